"""Snapshots made in worker processes (store/segments.py, store/workers.py).

A big snapshot reads, chunks, hashes and compresses files segment by segment
in worker processes. These tests force that path on small data (the
threshold and the segment size are lowered) and hold it to the result of the
in-process path: the same chunks, the same trees, so the same root tree id,
and byte-identical restores; plus SIGKILL mid-snapshot with workers running.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import (init_repo, list_snaps, make_tree, opened, pit_env, rand_bytes, restore, run_pit, snapshot,
                      tree_digest)
from replicator.waiting import poll_until
from store import ingest
from store.chunker import ChunkerParams, chunk_stream
from store.segments import Segment, read_segment

KiB = 1024


@pytest.fixture
def in_workers(monkeypatch):
    """Call it to run every later snapshot of the test in worker processes,
    with 256 KiB segments; it returns the segments read in this process."""
    def enable() -> list:
        here: list = []
        real = ingest.read_segment
        monkeypatch.setattr(ingest, "read_segment", lambda *a, **k: here.append(a) or real(*a, **k))
        monkeypatch.setattr(ingest, "POOL_AFTER", 0)
        monkeypatch.setattr(ingest, "SEGMENT_BYTES", 256 * KiB)
        monkeypatch.setattr(ingest, "MAIN_READS_UP_TO", 0)  # only processes read, whatever the cores
        return here
    return enable


def tree(root, rnd: random.Random) -> None:
    base = rand_bytes(3_000_000, "big")
    make_tree(root, {
        "big.bin": base,
        "big-copy.bin": base,  # the same chunks again: stored once
        "db.pages": b"".join(rand_bytes(8192, f"page{i % 40}") for i in range(300)),  # repeating pages
        "text": {f"f{i:03}.txt": b"line of file %d\n" % i * rnd.randint(0, 400) for i in range(60)},
        "empty": b"",
    })


def test_segments_cut_like_one_pass(tmp_path):
    """Chunking restarts at every cut, so a file read segment by segment gets
    exactly the chunks of one pass, whatever the segment size."""
    import zstandard

    p = tmp_path / "f"
    data = rand_bytes(2_000_000, "seg") + b"\0" * 300_000 + rand_bytes(700_000, "seg2")
    p.write_bytes(data)
    params = ChunkerParams.for_average(16 * KiB)
    with open(p, "rb") as f:
        want = [bytes(v) for v in chunk_stream(f, params)]
    cctx = zstandard.ZstdCompressor(level=3)
    for limit in (1, 50 * KiB, 256 * KiB, 10 * 1024 * KiB):
        got_lens, start, hops = [], 0, 0
        while True:
            res = read_segment(Segment(os.fsencode(p), start, len(data) - start), params, cctx, lambda h: False, limit)
            assert res.error is None
            got_lens += res.lens
            hops += 1
            if res.end is None:
                break
            start = res.end
        assert got_lens == [len(c) for c in want], f"segments of {limit} bytes cut elsewhere"
        assert (hops > 1) == (limit < len(data))


def test_snapshot_in_workers_is_the_snapshot_made_here(tmp_path, in_workers):
    src = tmp_path / "src"
    tree(src, random.Random(3))
    here_repo = init_repo(tmp_path / "here")
    a = snapshot(here_repo, "s", src)

    here = in_workers()
    pool_repo = init_repo(tmp_path / "pool")
    b = snapshot(pool_repo, "s", src)
    assert not here, "every segment should have been read by a worker process"

    assert b.root == a.root  # content addressed: the same chunks, lists and trees
    for k in ("new_chunks", "new_bytes", "new_stored", "files", "bytes", "files_read"):
        assert b.stats[k] == a.stats[k], k
    restore(pool_repo, b.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert run_pit(pool_repo, "verify", "--deep").returncode == 0


def test_reader_plan():
    assert ingest.reader_plan(3) == (3, False)  # asked for: processes only
    cores = os.cpu_count() or 2
    assert ingest.reader_plan(None) == ((1, True) if cores <= ingest.MAIN_READS_UP_TO
                                        else (ingest.default_workers(), False))


def test_main_thread_reads_beside_one_worker(tmp_path, in_workers, monkeypatch):
    """On a small machine one worker process and the main thread share the
    segments (the worker still starting when the third task is ready, the
    main thread takes it); the snapshot is the one made here alone."""
    src = tmp_path / "src"
    tree(src, random.Random(6))
    a = snapshot(init_repo(tmp_path / "here"), "s", src)
    here = in_workers()
    monkeypatch.setattr(ingest, "MAIN_READS_UP_TO", 1 << 16)
    monkeypatch.setattr(ingest, "TASK_BYTES", 256 * KiB)
    repo = init_repo(tmp_path / "both")
    b = snapshot(repo, "s", src)
    assert here, "the main thread should have read some segments"
    assert b.root == a.root
    for k in ("new_chunks", "new_bytes", "new_stored", "files", "bytes", "files_read"):
        assert b.stats[k] == a.stats[k], k
    restore(repo, b.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert run_pit(repo, "verify", "--deep").returncode == 0


def test_second_snapshot_in_workers_stores_only_the_change(tmp_path, in_workers):
    """Workers look chunks up in the committed index: what the repository has
    is neither compressed nor shipped back, and the change costs one chunk or two."""
    src = tmp_path / "src"
    tree(src, random.Random(4))
    repo = init_repo(tmp_path / "repo")
    here = in_workers()
    snapshot(repo, "s", src)
    with open(src / "big.bin", "r+b") as f:
        f.seek(1_500_000)
        f.write(b"x" * 8192)
    s2 = snapshot(repo, "s", src)
    assert 1 <= s2.stats["new_chunks"] <= 4
    assert s2.stats["files_read"] == 1
    assert not here
    restore(repo, s2.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)


def test_unreadable_file_is_left_out_with_a_warning(tmp_path, monkeypatch):
    """A file that vanishes or cannot be read between the scan and its read is
    left out of the snapshot with a warning; the rest completes."""
    from store.segments import SegmentResult

    src = tmp_path / "src"
    make_tree(src, {"a": {"ok.txt": b"fine\n", "gone.bin": rand_bytes(400_000, "g")}, "b.txt": b"b\n"})
    real = ingest.read_segment

    def failing(seg, *a, **k):
        return SegmentResult(error="Input/output error") if seg.path.endswith(b"gone.bin") else real(seg, *a, **k)

    monkeypatch.setattr(ingest, "read_segment", failing)
    repo = init_repo(tmp_path / "repo")
    s = snapshot(repo, "s", src)
    assert s.stats["skipped"] == 1
    assert any("gone.bin" in w and "Input/output error" in w for w in s.stats["warnings"])
    restore(repo, s.hex, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out" / "src" / "a")) == ["ok.txt"]
    assert run_pit(repo, "verify").returncode == 0


LAUNCH = (
    "import sys\n"
    "import store.ingest as I\n"
    "I.POOL_AFTER = 0\n"
    "I.SEGMENT_BYTES = 128 * 1024\n"
    "from store.cli import main\n"
    "sys.argv = ['pit'] + sys.argv[1:]\n"
    "main()\n"
)


def test_sigkill_while_workers_run_keeps_every_committed_snapshot(tmp_path):
    """SIGKILL of a snapshot whose files are being read by worker processes:
    earlier snapshots restore identically, no worker is left behind, and the
    next snapshot (in workers again) succeeds."""
    from test_crash import wait_for_lock
    from test_verify import _alive, _descendants

    rnd = random.Random(9)
    repo = init_repo(tmp_path / "repo", pack_size=1024 * 1024)
    src = tmp_path / "src"
    taken: dict[str, dict] = {}

    def pit_in_workers(*args):
        return subprocess.Popen([sys.executable, "-c", LAUNCH, "--repo", repo, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pit_env())

    kills = with_workers = 0
    for t in range(8):
        make_tree(src, {f"gen{t}.bin": rand_bytes(rnd.randint(1_000_000, 3_000_000), f"g{t}"),
                        f"small{t}": {f"f{i}": rand_bytes(rnd.randint(0, 9000), f"s{t}{i}") for i in range(30)}},
                  mtime=None)
        p = pit_in_workers("snapshot", "--set", "s", str(src))
        if wait_for_lock(repo, p):
            time.sleep(rnd.uniform(0.1, 0.6))  # start-up of the workers and their reads
            kids = _descendants(p.pid)
            p.send_signal(signal.SIGKILL)
            with_workers += len(kids) >= 2
            kills += p.wait() == -signal.SIGKILL
            poll_until(lambda: not any(map(_alive, kids)), 30, "the snapshot's workers to exit")
        else:
            p.wait()
        p = pit_in_workers("snapshot", "--set", "s", "--json", str(src))
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert b"Traceback" not in err
        taken[json.loads(out)["id"]] = tree_digest(src)
        listed = {s.hex for s in list_snaps(repo, "s")}
        assert set(taken) <= listed, "a committed snapshot was lost"
    assert kills >= 1 and with_workers >= 1, (kills, with_workers)
    for sid, digest in taken.items():
        out = tmp_path / "out" / sid
        restore(repo, sid, out)
        assert tree_digest(out / "src") == digest
    with opened(repo) as r:
        assert r.id
    assert run_pit(repo, "verify", "--deep").returncode == 0


def test_no_worker_processes_still_makes_the_snapshot(tmp_path, in_workers, monkeypatch):
    """Where processes cannot start (no /dev/shm, no sem_open) the snapshot is
    taken in this process, with a warning that says so."""
    from store.errors import StoreError

    src = tmp_path / "src"
    tree(src, random.Random(5))
    a = snapshot(init_repo(tmp_path / "a"), "s", src)
    here = in_workers()

    def refuse(*_a, **_k):
        raise StoreError("cannot start worker processes: [Errno 38] Function not implemented")

    monkeypatch.setattr(ingest, "process_pool", refuse)
    b = snapshot(init_repo(tmp_path / "b"), "s", src)
    assert b.root == a.root and here
    assert any("cannot start worker processes" in w for w in b.stats["warnings"])
    assert b.stats["skipped"] == 0


def test_a_worker_killed_mid_snapshot_fails_it_cleanly(tmp_path, in_workers):
    """A worker process that dies (OOM killer, SIGKILL) fails the snapshot with
    a one-line error; nothing is committed, earlier snapshots are intact and
    the next snapshot succeeds."""
    from store.errors import StoreError
    from test_verify import kill_a_worker_soon

    src = tmp_path / "src"
    make_tree(src, {"first.txt": b"first\n"})
    repo = init_repo(tmp_path / "repo")
    first = snapshot(repo, "s", src)
    make_tree(src, {f"big{i}.bin": rand_bytes(16_000_000, f"b{i}") for i in range(4)})
    in_workers()

    t, killed = kill_a_worker_soon()
    with pytest.raises(StoreError, match="worker process died"):
        snapshot(repo, "s", src)
    t.join()
    assert killed
    assert [s.hex for s in list_snaps(repo, "s")] == [first.hex]
    assert run_pit(repo, "verify").returncode == 0
    s2 = snapshot(repo, "s", src)
    restore(repo, s2.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)


def test_a_segment_reads_only_the_file_the_earlier_ones_read(tmp_path):
    """Each segment reopens the file by name: a file renamed over it in between
    (an editor's save, a log rotation) is noticed, a symlink is never followed."""
    import zstandard

    params = ChunkerParams.for_average(16 * KiB)
    cctx = zstandard.ZstdCompressor(level=3)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(rand_bytes(1_000_000, "A"))
    b.write_bytes(rand_bytes(1_000_000, "B"))
    first = read_segment(Segment(os.fsencode(a), 0, 1_000_000), params, cctx, lambda h: False, 100 * KiB)
    assert first.end and first.ident == (os.stat(a).st_dev, os.stat(a).st_ino)
    same = read_segment(Segment(os.fsencode(a), first.end, 0, first.ident), params, cctx, lambda h: False, 100 * KiB)
    assert not same.replaced and same.ids
    os.replace(b, a)
    other = read_segment(Segment(os.fsencode(a), first.end, 0, first.ident), params, cctx, lambda h: False)
    assert other.replaced and not other.ids
    os.symlink(a, tmp_path / "link")
    link = read_segment(Segment(os.fsencode(tmp_path / "link"), 0, 0), params, cctx, lambda h: False)
    assert link.error and not link.ids


def test_a_file_renamed_over_while_read_is_stored_whole_as_the_new_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_tree(src, {"log": rand_bytes(2_000_000, "old"), "other.txt": b"x\n"})
    new = tmp_path / "new-log"
    new.write_bytes(rand_bytes(1_500_000, "new"))
    monkeypatch.setattr(ingest, "SEGMENT_BYTES", 256 * KiB)
    real = ingest.read_segment

    def rotate_after_first(seg, *a, **k):
        res = real(seg, *a, **k)
        if seg.path.endswith(b"/log") and seg.start == 0 and new.exists():
            os.replace(new, src / "log")  # rotated between two segments of the file
        return res

    monkeypatch.setattr(ingest, "read_segment", rotate_after_first)
    repo = init_repo(tmp_path / "repo")
    s = snapshot(repo, "s", src)
    restore(repo, s.hex, tmp_path / "out")
    assert (tmp_path / "out" / "src" / "log").read_bytes() == rand_bytes(1_500_000, "new")
    assert run_pit(repo, "verify").returncode == 0


def test_worker_processes_that_cannot_start_mid_call(tmp_path, in_workers, monkeypatch):
    """On Python 3.11 the processes start in submit(): EAGAIN there (pids.max,
    RLIMIT_NPROC) means the snapshot goes on in this process."""
    class NoProcesses:
        def submit(self, *_a, **_k):
            raise BlockingIOError(11, "Resource temporarily unavailable")

        def shutdown(self, **_k):
            pass

    src = tmp_path / "src"
    tree(src, random.Random(6))
    a = snapshot(init_repo(tmp_path / "a"), "s", src)
    here = in_workers()
    monkeypatch.setattr(ingest, "process_pool", lambda *a, **k: NoProcesses())
    b = snapshot(init_repo(tmp_path / "b"), "s", src)
    assert b.root == a.root and here
    assert any("Resource temporarily unavailable" in w for w in b.stats["warnings"])


# ------------------------------------------------ frames spooled by the workers

def test_a_worker_spools_its_frames_and_hands_back_only_their_places(tmp_path):
    """With a spool directory a worker writes a task's frames to one file,
    back to back in chunk order, and returns where each lies instead of the
    bytes; the same frames, byte for byte, as it returns without one."""
    from store import segments

    src = tmp_path / "src"
    tree(src, random.Random(11))
    repo = init_repo(tmp_path / "repo")
    spool = tmp_path / "spool"
    spool.mkdir()
    params = ChunkerParams.for_average(16 * KiB)
    segs = [Segment(os.fsencode(src / n), 0, os.path.getsize(src / n)) for n in ("big.bin", "db.pages")]
    with opened(repo) as r:
        index_dir, spec = r.index_dir, r.codec.spec()
    runs = []
    for where in (None, str(spool)):
        segments.worker_init(index_dir, params, 3, 256 * KiB, spec, where)
        try:
            runs.append(segments.worker_run(segs))
        finally:
            segments._state.pop("index").close()
    plain, spooled = runs
    assert plain.spool is None and spooled.spool is not None
    data = open(spooled.spool, "rb").read()
    want = b""
    for a, b in zip(plain.results, spooled.results):
        assert a.ids == b.ids and b.frames == {}
        assert [i for i, *_ in b.spooled] == sorted(a.frames)
        assert b.spool_off == len(want)
        for i, flags, flen, stored, sid in b.spooled:
            fl, frame, st = a.frames[i]
            assert (flags, flen, stored, sid) == (fl, len(frame), st, frame[16:48])
            want += frame
    assert data == want


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_spooled_snapshots_equal_the_snapshot_made_here(tmp_path, in_workers, monkeypatch, seed):
    """Randomized (seeded; a failing seed becomes a case here): trees with
    content repeated within a file, across files and across segments in
    flight, tiny packs so that a spooled run is split over several, random
    segment and task sizes. The snapshot made through the workers' spools
    has the root tree, the new chunks and the stored bytes of the one made in
    this process, restores identically, verifies deep, and leaves no spool."""
    rnd = random.Random(seed)
    src = tmp_path / "src"
    pages = [rand_bytes(8192, f"p{seed}-{i}") for i in range(rnd.randint(3, 30))]
    spec: dict = {}
    for i in range(rnd.randint(2, 6)):
        kind = rnd.choice(["pages", "random", "copy", "text"])
        if kind == "pages" or (kind == "copy" and not spec):
            spec[f"f{i}"] = b"".join(rnd.choice(pages) for _ in range(rnd.randint(10, 300)))
        elif kind == "random":
            spec[f"f{i}"] = rand_bytes(rnd.randint(1, 2_500_000), f"r{seed}-{i}")
        elif kind == "copy":
            spec[f"f{i}"] = spec[rnd.choice(sorted(spec))]
        else:
            spec[f"f{i}"] = b"%d some text\n" % i * rnd.randint(0, 20_000)
    make_tree(src, spec)
    pack_size = rnd.choice([64 * KiB, 200 * KiB, 1024 * KiB])
    a = snapshot(init_repo(tmp_path / "here", pack_size=pack_size), "s", src)
    here = in_workers()
    monkeypatch.setattr(ingest, "SEGMENT_BYTES", rnd.choice([64, 256, 1024]) * KiB)
    monkeypatch.setattr(ingest, "TASK_BYTES", rnd.choice([128, 1024, 4096]) * KiB)
    repo = init_repo(tmp_path / "pool", pack_size=pack_size)
    b = snapshot(repo, "s", src)
    assert not here
    assert b.root == a.root, f"seed {seed}"
    for k in ("new_chunks", "new_bytes", "new_stored", "files", "bytes"):
        assert b.stats[k] == a.stats[k], (seed, k)
    assert os.listdir(os.path.join(repo, "tmp-ingest")) == []
    restore(repo, b.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert run_pit(repo, "verify", "--deep").returncode == 0


def test_a_writer_deletes_what_a_crash_left_spooled(tmp_path):
    """Only a writer's session makes spool files, so a new writer deletes
    any it finds (a SIGKILLed snapshot leaves its workers' last tasks)."""
    repo = init_repo(tmp_path / "repo")
    d = os.path.join(repo, "tmp-ingest")
    os.makedirs(d)
    for name in ("123-1", "123-2"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x" * 5000)
    with opened(repo) as r, r.writer():
        pass
    assert os.listdir(d) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs under the repository needs root (CI runs as root)")
def test_a_full_spool_fails_the_snapshot_and_changes_nothing(tmp_path, in_workers):
    """The disk under the spool filling up is a full disk, not an unreadable
    file: the snapshot fails (DiskFull, its own exit code on the CLI), no
    file is quietly left out, nothing is committed, no spool file stays."""
    from store.errors import DiskFull

    src = tmp_path / "src"
    make_tree(src, {"first.txt": b"first\n"})
    repo = init_repo(tmp_path / "repo")
    first = snapshot(repo, "s", src)
    make_tree(src, {f"big{i}.bin": rand_bytes(600_000, f"full{i}") for i in range(4)})
    d = os.path.join(repo, "tmp-ingest")
    os.makedirs(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", d], check=True)
    try:
        in_workers()
        with pytest.raises(DiskFull, match="spooling"):
            snapshot(repo, "s", src)
        assert os.listdir(d) == []
        p = subprocess.run([sys.executable, "-c", LAUNCH, "--repo", repo, "snapshot", "--set", "s", str(src)],
                           capture_output=True, env=pit_env(), timeout=120)
        err = p.stderr.decode()
        assert p.returncode == DiskFull.exit_code and "no space left" in err and "Traceback" not in err, err
        assert os.listdir(d) == []
    finally:
        subprocess.run(["umount", d], check=True)
    assert [s.hex for s in list_snaps(repo, "s")] == [first.hex]
    assert run_pit(repo, "verify", "--deep").returncode == 0
    s2 = snapshot(repo, "s", src)
    restore(repo, s2.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)


def test_no_source_file_is_open_once_a_snapshot_returns(tmp_path, monkeypatch):
    """The walk's prefetch thread (it opens files to ask the kernel to read them ahead) has finished
    when the snapshot returns: a source on a mount unmounted right after was once found busy. Here
    the prefetch is slowed down (a slow disk) so that it is still at work when the snapshot ends."""
    import threading

    real = ingest._willneed

    def slow(paths, stop):
        for p in paths:
            if stop.is_set():
                return
            time.sleep(0.005)
            real([p], stop)

    monkeypatch.setattr(ingest, "_willneed", slow)
    src = tmp_path / "src"
    make_tree(src, {f"d{j}": {f"f{i}": rand_bytes(3000, f"open{j}-{i}") for i in range(300)} for j in range(4)})
    repo = init_repo(tmp_path / "repo")
    snapshot(repo, "s", src)
    assert not [t for t in threading.enumerate() if t.name.startswith("pit-prefetch")]
    mine = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in mine if p.startswith(str(src))]


def test_without_a_spool_the_frames_travel_by_pipe_and_the_snapshot_is_the_same(tmp_path, in_workers):
    """Where `tmp-ingest/` cannot be made (here a file has its name), the workers hand their frames
    back in their results (the path before the spool): the same snapshot, with a warning that says why."""
    src = tmp_path / "src"
    tree(src, random.Random(21))
    a = snapshot(init_repo(tmp_path / "here"), "s", src)
    here = in_workers()
    repo = init_repo(tmp_path / "pipe")
    with open(os.path.join(repo, "tmp-ingest"), "wb") as f:
        f.write(b"not a directory")
    b = snapshot(repo, "s", src)
    assert not here and b.root == a.root
    for k in ("new_chunks", "new_bytes", "new_stored"):
        assert b.stats[k] == a.stats[k], k
    assert any("tmp-ingest" in w and "by pipe" in w for w in b.stats["warnings"]), b.stats["warnings"]
    assert run_pit(repo, "verify", "--deep").returncode == 0
