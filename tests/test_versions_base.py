"""The versions index keeps the oldest snapshot's states as a base: dropping the
oldest folds only the next snapshot's events into it (not one event per path),
and a layout-1 index (every event keyed by its snapshot) is converted by the
first writer and queried as it is until then."""
from __future__ import annotations

import lmdb
import pytest

from store import versions as V
from store.prune import drop_snapshot
from store.repository import Repository
from store.snapshots import list_snapshots

from test_versions import check
from test_view_support import snap, write


@pytest.fixture
def repo(tmp_path):
    r = Repository.init(str(tmp_path / "repo"))
    yield r
    r.close()


def _dump(repo):
    """{db name: {key: value}} of the layout-2 databases."""
    out = {}
    with repo.reading() as txn:
        for name in V.DB_NAMES:
            db = repo.index.env.open_db(name, txn=txn, create=False)
            out[name] = dict(txn.cursor(db=db))
    return out


def _many_files(tmp_path, n=60):
    src = str(tmp_path / "src")
    for i in range(n):
        write(src, f"d{i % 4}/f{i}.txt", f"content {i}")
    return src


def test_drop_oldest_visits_only_what_the_next_changed(repo, tmp_path):
    src = _many_files(tmp_path)
    s1 = snap(repo, "s", src)
    write(src, "d0/f0.txt", "changed")
    write(src, "d1/new.txt", "new")
    s2 = snap(repo, "s", src)
    write(src, "d2/f2.txt", "changed too")
    s3 = snap(repo, "s", src)
    check(repo, "s")
    d = _dump(repo)
    # the base: one entry per path of the oldest snapshot, none in bysnap
    base = [k for k in d[V.DB_NAMES[0]] if k[-V.SUFFIX:] == V.BASE]
    assert len(base) == 60 + 4 + 1  # files, d0..d3, the src folder
    assert not any(k[:32] == s1.id for k in d[V.DB_NAMES[1]])
    assert {k[:32] for k in d[V.DB_NAMES[1]]} == {s2.id, s3.id}

    with repo.writer() as w:
        visited = V.forget_snapshot(w, s1)
        drop_snapshot_rest(w, s1)
    assert visited == 2  # s2's two events, not 65 paths
    check(repo, "s")
    d = _dump(repo)
    assert {k[:32] for k in d[V.DB_NAMES[1]]} == {s3.id}
    assert len([k for k in d[V.DB_NAMES[0]] if k[-V.SUFFIX:] == V.BASE]) == 66
    with repo.reading() as txn:
        vs = V.list_versions(repo, txn, "s", b"src/d0/f0.txt")
        assert [[s.id for s in v.snapshots] for v in vs] == [[s2.id, s3.id]]
        assert vs[0].state.size == len("changed")

    # the last two: the middle (newest) one, then the only one left
    with repo.writer() as w:
        drop_snapshot(w, s3)
    check(repo, "s")
    with repo.writer() as w:
        assert V.forget_snapshot(w, s2) == 66
        drop_snapshot_rest(w, s2)
    assert all(not v for v in _dump(repo).values())


def drop_snapshot_rest(w, s):
    """drop_snapshot without the hooks (forget_snapshot already ran)."""
    from store import prune

    hooks = list(prune.drop_hooks)
    prune.drop_hooks.clear()
    try:
        drop_snapshot(w, s)
    finally:
        prune.drop_hooks.extend(hooks)


def test_new_oldest_becomes_the_base(repo, tmp_path):
    """A snapshot inserted before the oldest: the old base's differences become
    events of the snapshot after it."""
    from store.snapshots import Snapshot, add_snapshot

    src = _many_files(tmp_path, 8)
    s1 = snap(repo, "pool", src)
    write(src, "d0/f0.txt", "other")
    write(src, "d1/only-later.txt", "x")
    s2 = snap(repo, "pool", src)
    with repo.writer() as w:
        add_snapshot(w, Snapshot("s", "late", 2000 * 10**9, "h", ["src"], s2.root, None, {}))
        add_snapshot(w, Snapshot("s", "early", 1000 * 10**9, "h", ["src"], s1.root, None, {}))
    check(repo, "s")
    with repo.reading() as txn:
        late = list_snapshots(repo, txn, "s")[1]
        vs = V.list_versions(repo, txn, "s", b"src/d1/only-later.txt")
        assert [[s.name for s in v.snapshots] for v in vs] == [["late"]]
    d = _dump(repo)
    assert sorted(k[32:].rpartition(b"\0")[0].rpartition(b"\0")[2] for k in d[V.DB_NAMES[1]]
                  if k[:32] == late.id) == [b"f0.txt", b"only-later.txt"]


def _to_layout_1(repo):
    """Rewrite the index as layout 1 would have it, and remove layout 2."""
    with repo.writer() as w:
        env, txn = repo.index.env, w.txn
        new = [env.open_db(n, txn=txn, create=False) for n in V.DB_NAMES]
        old = [env.open_db(n, txn=txn, create=True) for n in V.DB_NAMES_V1]
        oldest = {}
        for k in list(txn.cursor(db=new[2]).iternext(values=False)):
            oldest.setdefault(k[:-V.SUFFIX - 1], k[-V.SUFFIX:])
            txn.put(k, b"", db=old[2])
        for k, v in list(txn.cursor(db=new[0])):
            pk, suffix = k[:-V.SUFFIX], k[-V.SUFFIX:]
            if suffix == V.BASE:
                suffix = oldest[pk.split(b"\0", 1)[0]]
            txn.put(pk + suffix, v, db=old[0])
            txn.put(suffix[-32:] + pk, b"", db=old[1])
        for db in new:
            txn.drop(db, delete=True)


def test_layout_1_is_read_then_converted(repo, tmp_path):
    src = _many_files(tmp_path, 12)
    snap(repo, "s", src)
    write(src, "d0/f0.txt", "2")
    snap(repo, "s", src)
    write(src, "d3/f3.txt", "3")
    snap(repo, "t", src)
    snap(repo, "s", src)
    want = {s: _answers(repo, s) for s in ("s", "t")}
    _to_layout_1(repo)
    with repo.reading() as txn:
        with pytest.raises(lmdb.NotFoundError):
            repo.index.env.open_db(V.DB_NAMES[0], txn=txn, create=False)
    # readers query layout 1 as it is
    for s in ("s", "t"):
        assert _answers(repo, s) == want[s]
        check(repo, s)
    # the first writer converts it, then drops the oldest the new way
    with repo.writer() as w:
        oldest = list_snapshots(repo, w.txn, "s")[0]
        drop_snapshot(w, oldest)
    check(repo, "s")
    check(repo, "t")
    assert _answers(repo, "t") == want["t"]
    with repo.reading() as txn:
        for name in V.DB_NAMES_V1:  # emptied
            db = repo.index.env.open_db(name, txn=txn, create=False)
            assert txn.stat(db)["entries"] == 0
    d = _dump(repo)
    with repo.reading() as txn:
        t0 = list_snapshots(repo, txn, "t")[0]
    assert not any(k[:32] == t0.id for k in d[V.DB_NAMES[1]])  # t's only snapshot is base


def _answers(repo, set_name):
    with repo.reading() as txn:
        out = {}
        for d in (b"", b"src", b"src/d0", b"src/d3"):
            out[d] = sorted((c.name, c.present) for c in V.list_children(repo, txn, set_name, d))
        for p in (b"src/d0/f0.txt", b"src/d3/f3.txt", b"src/d1/f1.txt"):
            out[p] = [(v.state.content, [s.id for s in v.snapshots])
                      for v in V.list_versions(repo, txn, set_name, p)]
    return out
