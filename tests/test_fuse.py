"""`pit mount` for real: ls -R, cmp, random reads, writes refused, a new
snapshot appearing while mounted, clean unmount."""
from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from store.repository import Repository

from test_view_support import snap, write

PIT = os.path.join(os.path.dirname(sys.executable), "pit")
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not os.path.exists("/usr/bin/fusermount3"),
                                reason="needs /dev/fuse and fusermount3 (.ci/apt-deps installs fuse3)")


def _mounted(mnt) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


@contextmanager
def serving(repo_path, mnt):
    """`pit mount REPO MNT` until the block ends, then unmounted and reaped."""
    mnt.mkdir()
    proc = subprocess.Popen([PIT, "mount", str(repo_path), str(mnt)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount failed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.fixture
def mounted(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    src = str(tmp_path / "data")
    write(src, "docs/a.txt", "alpha")
    write(src, "big.bin", os.urandom(3 * 1024 * 1024 + 7))
    os.symlink("docs/a.txt", os.path.join(src, "link"))
    s1 = snap(repo, "files", src)
    mnt = tmp_path / "mnt"
    try:
        with serving(tmp_path / "repo", mnt) as proc:
            yield {"repo": repo, "src": src, "mnt": mnt, "s1": s1, "proc": proc}
    finally:
        repo.close()


def test_browse_read_and_refuse_writes(mounted):
    mnt, src, s1 = mounted["mnt"], mounted["src"], mounted["s1"]
    out = subprocess.run(["ls", "-R", str(mnt)], capture_output=True, text=True, check=True).stdout
    assert s1.name in out and "latest" in out and ".versions" not in out  # dotfolder hidden from plain ls
    base = mnt / "files" / "latest" / "data"
    assert subprocess.run(["cmp", str(base / "big.bin"), os.path.join(src, "big.bin")]).returncode == 0
    want = open(os.path.join(src, "big.bin"), "rb").read()
    rnd = random.Random(1)
    with open(base / "big.bin", "rb") as f:
        for _ in range(50):
            off = rnd.randrange(len(want))
            n = rnd.randrange(1, 200_000)
            f.seek(off)
            assert f.read(n) == want[off:off + n]
    assert os.readlink(base / "link") == "docs/a.txt"
    assert (mnt / "files" / s1.name / "data" / "docs" / "a.txt").read_text() == "alpha"
    assert os.listdir(mnt / "files" / ".versions" / "data" / "docs" / "a.txt") == [f"a {s1.name}.txt"]
    for attempt in (lambda: (base / "new.txt").write_text("x"),
                    lambda: open(base / "big.bin", "r+b"),
                    lambda: os.mkdir(base / "d"),
                    lambda: os.unlink(base / "big.bin")):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno in (30, 13)  # EROFS (EACCES from default_permissions on some kernels)


def test_new_snapshot_appears_while_mounted(mounted):
    mnt, src = mounted["mnt"], mounted["src"]
    write(src, "docs/a.txt", "alpha two")
    s2 = snap(mounted["repo"], "files", src)
    deadline = time.monotonic() + 20
    while s2.name not in os.listdir(mnt / "files"):
        assert time.monotonic() < deadline, "new snapshot never appeared"
        time.sleep(0.2)
    assert (mnt / "files" / s2.name / "data" / "docs" / "a.txt").read_text() == "alpha two"


def test_sigterm_unmounts(mounted):
    mounted["proc"].terminate()
    mounted["proc"].wait(15)
    assert not _mounted(mounted["mnt"])


def test_xattrs_holes_and_blocks(tmp_path):
    """Extended attributes served by getxattr/listxattr; a sparse file reads
    its zeros and counts only its data in st_blocks (issue 12)."""
    from conftest import rand_bytes
    from meta_support import CD, CF, CL, craft, file_bytes

    Repository.init(str(tmp_path / "repo")).close()
    mib = 1 << 20
    disk = CF(size=256 * mib, pieces=[(100 * mib, rand_bytes(mib, "fuse-sparse"))])
    s = craft(tmp_path / "repo", "m", {
        "f": CF(b"attrs", xattrs={b"user.color": b"blue", b"user.bin": b"\x00\xff"}),
        "d": CD({"x": CF(b"x")}, xattrs={b"user.dir": b"yes"}),
        "l": CL("f", xattrs={b"trusted.own": b"link's own"}),
        "disk.img": disk,
    })
    mnt = tmp_path / "mnt"
    with serving(tmp_path / "repo", mnt):
        base = mnt / "m" / s.name / "src"
        assert sorted(os.listxattr(base / "f")) == ["user.bin", "user.color"]
        assert os.getxattr(base / "f", "user.color") == b"blue"
        assert os.getxattr(base / "f", "user.bin") == b"\x00\xff"
        with pytest.raises(OSError) as ei:
            os.getxattr(base / "f", "user.nothing")
        assert ei.value.errno == errno.ENODATA
        assert os.getxattr(base / "d", "user.dir") == b"yes"
        assert os.listxattr(base / "l", follow_symlinks=False) == ["trusted.own"]
        assert os.listxattr(mnt / "m") == []  # a set's folder has none
        st = os.stat(base / "disk.img")
        assert st.st_size == 256 * mib and st.st_blocks * 512 == mib
        want = file_bytes(disk)
        with open(base / "disk.img", "rb") as f:
            for off, n in [(0, 4096), (100 * mib - 7, 20), (100 * mib + 12345, 200_000), (256 * mib - 9, 9)]:
                f.seek(off)
                assert f.read(n) == want[off:off + n]
        with pytest.raises(OSError) as ei:
            os.setxattr(base / "f", "user.new", b"x")
        assert ei.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
