"""`pit install-service` and the systemd units (replicator/ops/service.py, docs/examples/systemd/).

Units are written under a temporary --root; `systemd-analyze verify` checks them when it is installed.
This machine has no running systemd, so `systemctl` runs only in the test that puts a recording fake
first on PATH."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import PIT, ROOT, run_pit
from replicator.ops import etcd_members, service
from replicator.errors import ConfigError

UNIT_DIR = "etc/systemd/system"


def install(tmp_path, *args, expect=0):
    root = tmp_path / "root"
    p = run_pit(None, "install-service", "--root", str(root), "--pit", PIT, *args, expect=expect)
    return root / UNIT_DIR, p.stdout.decode(), p.stderr.decode()


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ln in text.splitlines():
        if "=" in ln and not ln.startswith(("#", "[")):
            k, _, v = ln.partition("=")
            out.setdefault(k, []).append(v)
    return out


def test_every_unit_written_with_the_paths_given(tmp_path):
    repo, state = tmp_path / "repo", tmp_path / "st ate"
    d, out, _ = install(tmp_path, "--unit", "agent", "--unit", "serve", "--unit", "scrub", "--unit", "etcd",
                        "--config", str(tmp_path / "agent.toml"), "--serve-config", str(tmp_path / "serve.toml"),
                        "--repo", str(repo), "--state", str(state), "--etcd-name", "r1",
                        "--etcd-client", "http://127.0.0.1:2379", "--etcd-peer", "http://127.0.0.1:2380")
    assert sorted(os.listdir(d)) == ["pit-agent.service", "pit-etcd.service", "pit-scrub.service",
                                     "pit-scrub.timer", "pit-serve.service"]
    agent = directives((d / "pit-agent.service").read_text())
    assert agent["ExecStart"] == [f"{PIT} agent --config {tmp_path / 'agent.toml'}"]
    assert agent["Restart"] == ["on-failure"] and agent["KillSignal"] == ["SIGTERM"] and agent["TimeoutStopSec"]
    assert "ProtectHome" not in agent and agent["ProtectSystem"] == ["yes"]  # it must read the protected paths
    serve = directives((d / "pit-serve.service").read_text())
    assert serve["ExecStart"] == [f"{PIT} --repo {repo} serve -c {tmp_path / 'serve.toml'}"]
    assert serve["ReadWritePaths"] == [str(repo)] and serve["ProtectSystem"] == ["strict"]
    scrub = directives((d / "pit-scrub.service").read_text())
    assert scrub["ExecStart"] == [f"{PIT} --repo {repo} verify --deep"] and scrub["Type"] == ["oneshot"]
    timer = directives((d / "pit-scrub.timer").read_text())
    assert timer["RandomizedDelaySec"] and timer["Unit"] == ["pit-scrub.service"] and timer["Persistent"] == ["true"]
    etcd = directives((d / "pit-etcd.service").read_text())
    assert f'--data-dir "{state}/etcd/data"' in etcd["ExecStart"][0]  # quoted: the path has a space
    assert "--name r1 " in etcd["ExecStart"][0] and "--pre-vote" in etcd["ExecStart"][0]
    assert etcd["ReadWritePaths"] == [f'"{state}/etcd"']
    # no systemd here (or not at /): say so and print what to run
    assert "systemctl daemon-reload" in out
    assert "systemctl enable --now pit-agent.service pit-serve.service pit-scrub.timer" in out
    assert "systemctl enable --now --no-block pit-etcd.service" in out
    assert "ran:" not in out
    # again: nothing changes
    _, out2, _ = install(tmp_path, "--unit", "agent", "--config", str(tmp_path / "agent.toml"))
    assert "unchanged" in out2 and "wrote" not in out2


def test_defaults_come_from_the_agent_config(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state = "/srv/pit/state"\nrepo = "/srv/pit/repo"\n')
    d, out, _ = install(tmp_path, "--unit", "serve", "--unit", "scrub", "--config", str(cfg), "--no-enable")
    assert directives((d / "pit-scrub.service").read_text())["ExecStart"] == [f"{PIT} --repo /srv/pit/repo verify --deep"]
    assert directives((d / "pit-serve.service").read_text())["ExecStart"] == [
        f"{PIT} --repo /srv/pit/repo serve -c /etc/pit/serve.toml"]
    assert "systemctl daemon-reload" in out and "enable" not in out  # --no-enable


def test_bad_requests_are_one_line(tmp_path):
    _, _, err = install(tmp_path, "--unit", "etcd", expect=ConfigError.exit_code)
    assert err.count("\n") == 1 and "--etcd-client" in err
    _, _, err = install(tmp_path, "--unit", "etcd", "--etcd-client", "10.0.0.1:2379", "--etcd-peer",
                        "http://10.0.0.1:2380", expect=ConfigError.exit_code)
    assert err.count("\n") == 1 and "10.0.0.1:2379" in err
    with pytest.raises(ConfigError, match="absolute"):  # the command makes its paths absolute first
        service.render("scrub", {"repo": "relative/repo"})


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    etcd = shutil.which("etcd")
    units = ["agent", "serve", "scrub"] + (["etcd"] if etcd else [])
    root = tmp_path / "root"
    service.install(str(root), units, {"pit": PIT, "repo": str(tmp_path / "repo"), "state": str(tmp_path / "state"),
                                       "etcd": etcd or "/usr/bin/etcd"}, echo=lambda m: None, live=False)
    d = root / UNIT_DIR
    files = sorted(str(d / f) for f in os.listdir(d))
    p = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True, cwd=d)
    # parse problems are warnings ("FILE:LINE: Failed to parse ..., ignoring") with exit 0: none allowed
    problems = [ln for ln in (p.stderr + p.stdout).splitlines() if "pit-" in ln]
    assert p.returncode == 0 and not problems, p.stderr + p.stdout
    # and it does catch a bad directive, so the check above means something
    bad = d / "pit-agent.service"
    bad.write_text(bad.read_text().replace("KillMode=mixed", "KillMode=sometimes"))
    p = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, cwd=d)
    assert "pit-agent.service:" in p.stderr and "sometimes" in p.stderr


def test_the_examples_in_docs_are_the_rendered_defaults():
    d = os.path.join(ROOT, "docs", "examples", "systemd")
    want = {}
    for u in service.UNITS:
        want.update(service.render(u))
    assert sorted(os.listdir(d)) == sorted(want)
    for name, text in want.items():
        with open(os.path.join(d, name)) as f:
            assert f.read() == text, f"docs/examples/systemd/{name} differs from replicator/ops/service.py's"


def test_systemctl_runs_when_systemd_does(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "systemctl.log"
    fake = bindir / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    said = []
    r = service.install(str(tmp_path / "root"), ["agent", "scrub", "etcd"],
                        {"pit": PIT, "etcd_client": "http://127.0.0.1:2379", "etcd_peer": "http://127.0.0.1:2380",
                         "state": str(tmp_path / "state")}, echo=said.append, live=True)
    assert log.read_text().splitlines() == ["daemon-reload", "enable --now pit-agent.service pit-scrub.timer",
                                            "enable --now --no-block pit-etcd.service"]
    assert len(r["ran"]) == 3 and any(s.startswith("ran: systemctl daemon-reload") for s in said)
    fake.write_text("#!/bin/sh\necho 'Failed to enable unit: Access denied' >&2\nexit 1\n")
    with pytest.raises(ConfigError, match="Access denied"):
        service.install(str(tmp_path / "root"), ["agent"], {"pit": PIT}, echo=said.append, live=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_etcd_unit_runs_what_pit_etcd_start_runs(tmp_path, monkeypatch):
    """The pit-etcd unit's argv is the one `pit etcd start` runs (both from etcd_members.member_argv):
    run start() against a fake etcd that records its argv, and compare."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    rec = tmp_path / "argv"
    fake = bindir / "etcd"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$0\" \"$@\" > {rec}\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    state = str(tmp_path / "state")
    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    cluster = f"a={peer},b=http://127.0.0.1:1"  # several members: start() does not insist on health
    want = service.etcd_argv(str(fake), state, "a", client, peer, cluster)
    r = etcd_members.start(state, "a", client, peer, cluster, wait=0.3)
    try:
        for _ in range(100):
            if rec.exists() and rec.read_text().count("\n") == len(want):
                break
            import time
            time.sleep(0.05)
        got = rec.read_text().splitlines()
    finally:
        assert etcd_members.stop(state)
    assert r["started"] and got == want
    unit = service.render("etcd", {"etcd": str(fake), "state": state, "etcd_name": "a", "etcd_client": client,
                                   "etcd_peer": peer, "etcd_initial_cluster": cluster})["pit-etcd.service"]
    assert f"ExecStart={' '.join(want)}\n" in unit


def test_units_quote_what_systemd_would_split():
    text = service.render("agent", {"agent_config": "/etc/pit/my agent%1.toml"})["pit-agent.service"]
    assert 'agent --config "/etc/pit/my agent%%1.toml"\n' in text
    with pytest.raises(ConfigError):
        service.render("agent", {"agent_config": "/etc/pit/a\nExecStartPre=/bin/evil"})
    # the default pit is the one next to this interpreter (the venv's)
    assert service.default_pit() == os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "pit")


@pytest.mark.skipif(not shutil.which("etcd"), reason="etcd is not installed (Debian: etcd-server)")
def test_the_etcd_units_command_runs_a_member_in_the_foreground_and_restarts(tmp_path):
    """The unit's argv, run as systemd would (foreground, SIGTERM to stop), serves; run again on its
    data with the same argv (`--initial-cluster-state new` as written at install) it serves again."""
    import signal
    import time

    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    argv = service.etcd_argv(shutil.which("etcd"), str(tmp_path / "state"), "t1", client, peer)
    assert argv[argv.index("--initial-cluster-state") + 1] == "new"
    for _ in range(2):
        with open(tmp_path / "etcd.log", "ab") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                if etcd_members.health(client)[0] or p.poll() is not None:
                    break
                time.sleep(0.1)
            assert etcd_members.health(client)[0], (tmp_path / "etcd.log").read_text()[-2000:]
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
    assert os.path.isdir(tmp_path / "state" / "etcd" / "data" / "member")
