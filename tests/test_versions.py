"""The previous-versions index against a brute-force answer, across commits
and drops of the oldest, newest and middle snapshots, and inserts out of order."""
from __future__ import annotations

import random

import pytest

from store import versions
from store.objects import ObjectReader
from store.prune import drop_snapshot
from store.repository import Repository
from store.snapshots import Snapshot, add_snapshot, list_snapshots
from store.trees import DIR

from test_view_support import snap, write


def sig(e):
    if e is None:
        return None
    return (DIR,) if e.type == DIR else (e.type, e.content, e.nchunks)


def brute(repo, set_name):
    """{path: [(sig, [snapshot ids])]} by walking every snapshot: the slow truth."""
    with repo.reading() as txn:
        r = ObjectReader(repo, txn)
        snaps = list_snapshots(repo, txn, set_name)
        trees = [dict(r.walk(s.root)) for s in snaps]
    paths = set().union(*trees) if trees else set()
    out = {}
    for p in paths:
        runs, last = [], object()
        for s, t in zip(snaps, trees):
            cur = sig(t.get(p))
            if cur != last:
                runs.append((cur, []))
                last = cur
            runs[-1][1].append(s.id)
        out[p] = [run for run in runs if run[0] is not None]
    return out, trees


def check(repo, set_name):
    truth, trees = brute(repo, set_name)
    with repo.reading() as txn:
        assert versions.is_current(repo, txn, set_name)
        for p, runs in truth.items():
            got = versions.list_versions(repo, txn, set_name, p)
            got = [((DIR,) if v.state.type == DIR else (v.state.type, v.state.content, v.state.nchunks),
                    [s.id for s in v.snapshots]) for v in got]
            assert got == runs, p
        # children of every directory ever seen: the union of names
        dirs = {b""} | {p for t in trees for p, e in t.items() if e.type == DIR}
        for d in dirs:
            names = {p.rpartition(b"/")[2] for t in trees for p in t
                     if p.rpartition(b"/")[0] == d}
            got = {c.name for c in versions.list_children(repo, txn, set_name, d)}
            assert got == names, d


@pytest.fixture
def repo(tmp_path):
    r = Repository.init(str(tmp_path / "repo"))
    yield r
    r.close()


def test_versions_follow_commits(repo, tmp_path):
    src = str(tmp_path / "src")
    write(src, "report.txt", "v1")
    write(src, "sub/keep.txt", "same")
    s1 = snap(repo, "docs", src)
    write(src, "report.txt", "v2")
    s2 = snap(repo, "docs", src)
    write(src, "sub/new.txt", "n")
    s3 = snap(repo, "docs", src)
    write(src, "report.txt", "v1")  # reverted: a change again, so a new version
    s4 = snap(repo, "docs", src)
    with repo.reading() as txn:
        vs = versions.list_versions(repo, txn, "docs", b"src/report.txt")
        assert [[s.id for s in v.snapshots] for v in vs] == [[s1.id], [s2.id, s3.id], [s4.id]]
        assert [v.state.size for v in vs] == [2, 2, 2]
        keep = versions.list_versions(repo, txn, "docs", b"src/sub/keep.txt")
        assert len(keep) == 1 and len(keep[0].snapshots) == 4
        new = versions.list_versions(repo, txn, "docs", b"src/sub/new.txt")
        assert [s.id for s in new[0].snapshots] == [s3.id, s4.id]
    check(repo, "docs")


def test_versions_survive_drops_of_oldest_newest_middle(repo, tmp_path):
    src = str(tmp_path / "src")
    for i in range(6):
        write(src, "f.txt", f"v{i // 2}")
        write(src, f"only{i}.txt", "x")
        if i == 3:
            write(src, "dir/inner.txt", "i")
        snap(repo, "s", src)
    check(repo, "s")
    for pick in (0, -1, 1):  # oldest, newest, a middle one
        with repo.writer() as w:
            victim = list_snapshots(repo, w.txn, "s")[pick]
            drop_snapshot(w, victim)
        check(repo, "s")


def test_versions_random_inserts_and_drops(repo, tmp_path):
    """Snapshots added out of time order and dropped at random keep the index exact."""
    src = str(tmp_path / "src")
    roots = []
    rnd = random.Random(5)
    write(src, "z.txt", "always")
    for i in range(8):
        for name in ("a.txt", "b.txt", "d/c.txt", "d/e/f.txt"):
            if rnd.random() < 0.5:
                write(src, name, str(rnd.randrange(3)))
        if i == 4:
            import shutil
            shutil.rmtree(tmp_path / "src" / "d")
        roots.append(snap(repo, "pool", src).root)
    times = rnd.sample(range(1, 1000), 40)
    for step, t in enumerate(times):
        with repo.writer() as w:
            live = list_snapshots(repo, w.txn, "mix")
            if live and rnd.random() < 0.4:
                drop_snapshot(w, rnd.choice(live))
            else:
                root = rnd.choice(roots)
                s = Snapshot("mix", f"n{step}", t * 10**9, "h", ["src"], root, None, {})
                add_snapshot(w, s)
        check(repo, "mix")


def test_stale_index_is_detected_and_rebuilt(repo, tmp_path):
    src = str(tmp_path / "src")
    write(src, "a", "1")
    snap(repo, "s", src)
    write(src, "a", "2")
    s2 = snap(repo, "s", src)
    # A drop that bypasses the hook (an older pit, a repair) leaves the marks behind.
    from store import prune
    hooks = list(prune.drop_hooks)
    prune.drop_hooks.clear()
    try:
        with repo.writer() as w:
            drop_snapshot(w, s2)
    finally:
        prune.drop_hooks.extend(hooks)
    with repo.reading() as txn:
        assert not versions.is_current(repo, txn, "s")
    write(src, "a", "3")
    snap(repo, "s", src)  # the next commit rebuilds the set
    check(repo, "s")


def test_long_names_under_a_long_parent(repo, tmp_path):
    """A 255-byte name under a parent path of ~200 bytes: the key still fits
    LMDB's 511 bytes (the parent is keyed by its hash), the snapshot commits
    and its versions and the folder's children list right."""
    import os

    parent = "/".join(["p" * 60] * 3)  # 182 bytes, with the set name past the room left for it
    name = "n" * 255
    src = str(tmp_path / "src")
    write(src, f"{parent}/{name}", "one")
    write(src, f"{parent}/short", "s")
    snap(repo, "long-set-name-" + "x" * 40, src)
    write(src, f"{parent}/{name}", "two")
    snap(repo, "long-set-name-" + "x" * 40, src)
    set_name = "long-set-name-" + "x" * 40
    check(repo, set_name)
    with repo.reading() as txn:
        d = b"src/" + parent.encode()
        assert sorted(c.name for c in versions.list_children(repo, txn, set_name, d)) == [name.encode(), b"short"]
        assert len(versions.list_versions(repo, txn, set_name, d + b"/" + name.encode())) == 2
    assert os.path.exists(os.path.join(src, parent, name))


def test_a_lost_tree_of_an_old_snapshot_does_not_stop_the_next_commit(repo, tmp_path):
    """A repair lost a tree only an older snapshot has; the index is rebuilt
    (here: forced) inside the next snapshot's commit, which must still
    succeed: the lost directory's paths count as absent from that snapshot."""
    from store.objects import ObjectReader

    src = str(tmp_path / "src")
    write(src, "sub/f", "old")
    write(src, "keep", "k")
    s1 = snap(repo, "s", src)
    write(src, "sub/f", "new")
    s2 = snap(repo, "s", src)
    with repo.reading() as txn:
        lost = ObjectReader(repo, txn).lookup(s1.root, "src/sub").content
    with repo.index.env.begin(write=True) as txn:
        txn.delete(lost, db=repo.index.db["blobs"])
    repo.object_cache.clear()
    with repo.writer() as w:  # what a commit does when it finds the set's index stale
        versions.reindex_set(w, "s")
    write(src, "sub/g", "added")
    s3 = snap(repo, "s", src)
    with repo.reading() as txn:
        assert [[x.id for x in v.snapshots] for v in versions.list_versions(repo, txn, "s", b"src/keep")] == [
            [s1.id, s2.id, s3.id]]
        assert [[x.id for x in v.snapshots] for v in versions.list_versions(repo, txn, "s", b"src/sub/f")] == [
            [s2.id, s3.id]]
        assert versions.is_current(repo, txn, "s")
