"""The view model: layout, latest, versions folders, scope, verification status, reads."""
from __future__ import annotations

import os

import pytest

from store.errors import PathNotFound
from store.repository import Repository
from store.snapmeta import update_meta
from store.view import Scope, View, version_name

from test_view_support import snap, write


@pytest.fixture
def repo2(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    src = str(tmp_path / "data")
    write(src, "sales/report.xlsx", "v1")
    write(src, "hr/secret.txt", "s")
    write(src, "big.bin", os.urandom(300_000))
    s1 = snap(repo, "office", src)
    write(src, "sales/report.xlsx", "v2 longer")
    s2 = snap(repo, "office", src)
    yield repo, s1, s2, src
    repo.close()


def test_layout_and_latest(repo2):
    repo, s1, s2, src = repo2
    v = View(repo)
    assert [n.name for n in v.listdir(v.resolve("/"))] == ["office"]
    names = [n.name for n in v.listdir(v.resolve("office"))]
    assert names == [s1.name, s2.name, "latest", ".versions"]
    assert ":" not in s1.name
    latest = v.resolve("office/latest/data/sales/report.xlsx")
    assert latest.size == 9 and latest.kind == "file"
    old = v.resolve(f"office/{s1.name}/data/sales/report.xlsx")
    assert v.open(old).read(0, 100) == b"v1"
    assert old.etag != latest.etag
    assert v.resolve(f"office/{s1.name}/data/hr/secret.txt").etag == v.resolve("office/latest/data/hr/secret.txt").etag
    with pytest.raises(PathNotFound):
        v.resolve("office/latest/data/../data/hr")
    with pytest.raises(PathNotFound):
        v.resolve("nosuchset/latest")


def test_random_reads_match(repo2):
    repo, s1, s2, src = repo2
    v = View(repo)
    f = v.open(v.resolve("office/latest/data/big.bin"))
    want = open(os.path.join(src, "big.bin"), "rb").read()
    for off, n in [(0, 10), (12345, 70000), (299_990, 100), (150_000, 1)]:
        assert f.read(off, n) == want[off:off + n]
    assert b"".join(f.iter_range(1000, 250_000)) == want[1000:250_000]


def test_versions_folder(repo2):
    repo, s1, s2, src = repo2
    v = View(repo)
    top = [n.name for n in v.listdir(v.resolve("office/.versions"))]
    assert top == ["data"]
    vf = v.resolve("office/.versions/data/sales/report.xlsx")
    assert vf.kind == "vfile"
    vers = v.listdir(vf)
    assert [n.name for n in vers] == [version_name("report.xlsx", s1.name), version_name("report.xlsx", s2.name)]
    assert vers[0].name == f"report {s1.name}.xlsx"
    n = v.resolve(f"office/.versions/data/sales/report.xlsx/report {s1.name}.xlsx")
    assert v.open(n).read(0, 10) == b"v1"


def test_scope_hides_everything_outside(repo2):
    repo, s1, s2, src = repo2
    v = View(repo, Scope({"office": ["data/sales"]}))
    assert [n.name for n in v.listdir(v.resolve(f"office/{s1.name}"))] == ["data"]
    assert [n.name for n in v.listdir(v.resolve("office/latest/data"))] == ["sales"]
    assert [n.name for n in v.listdir(v.resolve("office/.versions/data"))] == ["sales"]
    for bad in ["office/latest/data/hr", "office/latest/data/hr/secret.txt", "office/latest/data/big.bin",
                "office/.versions/data/hr", "office/.versions/data/hr/secret.txt",
                "office/.versions/data/big.bin"]:
        with pytest.raises(PathNotFound):
            v.resolve(bad)
    assert v.resolve("office/latest/data/sales/report.xlsx").size == 9
    none = View(repo, Scope({"other": [""]}))
    assert none.listdir(none.resolve("/")) == []
    with pytest.raises(PathNotFound):
        none.resolve("office")


def test_verification_status(repo2):
    repo, s1, s2, src = repo2
    with repo.writer() as w:
        update_meta(w, s1.id, verify={"time": "2026-11-25T10:00:00Z", "depth": "deep", "result": "good"})
        update_meta(w, s2.id, verify="garbage")  # read defensively
    v = View(repo)
    by = {n.name: n.status for n in v.listdir(v.resolve("office")) if n.status}
    assert by[s1.name]["result"] == "good" and by[s1.name]["depth"] == "deep"
    assert by[s2.name]["result"] == "unverified"


def test_failover_selection_status_shows_in_the_view_and_listing(repo2):
    """What image selection recorded (replicator/failover/select.py) is shown next to the verification."""
    from davserver.provider import render_listing

    repo, s1, s2, src = repo2
    with repo.writer() as w:
        update_meta(w, s2.id, verify={"time": "t", "depth": "deep", "result": "damaged"},
                    image={"time": "t", "status": "skipped", "reason": "damage found at data/x"})
        update_meta(w, s1.id, verify={"time": "t", "depth": "deep", "result": "good"},
                    app_check={"time": "t", "template": "sqlite", "result": "good", "message": "ok"},
                    image={"time": "t", "status": "chosen", "reason": None})
    v = View(repo)
    node = v.resolve("office")
    kids = v.listdir(node)
    by = {n.name: n.status for n in kids if n.status}
    assert by[s1.name]["app_check"]["result"] == "good" and by[s1.name]["image"]["status"] == "chosen"
    assert by[s2.name]["image"] == {"status": "skipped", "reason": "damage found at data/x", "time": "t"}
    page = render_listing(node, ["office"], kids)
    assert "sqlite check good" in page and "failover image: chosen" in page
    assert "failover image: skipped (damage found at data/x)" in page


def test_gmt_names(repo2):
    repo, s1, s2, src = repo2
    v = View(repo, gmt_names=True)
    names = [n.name for n in v.listdir(v.resolve("office"))]
    assert names[0].startswith("@GMT-") and len(names[0]) == len("@GMT-2026.11.24-14.05.00")
    assert v.resolve(f"office/{names[0]}/data/sales/report.xlsx").size == 2


def test_new_snapshot_shows_without_reopening(repo2):
    repo, s1, s2, src = repo2
    v = View(repo)
    write(src, "sales/new.txt", "n")
    s3 = snap(repo, "office", src)
    assert s3.name in [n.name for n in v.listdir(v.resolve("office"))]
    assert v.resolve("office/latest/data/sales/new.txt").size == 1
