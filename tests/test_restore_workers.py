"""Restores whose file contents are written by worker processes (store/restore.py).

The threshold is lowered so that small trees take that path; the result is
held to the source itself (names, bytes, modes, mtimes of files and
directories, owners), in plain and in sync mode, and to the same failure
behaviour as the in-process path: a damaged chunk is a clear error and no
half-written file is left behind.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import init_repo, make_tree, opened, pit_env, rand_bytes, snapshot, tree_digest
from replicator.waiting import poll_until
from store import restore as R
from store.errors import IntegrityError, StoreError
from store.objects import ObjectReader
from store.snapshots import resolve

SPEC = {
    "big.bin": rand_bytes(3_000_000, "big"),
    "empty": b"",
    "d": {f"f{i:02}.txt": b"file %d\n" % i * (i * 50) for i in range(40)},
    "deep": {"a": {"b": {"c": {"x.bin": rand_bytes(200_000, "x")}}}, "e": {}},
}


@pytest.fixture
def in_workers(monkeypatch):
    """Every restore in the test writes its files from worker processes; the
    list collects the files written in this process instead."""
    here = []
    real = R.Restorer._write_here
    monkeypatch.setattr(R.Restorer, "_write_here", lambda self, job: here.append(job.entry.name) or real(self, job))
    monkeypatch.setattr(R, "POOL_AFTER", 0)
    return here


def restore_to(repo, target, spec="s@latest", sync=False, path="src"):
    with opened(repo, readonly=True) as r, r.reading() as txn:
        reader = ObjectReader(r, txn)
        entry = reader.lookup(resolve(r, txn, spec).root, path)
        if sync:
            entry = dataclasses.replace(entry, name=b"")
        return R.Restorer(reader, sync=sync).restore(entry, str(target))


def test_worker_restore_equals_the_source(tmp_path, in_workers):
    src = tmp_path / "src"
    make_tree(src, SPEC)
    os.chmod(src / "d" / "f03.txt", 0o640)
    repo = init_repo(tmp_path / "repo")
    snapshot(repo, "s", src)
    st = restore_to(repo, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert sorted(in_workers) == [b"empty", b"f00.txt"], "only the empty files should be written here"
    assert st.files == 43 and st.bytes == sum(os.path.getsize(os.path.join(d, f))
                                              for d, _, fs in os.walk(src) for f in fs)
    assert not [n for _, _, fs in os.walk(tmp_path / "out") for n in fs if n.startswith(".pit-")]


def test_worker_sync_restore_rewrites_only_what_differs(tmp_path, in_workers):
    src, live = tmp_path / "src", tmp_path / "live"
    make_tree(src, SPEC)
    repo = init_repo(tmp_path / "repo")
    snapshot(repo, "s", src)
    shutil.copytree(src, live, symlinks=True)
    (live / "d" / "f01.txt").write_bytes(b"changed locally")
    (live / "stray.tmp").write_bytes(b"not in the image")
    os.makedirs(live / "deep" / "a" / "strays")
    st = restore_to(repo, live, sync=True)
    assert tree_digest(live) == tree_digest(src)
    assert st.removed == 2
    assert st.files == 1 and st.unchanged == 42


def test_damaged_chunk_in_a_worker_is_an_error_and_leaves_no_partial_file(tmp_path, in_workers):
    from maint_helpers import all_blobs, file_chunks, flip_byte, pack_path
    from store import packs as P

    src = tmp_path / "src"
    make_tree(src, SPEC)
    repo = init_repo(tmp_path / "repo")
    s = snapshot(repo, "s", src)
    cid = file_chunks(repo, s.hex, "src/big.bin")[5]
    e = all_blobs(repo)[cid]
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 10)
    with pytest.raises(IntegrityError, match=cid.hex()[:16]):
        restore_to(repo, tmp_path / "out")
    left = [n for _, _, fs in os.walk(tmp_path / "out") for n in fs]
    assert "big.bin" not in left
    assert not [n for n in left if n.startswith(".pit-")], left


def test_no_worker_processes_still_restores(tmp_path, in_workers, monkeypatch):
    def refuse(*_a, **_k):
        raise StoreError("cannot start worker processes: [Errno 38] Function not implemented")

    monkeypatch.setattr(R, "process_pool", refuse)
    src = tmp_path / "src"
    make_tree(src, SPEC)
    repo = init_repo(tmp_path / "repo")
    snapshot(repo, "s", src)
    restore_to(repo, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert len(in_workers) == 43


def test_sigkilled_restore_leaves_no_worker_processes(tmp_path):
    from test_verify import _alive, _descendants

    src = tmp_path / "src"
    make_tree(src, {f"f{i}.bin": rand_bytes(2_000_000, f"f{i}") for i in range(6)})
    repo = init_repo(tmp_path / "repo")
    snapshot(repo, "s", src)
    script = (
        "import sys, time\n"
        "import store.restore as R\n"
        "R.POOL_AFTER = 0\n"
        "done = R.Restorer._done\n"
        "def slow(self, job):\n"
        "    print('workers started', flush=True); time.sleep(60); return done(self, job)\n"
        "R.Restorer._done = slow\n"
        "from store.cli import main\n"
        "sys.argv = ['pit'] + sys.argv[1:]\n"
        "main()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script, "--repo", repo, "restore", "s@latest", "--target",
                          str(tmp_path / "out")], stdout=subprocess.PIPE, env=pit_env())
    try:
        assert p.stdout.readline() == b"workers started\n"
        kids = poll_until(lambda: (k := _descendants(p.pid)) and len(k) >= 2 and k, 30, "worker processes")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    poll_until(lambda: not any(map(_alive, kids)), 30, "the workers to exit")
