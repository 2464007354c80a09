"""Frame sizes: a file whose chunk list does not fit one frame, a directory whose listing does not.

Every frame is at most `protocol.MAX_FRAME` bytes (16 MiB). A file's chunk list travels as
[id, length] pairs of ~38 bytes, so one CHANGES frame held at most ~440,000 chunk references
(~6.9 GiB of new content at 16 KiB average): a bigger file never replicated (FrameTooLarge).
The master now sends the leading part of such a list in OPS frames before the CHANGES frame
that finishes it, and the replica commits the joined list at once.

The end-to-end test lowers the limit (PIT_MAX_FRAME=128 KiB, both agents) instead of using
GiB of data: an 80 MiB file (~5,000 chunks, ~190 KB of references) then needs several frames,
and a directory of 3,000 files needs several LIST/LISTING frames.
"""
from __future__ import annotations

import json
import os
import signal

import msgpack
import pytest

from replicator.errors import FrameTooLarge, ProtocolError
from replicator.stream import changes as M
from replicator.stream import protocol as W
from replicator.stream.replica import check_ops, parse_change
from test_repl_helpers import cluster, read_tree, replica_snapshots, small_frames, wait_for, write  # noqa: F401  (fixtures)


def refs(n: int, seed: int = 0) -> list:
    return [[seed.to_bytes(4, "big") + i.to_bytes(28, "big"), 16384 + i % 7] for i in range(n)]


def test_one_frame_limit_of_a_chunk_list():
    """The premise: one change carrying a few hundred thousand chunk references is over the frame limit."""
    per_ref = len(msgpack.packb(refs(1000), use_bin_type=True)) / 1000
    limit = int(W.MAX_FRAME / per_ref)
    assert 400_000 < limit < 480_000, limit  # about 6.9 GiB of chunks at 16 KiB average
    change = {"p": b"data/vm.img", "e": [1, 0o644, 0, 0, 0], "base": None, "ops": [[1, refs(limit + 1000)]],
              "size": 0}
    with pytest.raises(FrameTooLarge):
        W.encode({"t": "changes", "seq": 1, "changes": [change]})


def test_split_ops_pieces_fit_and_join_back():
    ops = [[0, 0, 10], [1, refs(120_000, 1)], [0, 500, 3], [1, refs(90_000, 2)], [0, 9000, 1]]
    budget = W.MAX_FRAME // 2
    pieces = M.split_ops(ops, budget)
    assert len(pieces) >= 2
    for piece in pieces:
        assert len(W.encode({"t": "ops", "p": b"data/x", "ops": piece})) <= budget
        check_ops(piece, True)
    # joined, the pieces are the same list of references and keeps, in order
    flat = lambda os_: [r for op in os_ for r in (op[1] if op[0] == 1 else [tuple(op)])]  # noqa: E731
    assert flat([op for piece in pieces for op in piece]) == flat(ops)
    # the estimate is an upper bound of the real size
    c = {"p": b"data/x", "e": [1, 0o644, 0, 0, 0], "base": b"b" * 32, "ops": ops, "size": 1}
    assert M.change_bytes(c) >= len(msgpack.packb(c, use_bin_type=True))


def test_keep_op_without_base_is_refused_even_when_split():
    with pytest.raises(ProtocolError):
        parse_change({"p": b"a", "e": [1, 0o644, 0, 0, 0], "base": None, "ops": [[0, 0, 1]], "size": 1})
    with pytest.raises(ProtocolError):
        check_ops([[1, [[b"x" * 31, 10]]]], True)


def status(node):
    return json.loads(node.ctl("status", "--local").stdout)


@pytest.mark.slow  # ~60 s end to end; the splitting and joining are unit-tested above
def test_big_chunk_list_and_big_directory_in_small_frames(small_frames):  # noqa: F811
    c = small_frames(replicas=1)
    big = f"{c.src}/vm.img"
    size = 80 * 1024 * 1024
    with open(big, "wb") as f:  # streamed, never whole in memory
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    for i in range(3000):  # one directory whose listing needs several frames
        write(f"{c.src}/many/file-with-a-longish-name-{i:05d}.txt", b"%d\n" % i)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 180, "seeding through 128 KiB frames")
    st = status(c.primary)["sets"]["web"]["replicas"]["r1"]
    assert st["ops_frames"] >= 1, st  # the big file's list did not fit one frame

    # A change in the middle and an append; then a change while the master is down (catch-up).
    with open(big, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(64 * 1024))
    write(big, os.urandom(3 * 1024 * 1024), "ab")
    wait_for(lambda: c.converged(r), 120, "the change")

    c.primary.kill(signal.SIGKILL)
    with open(big, "r+b") as f:
        f.seek(1000)
        f.write(b"changed while the master was down")
    os.remove(f"{c.src}/many/file-with-a-longish-name-00007.txt")
    c.primary.start()
    wait_for(lambda: c.converged(r), 180, "catch-up through 128 KiB frames")
    out = c.primary.ctl("point", "--set", "web").stdout
    assert "r1" in out
    assert replica_snapshots(r.repo, "web")[-1][1] == read_tree(c.src)
