"""`pit demo down` without a cluster (issue 12): it finds the demo's processes by what they are when the
record of them is gone, reports only what it did and checked, and names what survives (exit 1);
`pit demo store` never overwrites a cluster demo's state; the commands it prints are typeable (issue 19).

The demo's network namespaces are machine-wide names: these tests replace the namespace lookup so that
they never touch a cluster demo running on this machine (tests/test_demo_cluster.py runs the real one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from replicator.ops import demo as demo_cluster
from replicator.waiting import poll_until
from store import demo as store_demo

SLEEPER = "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"


@pytest.fixture(autouse=True)
def no_namespaces(monkeypatch):
    monkeypatch.setattr(demo_cluster, "demo_namespaces", lambda: [])


def down(root) -> click.testing.Result:
    return CliRunner().invoke(demo_cluster.demo, ["--dir", str(root), "down"])


def _gone(pid: int) -> bool:
    return not demo_cluster._alive(pid)


def _daemon(*args: str) -> int:
    """Start a process the way the demo's daemons end up: in its own session, its parent gone."""
    launcher = ("import subprocess, sys; print(subprocess.Popen(sys.argv[1:], start_new_session=True, "
                "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    return int(subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True, text=True,
                              check=True).stdout)


def _session(sid: int) -> set[int]:
    """The processes of session `sid` (a process that ends meanwhile has no stat: left out)."""
    stats = {int(p): demo_cluster._stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    return {pid for pid, st in stats.items() if st and st[3] == sid}


def test_down_without_its_record_finds_the_processes_by_what_they_are(tmp_path):
    """What `pit demo store` used to leave: the demo directory without demo.json, its daemons running."""
    root = tmp_path / "demo-data"
    (root / "primary").mkdir(parents=True)
    (root / "logs").mkdir()
    (root / "logs" / "agent.log").write_text("")
    # an "agent" naming the demo directory, with a child (no path of the demo in its command line) in its session
    agent = _daemon(sys.executable, "-c", SLEEPER, str(root / "primary" / "agent.toml"))
    # the user's own program looking at a demo file is not the demo's
    viewer = subprocess.Popen(["tail", "-f", "/dev/null", str(root / "logs" / "agent.log")])
    try:
        child = poll_until(lambda: next(iter(_session(agent) - {agent}), None), 10, "the agent's child")
        r = down(root)
        assert r.exit_code == 0, r.output
        assert "stopped 2 processes (checked gone)" in r.output, r.output
        assert f"{agent}" in r.output and f"{child}" in r.output
        assert _gone(agent) and _gone(child)
        assert viewer.poll() is None, "a process that is not the demo's was killed"
        assert f"removed {root} (checked gone)" in r.output and not root.exists()
        assert "demo removed" in r.output
    finally:
        viewer.kill()
        viewer.wait()
        for pid in [agent, *_session(agent)]:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def test_down_says_what_survives_and_fails(tmp_path, monkeypatch):
    root = tmp_path / "demo-data"
    root.mkdir()
    (root / "notes.txt").write_text("the user's")          # no demo.json and not a demo's file: kept
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(root / "cluster.toml")],
                             start_new_session=True)
    poll_until(lambda: str(root) + "/cluster.toml" in (demo_cluster._cmdline(agent.pid) or []), 10, "the exec")
    monkeypatch.setattr(demo_cluster, "DOWN_TIMEOUT", 1.0)
    monkeypatch.setattr(demo_cluster.os, "kill", lambda pid, sig: None)   # a process that does not die
    try:
        r = down(root)
    finally:
        monkeypatch.undo()
        agent.kill()
        agent.wait()
    assert r.exit_code == 1, r.output
    assert "NOT completely removed" in r.output
    assert f"still running: pid {agent.pid}" in r.output
    assert "left in place" in r.output and "notes.txt" in r.output
    assert (root / "notes.txt").exists()
    assert "demo removed" not in r.output and "stopped" not in r.output


def test_down_with_nothing_there_claims_nothing(tmp_path):
    r = down(tmp_path / "none")
    assert r.exit_code == 0, r.output
    assert "no demo processes were running" in r.output and "there was no demo to remove" in r.output
    assert "demo removed" not in r.output


def test_store_tour_refuses_a_cluster_demos_directory(tmp_path):
    root = tmp_path / "demo-data"
    root.mkdir()
    (root / "demo.json").write_text(json.dumps({"pids": {"etcd": 1}}))
    with pytest.raises(click.ClickException, match="cluster demo"):
        store_demo.run_demo(str(root))
    assert json.loads((root / "demo.json").read_text()) == {"pids": {"etcd": 1}}
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(click.ClickException, match="not a store tour"):
        store_demo.run_demo(str(other))
    assert (other / "thesis.tex").exists()


def test_commands_are_printed_as_the_user_must_type_them(monkeypatch, tmp_path):
    bindir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    shown = store_demo.pit_command()
    assert shown != "pit" and shown.endswith("/pit")
    assert os.path.realpath(shown) == os.path.realpath(os.path.join(bindir, "pit"))
    monkeypatch.setenv("PATH", bindir + ":/usr/bin:/bin")
    assert store_demo.pit_command() == "pit"
    d = demo_cluster.Demo(str(tmp_path / "elsewhere"))
    assert d.demo_cmd == f"pit demo --dir {tmp_path / 'elsewhere'}"


def test_status_after_a_failover_prints_no_python_none(tmp_path, monkeypatch):
    root = tmp_path / "demo-data"
    root.mkdir()
    (root / "demo.json").write_text(json.dumps({"netns": False, "pids": {}}))
    answers = {"primary": {},   # its agent was killed
               "secondary": {"phase": "active", "leader": "secondary", "token": 7},
               "archive": {"phase": "replica", "leader": None, "token": None}}
    monkeypatch.setattr(demo_cluster.Demo, "status", lambda self, node: answers[node])
    r = CliRunner().invoke(demo_cluster.demo, ["--dir", str(root), "status"])
    assert r.exit_code == 0, r.output
    assert "None" not in r.output
    assert "primary    down" in r.output and "leader secondary, fencing token 7" in r.output
