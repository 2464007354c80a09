"""`pit find PATTERN [--set S] [-i] [--json]`: every version of every matching path, newest first,
from the previous-versions index (store/find.py); real repositories, real snapshots."""
from __future__ import annotations

import json

import pytest

from conftest import cli, make_tree, remove, snapshot
from store.find import find, suggest_paths
from store.repository import Repository


@pytest.fixture
def office(repo_path, tmp_path):
    src = tmp_path / "office"
    make_tree(src, {"src": {"report.txt": b"v1"}, "notes.TXT": b"n", "sales": {"q1.xlsx": b"q1"}})
    s1 = snapshot(repo_path, "office", src)
    make_tree(src, {"src": {"report.txt": b"v2, longer"}})
    s2 = snapshot(repo_path, "office", src)
    remove(src / "src" / "report.txt")
    make_tree(src, {"report.txt": b"top"})
    s3 = snapshot(repo_path, "office", src)
    other = tmp_path / "web"
    make_tree(other, {"report.txt": b"web"})
    w = snapshot(repo_path, "web", other)
    return repo_path, src, (s1, s2, s3, w)


def test_find_lists_every_version_newest_first(office):
    repo_path, _, (s1, s2, s3, w) = office
    out = cli(repo_path, "find", "report.txt").stdout.splitlines()
    assert [ln.split()[3] for ln in out] == [f"web@{w.name}:web/report.txt", f"office@{s3.name}:office/report.txt",
                                             f"office@{s2.name}:office/src/report.txt",
                                             f"office@{s1.name}:office/src/report.txt"]
    assert out[2].split()[0] == "10" and "(1 snapshot:" in out[2]


def test_find_json_and_set(office):
    repo_path, _, (s1, s2, s3, w) = office
    doc = json.loads(cli(repo_path, "find", "report.txt", "--set", "office", "--json").stdout)
    hits = doc["hits"]
    assert [(h["path"], h["size"], h["last"]) for h in hits] == [
        ("office/report.txt", 3, s3.name), ("office/src/report.txt", 10, s2.name), ("office/src/report.txt", 2, s1.name)]
    assert (hits[0]["snapshots"], hits[0]["first_id"], hits[0]["last_id"]) == (1, s3.hex, s3.hex)
    assert hits[0]["type"] == "file" and len(hits[0]["id"]) == 64
    # a version held by several snapshots: a run of them, first to last
    sales = json.loads(cli(repo_path, "find", "q1.xlsx", "--json").stdout)["hits"]
    assert len(sales) == 1 and (sales[0]["first"], sales[0]["last"], sales[0]["snapshots"]) == (s1.name, s3.name, 3)


def test_find_patterns(office):
    repo_path, *_ = office
    paths = lambda *a: {h["path"] for h in json.loads(cli(repo_path, "find", *a, "--json").stdout)["hits"]}  # noqa
    assert paths("*.txt") == {"office/report.txt", "office/src/report.txt", "web/report.txt"}
    assert paths("*.txt", "-i") == {"office/report.txt", "office/src/report.txt", "web/report.txt",
                                    "office/notes.TXT"}
    assert paths("src/*.txt") == {"office/src/report.txt"}       # at any depth
    assert paths("/office/*.txt") == {"office/report.txt"}       # a leading slash anchors
    assert paths("sales/") == {"office/sales"}                    # directories too


def test_no_match_and_bad_input(office):
    repo_path, *_ = office
    res = cli(repo_path, "find", "nothing-like-it", expect=1)
    assert "no path matches" in res.stderr
    for bad in ("../x", "a/../../b", "a\\"):
        res = cli(repo_path, "find", bad, expect=22)
        assert res.stderr.startswith("pit: error: ") and res.stderr.count("\n") == 1
    res = cli(repo_path, "find", "x", "--set", "nosuch", expect=15)
    assert res.stderr.count("\n") == 1


def test_long_parents_and_odd_names(repo_path, tmp_path):
    """A parent too long for a key is kept by its hash; a name that is not UTF-8 is found as it is."""
    src = tmp_path / "s"
    deep = {"a" * 100: {"b" * 100: {"c" * 60: {"deep.txt": b"deep"}}}}
    make_tree(src, {**deep, b"caf\xe9.tmp": b"latin-1"})
    snapshot(repo_path, "s", src)
    repo = Repository(str(repo_path), readonly=True)
    try:
        hits = find(repo, "deep.txt")
        assert [h.path for h in hits] == [b"s/" + b"a" * 100 + b"/" + b"b" * 100 + b"/" + b"c" * 60 + b"/deep.txt"]
        hits = find(repo, "c*/deep.txt")
        assert len(hits) == 1
        assert [h.path for h in find(repo, "*.tmp")] == [b"s/caf\xe9.tmp"]
    finally:
        repo.close()
    doc = json.loads(cli(repo_path, "find", "*.tmp", "--json").stdout)
    assert doc["hits"][0]["path"].encode("utf-8", "surrogateescape") == b"s/caf\xe9.tmp"


def test_suggest_paths_by_base_name(office):
    repo_path, *_ = office
    repo = Repository(str(repo_path), readonly=True)
    try:
        assert suggest_paths(repo, "office", b"report.txt") == [b"office/report.txt", b"office/src/report.txt"]
        assert suggest_paths(repo, "office", b"office/report.txt") == [b"office/src/report.txt"]
        assert suggest_paths(repo, "office", b"missing.txt") == []
    finally:
        repo.close()


def test_candidate_never_misses_what_match_takes():
    """The one-regex prefilter of `pit find` is a superset of the exact match, for files and dirs."""
    from store.filters import PathMatcher

    names = [b"report.txt", b"Report.TXT", b"caf\xc3\xa9.TXT", b"CAF\xc3\x89.txt", b"a", b"x/y/report.txt",
             b"dir", b"x/dir", b"\xff.txt", b"a/b/c"]
    for pats, ic in [(["*.txt"], False), (["*.txt"], True), (["dir/"], False), (["a/**"], False),
                     (["x/*/report*"], False), (["caf\u00e9.txt"], True), (["*", "!*.txt"], False)]:
        m = PathMatcher(pats, ic, floating=True)
        for n in names:
            for is_dir in (False, True):
                if m.match_bytes(n, is_dir):
                    assert m.candidate(n), (pats, ic, n, is_dir)


def test_a_path_not_in_the_snapshot_suggests_the_full_paths(office):
    repo_path, _, (s1, s2, s3, w) = office
    res = cli(repo_path, "restore", f"office@{s2.name}:report.txt", "--target", "/nonexistent/never", expect=17)
    assert "did you mean office/src/report.txt?" in res.stderr and res.stderr.count("\n") == 1
    res = cli(repo_path, "cat", "office@latest:src/report.txt", expect=17)   # deleted there: no suggestion of it
    assert "did you mean office/report.txt?" in res.stderr
    res = cli(repo_path, "ls", "office@latest:nothing-like-it", expect=17)
    assert "did you mean" not in res.stderr


def test_versions_of_a_bare_name_suggests_the_full_path(office):
    """`pit versions office report.txt` named no file; it now names where report.txt lives (issue 19)."""
    repo_path, _, _ = office
    res = cli(repo_path, "versions", "office", "report.txt", expect=1)
    assert "report.txt: no versions in set office; did you mean office/report.txt or office/src/report.txt?" \
        in res.stderr
    res = cli(repo_path, "versions", "office", "nothing-like-it", expect=1)
    assert "did you mean" not in res.stderr
