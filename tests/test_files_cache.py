"""The files cache (path, size, mtime, ctime, inode) lets a full scan skip
unchanged files without reading them, and never lets a changed file through.

Files modified within RACY_NS of a scan's start are not cached (their mtime
could still change within the same tick), so these tests give files mtimes
in the past with os.utime, except where the racy rule itself is tested."""
from __future__ import annotations

import os
import time

from conftest import MiB, blob_ids, make_tree, rand_bytes, restore, run_pit, snapshot, tree_digest
from store.ingest import RACY_NS

PAST = 1_600_000_000 * 10**9


def spec() -> dict:
    return {"a": rand_bytes(300_000, "a"), "b": b"bee", "empty": b"", "d": {"c": rand_bytes(90_000, "c"),
                                                                          "e": {"f": b"f" * 5000}}}


def nfiles() -> int:
    return 5


def test_unchanged_files_are_not_read(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    s1 = snapshot(repo_path, "s", src)
    assert s1.stats["files_read"] == nfiles()
    s2 = snapshot(repo_path, "s", src)
    assert s2.stats["files_read"] == 0 and s2.stats["bytes_read"] == 0
    assert s2.stats["examined_files"] == nfiles()
    assert s2.root == s1.root


def test_changed_file_is_read_again(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    snapshot(repo_path, "s", src)
    (src / "d" / "c").write_bytes(rand_bytes(90_001, "c2"))
    os.utime(src / "d" / "c", ns=(PAST, PAST + 5))
    s = snapshot(repo_path, "s", src)
    assert s.stats["files_read"] == 1
    restore(repo_path, s.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)


def test_same_size_same_mtime_new_content_is_caught_by_ctime(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    snapshot(repo_path, "s", src)
    st = os.stat(src / "a")
    time.sleep(0.02)  # let the ctime clock tick past the first write's
    (src / "a").write_bytes(rand_bytes(300_000, "a-other"))
    os.utime(src / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(src / "a").st_mtime_ns == st.st_mtime_ns and os.stat(src / "a").st_size == st.st_size
    s = snapshot(repo_path, "s", src)
    assert s.stats["files_read"] == 1
    restore(repo_path, s.hex, tmp_path / "out")
    assert (tmp_path / "out" / "src" / "a").read_bytes() == rand_bytes(300_000, "a-other")


def test_replaced_by_rename_is_caught_by_inode(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    snapshot(repo_path, "s", src)
    st = os.stat(src / "b")
    (tmp_path / "new-b").write_bytes(b"BEE")  # same size
    os.utime(tmp_path / "new-b", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp_path / "new-b", src / "b")
    s = snapshot(repo_path, "s", src)
    assert s.stats["files_read"] == 1
    restore(repo_path, s.hex, tmp_path / "out")
    assert (tmp_path / "out" / "src" / "b").read_bytes() == b"BEE"


def test_touch_reads_but_stores_no_new_chunks(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    snapshot(repo_path, "s", src)
    chunks = blob_ids(repo_path)
    os.utime(src / "a", ns=(PAST, PAST + 10**9))
    s = snapshot(repo_path, "s", src)
    assert s.stats["files_read"] == 1
    assert blob_ids(repo_path).keys() == chunks.keys()


def test_racy_files_are_not_cached(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    (src / "fresh").write_bytes(b"just written")  # mtime: now, inside the racy window
    s1 = snapshot(repo_path, "s", src)
    assert s1.stats["files_read"] == nfiles() + 1
    s2 = snapshot(repo_path, "s", src)
    if time.time_ns() - os.stat(src / "fresh").st_mtime_ns < RACY_NS:
        assert s2.stats["files_read"] == 1  # still racy: read again, not trusted from the cache
    os.utime(src / "fresh", ns=(PAST, PAST))
    s3 = snapshot(repo_path, "s", src)
    assert s3.stats["files_read"] == 1  # its mtime changed
    s4 = snapshot(repo_path, "s", src)
    assert s4.stats["files_read"] == 0
    assert s4.root == s3.root


def test_files_modified_in_the_future_are_never_cached(repo_path, tmp_path):
    """A file whose mtime is ahead of the clock is always racy: every scan reads it."""
    src = tmp_path / "src"
    make_tree(src, {"future": b"from the future", "past": b"p"})
    fut = time.time_ns() + 3600 * 10**9
    os.utime(src / "future", ns=(fut, fut))
    snapshot(repo_path, "s", src)
    for _ in range(2):
        s = snapshot(repo_path, "s", src)
        assert s.stats["files_read"] == 1


def test_cache_is_per_set(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    snapshot(repo_path, "one", src)
    assert snapshot(repo_path, "two", src).stats["files_read"] == nfiles()
    assert snapshot(repo_path, "one", src).stats["files_read"] == 0


def test_cache_does_not_resurrect_dropped_blobs(repo_path, tmp_path):
    """After the only snapshot is forgotten its blobs are gone; a cached stat
    must not point the next snapshot at them."""
    src = tmp_path / "src"
    make_tree(src, spec())
    s1 = snapshot(repo_path, "s", src)
    run_pit(repo_path, "forget", "--set", "s", s1.hex)
    assert blob_ids(repo_path) == {}
    s2 = snapshot(repo_path, "s", src)
    assert s2.stats["files_read"] == nfiles() - 1  # all but the empty file, which needs no blob
    restore(repo_path, s2.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)


def test_big_unchanged_file_skipped(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, {"big": rand_bytes(20 * MiB, "big"), "small": b"s"})
    snapshot(repo_path, "s", src)
    os.utime(src / "small", ns=(PAST, PAST + 1))
    s = snapshot(repo_path, "s", src)
    assert (s.stats["files_read"], s.stats["bytes_read"]) == (1, 1)
