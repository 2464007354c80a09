"""The smaller items of issue 19: `pit forget --dry-run` without --set shows every set, click's usage
errors are one line with their own exit code (2), `pit stats` shows the index's size, and a failover
status never prints Python's None. Real processes where the exact stderr matters."""
from __future__ import annotations

import json

import pytest

from conftest import cli, list_snaps, make_tree, run_pit, snapshot


@pytest.fixture
def two_sets(repo_path, tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        make_tree(src, {"f": b"gen %d" % i})
        snapshot(repo_path, "a", src)
    snapshot(repo_path, "b", src)
    cli(repo_path, "policy", "--set", "a", "--keep-last", "1")
    return repo_path


def test_forget_dry_run_without_set_shows_every_set(two_sets):
    repo = two_sets
    out = cli(repo, "forget", "--dry-run").stdout
    assert out.count("would drop") == 2 and " a@" in out and " b@" in out
    doc = json.loads(cli(repo, "forget", "--dry-run", "--json").stdout)
    assert {d["set"] for d in doc["decisions"]} == {"a", "b"} and doc["dry_run"] is True
    assert len(list_snaps(repo)) == 4  # nothing dropped
    for args in (["forget"], ["forget", "--dry-run", "--keep-last", "1"]):
        res = cli(repo, *args, expect=22)
        assert res.stderr.count("\n") == 1 and "--set" in res.stderr
    assert len(list_snaps(repo)) == 4


@pytest.mark.parametrize("args, words", [
    (["--bogus"], "No such option '--bogus'"),
    (["restore", "x@latest"], "Missing option '--target'"),
    (["restore", "x@latest", "-t", "/tmp/x", "--overwrite", "sometimes"], "'sometimes' is not one of"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["snapshot", "--set"], "requires an argument"),
    (["cluster", "init", "--bogus"], "No such option '--bogus'"),
])
def test_click_usage_errors_are_one_line(repo_path, args, words):
    p = run_pit(repo_path, *args, expect=2)
    err = p.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pit: error: usage: ") and words in err, err
    assert "--help`)" in err and p.stdout == b""


def test_help_still_works(repo_path):
    p = run_pit(repo_path, "restore", "--help")
    assert b"--overwrite" in p.stdout and p.stderr == b""


def test_stats_shows_the_index(two_sets):
    doc = json.loads(cli(two_sets, "stats", "--json").stdout)
    assert doc["index_bytes"] > 0 and 0 < doc["index_used_bytes"] <= doc["index_bytes"]
    assert "index: " in cli(two_sets, "stats").stdout


def test_failover_status_never_shows_none():
    from replicator.commands.failover import _shown

    assert _shown(None) == "-" and _shown(0) == 0 and _shown("x") == "x"
