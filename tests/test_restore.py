"""Restore of whole snapshots, subtrees and single files; restore writes only
inside its target and never follows a symlink planted there."""
from __future__ import annotations

import json
import os

import pytest

from conftest import F, Link, cli, make_tree, rand_bytes, restore, run_pit, snapshot, tree_digest
from store.errors import StoreError, UnsafePath

SPEC = {
    "top.txt": b"top",
    "d1": {"x": rand_bytes(90_000, "x"), "sub": {"y": b"why", "deeper": {"z": rand_bytes(5000, "z")}},
           "link": Link("x"), "empty": {}},
    "d2": {"w": F(b"w", mode=0o640)},
}


@pytest.fixture
def snap(repo_path, tmp_path):
    make_tree(tmp_path / "src", SPEC)
    return snapshot(repo_path, "r", tmp_path / "src")


def test_restore_subtree(repo_path, snap, tmp_path):
    restore(repo_path, "r@latest", tmp_path / "out", path="src/d1/sub")
    assert os.listdir(tmp_path / "out") == ["sub"]
    assert tree_digest(tmp_path / "out" / "sub") == tree_digest(tmp_path / "src" / "d1" / "sub")
    assert tree_digest(tmp_path / "out")[b"sub"] == tree_digest(tmp_path / "src" / "d1")[b"sub"]


def test_restore_single_file_and_symlink(repo_path, snap, tmp_path):
    restore(repo_path, "r@latest", tmp_path / "out", path="src/d2/w")
    restore(repo_path, "r@latest", tmp_path / "out", path="src/d1/link")
    assert sorted(os.listdir(tmp_path / "out")) == ["link", "w"]
    got, want1, want2 = tree_digest(tmp_path / "out"), tree_digest(tmp_path / "src" / "d2"), \
        tree_digest(tmp_path / "src" / "d1")
    assert got[b"w"] == want1[b"w"] and got[b"link"] == want2[b"link"]


def test_restore_subtree_cli(repo_path, snap, tmp_path):
    res = cli(repo_path, "restore", "r@latest:src/d1", "--target", tmp_path / "out", "--json")
    out = json.loads(res.stdout)
    assert out["snapshot"] == snap.hex and (out["files"], out["symlinks"]) == (3, 1)
    assert out["dirs"] == 4  # d1, sub, deeper, empty
    assert tree_digest(tmp_path / "out" / "d1") == tree_digest(tmp_path / "src" / "d1")
    p = run_pit(repo_path, "restore", f"{snap.hex[:8]}:src/d1/sub/deeper/z", "--target", tmp_path / "one")
    assert (tmp_path / "one" / "z").read_bytes() == (tmp_path / "src" / "d1" / "sub" / "deeper" / "z").read_bytes()
    assert p.stderr == b""


def test_restore_leaves_no_temporary_files(repo_path, snap, tmp_path):
    restore(repo_path, "r@latest", tmp_path / "out")
    restore(repo_path, "r@latest", tmp_path / "out")
    names = [n for d, ds, fs in os.walk(tmp_path / "out") for n in ds + fs]
    assert not [n for n in names if n.startswith(".pit-")]


# ------------------------------------------------------ planted symlinks
@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"
    make_tree(d, {"victim": b"must stay", "sub": {}})
    return d


def refused(fn, outside) -> None:
    """`fn` must refuse (a StoreError), leave `outside` alone, and say why:
    UnsafePath, the error restore promises for a symlink in the target."""
    with pytest.raises(StoreError) as info:
        fn()
    assert outside_untouched(outside)
    assert isinstance(info.value, UnsafePath), \
        f"planted symlink reported as {type(info.value).__name__}: {info.value}"


def outside_untouched(outside) -> bool:
    return sorted(os.listdir(outside)) == ["sub", "victim"] and os.listdir(outside / "sub") == [] \
        and (outside / "victim").read_bytes() == b"must stay"


def test_planted_symlink_for_a_directory_is_not_followed(repo_path, snap, tmp_path, outside):
    target = tmp_path / "out"
    os.makedirs(target / "src")
    os.symlink(outside, target / "src" / "d1")  # where the snapshot has a directory
    refused(lambda: restore(repo_path, "r@latest", target), outside)
    assert os.readlink(target / "src" / "d1") == str(outside)


def test_planted_symlink_at_the_top_is_not_followed(repo_path, snap, tmp_path, outside):
    target = tmp_path / "out"
    os.makedirs(target)
    os.symlink(outside, target / "src")
    p = run_pit(repo_path, "restore", "r@latest", "--target", target, expect=None)
    assert outside_untouched(outside)
    assert p.stderr.decode().startswith("pit: error: ") and p.stderr.count(b"\n") == 1
    assert p.returncode == UnsafePath.exit_code, p.stderr


def test_planted_symlink_for_a_subtree_restore(repo_path, snap, tmp_path, outside):
    target = tmp_path / "out"
    os.makedirs(target)
    os.symlink(outside / "sub", target / "sub")
    refused(lambda: restore(repo_path, "r@latest", target, path="src/d1/sub"), outside)


def test_planted_symlink_for_a_file_is_replaced_not_written_through(repo_path, snap, tmp_path, outside):
    target = tmp_path / "out"
    os.makedirs(target / "src" / "d2")
    os.symlink(outside / "victim", target / "src" / "top.txt")
    os.symlink(outside / "victim", target / "src" / "d2" / "w")
    restore(repo_path, "r@latest", target)
    assert outside_untouched(outside)
    assert not os.path.islink(target / "src" / "top.txt")
    assert tree_digest(target / "src") == tree_digest(tmp_path / "src")


def test_planted_dangling_symlink_where_a_directory_goes(repo_path, snap, tmp_path, outside):
    target = tmp_path / "out"
    os.makedirs(target / "src")
    os.symlink(outside / "nonexistent", target / "src" / "d1")
    refused(lambda: restore(repo_path, "r@latest", target), outside)
    assert not (outside / "nonexistent").exists()


def test_symlink_then_directory_across_two_restores(repo_path, tmp_path, outside):
    """Snapshot 1 has `esc -> outside`; snapshot 2 has a directory `esc` with
    files. Restoring 1 then 2 into the same target must not write through the
    link that restore 1 created."""
    src = tmp_path / "src"
    make_tree(src, {"esc": Link(str(outside))})
    snapshot(repo_path, "attack", src)
    os.unlink(src / "esc")
    make_tree(src, {"esc": {"victim": b"overwritten!", "sub": {"planted": b"planted"}}})
    snapshot(repo_path, "attack", src)
    target = tmp_path / "out"
    restore(repo_path, "attack@-1", target)
    assert os.path.islink(target / "src" / "esc")
    refused(lambda: restore(repo_path, "attack@latest", target), outside)


def test_file_where_target_has_a_directory(repo_path, snap, tmp_path):
    target = tmp_path / "out"
    make_tree(target / "src", {"top.txt": {"blocker": b"b"}})
    p = run_pit(repo_path, "restore", "r@latest", "--target", target, expect=None)
    assert p.returncode != 0
    assert p.stderr.decode().startswith("pit: error: ") and p.stderr.count(b"\n") == 1
    assert (target / "src" / "top.txt" / "blocker").read_bytes() == b"b"


def test_a_directory_in_the_way_fails_cleanly(tmp_path):
    """A directory where the snapshot has a file: a one-line error, and no
    temporary file or open descriptor left behind."""
    from conftest import init_repo

    src = tmp_path / "src"
    make_tree(src, {"d": {f"f{i}.txt": b"%d\n" % i for i in range(10)}})
    repo = init_repo(tmp_path / "repo")
    snapshot(repo, "s", src)
    out = tmp_path / "out"
    os.makedirs(out / "src" / "d" / "f5.txt")
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(StoreError, match="directory is in the way"):
        restore(repo, "s@latest", out)
    assert not [n for _, _, fs in os.walk(out) for n in fs if n.startswith(".pit-")]
    assert len(os.listdir("/proc/self/fd")) == fds
