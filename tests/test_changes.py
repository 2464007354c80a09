"""The change-set snapshot API gives the same snapshot as a full scan.

For each kind of change (adds, modifies, deletes, new nested directories,
file<->dir type changes, symlinks, metadata), a snapshot built from the
changed paths only must have the same root tree id as a full scan of the
same tree, with and without the files cache, and must cost O(changed
paths): it examines only the named paths."""
from __future__ import annotations

import os
import random
import shutil

import pytest

from conftest import F, Link, list_snaps, make_tree, rand_bytes, restore, snapshot, tree_digest
from store.errors import InvalidArgument


def base_spec() -> dict:
    return {
        "a.txt": b"alpha\n" * 100,
        "b.bin": rand_bytes(200_000, "b"),
        "big": rand_bytes(1_100_000, "big"),
        "d1": {"x": b"x" * 10, "y": rand_bytes(30_000, "y"), "sub": {"z": b"zed", "zz": rand_bytes(70_000, "zz")}},
        "d2": {"w": b"double-u"},
        "link": Link("a.txt"),
        "dirlink": Link("d1"),
        "empty": {},
        "wide": {f"f{i:03}": b"%d" % i for i in range(60)},
    }


@pytest.fixture
def world(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, base_spec())
    parent = snapshot(repo_path, "cs", src)
    return repo_path, src, parent


def check_equal_to_full_scan(repo_path, src, changed, tag: str):
    """Change-set snapshot vs. full scans; returns the change-set snapshot."""
    cs = snapshot(repo_path, "cs", src, changes=changed)
    assert cs.stats["mode"] == "changes"
    fresh = snapshot(repo_path, "fresh-" + tag, src)  # no parent, empty files cache
    assert fresh.stats["mode"] == "scan"
    assert cs.root == fresh.root, f"change set {changed} built a different tree than a full scan"
    cached = snapshot(repo_path, "cs", src)  # full scan of the same set: files cache in play
    assert cached.root == cs.root
    assert (cs.stats["files"], cs.stats["dirs"], cs.stats["bytes"]) == \
        (fresh.stats["files"], fresh.stats["dirs"], fresh.stats["bytes"])
    return cs


def add_file(src):
    make_tree(src, {"new.txt": b"brand new"})
    return [src / "new.txt"]


def modify_deep(src):
    (src / "d1" / "sub" / "zz").write_bytes(rand_bytes(70_000, "zz2"))
    return [src / "d1" / "sub" / "zz"]


def modify_same_size_same_mtime(src):
    p = src / "d1" / "y"
    st = os.stat(p)
    p.write_bytes(rand_bytes(30_000, "y-other"))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime tells
    return [p]


def delete_file(src):
    os.unlink(src / "d2" / "w")
    return [src / "d2" / "w"]


def delete_dir(src):
    shutil.rmtree(src / "d1")
    return [src / "d1"]


def delete_dir_report_children(src):
    shutil.rmtree(src / "d1")
    return [src / "d1" / "x", src / "d1" / "sub" / "z", src / "d1"]


def nested_new_dirs_leaf_only(src):
    make_tree(src, {"n1": {"n2": {"n3": {"f": b"deep new", "g": rand_bytes(50_000, "g")}, "e": {}}}})
    return [src / "n1" / "n2" / "n3" / "f"]  # only the leaf: the new ancestors must still appear whole


def nested_new_dirs_top(src):
    make_tree(src, {"n1": {"n2": {"n3": {"f": b"deep new"}}}})
    return [src / "n1"]


def file_to_dir(src):
    os.unlink(src / "a.txt")
    make_tree(src, {"a.txt": {"inside": b"now a directory", "more": {"m": b"m"}}})
    return [src / "a.txt"]


def file_to_dir_child_reported(src):
    os.unlink(src / "a.txt")
    make_tree(src, {"a.txt": {"inside": b"now a directory"}})
    return [src / "a.txt" / "inside"]


def dir_to_file(src):
    shutil.rmtree(src / "d2")
    make_tree(src, {"d2": b"now a file"})
    return [src / "d2"]


def dir_to_file_child_reported(src):
    shutil.rmtree(src / "d1")
    make_tree(src, {"d1": b"now a file"})
    return [src / "d1" / "sub" / "z"]


def symlink_changes(src):
    os.unlink(src / "link")
    os.symlink("b.bin", src / "link")  # retarget
    os.unlink(src / "d2" / "w")
    os.symlink("../a.txt", src / "d2" / "w")  # file -> symlink
    os.unlink(src / "dirlink")
    make_tree(src, {"dirlink": b"symlink -> file"})  # symlink -> file
    os.symlink("nowhere", src / "dangling")  # new dangling
    return [src / "link", src / "d2" / "w", src / "dirlink", src / "dangling"]


def dir_to_symlink(src):
    shutil.rmtree(src / "d1" / "sub")
    os.symlink("..", src / "d1" / "sub")
    return [src / "d1" / "sub"]


def metadata_only(src):
    os.chmod(src / "b.bin", 0o600)
    os.chmod(src / "d2", 0o700)
    os.utime(src / "big", ns=(1, 1_500_000_000_000_000_000))
    os.chown(src / "d1" / "x", 4321, 8765)
    return [src / "b.bin", src / "d2", src / "big", src / "d1" / "x"]


def spurious_and_duplicate(src):
    make_tree(src, {"wide": {"f007": b"changed seven"}})
    # unchanged paths, a path twice, a vanished path, and a child after its parent
    return [src / "wide" / "f007", src / "wide" / "f007", src / "d1" / "y", src / "never-existed",
            src / "d1", src / "d1" / "x"]


def whole_source(src):
    make_tree(src, {"wide": {"f001": b"one changed"}})
    (src / "big").write_bytes(rand_bytes(1_100_000, "big2"))
    return [src]


SCENARIOS = [add_file, modify_deep, modify_same_size_same_mtime, delete_file, delete_dir,
             delete_dir_report_children, nested_new_dirs_leaf_only, nested_new_dirs_top, file_to_dir,
             file_to_dir_child_reported, dir_to_file, dir_to_file_child_reported, symlink_changes,
             dir_to_symlink, metadata_only, spurious_and_duplicate, whole_source]


@pytest.mark.parametrize("mutate", SCENARIOS, ids=lambda f: f.__name__)
def test_change_set_equals_full_scan(world, mutate, tmp_path):
    repo_path, src, parent = world
    changed = mutate(src)
    cs = check_equal_to_full_scan(repo_path, src, changed, mutate.__name__.replace("_", "-"))
    assert cs.parent == parent.id
    restore(repo_path, cs.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)


def test_change_set_examines_only_named_paths(world):
    repo_path, src, _ = world
    (src / "wide" / "f010").write_bytes(b"ten, changed")
    cs = snapshot(repo_path, "cs", src, changes=[src / "wide" / "f010"])
    # 61 files exist under src/wide and ~70 in all: a change set looks at one
    assert cs.stats["examined_files"] == 1
    assert cs.stats["files_read"] == 1
    assert cs.stats["examined_dirs"] == 2  # src and src/wide, re-stat'ed as ancestors
    assert cs.stats["files"] == 1 + 1 + 1 + 4 + 1 + 60  # totals still cover the whole tree
    full = snapshot(repo_path, "fresh", src)
    assert full.root == cs.root


def test_empty_change_set_repeats_parent(world):
    repo_path, src, parent = world
    cs = snapshot(repo_path, "cs", src, changes=[])
    assert cs.root == parent.root
    assert cs.stats["examined_files"] == 0


def test_change_outside_sources_refused(world, tmp_path):
    repo_path, src, _ = world
    n = len(list_snaps(repo_path))
    with pytest.raises(InvalidArgument):
        snapshot(repo_path, "cs", src, changes=[tmp_path / "elsewhere" / "f"])
    assert len(list_snaps(repo_path)) == n


def test_change_set_without_parent_falls_back_to_scan(repo_path, tmp_path):
    make_tree(tmp_path / "src", base_spec())
    s = snapshot(repo_path, "first", tmp_path / "src", changes=[tmp_path / "src" / "a.txt"])
    assert s.stats["mode"] == "scan"
    assert s.root == snapshot(repo_path, "other", tmp_path / "src").root


def test_change_set_with_other_sources_falls_back_to_scan(world, tmp_path):
    repo_path, src, _ = world
    make_tree(tmp_path / "extra", {"e": b"e"})
    s = snapshot(repo_path, "cs", [src, tmp_path / "extra"], changes=[src / "a.txt"])
    assert s.stats["mode"] == "scan"
    assert s.root == snapshot(repo_path, "fresh", [src, tmp_path / "extra"]).root


def test_multiple_sources_change_set(repo_path, tmp_path):
    make_tree(tmp_path / "one", {"a": b"a", "d": {"b": b"b"}})
    make_tree(tmp_path / "two", {"c": b"c"})
    srcs = [tmp_path / "one", tmp_path / "two"]
    snapshot(repo_path, "m", srcs)
    make_tree(tmp_path / "two", {"new": {"deep": b"x"}})
    os.unlink(tmp_path / "one" / "d" / "b")
    cs = snapshot(repo_path, "m", srcs, changes=[tmp_path / "two" / "new" / "deep", tmp_path / "one" / "d" / "b"])
    assert cs.stats["mode"] == "changes"
    assert cs.root == snapshot(repo_path, "fresh", srcs).root


def test_random_change_chains(repo_path, tmp_path):
    """Twelve rounds of random edits, each snapshotted from its change set and
    compared with a full scan; the chain never drifts from the real tree."""
    rnd = random.Random(1234)
    src = tmp_path / "src"
    make_tree(src, base_spec())
    snapshot(repo_path, "chain", src)
    for rnd_i in range(12):
        changed = []
        for _ in range(rnd.randint(1, 6)):
            every = [os.path.join(d, n) for d, ds, fs in os.walk(src) for n in ds + fs]
            victim = rnd.choice(every) if every else None
            op = rnd.choice(["add", "add_dir", "modify", "delete", "retype", "link", "chmod"])
            if op in ("add", "add_dir") or victim is None:
                base = rnd.choice([d for d, _, _ in os.walk(src)])
                name = f"n{rnd_i}-{rnd.randrange(10**6)}"
                node = rand_bytes(rnd.randrange(0, 90_000), name) if op == "add" else {"in": b"x", "e": {}}
                make_tree(base, {name: node}, mtime=None)
                changed.append(os.path.join(base, name))
            elif op == "modify" and os.path.isfile(victim) and not os.path.islink(victim):
                with open(victim, "ab") as f:
                    f.write(rand_bytes(rnd.randrange(1, 20_000), victim + str(rnd_i)))
                changed.append(victim)
            elif op == "delete" or op == "modify":
                if os.path.isdir(victim) and not os.path.islink(victim):
                    shutil.rmtree(victim)
                else:
                    os.unlink(victim)
                changed.append(victim)
            elif op == "retype":
                was_dir = os.path.isdir(victim) and not os.path.islink(victim)
                shutil.rmtree(victim) if was_dir else os.unlink(victim)
                make_tree(os.path.dirname(victim), {os.path.basename(victim): b"file now" if was_dir else {"k": b"k"}})
                changed.append(victim)
            elif op == "link":
                if os.path.isdir(victim) and not os.path.islink(victim):
                    shutil.rmtree(victim)
                else:
                    os.unlink(victim)
                os.symlink(f"target-{rnd_i}", victim)
                changed.append(victim)
            else:
                if not os.path.islink(victim):
                    os.chmod(victim, rnd.choice([0o600, 0o644, 0o755, 0o700]))
                    changed.append(victim)
        rnd.shuffle(changed)
        cs = snapshot(repo_path, "chain", src, changes=changed)
        assert cs.stats["mode"] == "changes"
        full = snapshot(repo_path, f"full{rnd_i}", src)
        assert cs.root == full.root, f"round {rnd_i}: change set {changed} diverged from a full scan"
    restore(repo_path, "chain@latest", tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
