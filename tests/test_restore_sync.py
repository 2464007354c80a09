"""Restore with sync=True (how a promoted secondary materialises an image into its live paths):
the target becomes equal to the tree, files already equal are not rewritten, extra names go."""
from __future__ import annotations

import dataclasses
import os
import shutil

from conftest import make_tree, opened, rand_bytes, snapshot, tree_digest
from store.objects import ObjectReader
from store.restore import Restorer
from store.snapshots import resolve

SPEC = {"a.txt": b"alpha", "big": rand_bytes(300_000, "big"), "d": {"x": b"x1", "sub": {"y": b"y1"}}, "e": {}}


def sync(repo_path, target, spec="r@latest"):
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        r = ObjectReader(repo, txn)
        entry = r.lookup(resolve(repo, txn, spec).root, "src")
        return Restorer(r, sync=True).restore(dataclasses.replace(entry, name=b""), str(target))


def test_sync_makes_the_target_equal_and_rewrites_only_what_differs(repo_path, tmp_path):
    src, live = tmp_path / "src", tmp_path / "live"
    make_tree(src, SPEC)
    snapshot(repo_path, "r", src)
    # the live copy: an earlier state, plus strays and type conflicts
    shutil.copytree(src, live / "src", symlinks=True)
    st = sync(repo_path, live / "src")  # first sync: everything the tree names is written
    assert tree_digest(live / "src") == tree_digest(src)
    (live / "src" / "a.txt").write_bytes(b"changed locally")
    (live / "src" / "stray.tmp").write_bytes(b"not in the image")
    os.makedirs(live / "src" / "d" / "strays" / "deep")
    (live / "src" / "d" / "strays" / "deep" / "f").write_bytes(b"f")
    shutil.rmtree(live / "src" / "e")
    (live / "src" / "e").write_bytes(b"a file where a directory belongs")
    (live / "src" / "d" / "x").unlink()
    os.symlink("/etc", live / "src" / "d" / "x")  # a symlink where a file belongs: never followed

    st = sync(repo_path, live / "src")
    assert tree_digest(live / "src") == tree_digest(src)
    assert st.files == 2  # a.txt and d/x rewritten
    assert st.unchanged == 2  # big and d/sub/y untouched
    assert st.removed >= 4  # stray.tmp, d/strays, the file e, the symlink x
    assert os.path.isdir("/etc") and os.listdir("/etc")
    assert sync(repo_path, live / "src").bytes == 0  # nothing differs any more
