"""What `pit snapshot` records beyond bytes (issue 12): extended attributes
(every namespace this process can read: user.*, ACLs, security labels),
sparse files as data extents (holes are neither read nor stored), and hard
links as an inode key shared by the names of one inode. Restoring them is
tested in tests/test_restore_meta.py; here: what goes into the trees."""
from __future__ import annotations

import os

import pytest

from conftest import init_repo, opened, rand_bytes, run_pit
from store import ingest
from store.ingest import HOLE_MIN, create_snapshot
from store.objects import ObjectReader
from store.trees import X_DATA

MiB = 1024 * 1024


def _entries(repo, snap) -> dict:
    with opened(repo, readonly=True) as r, r.reading() as txn:
        return {p.decode(): e for p, e in ObjectReader(r, txn).walk(snap.root)}


def _read(repo, snap, rel: str, off: int, n: int) -> bytes:
    with opened(repo, readonly=True) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        return rd.open_file(rd.lookup(snap.root, rel)).read(off, n)


def _snap(repo, *paths, **kw):
    with opened(repo) as r:
        return create_snapshot(r, "s", [str(p) for p in paths], **kw)


def _sparse(path, size: int, runs: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in runs:
            f.seek(off)
            f.write(data)


def test_xattrs_of_files_dirs_and_symlinks_are_recorded(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "f").write_bytes(b"x")
    os.symlink("f", src / "ln")
    try:
        os.setxattr(src / "f", "user.b", b"2")
        os.setxattr(src / "f", "user.a", b"\x00\xff binary")
        os.setxattr(src / "d", "user.dir", b"yes")
    except OSError as exc:
        pytest.skip(f"no user xattrs on this file system: {exc}")
    repo = init_repo(tmp_path / "repo")
    snap = _snap(repo, src)
    e = _entries(repo, snap)
    assert e["src/f"].xattrs == [(b"user.a", b"\x00\xff binary"), (b"user.b", b"2")]  # sorted by name
    assert e["src/d"].xattrs == [(b"user.dir", b"yes")]
    assert e["src/ln"].xattrs == []  # the symlink's own, never its target's
    os.removexattr(src / "f", "user.b")
    again = _snap(repo, src)  # an xattr change alone (ctime moved) is seen
    assert _entries(repo, again)["src/f"].xattrs == [(b"user.a", b"\x00\xff binary")]


def test_acls_are_recorded_as_their_xattrs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    if os.system(f"setfacl -m u:nobody:r {src / 'f'} 2>/dev/null") != 0:
        pytest.skip("setfacl or ACL support missing")
    repo = init_repo(tmp_path / "repo")
    names = [k for k, _ in _entries(repo, _snap(repo, src))["src/f"].xattrs]
    assert b"system.posix_acl_access" in names


def test_a_sparse_file_stores_its_data_extents_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    one = rand_bytes(MiB, "data")
    tail = rand_bytes(5000, "tail")
    _sparse(src / "vm.img", 1 << 30, [(100 * MiB, one), ((1 << 30) - 5000, tail)])
    if os.stat(src / "vm.img").st_blocks * 512 > 8 * MiB:
        pytest.skip("this file system does not keep holes")
    repo = init_repo(tmp_path / "repo")
    snap = _snap(repo, src)
    e = _entries(repo, snap)["src/vm.img"]
    assert e.size == 1 << 30
    assert sum(n for _, n in e.extents) < 2 * MiB and e.data_size == sum(n for _, n in e.extents)
    assert snap.stats["bytes_read"] < 2 * MiB  # the holes were never read
    assert _read(repo, snap, "src/vm.img", 100 * MiB - 10, 20) == b"\0" * 10 + one[:10]
    assert _read(repo, snap, "src/vm.img", (1 << 30) - 5000, 5000) == tail
    assert _read(repo, snap, "src/vm.img", 0, 4096) == b"\0" * 4096
    # an unchanged sparse file from the files cache keeps its extents
    os.utime(src / "vm.img", ns=(0, 1_000_000_000))
    _snap(repo, src)
    cached = _snap(repo, src)
    assert cached.stats["files_read"] == 0 and _entries(repo, cached)["src/vm.img"].extents == e.extents
    assert run_pit(repo, "verify", "--deep").returncode == 0


def test_small_holes_are_stored_as_zeros_and_all_hole_files_as_none(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _sparse(src / "small-holes", 4 * MiB, [(0, b"a" * 4096), (HOLE_MIN // 2, b"b" * 4096), (3 * MiB, b"c")])
    _sparse(src / "empty-disk", 64 * MiB, [])
    repo = init_repo(tmp_path / "repo")
    snap = _snap(repo, src)
    e = _entries(repo, snap)
    ext = e["src/small-holes"].extents
    if ext is not None:  # the first two runs are closer than HOLE_MIN: one extent
        assert ext[0][0] == 0 and ext[0][1] >= HOLE_MIN // 2 + 4096
    assert e["src/empty-disk"].extents == [] and e["src/empty-disk"].nchunks == 0
    assert _read(repo, snap, "src/empty-disk", 10 * MiB, 100) == b"\0" * 100
    assert _read(repo, snap, "src/small-holes", 3 * MiB - 1, 2) == b"\0c"


def test_sparse_files_in_worker_processes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    runs = [(i * 8 * MiB, rand_bytes(700_000, f"r{i}")) for i in range(6)]
    _sparse(src / "disk", 64 * MiB, runs)
    (src / "plain").write_bytes(rand_bytes(1_500_000, "plain"))
    monkeypatch.setattr(ingest, "POOL_AFTER", 0)
    monkeypatch.setattr(ingest, "SEGMENT_BYTES", 256 * 1024)
    repo = init_repo(tmp_path / "repo")
    snap = _snap(repo, src)
    e = _entries(repo, snap)["src/disk"]
    if e.extents is None:
        pytest.skip("this file system does not keep holes")
    for off, data in runs:
        assert _read(repo, snap, "src/disk", off, len(data)) == data
    # the same chunks as in one process: the extents cut the same way
    monkeypatch.setattr(ingest, "POOL_AFTER", 1 << 40)
    monkeypatch.setattr(ingest, "SEGMENT_BYTES", 8 * MiB)
    repo2 = init_repo(tmp_path / "repo2")
    assert _snap(repo2, src).root == snap.root


def test_hard_links_share_an_inode_key(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"shared")
    os.link(src / "a", src / "b")
    (src / "c").write_bytes(b"alone")
    repo = init_repo(tmp_path / "repo")
    e = _entries(repo, _snap(repo, src))
    assert e["src/a"].inode_key == e["src/b"].inode_key is not None
    assert e["src/c"].inode_key is None
    assert X_DATA not in e["src/a"].extra
