"""Verify on healthy repositories: exit codes, what is recorded (per snapshot in
snapmeta, per chunk in `verified`), --recheck-after, --sample determinism,
--set/--snapshot scoping. Damage is in test_corruption.py."""
from __future__ import annotations

import os
import random
import shutil
import threading

import pytest

from maint_helpers import (
    get_snapmeta, init_repo, make_tree, mutate_tree, opened, pit, pit_json, reachable, snap, write_file,
)
from store.errors import IndexMissing, InvalidArgument, RepositoryNotFound, SnapshotNotFound


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    repo = init_repo(str(d / "repo"))
    rng = random.Random(41)
    src = str(d / "src")
    make_tree(src, rng, nfiles=16, size_range=(5_000, 80_000))
    ids = [snap(repo, "a", [src]).hex]
    mutate_tree(src, rng, 4)
    ids.append(snap(repo, "a", [src]).hex)
    mutate_tree(src, rng, 4)
    ids.append(snap(repo, "a", [src]).hex)
    other = str(d / "other")
    write_file(os.path.join(other, "x.bin"), rng.randbytes(50_000))
    ids.append(snap(repo, "b", [other]).hex)
    return repo, ids


@pytest.fixture
def repo(base_repo, tmp_path):
    src, ids = base_repo
    dst = str(tmp_path / "repo")
    shutil.copytree(src, dst)
    return dst, ids


def chunks_of(repo, sid) -> set[bytes]:
    return {b for b, k in reachable(repo, sid).items() if k == "chunk"}


def verified_keys(repo) -> set[bytes]:
    with opened(repo) as r, r.reading() as txn:
        with txn.cursor(db=r.index.db["verified"]) as cur:
            return {bytes(k) for k in cur.iternext(keys=True, values=False)}


def clear_verified(repo) -> None:
    with opened(repo, readonly=False) as r:
        with r.index.env.begin(write=True) as txn:
            txn.drop(r.index.db["verified"], delete=False)


def test_clean_repo_exits_zero(repo):
    repo, ids = repo
    out, p = pit_json(repo, "verify")
    assert p.returncode == 0
    assert out["result"] == "good" and out["damage"] == [] and out["problems"] == []
    assert out["depth"] == "structural"
    assert len(out["snapshots"]) == 4
    assert out["chunks_read"] == 0  # structural reads trees, not chunks
    text = pit(repo, "verify").stdout.decode()
    assert "result: clean" in text


def test_deep_reads_every_chunk_and_records(repo):
    repo, ids = repo
    all_chunks = set().union(*(chunks_of(repo, s) for s in ids))
    out, _ = pit_json(repo, "verify", "--deep")
    assert out["result"] == "good"
    assert out["chunks"] == len(all_chunks)
    assert out["chunks_read"] == len(all_chunks)
    assert out["recorded"] is True
    assert verified_keys(repo) == all_chunks
    for sid in ids:
        v = get_snapmeta(repo, sid)["verify"]
        assert v["depth"] == "deep" and v["result"] == "good" and v["time"].endswith("Z")
    # recently verified chunks are skipped
    out, _ = pit_json(repo, "verify", "--deep", "--recheck-after", "3600")
    assert out["result"] == "good"
    assert out["chunks_read"] == 0
    assert out["chunks_skipped_recent"] == len(all_chunks)
    # 0 means: read them all again
    out, _ = pit_json(repo, "verify", "--deep", "--recheck-after", "0")
    assert out["chunks_read"] == len(all_chunks)


def test_next_older_snapshot_reads_only_what_it_does_not_share(repo):
    repo, ids = repo
    newest, older = ids[2], ids[1]
    out, _ = pit_json(repo, "verify", "--deep", "--snapshot", newest)
    assert out["chunks_read"] == len(chunks_of(repo, newest))
    assert len(out["snapshots"]) == 1
    out, _ = pit_json(repo, "verify", "--deep", "--snapshot", older, "--recheck-after", "3600")
    only_older = chunks_of(repo, older) - chunks_of(repo, newest)
    assert only_older, "the fixture should make the older snapshot own some chunks"
    assert out["chunks_read"] == len(only_older)
    assert out["chunks_skipped_recent"] == len(chunks_of(repo, older) & chunks_of(repo, newest))
    assert get_snapmeta(repo, older)["verify"]["result"] == "good"
    assert "verify" not in get_snapmeta(repo, ids[0])  # not chosen, not recorded


def test_structural_verify_records_depth(repo):
    repo, ids = repo
    pit(repo, "verify", "--set", "b")
    assert get_snapmeta(repo, ids[3])["verify"]["depth"] == "structural"
    assert "verify" not in get_snapmeta(repo, ids[0])


def test_scope_by_set_and_snapshot(repo):
    repo, ids = repo
    out, _ = pit_json(repo, "verify", "--set", "b", "--deep")
    assert len(out["snapshots"]) == 1 and out["snapshots"][0].startswith("b@")
    assert out["chunks_read"] == len(chunks_of(repo, ids[3]))
    out, _ = pit_json(repo, "verify", "--snapshot", ids[0][:10], "--snapshot", "a@latest")
    assert len(out["snapshots"]) == 2


def test_sample_is_deterministic_per_seed(repo):
    repo, ids = repo
    all_chunks = set().union(*(chunks_of(repo, s) for s in ids))
    out1, _ = pit_json(repo, "verify", "--sample", "30", "--seed", "7")
    k1 = verified_keys(repo)
    assert out1["depth"] == "sample"
    assert out1["chunks_read"] == len(k1)
    assert 0 < len(k1) < len(all_chunks)
    assert k1 <= all_chunks
    clear_verified(repo)
    out2, _ = pit_json(repo, "verify", "--sample", "30", "--seed", "7")
    assert verified_keys(repo) == k1 and out2["chunks_read"] == out1["chunks_read"]
    clear_verified(repo)
    pit_json(repo, "verify", "--sample", "30", "--seed", "8")
    k3 = verified_keys(repo)
    assert k3 and k3 != k1  # another seed, another subset
    clear_verified(repo)
    pit_json(repo, "verify", "--sample", "100", "--seed", "8")
    assert verified_keys(repo) == all_chunks


def test_could_not_run_exit_codes(repo, tmp_path):
    repo, ids = repo
    p = pit(repo, "verify", "--deep", "--sample", "10", expect=InvalidArgument.exit_code)
    assert b"pit: error:" in p.stderr
    pit(str(tmp_path / "nowhere"), "verify", expect=RepositoryNotFound.exit_code)
    pit(repo, "verify", "--snapshot", "ffffffff", expect=SnapshotNotFound.exit_code)
    shutil.rmtree(os.path.join(repo, "index"))
    p = pit(repo, "verify", expect=IndexMissing.exit_code)
    assert b"repair" in p.stderr
    for code in (RepositoryNotFound.exit_code, SnapshotNotFound.exit_code, IndexMissing.exit_code):
        assert code >= 10


def test_verify_api_report(repo):
    from store.verify import verify

    repo, ids = repo
    with opened(repo) as r:
        rep = verify(r, depth="deep", record=False)
    assert rep.clean and rep.to_json()["result"] == "good"
    assert rep.chunks_read == rep.chunks
    assert verified_keys(repo) == set()  # record=False writes nothing


def test_locked_repository_is_not_reported_as_damage(repo):
    """Verify records its results under the writer lock. If another writer holds the
    lock past the wait, that is not damage: exit 0 (results unrecorded) or an exit
    of 10 and up (could not run), never 3."""
    import fcntl
    import json

    repo, ids = repo
    fd = os.open(os.path.join(repo, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        p = pit(repo, "verify", "--json", expect=None, timeout=120)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert p.returncode == 0 or p.returncode >= 10, (
        f"verify of a healthy but locked repository exited {p.returncode}: "
        f"{json.loads(p.stdout).get('problems') if p.stdout.strip() else p.stderr.decode()}")


def _descendants(pid: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_a_worker_soon() -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs the first worker process (spawned by
    store.workers) of this process as soon as one appears; the list gets its pid."""
    import signal
    import time

    killed: list[int] = []

    def is_worker(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"spawn_main" in f.read()
        except OSError:
            return False

    def run() -> None:
        for _ in range(6000):
            kids = [k for k in _descendants(os.getpid()) if is_worker(k)]
            if kids:
                os.kill(kids[0], signal.SIGKILL)
                killed.append(kids[0])
                return
            time.sleep(0.002)

    t = threading.Thread(target=run)
    t.start()
    return t, killed


def test_sigkilled_verify_leaves_no_worker_processes(repo):
    """The deep check's worker processes die with the verify that started them."""
    import signal
    import subprocess
    import sys

    from replicator.waiting import poll_until

    script = (
        "import sys, time\n"
        "import store.verify as V\n"
        "from store.repository import Repository\n"
        "V.PARALLEL_MIN = 0\n"
        "finish = V._DeepCheck.finish\n"
        "def slow(self):\n"
        "    print('workers started', flush=True); time.sleep(60); return finish(self)\n"
        "V._DeepCheck.finish = slow\n"
        "V.verify(Repository(sys.argv[1]), depth='deep')\n"
    )
    path, _ids = repo
    p = subprocess.Popen([sys.executable, "-c", script, path], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"workers started\n"
        kids = poll_until(lambda: (k := _descendants(p.pid)) and len(k) >= 2 and k, 30, "worker processes")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    poll_until(lambda: not any(map(_alive, kids)), 30, "the workers to exit")


def test_no_worker_processes_still_verifies(repo, monkeypatch):
    from store import verify as V
    from store.errors import StoreError

    def refuse(*_a, **_k):
        raise StoreError("cannot start worker processes: [Errno 38] Function not implemented")

    monkeypatch.setattr(V, "PARALLEL_MIN", 0)
    monkeypatch.setattr(V, "process_pool", refuse)
    path, _ids = repo
    with opened(path) as r:
        rep = V.verify(r, depth="deep", record=False)
    assert rep.clean and rep.chunks_read == rep.chunks > 0
    assert any("checking in this process" in n for n in rep.notes)


def test_a_killed_verify_worker_is_a_one_line_error(tmp_path, monkeypatch):
    """A deep-check worker that dies (OOM killer) makes verify report that it
    could not run, promptly, rather than hang or report damage."""
    from store import verify as V
    from store.errors import StoreError

    rng = random.Random(8)
    repo = init_repo(str(tmp_path / "repo"))
    src = str(tmp_path / "src")
    make_tree(src, rng, nfiles=60, size_range=(200_000, 400_000))
    snap(repo, "a", [src])
    monkeypatch.setattr(V, "PARALLEL_MIN", 0)
    t, killed = kill_a_worker_soon()
    with opened(repo) as r:
        try:
            rep = V.verify(r, depth="deep", record=False)
        except StoreError as exc:  # killed while checking
            assert "verify worker died" in str(exc)
        else:  # killed while starting: checked in this process instead
            assert rep.clean and any("checking in this process" in n for n in rep.notes), rep.notes
    t.join()
    assert killed
