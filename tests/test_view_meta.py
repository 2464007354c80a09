"""The restore views over sparse files (issue 12): reads put the data at its
extents and the holes read as zeros without reading a chunk; ETags tell
the same data at other places apart; the previous-versions index (layout 3)
carries a sparse file's extents, and an index of layout 2 (without them) is
still read, then rebuilt by the next writer."""
from __future__ import annotations

import lmdb
import msgpack
import pytest

from conftest import rand_bytes
from meta_support import CD, CF, craft, file_bytes
from store import versions as V
from store.repository import Repository
from store.view import View

MiB = 1 << 20


@pytest.fixture
def sparse_repo(tmp_path):
    path = str(tmp_path / "repo")
    Repository.init(path).close()
    one = CF(size=64 * MiB, pieces=[(8 * MiB, rand_bytes(300_000, "one")), (40 * MiB, rand_bytes(5000, "t"))])
    two = CF(size=64 * MiB, pieces=[(8 * MiB, rand_bytes(300_000, "two")), (40 * MiB, rand_bytes(5000, "t"))])
    s1 = craft(path, "vm", {"disk.img": one, "d": CD({"x": CF(b"x")})})
    s2 = craft(path, "vm", {"disk.img": two})
    repo = Repository(path)
    yield repo, (s1, one), (s2, two)
    repo.close()


def count_reads(repo, monkeypatch) -> list:
    reads = []
    real = repo.read_entry
    monkeypatch.setattr(repo, "read_entry", lambda bid, e, *a: reads.append(bid) or real(bid, e, *a))
    return reads


def test_sparse_reads_holes_as_zeros_and_reads_only_data(sparse_repo, monkeypatch):
    repo, (s1, one), (s2, two) = sparse_repo
    v = View(repo)
    node = v.resolve(f"vm/{s1.name}/src/disk.img")
    assert node.size == 64 * MiB
    want = file_bytes(one)
    repo.chunk_cache.clear()
    f = v.open(node)  # reads the chunk list
    reads = count_reads(repo, monkeypatch)
    assert f.size == 64 * MiB
    assert f.read(0, 4096) == bytes(4096) and f.read(30 * MiB, MiB) == bytes(MiB)
    assert reads == []  # holes cost no chunk read
    for off, n in [(8 * MiB - 10, 20), (8 * MiB + 100_000, 70_000), (40 * MiB - 3, 5010), (64 * MiB - 5, 100)]:
        assert f.read(off, n) == want[off:off + n]
    assert 0 < len(reads) <= 4
    assert b"".join(f.iter_range(8 * MiB - 5, 8 * MiB + 300_005)) == want[8 * MiB - 5:8 * MiB + 300_005]
    assert b"".join(f.iter_range()) == want
    assert all(len(p) <= MiB for p in f.iter_range(0, 20 * MiB))


def test_etags_tell_places_apart(tmp_path):
    path = str(tmp_path / "repo")
    Repository.init(path).close()
    data = rand_bytes(100_000, "same")
    s = craft(path, "e", {"a": CF(size=MiB, pieces=[(0, data)]), "b": CF(size=MiB, pieces=[(4096, data)]),
                          "c": CF(size=2 * MiB, pieces=[(0, data)]), "d": CF(size=MiB, pieces=[(0, data)])})
    with Repository(path) as repo:
        v = View(repo)
        tags = {n: v.resolve(f"e/{s.name}/src/{n}").etag for n in "abcd"}
    assert tags["a"] == tags["d"] and len({tags["a"], tags["b"], tags["c"]}) == 3


def test_versions_of_a_sparse_file_read_right(sparse_repo):
    repo, (s1, one), (s2, two) = sparse_repo
    v = View(repo)
    vfile = v.resolve("vm/.versions/src/disk.img")
    nodes = v.listdir(vfile)
    assert len(nodes) == 2
    for n, node in zip(nodes, (one, two)):
        assert n.size == 64 * MiB
        f = v.open(n)
        want = file_bytes(node)
        assert f.read(8 * MiB, 300_000) == want[8 * MiB:8 * MiB + 300_000]
        assert f.read(0, 100) == bytes(100)
    with repo.reading() as txn:
        vs = V.list_versions(repo, txn, "vm", b"src/disk.img")
    assert [x.state.extents for x in vs] == [[[8 * MiB, 300_000], [40 * MiB, 5000]]] * 2


def test_a_sparse_file_whose_holes_moved_is_a_new_version(tmp_path):
    path = str(tmp_path / "repo")
    Repository.init(path).close()
    data = rand_bytes(70_000, "moving")
    craft(path, "m", {"f": CF(size=MiB, pieces=[(0, data)])})
    craft(path, "m", {"f": CF(size=MiB, pieces=[(65536, data)])})  # the same bytes elsewhere
    with Repository(path) as repo, repo.reading() as txn:
        assert len(V.list_versions(repo, txn, "m", b"src/f")) == 2


def _to_layout_2(repo):
    """The index as layout 2 had it: states without extents, under the v2 names."""
    with repo.writer() as w:
        env, txn = repo.index.env, w.txn
        new = [env.open_db(n, txn=txn, create=False) for n in V.DB_NAMES]
        old = [env.open_db(n, txn=txn, create=True) for n in V.DB_NAMES_V2]
        for a, b in zip(new, old):
            for k, val in list(txn.cursor(db=a)):
                if a is new[0]:
                    st = msgpack.unpackb(val)
                    val = msgpack.packb(st[:6] if st is not None else None, use_bin_type=True)
                txn.put(k, val, db=b)
        for db in new:
            txn.drop(db, delete=True)


def test_layout_2_is_read_then_rebuilt(sparse_repo, tmp_path):
    repo, (s1, one), (s2, two) = sparse_repo
    _to_layout_2(repo)
    with repo.reading() as txn:
        with pytest.raises(lmdb.NotFoundError):
            repo.index.env.open_db(V.DB_NAMES[0], txn=txn, create=False)
        vs = V.list_versions(repo, txn, "vm", b"src/disk.img")
        assert V.is_current(repo, txn, "vm")
    assert len(vs) == 2 and all(x.state.extents is None for x in vs)
    # the views still read the right bytes: the snapshot's tree has the extents
    v = View(repo)
    nodes = v.listdir(v.resolve("vm/.versions/src/disk.img"))
    assert v.open(nodes[0]).read(8 * MiB, 300_000) == file_bytes(one)[8 * MiB:8 * MiB + 300_000]
    repo.close()
    # the next writer rebuilds every set in layout 3 and empties layout 2
    path = str(tmp_path / "repo")
    craft(path, "other", {"f": CF(b"f")})
    with Repository(path) as r2, r2.reading() as txn:
        vs = V.list_versions(r2, txn, "vm", b"src/disk.img")
        assert [x.state.extents is not None for x in vs] == [True, True]
        assert V.is_current(r2, txn, "vm") and V.is_current(r2, txn, "other")
        assert [c.name for c in V.list_children(r2, txn, "vm", b"src")] == [b"d", b"disk.img"]
        for name in V.DB_NAMES_V2:
            assert txn.stat(r2.index.env.open_db(name, txn=txn, create=False))["entries"] == 0


def test_webdav_get_range_and_zip_of_a_sparse_file(tmp_path):
    """Through `pit serve` and curl: a whole GET, a Range across a hole's
    edge and a zip download give the file's bytes, zeros included."""
    import io
    import os
    import subprocess
    import sys
    import zipfile

    from davserver.config import hash_password
    from test_view_support import free_port, stop, wait_port

    path = str(tmp_path / "repo")
    Repository.init(path).close()
    node = CF(size=8 * MiB + 3, pieces=[(MiB, rand_bytes(200_000, "dav")), (5 * MiB, rand_bytes(70_000, "dav2"))])
    s = craft(path, "vm", {"disk.img": node})
    want = file_bytes(node)
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'[users.alice]\npassword = "{hash_password("pw")}"\nsets = ["vm"]\n')
    port = free_port()
    pit = os.path.join(os.path.dirname(sys.executable), "pit")
    proc = subprocess.Popen([pit, "-r", path, "serve", "-c", str(cfg), "--port", str(port), "--self-signed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)

        def get(url_path, *args):
            r = subprocess.run(["curl", "-s", "-g", "-k", "-u", "alice:pw", *args,
                                f"https://127.0.0.1:{port}{url_path}"], capture_output=True, timeout=60, check=True)
            return r.stdout

        base = f"/vm/{s.name}/src"
        assert get(f"{base}/disk.img") == want
        lo, hi = MiB - 100, MiB + 99
        assert get(f"{base}/disk.img", "-H", f"Range: bytes={lo}-{hi}") == want[lo:hi + 1]
        with zipfile.ZipFile(io.BytesIO(get(f"{base}/?zip"))) as z:
            assert z.read("disk.img") == want
    finally:
        stop(proc)
