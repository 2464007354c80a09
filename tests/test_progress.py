"""Progress of long commands (store/cli_support.py StatusLine): a status line on a terminal (forced
here with PIT_PROGRESS=text, since a test has no terminal), nothing when stdout or stderr is not a
terminal, JSON lines for tools. Real processes; no timing is asserted."""
from __future__ import annotations

import json

import pytest

from conftest import make_tree, pit_env, rand_bytes, run_pit, snapshot


@pytest.fixture
def repo(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, {"a": rand_bytes(300_000, "a"), "d": {"b": rand_bytes(100_000, "b"), "report.txt": b"r"}})
    snapshot(repo_path, "s", src)
    make_tree(src, {"a": rand_bytes(300_000, "a2")})
    snapshot(repo_path, "s", src)
    return repo_path, tmp_path


COMMANDS = [
    (("verify", "--deep"), "verify: "),
    (("prune", "--threshold", "0"), "prune: "),
    (("compact", "--threshold", "0"), "compact: "),
    (("repair",), "repair: "),
    (("find", "report.txt"), "find: "),
    (("restore", "s@latest", "--target", "{t}"), "restored "),
    (("snapshot", "--set", "s", "{src}"), " examined"),
]


@pytest.mark.parametrize("args, words", COMMANDS, ids=[c[0][0] for c in COMMANDS])
def test_a_status_line_on_a_terminal_and_none_otherwise(repo, args, words):
    repo_path, tmp = repo
    args = [a.format(t=tmp / "t", src=tmp / "src") for a in args]
    p = run_pit(repo_path, *args, env=pit_env(PIT_PROGRESS="text"))
    err = p.stderr.decode()
    assert "\r" in err and words in err, err
    assert "\r" not in p.stdout.decode()  # the result itself stays clean
    if args[0] == "restore":
        args[3] = str(tmp / "t2")
    quiet = run_pit(repo_path, *args)    # stdout and stderr are pipes here: no status line
    assert "\r" not in quiet.stderr.decode() and words not in quiet.stderr.decode()


def test_json_progress_lines(monkeypatch, capsys):
    from store.cli_support import StatusLine, progress_mode

    monkeypatch.setenv("PIT_PROGRESS", "auto")
    assert progress_mode(json_lines=True) == "json"   # --json, stderr not a terminal: lines for tools
    assert progress_mode(json_lines=False) == "none"
    monkeypatch.setenv("PIT_PROGRESS", "none")
    assert progress_mode(json_lines=True) == "none"
    monkeypatch.setenv("PIT_PROGRESS", "json")
    st = StatusLine("verify", json_lines=True)
    st.show("not yet", bytes_read=1)                  # nothing in the first second
    st.t0 -= 5                                       # as if it had run for five seconds
    st.show("reading", bytes_read=10, bytes_total=100)
    st.show("again at once", bytes_read=11)           # at most one a second
    st.done()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert d["progress"] == "verify" and d["bytes_read"] == 10 and d["bytes_total"] == 100 and d["elapsed"] >= 5


def test_json_output_stays_one_document_with_json_progress(repo):
    repo_path, _ = repo
    p = run_pit(repo_path, "verify", "--deep", "--json", env=pit_env(PIT_PROGRESS="json"))
    json.loads(p.stdout)  # progress goes to stderr, one JSON object a line
    for line in p.stderr.decode().splitlines():
        assert "progress" in json.loads(line)
