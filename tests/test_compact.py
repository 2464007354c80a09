"""Compaction: rewrite the live frames of packs with garbage, delete the old
packs, and never delete a pack that a reader on an older LMDB view still needs."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import pytest

from maint_helpers import (
    ROOT, all_blobs, assert_verify_clean, file_chunks, init_repo, make_tree, opened, open_pack_number,
    pack_entries, pack_files, pack_path, packs_bytes, pit, pit_env, pit_json, restore_digest, snap,
    snapshot_ids, source_digest, write_file,
)
from store.errors import InvalidArgument


def history_with_garbage(tmp_path, seed=31, rewrite=18):
    """Two snapshots whose second rewrites most files, so dropping the first frees
    most of the first packs. 1 MiB packs: several are sealed."""
    repo = init_repo(str(tmp_path / "repo"), pack_mib=1)
    rng = random.Random(seed)
    src = str(tmp_path / "src")
    files = make_tree(src, rng, nfiles=24, size_range=(60_000, 140_000))
    old_file = os.path.relpath(files[0], os.path.dirname(src))  # src/f000.bin
    old_bytes = open(files[0], "rb").read()
    a = snap(repo, "s", [src])
    da = source_digest(src)
    for p in files[:rewrite]:
        write_file(p, rng.randbytes(rng.randint(60_000, 140_000)))
    b = snap(repo, "s", [src])
    db = source_digest(src)
    write_file(os.path.join(src, "late.bin"), rng.randbytes(50_000))
    c = snap(repo, "s", [src])
    dc = source_digest(src)
    return repo, src, (a.hex, b.hex, c.hex), {a.hex: da, b.hex: db, c.hex: dc}, old_file, old_bytes


def test_compact_after_drop_reclaims_space_and_restores(tmp_path):
    repo, _, (a, b, c), digests, _, _ = history_with_garbage(tmp_path)
    assert sum(1 for pe in pack_entries(repo).values() if pe.sealed) >= 2
    pit(repo, "forget", "--set", "s", a)
    open_no = open_pack_number(repo)
    with_garbage = [n for n, pe in pack_entries(repo).items() if pe.dead and n != open_no]
    assert len(with_garbage) >= 2
    before = packs_bytes(repo)
    garbage = sum(pe.dead for pe in pack_entries(repo).values())
    assert garbage > 0

    out, _ = pit_json(repo, "compact", "--threshold", "0")
    assert out["packs_compacted"] >= 2
    assert out["bytes_reclaimed"] == garbage
    assert out["packs_deleted"] == out["packs_compacted"]
    assert out["packs_waiting"] == 0 and out["damaged"] == []
    for num in with_garbage:
        assert not os.path.exists(pack_path(repo, num)), "a compacted pack was left behind"
    after = packs_bytes(repo)
    assert after < before - garbage // 2, (before, after, garbage)

    # every remaining pack other than the open one is garbage-free now
    open_no = open_pack_number(repo)
    for num, pe in pack_entries(repo).items():
        if num != open_no:
            assert pe.dead == 0, (num, pe)
    # every indexed blob points into a pack that exists
    files = pack_files(repo)
    for bid, e in all_blobs(repo).items():
        assert os.path.basename(pack_path(repo, e.pack)) in files

    assert_verify_clean(repo, deep=True)
    for sid in (b, c):
        assert restore_digest(repo, sid) == digests[sid]
    again, _ = pit_json(repo, "compact", "--threshold", "0")
    assert again["packs_compacted"] == 0 and again["packs_deleted"] == 0
    # and the repository keeps working
    s = snap(repo, "s", [str(tmp_path / "src")])
    assert restore_digest(repo, s.hex) == digests[c]
    assert_verify_clean(repo)


def test_threshold_leaves_packs_with_little_garbage(tmp_path):
    repo, src, (a, b, c), digests, _, _ = history_with_garbage(tmp_path, seed=32, rewrite=1)
    pit(repo, "forget", "--set", "s", a)  # one file's old content becomes garbage
    ratios = {n: pe.dead / (pe.live + pe.dead) for n, pe in pack_entries(repo).items() if pe.live + pe.dead}
    assert 0 < max(ratios.values()) < 0.25, ratios
    files_before = pack_files(repo)
    out, _ = pit_json(repo, "compact")  # default threshold 25 %
    assert out["packs_compacted"] == 0
    assert pack_files(repo) == files_before
    out, _ = pit_json(repo, "compact", "--threshold", "0")
    assert out["packs_compacted"] >= 1
    assert_verify_clean(repo, deep=True)
    for sid in (b, c):
        assert restore_digest(repo, sid) == digests[sid]


def test_max_seconds_zero_does_no_work(tmp_path):
    repo, _, (a, b, c), digests, _, _ = history_with_garbage(tmp_path, seed=33)
    pit(repo, "forget", "--set", "s", a)
    files_before = pack_files(repo)
    out, _ = pit_json(repo, "compact", "--threshold", "0", "--max-seconds", "0")
    assert out["packs_compacted"] == 0
    assert pack_files(repo) == files_before
    assert_verify_clean(repo)


@pytest.mark.parametrize("t", ["-0.1", "1.5"])
def test_bad_threshold_refused(tmp_path, t):
    repo = init_repo(str(tmp_path / "repo"))
    p = pit(repo, "compact", "--threshold", t, expect=(1, InvalidArgument.exit_code))
    assert b"pit: error:" in p.stderr


READER = r"""
import hashlib, sys
from store.repository import Repository
from store.objects import ObjectReader, iter_file_chunks
from store.snapshots import get_snapshot
repo = Repository(sys.argv[1], readonly=True)
txn = repo.index.read()
s = get_snapshot(repo, txn, bytes.fromhex(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()
r = ObjectReader(repo, txn)
e = r.lookup(s.root, sys.argv[3])
print(hashlib.sha256(b"".join(iter_file_chunks(r, e))).hexdigest(), flush=True)
sys.stdin.readline()
txn.abort()
repo.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_reader_in_other_process_keeps_retired_pack(tmp_path):
    """A reader (think: a WebDAV client streaming a file) holds an LMDB view from
    before the drop; compaction in another process must not delete the packs
    that view points into, and the reader gets the right bytes."""
    repo, _, (a, b, c), digests, old_file, old_bytes = history_with_garbage(tmp_path, seed=34)
    chunk_packs = {all_blobs(repo)[cid].pack for cid in file_chunks(repo, a, old_file)}
    open_no = open_pack_number(repo)
    assert chunk_packs - {open_no}, "the old file should live in a sealed pack"
    reader = subprocess.Popen([sys.executable, "-c", READER, repo, a, old_file], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pit_env(), cwd=ROOT)
    try:
        assert reader.stdout.readline().strip() == b"ready"
        pit(repo, "forget", "--set", "s", a)
        out, _ = pit_json(repo, "compact", "--threshold", "0")
        assert out["packs_compacted"] >= 1
        assert out["packs_waiting"] >= 1
        for num in chunk_packs - {open_no}:
            assert os.path.exists(pack_path(repo, num)), "compaction deleted a pack an older reader needs"
        # the repository is consistent meanwhile (a waiting pack is not a stray pack)
        assert_verify_clean(repo, deep=True)
        assert restore_digest(repo, b) == digests[b]
        # the old reader reads the dropped snapshot's file, correctly
        reader.stdin.write(b"go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip().decode() == hashlib.sha256(old_bytes).hexdigest()
        # a compaction while the reader still holds its view deletes nothing it needs
        out, _ = pit_json(repo, "compact", "--threshold", "0")
        for num in chunk_packs - {open_no}:
            assert os.path.exists(pack_path(repo, num))
        reader.stdin.write(b"close\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == b"closed"
        out, _ = pit_json(repo, "compact", "--threshold", "0")
        assert out["packs_deleted"] >= 1 and out["packs_waiting"] == 0
        for num in chunk_packs - {open_no}:
            assert not os.path.exists(pack_path(repo, num)), "the retired pack was never deleted"
    finally:
        try:
            reader.stdin.close()
        except OSError:
            pass
        reader.wait(timeout=30)
    assert reader.returncode == 0, reader.stderr.read().decode()
    assert_verify_clean(repo, deep=True)
    for sid in (b, c):
        assert restore_digest(repo, sid) == digests[sid]


def test_reader_in_this_process_keeps_retired_pack(tmp_path):
    from store.objects import ObjectReader, iter_file_chunks
    from store.snapshots import get_snapshot

    repo, _, (a, b, c), digests, old_file, old_bytes = history_with_garbage(tmp_path, seed=35)
    chunk_packs = {all_blobs(repo)[cid].pack for cid in file_chunks(repo, a, old_file)} - {open_pack_number(repo)}
    assert chunk_packs
    with opened(repo) as r:
        with r.reading() as txn:
            s = get_snapshot(r, txn, bytes.fromhex(a))
            pit(repo, "forget", "--set", "s", a)
            out, _ = pit_json(repo, "compact", "--threshold", "0")
            assert out["packs_waiting"] >= 1
            assert all(os.path.exists(pack_path(repo, n)) for n in chunk_packs)
            rd = ObjectReader(r, txn)
            data = b"".join(iter_file_chunks(rd, rd.lookup(s.root, old_file)))
            assert data == old_bytes
        # the read transaction is over: the next compaction may delete
        out, _ = pit_json(repo, "compact", "--threshold", "0")
        assert out["packs_waiting"] == 0
        assert not any(os.path.exists(pack_path(repo, n)) for n in chunk_packs)
    assert snapshot_ids(repo) == [b, c]
    assert_verify_clean(repo, deep=True)
