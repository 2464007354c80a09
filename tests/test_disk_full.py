"""Disk full (ENOSPC): the repository lives on a small tmpfs. A snapshot that
does not fit fails with DiskFull's exit code and one line; nothing committed
is harmed (earlier snapshots restore identically) and, once there is room
again, the next snapshot works. ENOSPC is provoked at several stages (pack
write, index commit, init, restore) by leaving chosen amounts of free space."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

import store.errors as E
from conftest import MiB, make_tree, opened, rand_bytes, restore, run_pit, snapshot, tree_digest


def _mount(d) -> None:
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.decode().strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    _mount(d)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        if os.path.ismount(d):  # something still holds it: detach lazily
            subprocess.run(["umount", "-l", str(d)], check=False)


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def ballast(tmpfs, leave: int) -> str:
    """Fill the tmpfs so that about `leave` bytes stay free; returns the ballast path."""
    path = os.path.join(tmpfs, "ballast")
    size = max(0, free_bytes(tmpfs) - leave)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    assert free_bytes(tmpfs) <= leave + 64 * 1024
    return path


def one_line(p) -> str:
    err = p.stderr.decode(errors="replace")
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.startswith("pit: error: ") and err.count("\n") == 1, repr(err)
    return err


def snaps_json(repo) -> list:
    return json.loads(run_pit(repo, "snapshots", "--json").stdout)


def check_restores(repo, expected: dict, out) -> None:
    """Every snapshot id in `expected` restores to exactly its recorded digest."""
    for sid, digest in expected.items():
        shutil.rmtree(out, ignore_errors=True)
        run_pit(repo, "restore", sid, "--target", out)
        assert tree_digest(os.path.join(out, "src")) == digest, f"snapshot {sid[:12]} changed"
    shutil.rmtree(out, ignore_errors=True)


def test_snapshot_larger_than_the_disk(tmpfs, tmp_path):
    repo = tmpfs / "repo"
    src = tmp_path / "src"
    run_pit(repo, "init")
    make_tree(src, {"a": rand_bytes(MiB, "a"), "d": {"b": b"small", "c": rand_bytes(50_000, "c")}})
    first = json.loads(run_pit(repo, "snapshot", "--set", "s", src, "--json").stdout)
    expected = {first["id"]: tree_digest(src)}

    make_tree(src, {"huge": rand_bytes(12 * MiB, "huge")})  # more than the 8 MiB disk
    p = run_pit(repo, "snapshot", "--set", "s", src, expect=None)
    one_line(p)
    assert p.returncode == E.DiskFull.exit_code, p.stderr
    assert [s["id"] for s in snaps_json(repo)] == [first["id"]]
    check_restores(repo, expected, tmp_path / "out")

    # free space (the big file goes away), then the next snapshot works
    os.unlink(src / "huge")
    make_tree(src, {"later": rand_bytes(400_000, "later")})
    nxt = json.loads(run_pit(repo, "snapshot", "--set", "s", src, "--json").stdout)
    expected[nxt["id"]] = tree_digest(src)
    assert [s["id"] for s in snaps_json(repo)] == [first["id"], nxt["id"]]
    check_restores(repo, expected, tmp_path / "out")
    # the failed attempt's bytes were reclaimed, not left to fill the disk
    packs = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(repo / "packs") for f in fs)
    assert packs < 3 * MiB, packs


@pytest.mark.parametrize("what,leave", [
    ("data", 0), ("data", 16 * 1024), ("data", 300 * 1024), ("data", 900 * 1024),
    ("index", 64 * 1024), ("index", 160 * 1024),
])
def test_enospc_at_each_stage(tmpfs, tmp_path, what, leave):
    """`data`: 1.5 MiB of new chunks (fails writing the pack); `index`: 2500
    empty files (a tiny pack, but thousands of index and files-cache records:
    fails at the LMDB commit)."""
    repo = tmpfs / "repo"
    src = tmp_path / "src"
    run_pit(repo, "init")
    make_tree(src, {"base": rand_bytes(200_000, "base"), "d": {"x": b"x"}})
    first = json.loads(run_pit(repo, "snapshot", "--set", "s", src, "--json").stdout)
    expected = {first["id"]: tree_digest(src)}

    if what == "data":
        make_tree(src, {"new": rand_bytes(1536 * 1024, "new")})
    else:
        make_tree(src, {"many": {f"empty-{i:05}": b"" for i in range(2500)}})
    weight = ballast(tmpfs, leave)
    p = run_pit(repo, "snapshot", "--set", "s", src, expect=None)
    one_line(p)
    assert p.returncode == E.DiskFull.exit_code, p.stderr

    os.unlink(weight)
    assert [s["id"] for s in snaps_json(repo)] == [first["id"]]
    check_restores(repo, expected, tmp_path / "out")
    nxt = json.loads(run_pit(repo, "snapshot", "--set", "s", src, "--json").stdout)
    expected[nxt["id"]] = tree_digest(src)
    check_restores(repo, expected, tmp_path / "out")
    again = json.loads(run_pit(repo, "snapshot", "--set", "s", src, "--json").stdout)
    assert again["root"] == nxt["root"]


def test_disk_full_in_process_then_recover(tmpfs, tmp_path):
    """Through the API in one process: DiskFull is raised, the writer lock and
    session are released, and the same process snapshots fine afterwards."""
    from store.repository import Repository

    repo = str(tmpfs / "repo")
    Repository.init(repo).close()
    src = tmp_path / "src"
    make_tree(src, {"a": rand_bytes(300_000, "a")})
    s1 = snapshot(repo, "s", src)
    d1 = tree_digest(src)
    make_tree(src, {"b": rand_bytes(3 * MiB, "b")})
    weight = ballast(tmpfs, 100 * 1024)
    with pytest.raises(E.DiskFull):
        snapshot(repo, "s", src)
    os.unlink(weight)
    restore(repo, s1.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == d1
    s2 = snapshot(repo, "s", src, lock_wait=0.5)
    shutil.rmtree(tmp_path / "out")
    restore(repo, s2.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    with opened(repo, readonly=True) as r, r.reading() as txn:
        from store.snapshots import list_snapshots

        assert [s.id for s in list_snapshots(r, txn)] == [s1.id, s2.id]


def test_first_snapshot_fails_then_works(tmpfs, tmp_path):
    repo = tmpfs / "repo"
    run_pit(repo, "init")
    src = tmp_path / "src"
    make_tree(src, {"big": rand_bytes(10 * MiB, "big")})
    p = run_pit(repo, "snapshot", "--set", "s", src, expect=None)
    one_line(p)
    assert p.returncode == E.DiskFull.exit_code
    assert snaps_json(repo) == []
    os.unlink(src / "big")
    make_tree(src, {"small": rand_bytes(100_000, "small")})
    s = json.loads(run_pit(repo, "snapshot", "--set", "s", src, "--json").stdout)
    check_restores(repo, {s["id"]: tree_digest(src)}, tmp_path / "out")


def test_init_on_a_full_disk(tmpfs):
    """`pit init` on a full disk: DiskFull's code and one line, and once there
    is room again a second `pit init` at the same path works."""
    weight = ballast(tmpfs, 0)
    p = run_pit(tmpfs / "repo", "init", expect=None)
    how = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exited {p.returncode}"
    assert p.returncode == E.DiskFull.exit_code, f"pit init on a full disk {how}: {p.stderr!r}"
    one_line(p)
    os.unlink(weight)
    run_pit(tmpfs / "repo", "init")
    assert snaps_json(tmpfs / "repo") == []


def test_restore_onto_a_full_disk(repo_path, tmpfs, tmp_path):
    make_tree(tmp_path / "src", {"a": rand_bytes(2 * MiB, "a")})
    snapshot(repo_path, "s", tmp_path / "src")
    ballast(tmpfs, 512 * 1024)
    p = run_pit(repo_path, "restore", "s@latest", "--target", tmpfs / "out", expect=None)
    one_line(p)
    assert p.returncode == E.DiskFull.exit_code, p.stderr
    leftovers = [f for d, _, fs in os.walk(tmpfs / "out") for f in fs if f.startswith(".pit-")]
    assert leftovers == []  # the half-written temporary file is removed


@pytest.mark.parametrize("pack_mib", [32, 1], ids=["reopened-pack", "new-packs"])
def test_failed_snapshot_gives_its_pack_bytes_back(tmpfs, tmp_path, pack_mib):
    """Issue 12: a snapshot that fails on a full disk must not leave its
    uncommitted pack bytes filling the disk until the next writer. Right after
    the failure (no other writer has run), the pack it reopened is back at its
    committed size and the packs it created are gone."""
    from maint_helpers import pack_entries, pack_files

    repo = tmpfs / "repo"
    src = tmp_path / "src"
    run_pit(repo, "init", "--pack-size", pack_mib)
    make_tree(src, {"a": rand_bytes(600_000, "a")})
    first = json.loads(run_pit(repo, "snapshot", "--set", "s", src, "--json").stdout)
    committed = {n: e.size for n, e in pack_entries(str(repo)).items()}
    before = free_bytes(tmpfs)

    make_tree(src, {"huge": rand_bytes(12 * MiB, "huge")})  # more than the 8 MiB disk
    p = run_pit(repo, "snapshot", "--set", "s", src, expect=None)
    one_line(p)
    assert p.returncode == E.DiskFull.exit_code, p.stderr
    from store import packs as PK

    on_disk = {PK.pack_number(n): size for n, size in pack_files(str(repo)).items()}
    assert on_disk == committed, f"uncommitted pack bytes left behind: {on_disk} vs committed {committed}"
    assert free_bytes(tmpfs) >= before - 256 * 1024  # LMDB may keep a page or two
    assert [s["id"] for s in snaps_json(repo)] == [first["id"]]
    os.unlink(src / "huge")
    check_restores(repo, {first["id"]: tree_digest(src)}, tmp_path / "out")


def test_abort_truncates_what_the_session_appended(tmp_path):
    """The same without a full disk: a session that appended and then failed
    (here: an exception inside it) leaves the packs as committed."""
    from maint_helpers import pack_entries, pack_files
    from store import packs as PK
    from store.repository import Repository, blob_id

    repo = str(tmp_path / "repo")
    Repository.init(repo, pack_size=MiB).close()
    make_tree(tmp_path / "src", {"a": rand_bytes(300_000, "a")})
    snapshot(repo, "s", tmp_path / "src")
    committed = {n: e.size for n, e in pack_entries(repo).items()}
    with opened(repo) as r:
        with pytest.raises(RuntimeError):
            with r.writer() as w:
                for i in range(40):  # 2.5 MiB: fills the open pack, seals it, creates two more
                    data = rand_bytes(64 * 1024, f"x{i}")
                    w.put(PK.CHUNK, blob_id(data), data)
                assert len(pack_files(repo)) > len(committed)
                raise RuntimeError("the session fails")
    assert {PK.pack_number(n): s for n, s in pack_files(repo).items()} == committed
