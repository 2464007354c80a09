"""Restore keeps extended attributes (ACLs included), holes and hard links
(issue 12): real xattrs on the temporary file system, sparse files checked
by their allocated blocks, links by their inode numbers; in plain and sync
mode. Snapshots are written entry by entry (tests/meta_support.py), so
these test restore against the format whatever the ingest records; the
last tests take real snapshots of real files."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest

from conftest import cli, opened, rand_bytes, run_pit, snapshot
from meta_support import CD, CF, CL, craft, file_bytes
from store.objects import ObjectReader
from store.restore import Restorer
from store.snapshots import resolve

MiB = 1 << 20
ROOT = os.geteuid() == 0


def xattrs_of(path, follow=True) -> dict:
    return {n: os.getxattr(path, n, follow_symlinks=follow) for n in os.listxattr(path, follow_symlinks=follow)}


def restore_api(repo, spec, target, path="", sync=False, **kw):
    with opened(repo, readonly=True) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        e = rd.lookup(resolve(r, txn, spec).root, path)
        if sync:
            e = dataclasses.replace(e, name=b"")
        return Restorer(rd, sync=sync, **kw).restore(e, str(target), path=path)


def acl_value(tmp_path, kind: str = "access") -> bytes:
    """A real POSIX ACL in the kernel's xattr encoding (setfacl on a scratch directory)."""
    p = tmp_path / f"acl-{kind}"
    p.mkdir(exist_ok=True)
    spec = "u::rwx,u:12345:r-x,g::r-x,m::r-x,o::---"
    subprocess.run(["setfacl", *(["-d"] if kind == "default" else []), "-m", spec, str(p)], check=True)
    return os.getxattr(p, f"system.posix_acl_{kind}")


# ------------------------------------------------------------------ xattrs
def test_xattrs_of_files_dirs_and_symlinks(repo_path, tmp_path):
    acl, dacl = acl_value(tmp_path), acl_value(tmp_path, "default")
    tree = {
        "f": CF(b"file", xattrs={b"user.a": b"1", b"user.bin": bytes(range(256)), b"user.empty": b""}),
        "acl": CF(b"with an ACL", mode=0o750, xattrs={b"system.posix_acl_access": acl}),
        "d": CD({"inner": CF(b"x")}, xattrs={b"user.dir": b"d", b"system.posix_acl_default": dacl}),
        "l": CL("f", xattrs={b"trusted.link": b"own"} if ROOT else {}),
    }
    s = craft(repo_path, "x", tree)
    out = tmp_path / "out"
    st = restore_api(repo_path, s.hex, out)
    src = out / "src"
    assert xattrs_of(src / "f") == {"user.a": b"1", "user.bin": bytes(range(256)), "user.empty": b""}
    assert os.getxattr(src / "acl", "system.posix_acl_access") == acl
    assert "user:12345:r-x" in subprocess.run(["getfacl", "-p", str(src / "acl")], capture_output=True,
                                              text=True, check=True).stdout
    assert os.stat(src / "acl").st_mode & 0o777 == 0o750
    d = xattrs_of(src / "d")
    assert d["user.dir"] == b"d" and d["system.posix_acl_default"] == dacl
    # the directory's default ACL is inherited by what is created in it later, as on the source
    assert "default:user:12345:r-x" in subprocess.run(["getfacl", "-p", str(src / "d")], capture_output=True,
                                                      text=True, check=True).stdout
    if ROOT:
        assert xattrs_of(src / "l", follow=False) == {"trusted.link": b"own"}
        assert "trusted.link" not in xattrs_of(src / "f")  # never the target's
    assert st.xattrs == 6 + ROOT and st.xattr_failed == 0 and st.warnings == []


def test_an_xattr_that_cannot_be_set_is_a_warning(repo_path, tmp_path):
    s = craft(repo_path, "w", {"f": CF(b"data", xattrs={b"user.ok": b"1", b"bogus.ns": b"x"}), "g": CF(b"g")})
    st = restore_api(repo_path, s.hex, tmp_path / "out")
    assert (tmp_path / "out" / "src" / "f").read_bytes() == b"data"
    assert xattrs_of(tmp_path / "out" / "src" / "f") == {"user.ok": b"1"}
    assert (st.files, st.xattrs, st.xattr_failed) == (2, 1, 1)
    assert len(st.warnings) == 1 and st.warnings[0].startswith("src/f: extended attribute bogus.ns not set")
    p = run_pit(repo_path, "restore", s.hex, "--target", tmp_path / "cli")  # exit 0: a warning, not damage
    assert b"pit: warning: src/f: extended attribute bogus.ns not set" in p.stderr
    out = json.loads(run_pit(repo_path, "restore", s.hex, "--target", tmp_path / "cli2", "--json").stdout)
    assert (out["xattrs"], out["xattrs_not_set"], out["failed"]) == (1, 1, [])


# ------------------------------------------------------------------- holes
def test_sparse_file_is_restored_with_its_holes(repo_path, tmp_path):
    data = rand_bytes(MiB, "sparse")
    tail = rand_bytes(100_000, "tail")
    big = CF(size=1 << 30, pieces=[(5 * MiB, data), ((1 << 30) - len(tail), tail)])
    tree = {"big.img": big, "hole.img": CF(size=10 * MiB, pieces=[]),
            "small": CF(size=300_000, pieces=[(100_000, b"x" * 1000)])}
    s = craft(repo_path, "sp", tree)
    out = tmp_path / "out"
    st = restore_api(repo_path, s.hex, out)
    p = out / "src" / "big.img"
    info = os.stat(p)
    assert info.st_size == 1 << 30
    assert info.st_blocks * 512 < 2 * MiB  # ~1.1 MiB of data allocated, not 1 GiB
    assert st.bytes == MiB + len(tail) + 1000  # data only: holes are never written
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 5 * MiB
        assert os.pread(fd, MiB, 5 * MiB) == data
        assert os.pread(fd, len(tail), (1 << 30) - len(tail)) == tail
        assert os.pread(fd, 4096, 512 * MiB) == bytes(4096)
        assert os.pread(fd, 10, 5 * MiB - 10) == bytes(10)
    finally:
        os.close(fd)
    hole = os.stat(out / "src" / "hole.img")
    assert (hole.st_size, hole.st_blocks) == (10 * MiB, 0)
    assert (out / "src" / "small").read_bytes() == file_bytes(tree["small"])


def test_cat_of_a_sparse_file(repo_path, tmp_path):
    node = CF(size=3 * MiB + 5, pieces=[(MiB + 7, rand_bytes(70_000, "c")), (3 * MiB, b"end!!")])
    s = craft(repo_path, "c", {"f": node})
    assert run_pit(repo_path, "cat", f"{s.hex}:src/f").stdout == file_bytes(node)
    # and a file that is all hole
    s = craft(repo_path, "c", {"f": CF(size=2 * MiB + 3, pieces=[])})
    assert run_pit(repo_path, "cat", f"{s.hex}:src/f").stdout == bytes(2 * MiB + 3)


# ------------------------------------------------------------- hard links
def links_tree(key=(64769, 4242)):
    body = rand_bytes(200_000, "linked")
    return {
        "a": CD({"x": CF(body, mode=0o640, inode=key)}),
        "b": CD({"y": CF(body, mode=0o640, inode=key)}),
        "z": CF(body, mode=0o640, inode=key),
        "w": CF(b"other content, same key", inode=key),  # not the same file: never linked to the others
        "plain": CF(body),                                # same bytes, no key: a file of its own
    }


def test_hard_links_become_links_to_the_first(repo_path, tmp_path):
    s = craft(repo_path, "h", links_tree())
    out = tmp_path / "out" / "src"
    st = restore_api(repo_path, s.hex, tmp_path / "out")
    x, y, z = (os.stat(out / p) for p in ("a/x", "b/y", "z"))
    assert x.st_ino == y.st_ino == z.st_ino and x.st_nlink == 3
    assert os.stat(out / "w").st_ino != x.st_ino and os.stat(out / "w").st_nlink == 1
    assert os.stat(out / "plain").st_ino != x.st_ino
    assert (out / "b" / "y").read_bytes() == rand_bytes(200_000, "linked")
    assert (st.files, st.links, st.bytes) == (3, 2, 200_000 * 2 + len(b"other content, same key"))
    res = json.loads(cli(repo_path, "restore", s.hex, "--target", tmp_path / "cli", "--json").stdout)
    assert res["links"] == 2 and res["files"] == 3
    # a restore of one of the names alone: just that file
    restore_api(repo_path, s.hex, tmp_path / "one", path="src/b")
    assert os.stat(tmp_path / "one" / "b" / "y").st_nlink == 1


def test_sync_keeps_links_xattrs_and_holes(repo_path, tmp_path):
    tree = links_tree()
    tree["sparse"] = CF(size=64 * MiB, pieces=[(32 * MiB, rand_bytes(300_000, "s"))])
    tree["meta"] = CF(b"meta only changes", xattrs={b"user.v": b"1"})
    tree["d"] = CD({"k": CF(b"k")}, xattrs={b"user.dir": b"1"})
    craft(repo_path, "y", tree)
    live = tmp_path / "live"
    st = restore_api(repo_path, "y@latest", live, path="src", sync=True)
    assert st.links == 2 and os.stat(live / "a" / "x").st_ino == os.stat(live / "z").st_ino
    assert os.stat(live / "sparse").st_blocks * 512 < 2 * MiB
    ino_meta = os.stat(live / "meta").st_ino
    # nothing differs: nothing is rewritten, the links stay links
    st = restore_api(repo_path, "y@latest", live, path="src", sync=True)
    assert (st.files, st.links, st.bytes) == (0, 0, 0) and st.unchanged == 8
    # someone broke a link, added an xattr, and the image's xattrs changed (same bytes and mtime)
    os.unlink(live / "b" / "y")
    (live / "b" / "y").write_bytes(rand_bytes(200_000, "linked"))
    os.utime(live / "b" / "y", ns=(tree["z"].mtime, tree["z"].mtime))
    os.setxattr(live / "d", "user.stray", b"s")
    os.setxattr(live / "meta", "user.stray", b"s")
    tree["meta"] = CF(b"meta only changes", xattrs={b"user.v": b"2", b"user.new": b"n"}, mode=0o600)
    tree["d"] = CD({"k": CF(b"k")}, xattrs={b"user.dir": b"2"})
    craft(repo_path, "y", tree)
    st = restore_api(repo_path, "y@latest", live, path="src", sync=True)
    assert st.links == 1 and os.stat(live / "b" / "y").st_ino == os.stat(live / "z").st_ino
    assert xattrs_of(live / "meta") == {"user.v": b"2", "user.new": b"n"}
    assert os.stat(live / "meta").st_ino == ino_meta and os.stat(live / "meta").st_mode & 0o777 == 0o600
    assert xattrs_of(live / "d") == {"user.dir": b"2"}
    assert st.files == 0 and st.bytes == 0


# --------------------------------------------------- real snapshots of real files
def test_real_snapshot_round_trip(repo_path, tmp_path):
    """xattrs (user and ACL), a sparse file made with truncate, hard links made
    with os.link: snapshot, restore, compare."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "f").write_bytes(b"attrs")
    os.setxattr(src / "f", "user.color", b"blue")
    subprocess.run(["setfacl", "-m", "u:12345:r", str(src / "f")], check=True)
    os.setxattr(src / "d", "user.dir", b"yes")
    (src / "vm.img").touch()
    os.truncate(src / "vm.img", 256 * MiB)  # all hole, then 1 MiB of data in the middle
    fd = os.open(src / "vm.img", os.O_WRONLY)
    os.pwrite(fd, rand_bytes(MiB, "vm"), 100 * MiB)
    os.close(fd)
    (src / "d" / "one").write_bytes(rand_bytes(50_000, "one"))
    os.link(src / "d" / "one", src / "two")
    s = snapshot(repo_path, "real", src)
    with opened(repo_path, readonly=True) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        recorded = rd.lookup(s.root, "src/f").xattrs
    if not recorded:
        pytest.skip("this checkout's ingest does not record extended attributes yet")
    out = tmp_path / "out"
    run_pit(repo_path, "restore", s.hex, "--target", out)
    o = out / "src"
    assert xattrs_of(o / "f") == xattrs_of(src / "f")
    assert xattrs_of(o / "d") == xattrs_of(src / "d")
    assert os.stat(o / "vm.img").st_blocks * 512 < 4 * MiB
    with open(o / "vm.img", "rb") as a, open(src / "vm.img", "rb") as b:
        while True:
            x, y = a.read(8 * MiB), b.read(8 * MiB)
            assert x == y
            if not x:
                break
    assert os.stat(o / "two").st_ino == os.stat(o / "d" / "one").st_ino


def test_ls_json_shows_the_metadata(repo_path, tmp_path):
    s = craft(repo_path, "ls", {"f": CF(b"f", xattrs={b"user.a": b"1"}, inode=(3, 9)),
                                "sp": CF(size=MiB, pieces=[(4096, b"x" * 10)]), "plain": CF(b"p")})
    rows = {r["name"]: r for r in json.loads(cli(repo_path, "ls", f"{s.hex}:src", "--json").stdout)}
    assert rows["f"]["xattrs"] == ["user.a"] and rows["f"]["inode"] == [3, 9]
    assert rows["sp"]["size"] == MiB and rows["sp"]["sparse"] == {"data_bytes": 10, "extents": [[4096, 10]]}
    assert not {"xattrs", "sparse", "inode"} & set(rows["plain"])


def test_a_directory_synced_into_place_takes_its_own_owner_and_mode(repo_path, tmp_path):
    """A failover's live copy: the set's directory restored into the live path itself (name '') must be the
    directory it was (owner, mode), or a database server refuses to start there. Seen with MariaDB: the live
    data directory stayed root's 0755 and mariadbd could not write its binlog index."""
    src = tmp_path / "src" / "data"
    src.mkdir(parents=True)
    (src / "f").write_bytes(b"rows")
    os.chmod(src, 0o700)
    owner = (4242, 4343) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        os.chown(src, *owner)
    s = snapshot(repo_path, "live", src)
    live = tmp_path / "live" / "data"
    live.mkdir(parents=True)
    os.chmod(live, 0o755)
    with opened(repo_path, readonly=True) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        e = dataclasses.replace(rd.lookup(s.root, "data"), name=b"")
        Restorer(rd, sync=True).restore(e, str(live), own_meta=True)
        st = os.stat(live)
        assert (st.st_uid, st.st_gid) == owner and st.st_mode & 0o7777 == 0o700
        other = tmp_path / "plain"
        Restorer(rd, sync=True).restore(e, str(other))  # without own_meta: the target keeps its own
        mask = os.umask(0o022)
        os.umask(mask)
        assert os.stat(other).st_mode & 0o7777 == 0o777 & ~mask
    assert (live / "f").read_bytes() == b"rows"
