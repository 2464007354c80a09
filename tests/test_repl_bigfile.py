"""A 64 KiB change inside a 512 MiB file ships bytes proportional to the change, not to the file.

The file is written streamed (1 MiB at a time, never whole in memory). Two variants:

* `repeating` (every run): a random 1 MiB block written 512 times. Content-defined chunk
  boundaries repeat with it, so seeding ships ~1 MiB of chunk data (plus the 512 MiB file's
  list of ~32,000 chunk references, ~1.2 MB), and the test stays quick; the change itself is
  fresh random data, exactly as in the random variant.
* `random` (`-m slow`): 512 MiB of random data, all of it seeded over the wire.

The bound: the bytes on the wire are the new chunks (64 KiB and the chunks the change cuts into on
either side: 2 average chunks of 16 KiB on average, at most 2 maximum chunks of 64 KiB) plus under
16 KiB of metadata. Sending the file's whole chunk list again would alone cost ~1.2 MB.
"""
from __future__ import annotations

import json
import os

import pytest

from test_repl_helpers import cluster, wait_for  # noqa: F401  (cluster: the fixture)
from store.apply import head_root
from store.objects import ObjectReader
from store.repository import Repository

MIB = 1024 * 1024
SIZE = 512 * MIB


def sent(c) -> int:
    return json.loads(c.primary.ctl("status", "--local").stdout)["sets"]["web"]["replicas"]["r1"]["bytes_sent"]


def replica_entry(repo_path: str, path: str):
    repo = Repository(repo_path, readonly=True)
    try:
        with repo.reading() as txn:
            root = head_root(repo, txn, "web")
            return ObjectReader(repo, txn).lookup(root, path) if root is not None else None
    finally:
        repo.close()


def chunks_of(path: str) -> list[tuple[bytes, int]]:
    """The file chunked here as the master does (streamed): [(BLAKE3 id, length)]."""
    import blake3

    from store.chunker import ChunkerParams, chunk_stream

    with open(path, "rb") as f:
        return [(blake3.blake3(v).digest(), len(v)) for v in chunk_stream(f, ChunkerParams.for_average(16384))]


def same_file(r, rel: str, chunks: list) -> bool:
    """The replica's file equals the master's: every chunk id (BLAKE3 of its bytes, checked by the
    replica on receipt) equal to the replica's list, in order."""
    e = replica_entry(r.repo, rel)
    repo = Repository(r.repo, readonly=True)
    try:
        with repo.reading() as txn:
            cl = ObjectReader(repo, txn).chunk_list(e)
    finally:
        repo.close()
    return list(zip(cl.ids, cl.lengths)) == chunks


# CI keeps the 32 MiB variant (tests/test_repl_e2e.py); both 512 MiB ones run under -m slow
@pytest.mark.parametrize("kind", [pytest.param("repeating", marks=pytest.mark.slow),
                                  pytest.param("random", marks=pytest.mark.slow)])
def test_64k_change_in_512m_file(cluster, kind):
    c = cluster(replicas=1)
    big = f"{c.src}/vm.img"
    block = os.urandom(MIB)
    with open(big, "wb") as f:
        for _ in range(SIZE // MIB):
            f.write(block if kind == "repeating" else os.urandom(MIB))
    c.start()
    r = c.replicas[0]
    e = wait_for(lambda: (lambda e: e if e is not None and e.size == SIZE else None)(replica_entry(r.repo, "data/vm.img")),
                 900 if kind == "random" else 300, "seeding 512 MiB", interval=0.5)
    before = chunks_of(big)
    assert same_file(r, "data/vm.img", before)
    seeded = sent(c)
    if kind == "random":
        assert seeded > SIZE * 0.95

    with open(big, "r+b") as f:
        f.seek(SIZE // 2 + 12345)
        f.write(os.urandom(64 * 1024))
    wait_for(lambda: replica_entry(r.repo, "data/vm.img").content != e.content, 300, "the 64 KiB change",
             interval=0.5)
    after = chunks_of(big)
    assert same_file(r, "data/vm.img", after)
    wait_for(lambda: sent(c) > seeded, 30, "the byte counter")
    delta = sent(c) - seeded
    # The chunks the change created: 64 KiB and the chunks it cut into on either side (at most
    # one maximum-size chunk, 64 KiB, each side; 16 KiB each on average).
    new_bytes = sum(n for cid, n in set(after) - set(before))
    assert 64 * 1024 <= new_bytes <= 3 * 64 * 1024, new_bytes
    # On the wire: those chunks (random: incompressible) plus metadata, never the file's list again.
    assert delta < new_bytes + 16 * 1024, (delta, new_bytes)
    print(f"512 MiB file ({kind}), 64 KiB changed: {new_bytes} bytes of new chunks, {delta} bytes on the wire")
