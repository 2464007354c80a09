"""Diff between two snapshots: added, removed, modified (with sizes),
metadata-only and type changes; only differing subtrees are read."""
from __future__ import annotations

import os
import shutil

from conftest import Link, cli, cli_json, make_tree, opened, rand_bytes, run_pit, snapshot
from store.diff import diff_trees
from store.objects import ObjectReader


def spec() -> dict:
    return {
        "keep.txt": b"unchanged",
        "mod.bin": rand_bytes(100_000, "mod"),
        "gone.txt": b"to be removed",
        "chmod.txt": b"mode changes",
        "touch.txt": b"mtime changes",
        "retype": b"file, later a directory",
        "link": Link("keep.txt"),
        "olddir": {"a": b"a", "sub": {"b": b"b"}},
        "stable": {f"s{i}": b"%d" % i for i in range(20)},
        "deep": {"l1": {"l2": {"l3": {"leaf": b"leaf"}}}},
    }


def mutate(src) -> None:
    (src / "mod.bin").write_bytes(rand_bytes(150_000, "mod2"))
    os.unlink(src / "gone.txt")
    os.chmod(src / "chmod.txt", 0o600)
    os.utime(src / "touch.txt", ns=(0, 1_700_000_000_000_000_000))
    os.unlink(src / "retype")
    make_tree(src, {"retype": {"inside": b"x"}, "added.txt": b"new", "newdir": {"n": b"n", "m": {"o": b"o"}}})
    os.unlink(src / "link")
    os.symlink("mod.bin", src / "link")
    shutil.rmtree(src / "olddir")
    (src / "deep" / "l1" / "l2" / "l3" / "leaf").write_bytes(b"leaf changed")


EXPECTED = {
    ("+", "src/added.txt"), ("+", "src/newdir"), ("+", "src/newdir/n"), ("+", "src/newdir/m"),
    ("+", "src/newdir/m/o"),
    ("-", "src/gone.txt"), ("-", "src/olddir"), ("-", "src/olddir/a"), ("-", "src/olddir/sub"),
    ("-", "src/olddir/sub/b"),
    ("M", "src/mod.bin"), ("M", "src/link"), ("M", "src/deep/l1/l2/l3/leaf"),
    ("m", "src/chmod.txt"), ("m", "src/touch.txt"),
    ("T", "src/retype"),
}


def two_snapshots(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, spec())
    a = snapshot(repo_path, "d", src)
    mutate(src)
    b = snapshot(repo_path, "d", src)
    return a, b


def test_diff_api(repo_path, tmp_path):
    a, b = two_snapshots(repo_path, tmp_path)
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        r = ObjectReader(repo, txn)
        changes = list(diff_trees(r, a.root, r, b.root))
        assert list(diff_trees(r, a.root, r, a.root)) == []
        back = {(c.status, c.path.decode()) for c in diff_trees(r, b.root, r, a.root)}
    got = {(c.status, c.path.decode()) for c in changes}
    assert got == EXPECTED
    assert len(changes) == len(got)  # nothing reported twice
    mod = next(c for c in changes if c.path == b"src/mod.bin")
    assert (mod.old.size, mod.new.size) == (100_000, 150_000)
    flip = {"+": "-", "-": "+"}
    assert back == {(flip.get(s, s), p) for s, p in EXPECTED}


def test_diff_reads_only_differing_subtrees(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, {f"dir{i}": {f"sub{j}": {"f": b"%d-%d" % (i, j)} for j in range(5)} for i in range(30)})
    a = snapshot(repo_path, "d", src)
    (src / "dir17" / "sub3" / "f").write_bytes(b"changed")
    b = snapshot(repo_path, "d", src)

    class Counting(ObjectReader):
        reads = 0

        def tree(self, tree_id):
            Counting.reads += 1
            return super().tree(tree_id)

    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        r = Counting(repo, txn)
        changes = list(diff_trees(r, a.root, r, b.root))
    assert [(c.status, c.path) for c in changes] == [("M", b"src/dir17/sub3/f")]
    # root, src, dir17, sub3 on each side: 8 of the 2 x 182 trees
    assert Counting.reads <= 8


def test_diff_cli_text_and_json(repo_path, tmp_path):
    a, b = two_snapshots(repo_path, tmp_path)
    out = cli_json(repo_path, "diff", a.hex, "d@latest")
    assert (out["old"], out["new"]) == (a.hex, b.hex)
    got = {(c["status"], c["path"]) for c in out["changes"]}
    names = {"+": "added", "-": "removed", "M": "modified", "m": "metadata", "T": "type"}
    assert got == {(names[s], p) for s, p in EXPECTED}
    mod = next(c for c in out["changes"] if c["path"] == "src/mod.bin")
    assert (mod["old_size"], mod["new_size"], mod["type"]) == (100_000, 150_000, "file")
    retype = next(c for c in out["changes"] if c["path"] == "src/retype")
    assert retype["type"] == "dir"

    res = cli(repo_path, "diff", "d@-1", "d@latest")
    lines = set(res.stdout.splitlines())
    assert "M src/mod.bin  (100000 -> 150000 bytes, +50000)" in lines
    assert "+ src/newdir/" in lines and "- src/gone.txt" in lines and "T src/retype/" in lines
    p = run_pit(repo_path, "diff", "d@-1", "d@latest")
    assert b"5 added, 5 removed, 3 modified, 2 metadata only, 1 type changed" in p.stderr


def test_diff_of_identical_snapshots_is_empty(repo_path, tmp_path):
    make_tree(tmp_path / "src", spec())
    a = snapshot(repo_path, "d", tmp_path / "src")
    b = snapshot(repo_path, "e", tmp_path / "src")
    assert a.id != b.id and a.root == b.root
    assert cli_json(repo_path, "diff", a.hex, b.hex)["changes"] == []


def test_metadata_changes_are_named(repo_path, tmp_path):
    """xattrs only is `m`, and says so; the same data at other places of a
    sparse file is `M` (other bytes); a file gaining a hard link is `m`."""
    from meta_support import CD, CF, craft

    data = rand_bytes(50_000, "diff-sparse")
    tree = {"x.txt": CF(b"same", xattrs={b"user.a": b"1"}), "d": CD({"k": CF(b"k")}, xattrs={b"user.d": b"1"}),
            "sp": CF(size=1 << 20, pieces=[(0, data)]), "mode.txt": CF(b"m"), "ln": CF(b"linked")}
    a = craft(repo_path, "x", tree)
    tree.update({"x.txt": CF(b"same", xattrs={b"user.a": b"2"}), "d": CD({"k": CF(b"k")}),
                 "sp": CF(size=1 << 20, pieces=[(4096, data)]), "mode.txt": CF(b"m", mode=0o600, xattrs={b"user.q": b""}),
                 "ln": CF(b"linked", inode=(1, 2))})
    b = craft(repo_path, "x", tree)
    out = cli_json(repo_path, "diff", a.hex, b.hex)
    got = {c["path"]: (c["status"], c.get("metadata")) for c in out["changes"]}
    assert got == {"src/x.txt": ("metadata", ["xattrs"]), "src/d": ("metadata", ["xattrs"]),
                   "src/sp": ("modified", None), "src/mode.txt": ("metadata", ["mode", "xattrs"]),
                   "src/ln": ("metadata", ["hardlinks"])}
    lines = set(cli(repo_path, "diff", a.hex, b.hex).stdout.splitlines())
    assert "m src/x.txt  (xattrs)" in lines and "m src/mode.txt  (mode, xattrs)" in lines and "m src/d/  (xattrs)" in lines


def test_real_xattr_change_is_metadata(repo_path, tmp_path):
    """A real file whose extended attribute changed, snapshot by `pit snapshot`'s ingest."""
    src = tmp_path / "src"
    make_tree(src, {"f": b"same bytes", "g": b"other"})
    os.setxattr(src / "f", "user.tag", b"1")
    a = snapshot(repo_path, "rx", src)
    os.setxattr(src / "f", "user.tag", b"2")
    b = snapshot(repo_path, "rx", src)
    out = cli_json(repo_path, "diff", a.hex, b.hex)
    assert [(c["path"], c["status"], c.get("metadata")) for c in out["changes"]] == [
        ("src/f", "metadata", ["xattrs"])]
