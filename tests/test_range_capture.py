"""Issue 17 part 2: a change to a big file costs about the changed bytes.

- store/rechunk.py: re-chunking only the written chunks gives exactly the
  chunk list of a full pass (random files, random writes, size changes);
- store/changeset.py: `--changes` lines with byte ranges, refused strictly;
- store/ingest_ranges.py: a snapshot from ranges stores the same filelist
  (same chunk list) as a full rescan, and falls back to a whole read (and
  says so) when the ranges cannot be trusted;
- store/capture.py on real btrfs and XFS file systems on loop devices made
  here: the ranges found by comparing reflink clones cover every byte
  written with pwrite and through mmap, and on tmpfs/ext4 the capture says
  it cannot and reads whole.
"""
from __future__ import annotations

import mmap
import os
import random
import shutil
import subprocess
from contextlib import contextmanager

import pytest

from conftest import cli, init_repo, list_snaps, opened, rand_bytes, restore
from store.capture import Extent, ReflinkCapture, changed_ranges
from store.changeset import parse_changes
from store.errors import ChangeSetInvalid
from store.chunker import ChunkerParams, chunk_bytes
from store.ingest import create_snapshot
from store.rechunk import rechunk

MiB = 1024 * 1024
OLD_MTIME = 1_600_000_000_000_000_000


# ------------------------------------------------------------ pure rechunk
def _apply_random_change(r: random.Random, data: bytearray) -> list[tuple[int, int]]:
    ranges = []
    for _ in range(r.randrange(0, 8)):
        if not data:
            break
        off = r.randrange(len(data))
        n = r.choice([1, 100, 4096, 8192, r.randrange(1, 200_000)])
        n = min(n, len(data) - off)
        data[off:off + n] = r.randbytes(n)
        ranges.append((off, n))
    if r.random() < 0.35:  # a size change: its tail is implied, not listed
        new = r.randrange(0, 2 * len(data) + 10)
        if new > len(data):
            data += r.randbytes(new - len(data))
        else:
            del data[new:]
    return ranges


@pytest.mark.parametrize("seed", list(range(40)))
def test_rechunk_equals_full_chunking(seed):
    r = random.Random(seed)
    params = ChunkerParams.for_average(r.choice([1024, 4096, 16384]))
    size = r.choice([0, 1, 3000, r.randrange(1, 1_500_000)])
    old = bytes(r.randbytes(size)) if r.random() < 0.8 else bytes(size)  # zeros: max-size cuts
    old_lens = [len(c) for c in chunk_bytes(old, params)]
    new = bytearray(old)
    ranges = _apply_random_change(r, new)
    reads = []

    def read(off, n):
        reads.append((off, n))
        return bytes(new[off:off + n])

    res = rechunk(old_lens, ranges, len(new), read, params)
    starts = [0]
    for n in old_lens:
        starts.append(starts[-1] + n)
    got = [old[starts[p]:starts[p + 1]] if isinstance(p, int) else p for p in res.pieces]
    assert got == [bytes(c) for c in chunk_bytes(bytes(new), params)]
    assert res.bytes_read == sum(n for _, n in reads)
    if not ranges and len(new) == len(old):
        assert res.bytes_read == 0 and res.new_chunks == 0


def test_rechunk_reads_about_the_written_chunks():
    params = ChunkerParams.for_average(16384)
    old = rand_bytes(32 * MiB, "rc")
    old_lens = [len(c) for c in chunk_bytes(old, params)]
    new = bytearray(old)
    r = random.Random(7)
    ranges = []
    for p in r.sample(range(len(old) // 8192), 40):
        new[p * 8192:(p + 1) * 8192] = r.randbytes(8192)
        ranges.append((p * 8192, 8192))
    res = rechunk(old_lens, ranges, len(new), lambda o, n: bytes(new[o:o + n]), params)
    # each 8 KiB page costs the chunks it touches (16 KiB average, up to 64 KiB): far below the file
    assert res.bytes_read <= 40 * (8192 + 2 * 64 * 1024)
    assert res.reused_chunks > len(old_lens) - 100


# ------------------------------------------------------------ FIEMAP compare
def test_changed_ranges_of_extent_maps():
    old = [Extent(0, 1_000_000, 65536, 0), Extent(65536, 5_000_000, 65536, 0), Extent(196608, 9_000_000, 4096, 0)]
    new = [Extent(0, 1_000_000, 8192, 0),            # first 8 KiB still shared
           Extent(8192, 7_000_000, 4096, 0),         # rewritten (moved)
           Extent(12288, 1_012_288, 53248, 0),       # same place again
           Extent(65536, 5_000_000, 65536, 0x800),   # unwritten now: counts as written
           Extent(131072, 3_000_000, 4096, 0x4),     # delalloc: no trustworthy address
           Extent(196608, 9_000_000, 4096, 0x1)]     # unchanged, last
    size = 262144
    assert changed_ranges(old, new, size) == [(8192, 4096), (65536, 65536 + 4096)]
    assert changed_ranges(old, old, size) == []
    assert changed_ranges([], [], size) == []  # all hole in both
    assert changed_ranges([], old[:1], size) == [(0, 65536)]


# ------------------------------------------------------------ change sets
@pytest.mark.parametrize("line,why", [
    ("f\t-1\t10", "offset"),
    ("f\t1\t-5", "length"),
    ("f\tx\t5", "offset"),
    ("f\t1", "fields"),
    ("f\t1\t2\t3\t4", "fields"),
    ("f\t1\t0", "length 0"),
    ("f\t 1\t2", "offset"),
    ("f\t1\t2\x00", "NUL"),
    ("\t1\t2", "empty path"),
    ("f\tbaseline\t1", "offset .baseline."),
    ("f\tbaseline\t1\tnow", "mtime"),
])
def test_malformed_change_lines_refused(line, why):
    with pytest.raises(ChangeSetInvalid, match=why):
        parse_changes(["ok", line])


def test_change_set_parse():
    cs = parse_changes(["/a/f\t0\t10\n", "/a/f\t5\t20\n", "/a/f\t100\t1\n", "\n", "/a/g\n", "/a/g\t1\t1\n",
                        "/a/h\tbaseline\t10\t20\n", "/a/h\t3\t4\r\n"])
    assert cs.paths == [b"/a/f", b"/a/g", b"/a/h"]
    assert cs.ranges[b"/a/f"].ranges == [(0, 25), (100, 1)]
    assert b"/a/g" not in cs.ranges  # named whole: read whole
    assert cs.ranges[b"/a/h"].baseline == (10, 20)


def test_cli_refuses_a_malformed_change_set(repo_path, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    cli(repo_path, "snapshot", "--set", "s", str(src))
    for bad in (f"{src}/f\t-3\t4\n", f"{src}/f\t3\n", f"{src}/f\t1\t2\x00\n"):
        (tmp_path / "ch").write_text(f"{src}/f\n" + bad)
        res = cli(repo_path, "snapshot", "--set", "s", "--changes", str(tmp_path / "ch"), str(src), expect=66)
        assert "change set line 2" in res.output and len(res.output.strip().splitlines()) == 1
    assert len(list_snaps(repo_path, "s")) == 1  # nothing done


# ------------------------------------------------------------ ingest from ranges
def _entry(repo_path, snap, rel):
    from store.objects import ObjectReader

    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        return ObjectReader(repo, txn).lookup(snap.root, rel)


def _full_scan_content(repo_path, src, rel):
    """The file's content id as a full rescan (a set of its own: no files cache) stores it."""
    with opened(repo_path) as repo:
        snap = create_snapshot(repo, "fullscan", [str(src)])
    return _entry(repo_path, snap, rel).content


def _snap(repo_path, src, changes=None, capture=None, set_name="s"):
    with opened(repo_path) as repo:
        return create_snapshot(repo, set_name, [str(src)], changes, capture=capture)


def _write_pages(path, r: random.Random, n: int, page: int = 8192) -> list[tuple[int, int]]:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        out = []
        for p in r.sample(range(size // page), n):
            os.pwrite(fd, r.randbytes(page), p * page)
            out.append((p * page, page))
        return out
    finally:
        os.close(fd)


@pytest.fixture(params=["plain", "encrypted"])
def either_repo(request, tmp_path, monkeypatch) -> str:
    """A fresh repository, plain or encrypted (its key file in PIT_KEY_FILE for every open)."""
    if request.param == "plain":
        return init_repo(tmp_path / "repo")
    from store.keys import KeySource
    from store.repository import Repository

    key = str(tmp_path / "repo.key")
    monkeypatch.setenv("PIT_KEY_FILE", key)
    Repository.init(str(tmp_path / "repo"), encrypt=True, keys=KeySource(key_file=key)).close()
    return str(tmp_path / "repo")


def test_change_set_ranges_store_what_a_full_rescan_stores(either_repo, tmp_path):
    repo_path = either_repo
    src = tmp_path / "src"
    src.mkdir()
    db = src / "db"
    db.write_bytes(rand_bytes(6 * MiB, "db"))
    os.utime(db, ns=(OLD_MTIME, OLD_MTIME))
    _snap(repo_path, src)
    st0 = os.stat(db)
    written = _write_pages(db, random.Random(3), 20)
    with open(db, "ab") as f:
        f.write(rand_bytes(12345, "tail"))  # grown: the tail is implied
    lines = [f"{db}\t{o}\t{n}" for o, n in written] + [f"{db}\tbaseline\t{st0.st_size}\t{st0.st_mtime_ns}"]
    snap = _snap(repo_path, src, parse_changes(lines))
    s = snap.stats
    assert s["range_files"] == 1 and s["range_fallbacks"] == 0, s
    assert s["range_log"][0]["mode"] == "ranges"
    assert s["bytes_read"] < 20 * (8192 + 2 * 65536) + 12345 + 65536
    assert _entry(repo_path, snap, "src/db").content == _full_scan_content(repo_path, src, "src/db")
    restore(repo_path, snap.hex, tmp_path / "out", "src/db")
    assert (tmp_path / "out" / db.name).read_bytes() == db.read_bytes()


@pytest.mark.parametrize("seed", [101, 102, 103, 104, 105, 106])
def test_ranges_over_many_leaves_store_what_a_full_rescan_stores(small_repo, tmp_path, seed):
    """1 KiB chunks: a 2-3 MB file has ~40 leaves of ~64 chunks; only the written ones are re-planned,
    and the filelist (index and leaves) must be the one a full rescan writes. Some seeds shrink the
    file to one leaf, some grow it, some write across leaf boundaries."""
    r = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    db = src / "db"
    data = bytearray(r.randbytes(r.randrange(2 * MiB, 3 * MiB)))
    db.write_bytes(data)
    os.utime(db, ns=(OLD_MTIME, OLD_MTIME))
    _snap(small_repo, src)
    for rnd in range(3):
        before = len(data)
        ranges = _apply_random_change(r, data)
        if seed == 103 and rnd == 1:
            del data[150_000:]  # one leaf's worth of chunks or fewer: planned whole
        db.write_bytes(data)
        snap = _snap(small_repo, src, parse_changes([f"{db}\t{o}\t{n}" for o, n in ranges] or [f"{db}\t0\t1"]))
        assert snap.stats["range_files"] == 1, snap.stats
        if len(data) == before > 1_000_000 and sum(n for _, n in ranges) < 100_000:
            assert snap.stats["bytes_read"] < len(data) // 4
        assert _entry(small_repo, snap, "src/db").content == _full_scan_content(small_repo, src, "src/db")
        restore(small_repo, snap.hex, tmp_path / f"out{rnd}", "src/db")
        assert (tmp_path / f"out{rnd}" / "db").read_bytes() == bytes(data)


def test_stale_baseline_falls_back_to_a_whole_read(repo_path, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    db = src / "db"
    db.write_bytes(rand_bytes(3 * MiB, "stale"))
    os.utime(db, ns=(OLD_MTIME, OLD_MTIME))
    _snap(repo_path, src)
    written = _write_pages(db, random.Random(4), 5)
    # the ranges claim to be relative to a file of another mtime than the parent's entry
    lines = [f"{db}\t{o}\t{n}" for o, n in written] + [f"{db}\tbaseline\t{3 * MiB}\t{OLD_MTIME - 1}"]
    snap = _snap(repo_path, src, parse_changes(lines))
    s = snap.stats
    assert s["range_files"] == 0 and s["range_fallbacks"] == 1
    assert "stale baseline" in s["range_log"][0]["reason"]
    assert any("read whole" in w for w in s["warnings"])
    assert s["bytes_read"] == 3 * MiB
    assert _entry(repo_path, snap, "src/db").content == _full_scan_content(repo_path, src, "src/db")


def test_ranges_without_a_parent_entry_read_whole(repo_path, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(b"k")
    _snap(repo_path, src)
    db = src / "new.db"
    db.write_bytes(rand_bytes(MiB, "new"))
    snap = _snap(repo_path, src, parse_changes([f"{db}\t0\t10"]))
    assert snap.stats["range_log"][0]["reason"] == "no parent entry for the file"
    restore(repo_path, snap.hex, tmp_path / "out", "src/new.db")
    assert (tmp_path / "out" / db.name).read_bytes() == db.read_bytes()


# ------------------------------------------------------------ loop file systems
MKFS = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "ext4": ["mkfs.ext4", "-q"]}


def _umount(mnt) -> None:
    """Unmount; a mount found busy is detached lazily (no test leaves a mount behind), and the test fails:
    something of ours still had a file open there."""
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        raise AssertionError(f"{mnt} was busy when the test ended (a file left open on it)")


@contextmanager
def mounted(tmp_path, fs: str):
    """A fresh file system of kind `fs` mounted at tmp_path/mnt; always unmounted and detached."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    mnt = tmp_path / f"mnt-{fs}"
    mnt.mkdir()
    if fs == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True)
        try:
            yield mnt
        finally:
            _umount(mnt)
        return
    if shutil.which(MKFS[fs][0]) is None:
        pytest.skip(f"{MKFS[fs][0]} is not installed (.ci/apt-deps installs it)")
    img = tmp_path / f"{fs}.img"
    with open(img, "wb") as f:
        f.truncate(1024 * MiB)
    subprocess.run([*MKFS[fs], str(img)], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            _umount(mnt)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
        img.unlink()


def _capture(src, min_size=MiB):
    return ReflinkCapture.open(str(src / ".pit-clones" / "s"), min_size)


def _capture_snap(repo_path, src):
    cap = _capture(src)
    snap = _snap(repo_path, src, capture=cap)
    cap.commit()
    return snap, cap


def _mmap_pages(path, r: random.Random, n: int) -> list[tuple[int, int]]:
    """Writes through a shared mapping, unaligned, never flushed: the clone must see them."""
    out = []
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        for _ in range(n):
            off = r.randrange(len(m) - 5000)
            ln = r.randrange(1, 5000)
            m[off:off + ln] = r.randbytes(ln)
            out.append((off, ln))
    return out


def _covered(written, ranges) -> bool:
    """Every written byte lies in a captured range (they come merged: a write lies in one)."""
    return all(any(ro <= off and off + n <= ro + rn for ro, rn in ranges) for off, n in written)


@pytest.mark.parametrize("fs,seed", [("btrfs", 11), ("btrfs", 12), ("xfs", 21), ("xfs", 22)])
def test_capture_finds_every_written_byte(repo_path, tmp_path, fs, seed):
    r = random.Random(seed)
    with mounted(tmp_path, fs) as mnt:
        src = mnt / "data"
        src.mkdir()
        db = src / "db"
        db.write_bytes(r.randbytes(12 * MiB))
        (src / "small").write_bytes(b"below the threshold")
        snap, cap = _capture_snap(repo_path, src)
        assert snap.stats["range_log"][0]["reason"] == "no baseline clone yet"
        for rnd in range(3):
            written = _write_pages(db, r, r.randrange(1, 30), page=4096)
            if rnd:
                written += _mmap_pages(db, r, r.randrange(1, 10))
            if rnd == 2:  # a size change too: grown, then shrunk below its old size
                with open(db, "ab") as f:
                    f.write(r.randbytes(r.randrange(1, 300_000)))
            snap, cap = _capture_snap(repo_path, src)
            s = snap.stats
            assert s["range_files"] == 1 and s["range_fallbacks"] == 0, s
            assert s["capture"]["files"][str(db)].startswith("ranges:")
            assert _covered(written, cap.given[str(db)]), (written, cap.given[str(db)])
            if fs == "btrfs" or not rnd:
                # XFS writes a dirty mmap folio back whole (64 KiB to 2 MiB): false positives, as measured
                # in /work/shared/notes/change-capture.md; pwrite is exact on both
                assert s["bytes_read"] < db.stat().st_size // 2
            assert _entry(repo_path, snap, "data/db").content == _full_scan_content(repo_path, src, "data/db")
            out = tmp_path / f"out{rnd}"
            restore(repo_path, snap.hex, out, "data/db")
            assert (out / "db").read_bytes() == db.read_bytes()
        os.truncate(db, 5 * MiB + 777)
        snap, cap = _capture_snap(repo_path, src)
        assert snap.stats["range_files"] == 1
        assert _entry(repo_path, snap, "data/db").content == _full_scan_content(repo_path, src, "data/db")
        assert sorted(os.listdir(src)) == [".pit-clones", "db", "small"]
        data_tree = _entry(repo_path, snap, "data").content
        with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
            from store.objects import ObjectReader

            names = [e.name for e in ObjectReader(repo, txn).tree(data_tree)]
        assert names == [b"db", b"small"]  # the clones are never in a snapshot


def test_capture_baseline_stale_after_a_snapshot_without_capture(repo_path, tmp_path):
    r = random.Random(5)
    with mounted(tmp_path, "btrfs") as mnt:
        src = mnt / "data"
        src.mkdir()
        db = src / "db"
        db.write_bytes(r.randbytes(4 * MiB))
        _capture_snap(repo_path, src)
        _write_pages(db, r, 3)
        _snap(repo_path, src)  # a plain snapshot: the clone is no longer the parent's content
        _write_pages(db, r, 3)
        snap, _ = _capture_snap(repo_path, src)
        assert snap.stats["range_fallbacks"] == 1
        assert "stale baseline" in snap.stats["range_log"][0]["reason"]
        assert _entry(repo_path, snap, "data/db").content == _full_scan_content(repo_path, src, "data/db")


@pytest.mark.parametrize("fs", ["tmpfs", "ext4"])
def test_capture_without_reflink_reads_whole_and_says_so(repo_path, tmp_path, fs):
    r = random.Random(6)
    with mounted(tmp_path, fs) as mnt:
        src = mnt / "data"
        src.mkdir()
        db = src / "db"
        db.write_bytes(r.randbytes(2 * MiB))
        _capture_snap(repo_path, src)
        _write_pages(db, r, 3)
        snap, cap = _capture_snap(repo_path, src)
        s = snap.stats
        assert s["range_files"] == 0 and s["range_fallbacks"] == 1
        assert "reflink unsupported here" in s["range_log"][0]["reason"]
        assert "reflink unsupported" in s["capture"]["files"][str(db)]
        restore(repo_path, snap.hex, tmp_path / "out", "data/db")
        assert (tmp_path / "out" / db.name).read_bytes() == db.read_bytes()


def test_cli_capture_says_which_way_each_file_went(repo_path, tmp_path):
    import json

    r = random.Random(8)
    with mounted(tmp_path, "xfs") as mnt:
        src = mnt / "data"
        src.mkdir()
        db = src / "db"
        db.write_bytes(r.randbytes(3 * MiB))
        args = ["snapshot", "--set", "s", "--capture", "reflink", "--capture-min-size", str(MiB), str(src)]
        first = cli(repo_path, *args)
        assert f"{db}: whole (no baseline clone yet)" in first.output
        _write_pages(db, r, 4)
        out = json.loads(cli(repo_path, *args, "--json").stdout)["stats"]
        assert out["range_files"] == 1 and out["capture"]["mechanism"] == "reflink"
        assert out["range_log"][0]["mode"] == "ranges" and out["range_log"][0]["bytes_read"] < MiB
        _write_pages(db, r, 4)
        text = cli(repo_path, *args).output
        assert "ranges: 1 files from written ranges" in text and f"{db}: ranges, " in text
        assert sorted(os.listdir(src / ".pit-clones" / "s"))[-2:] == ["lock", "state.json"]


def test_fiemap_reads_maps_longer_than_one_call(tmp_path, monkeypatch):
    import store.capture as C

    r = random.Random(9)
    with mounted(tmp_path, "btrfs") as mnt:
        f = mnt / "f"
        f.write_bytes(r.randbytes(4 * MiB))
        fd = os.open(f, os.O_RDONLY)
        try:
            C.clone_file(fd, str(mnt / "clone"))
            _write_pages(f, r, 40, page=4096)  # copy-on-write: ~40 extents more
            whole = C.fiemap(fd)
            monkeypatch.setattr(C, "BATCH", 3)
            assert C.fiemap(fd) == whole and len(whole) > 3 * 5
            assert whole[-1].flags & C.FIEMAP_EXTENT_LAST
            assert sum(e.length for e in whole) >= 4 * MiB
        finally:
            os.close(fd)
