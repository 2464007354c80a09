"""The `pit` CLI: naming snapshots (SET@latest, SET@-N, SET@NAME, id prefix,
display name), and every `--json` output parses and says the right thing."""
from __future__ import annotations

import json
import os

import pytest

from conftest import (Link, add_crafted_snapshots, cli, cli_json, colliding_records, list_snaps, make_tree, opened,
                      rand_bytes, run_pit, snapshot)
from store.errors import AmbiguousSnapshot, SnapshotNotFound
from store.snapshots import resolve


@pytest.fixture
def three(repo_path, tmp_path):
    """Set `a` with three snapshots of different content, set `b` with one."""
    src = tmp_path / "src"
    snaps = []
    for i in range(3):
        make_tree(src, {"gen": b"generation %d" % i, "data": rand_bytes(50_000, "d%d" % i)})
        snaps.append(snapshot(repo_path, "a", src))
    b = snapshot(repo_path, "b", src)
    return repo_path, snaps, b


def res(repo_path, spec):
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        return resolve(repo, txn, spec)


def test_set_relative_names(three):
    repo_path, (s0, s1, s2), b = three
    assert res(repo_path, "a@latest").id == s2.id
    assert res(repo_path, "a@").id == s2.id
    assert res(repo_path, "a@-0").id == s2.id
    assert res(repo_path, "a@-1").id == s1.id
    assert res(repo_path, "a@-2").id == s0.id
    assert res(repo_path, "b@latest").id == b.id
    with pytest.raises(SnapshotNotFound):
        res(repo_path, "a@-3")
    with pytest.raises(SnapshotNotFound):
        res(repo_path, "nosuchset@latest")


def test_names_are_unique_per_set_and_windows_legal(three):
    repo_path, snaps, b = three
    names = [s.name for s in snaps]
    assert len(set(names)) == 3
    for n in names + [b.name]:
        assert not set(n) & set(':<>"/\\|?*'), n
    for s in snaps:
        assert res(repo_path, f"a@{s.name}").id == s.id
        assert res(repo_path, f"a@{s.hex[:10]}").id == s.id


def test_id_prefixes(three):
    repo_path, snaps, _ = three
    for s in snaps:
        assert res(repo_path, s.hex).id == s.id
        assert res(repo_path, s.hex.upper()).id == s.id
        for n in (4, 5, 7, 12, 63):
            assert res(repo_path, s.hex[:n]).id == s.id
    with pytest.raises(SnapshotNotFound):
        res(repo_path, "f" * 64 if not any(s.hex == "f" * 64 for s in snaps) else "0" * 64)
    with pytest.raises(SnapshotNotFound):  # too short to be a prefix, and no such name
        res(repo_path, snaps[0].hex[:3])


def test_display_names(three):
    repo_path, snaps, b = three
    unique = [s for s in snaps + [b] if sum(x.name == s.name for x in snaps + [b]) == 1]
    for s in unique:
        assert res(repo_path, s.name).id == s.id
    with pytest.raises(SnapshotNotFound):
        res(repo_path, "1999-01-01T00.00.00Z")


def test_display_name_shared_by_two_sets_is_ambiguous(three):
    repo_path, snaps, _ = three
    add_crafted_snapshots(repo_path, snaps[0], [{"set": "x", "name": "2020-01-01T00.00.00Z"},
                                                {"set": "y", "name": "2020-01-01T00.00.00Z"}])
    with pytest.raises(AmbiguousSnapshot):
        res(repo_path, "2020-01-01T00.00.00Z")
    assert res(repo_path, "x@2020-01-01T00.00.00Z").set == "x"


def test_ambiguous_id_prefix(three):
    repo_path, snaps, _ = three
    prefix, recs = colliding_records(snaps[0])
    made = add_crafted_snapshots(repo_path, snaps[0], recs)
    assert made[0].hex[:4] == made[1].hex[:4] == prefix
    with pytest.raises(AmbiguousSnapshot):
        res(repo_path, prefix)
    longer = next(n for n in range(5, 65) if made[0].hex[:n] != made[1].hex[:n])
    assert res(repo_path, made[0].hex[:longer]).id == made[0].id


# ----------------------------------------------------------------- --json
def test_json_outputs_parse(three, tmp_path):
    repo_path, (s0, s1, s2), b = three
    listed = cli_json(repo_path, "snapshots")
    assert [s["id"] for s in listed] == [s0.hex, s1.hex, s2.hex, b.hex]
    assert [s["id"] for s in cli_json(repo_path, "snapshots", "--set", "a")] == [s0.hex, s1.hex, s2.hex]
    assert cli_json(repo_path, "snapshots", "--set", "nothing") == []
    for s in listed:
        assert {"id", "short_id", "set", "name", "time", "time_ns", "host", "paths", "root", "parent",
                "stats"} <= s.keys()
    assert listed[1]["parent"] == s0.hex and listed[0]["parent"] is None

    ls = cli_json(repo_path, "ls", "a@latest:src")
    assert {(r["name"], r["type"], r["size"]) for r in ls} == {("gen", "file", 12), ("data", "file", 50_000)}
    assert cli_json(repo_path, "ls", "a@latest:src/gen")[0]["path"] == "src/gen"
    assert {r["path"] for r in cli_json(repo_path, "ls", "-R", "a@latest")} == {"src", "src/gen", "src/data"}

    d = cli_json(repo_path, "diff", "a@-2", "a@latest")
    assert {c["path"] for c in d["changes"]} == {"src/gen", "src/data"}

    r = json.loads(cli(repo_path, "restore", "a@-1", "--target", tmp_path / "out", "--json").stdout)
    assert (r["snapshot"], r["files"], r["bytes"]) == (s1.hex, 2, 50_012)
    assert (tmp_path / "out" / "src" / "gen").read_bytes() == b"generation 1"

    st = cli_json(repo_path, "stats")
    assert st["snapshots"] == 4 and st["sets"] == ["a", "b"]
    assert st["blobs"]["chunk"]["raw"] >= 150_000 and st["packs"] >= 1


def test_snapshot_json_and_text(repo_path, tmp_path):
    make_tree(tmp_path / "src", {"f": b"x" * 1000, "l": Link("f"), "d": {}})
    out = json.loads(run_pit(repo_path, "snapshot", "--set", "j", tmp_path / "src", "--json").stdout)
    assert out["set"] == "j" and out["stats"]["files"] == 1 and out["stats"]["dirs"] == 2
    assert out["paths"] == [str(tmp_path / "src")]
    assert [s.hex for s in list_snaps(repo_path)] == [out["id"]]
    text = run_pit(repo_path, "snapshot", "--set", "j", tmp_path / "src")
    assert text.stdout.startswith(b"snapshot ") and b"saved as j@" in text.stdout
    assert text.stderr == b""  # no progress output when not on a terminal


def test_ls_json_with_non_utf8_names(repo_path, tmp_path):
    make_tree(tmp_path / "src", {b"bad-\xff": b"1", "ok-é": b"2", "l": Link(b"\xfe")})
    snapshot(repo_path, "u", tmp_path / "src")
    p = run_pit(repo_path, "ls", "u@latest:src", "--json")
    rows = json.loads(p.stdout)
    assert {os.fsencode(r["name"]) for r in rows} == {b"bad-\xff", "ok-é".encode(), b"l"}
    link = next(r for r in rows if r["name"] == "l")
    assert os.fsencode(link["target"]) == b"\xfe"


def test_changes_file_option(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, {"a": b"a", "d": {"b": b"b"}})
    first = json.loads(run_pit(repo_path, "snapshot", "--set", "c", src, "--json").stdout)
    (src / "d" / "b").write_bytes(b"b changed")
    (tmp_path / "changes.txt").write_text(f"{src / 'd' / 'b'}\n\n")
    out = json.loads(run_pit(repo_path, "snapshot", "--set", "c", "--changes", tmp_path / "changes.txt", src,
                             "--json").stdout)
    assert out["stats"]["mode"] == "changes" and out["parent"] == first["id"]
    via_stdin = json.loads(run_pit(repo_path, "snapshot", "--set", "c", "--changes", "-", src, "--json",
                                   input=f"{src / 'd' / 'b'}\n".encode()).stdout)
    assert via_stdin["root"] == out["root"]
    full = json.loads(run_pit(repo_path, "snapshot", "--set", "other", src, "--json").stdout)
    assert full["root"] == out["root"]
