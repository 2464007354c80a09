"""A full disk during `pit snapshot` and `pit compact`: the command fails with
DiskFull's exit code and one line (no traceback), reads keep working while the
disk is full, and once space is freed the repository is consistent (verify
clean, earlier snapshots restore identically) and the operation succeeds.

The repository lives on a 12 MiB tmpfs mounted for the test (we run as root);
the finalizer always unmounts it."""
from __future__ import annotations

import os
import random
import subprocess

import pytest

from maint_helpers import (
    assert_verify_clean, init_repo, make_tree, pit, pit_cmd, pit_env, pit_json, restore_digest, snapshot_ids,
    source_digest, write_file,
)
from store.errors import DiskFull

KiB = 1024


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if os.path.ismount(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(fs: str, leave: int) -> str:
    """Fill the file system until only about `leave` bytes are free."""
    filler = os.path.join(fs, "filler")
    with open(filler, "wb") as f:
        block = b"\xa5" * (64 * KiB)
        while True:
            room = free_bytes(fs) - leave
            if room <= 0:
                break
            try:
                f.write(block[: min(len(block), room)])
                f.flush()
            except OSError:
                break
    return filler


def run_raw(repo, *args):
    """Run pit without checking anything yet (the checks come after the consistency checks)."""
    return subprocess.run(pit_cmd(repo, *args), capture_output=True, env=pit_env(), timeout=120)


def check_disk_full_error(p) -> None:
    err = p.stderr.decode()
    assert p.returncode == DiskFull.exit_code, (p.returncode, err)
    assert err.startswith("pit: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("leave", [0, 48 * KiB, 600 * KiB])
def test_disk_full_during_snapshot(small_fs, tmp_path, leave):
    repo = init_repo(os.path.join(small_fs, "repo"), pack_mib=1)
    rng = random.Random(71 + leave)
    src1 = str(tmp_path / "one" / "src")
    make_tree(src1, rng, nfiles=8, size_range=(20_000, 100_000))
    pit(repo, "snapshot", "--set", "s", src1)
    (first,) = snapshot_ids(repo)
    d1 = source_digest(src1)
    src2 = str(tmp_path / "two" / "src")
    make_tree(src2, rng, nfiles=30, size_range=(80_000, 160_000))  # ~3.5 MiB, incompressible

    filler = fill(small_fs, leave)
    p = run_raw(repo, "snapshot", "--set", "s", src2)
    assert p.returncode != 0
    # reads work while the disk is still full
    assert snapshot_ids(repo) == [first]
    assert restore_digest(repo, first, str(tmp_path)) == d1
    pit(repo, "snapshots")

    os.unlink(filler)
    assert snapshot_ids(repo) == [first]
    assert_verify_clean(repo, deep=True)
    assert restore_digest(repo, first, str(tmp_path)) == d1
    out, _ = pit_json(repo, "snapshot", "--set", "s", src2)
    assert restore_digest(repo, out["id"], str(tmp_path)) == source_digest(src2)
    assert restore_digest(repo, first, str(tmp_path)) == d1
    assert_verify_clean(repo, deep=True)
    check_disk_full_error(p)


@pytest.mark.parametrize("leave", [0, 16 * KiB])
def test_disk_full_during_compact(small_fs, tmp_path, leave):
    repo = init_repo(os.path.join(small_fs, "repo"), pack_mib=1)
    rng = random.Random(81 + leave)
    src = str(tmp_path / "src")
    files = make_tree(src, rng, nfiles=24, size_range=(80_000, 140_000))  # ~2.6 MiB
    out, _ = pit_json(repo, "snapshot", "--set", "s", src)
    a = out["id"]
    for p in files[:16]:  # two thirds rewritten: the first packs keep a third live
        write_file(p, rng.randbytes(rng.randint(80_000, 140_000)))
    out, _ = pit_json(repo, "snapshot", "--set", "s", src)
    b = out["id"]
    db = source_digest(src)
    pit(repo, "forget", "--set", "s", a)

    filler = fill(small_fs, leave)
    p = run_raw(repo, "compact", "--threshold", "0")
    assert p.returncode != 0
    assert snapshot_ids(repo) == [b]
    assert restore_digest(repo, b, str(tmp_path)) == db  # readable while full

    os.unlink(filler)
    assert_verify_clean(repo, deep=True)
    assert restore_digest(repo, b, str(tmp_path)) == db
    out, _ = pit_json(repo, "compact", "--threshold", "0")
    assert out["damaged"] == [] and out["packs_waiting"] == 0
    assert_verify_clean(repo, deep=True)
    assert restore_digest(repo, b, str(tmp_path)) == db
    # and the repository takes new snapshots
    write_file(os.path.join(src, "after.bin"), rng.randbytes(100_000))
    out, _ = pit_json(repo, "snapshot", "--set", "s", src)
    assert restore_digest(repo, out["id"], str(tmp_path)) == source_digest(src)
    check_disk_full_error(p)


def test_disk_full_at_index_commit(small_fs, tmp_path):
    """A drop writes almost nothing to packs (a tombstone fits in the pack's last page)
    but rewrites many index pages: with 16 KiB free the LMDB commit is what fails.
    It must still be DiskFull (exit 19, one line), and nothing may change."""
    repo = init_repo(os.path.join(small_fs, "repo"), pack_mib=1)
    rng = random.Random(91)
    src = str(tmp_path / "src")
    files = make_tree(src, rng, nfiles=24, size_range=(80_000, 140_000))
    a = pit_json(repo, "snapshot", "--set", "s", src)[0]["id"]
    da = source_digest(src)
    for p in files[:16]:
        write_file(p, rng.randbytes(100_000))
    b = pit_json(repo, "snapshot", "--set", "s", src)[0]["id"]
    db = source_digest(src)

    filler = fill(small_fs, 16 * KiB)
    p = run_raw(repo, "forget", "--set", "s", a)
    assert p.returncode != 0
    assert snapshot_ids(repo) == [a, b]  # abandoned: nothing committed
    os.unlink(filler)
    assert_verify_clean(repo, deep=True)
    assert restore_digest(repo, a, str(tmp_path)) == da
    assert restore_digest(repo, b, str(tmp_path)) == db
    pit(repo, "forget", "--set", "s", a)
    assert snapshot_ids(repo) == [b]
    assert_verify_clean(repo)
    check_disk_full_error(p)
