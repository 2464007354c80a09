"""`pit cluster init --agent-config FILE [--cluster FILE] [--metrics HOST:PORT] [--force]`: the primary's agent
file is written with what the quickstart's agent.toml holds, its directory made, and it passes `pit config
check`; a different file already there, a path under a file, a directory, a bad --metrics are one typed line
before the cluster is created. (`pit join --repo --agent-config` against a running primary: test_repl_security.)"""
from __future__ import annotations

import os
import tomllib

import pytest

from conftest import run_pit
from replicator import config as C
from replicator.errors import ConfigError

CONFIG_ERROR = ConfigError.exit_code


def _init(tmp_path, state, *extra, expect=0):
    return run_pit(None, "cluster", "init", "--state", tmp_path / state, "--node", "a", "--address",
                   "127.0.0.1:7400", *extra, expect=expect)


def _one_line(p, needle):
    err = p.stderr.decode()
    assert err.startswith("pit: error: ") and err.count("\n") == 1 and needle in err, err


def test_init_writes_the_primarys_agent_config_and_it_checks(tmp_path, monkeypatch):
    cfg = tmp_path / "etc" / "pit" / "agent.toml"
    p = _init(tmp_path, "state", "--agent-config", cfg, "--metrics", "127.0.0.1:9474")
    out = p.stdout.decode()
    assert "cluster created: primary a" in out and f"wrote agent configuration {cfg} (state, cluster, metrics)" in out
    assert tomllib.loads(cfg.read_text()) == {"state": str(tmp_path / "state"),
                                              "cluster": str(tmp_path / "etc" / "pit" / "cluster.toml"),
                                              "metrics": "127.0.0.1:9474"}
    assert oct(os.stat(cfg).st_mode & 0o777) == "0o644"
    p = run_pit(None, "config", "check", cfg)
    assert "ok: agent configuration of the primary (cluster file" in p.stdout.decode()
    # --cluster names another cluster file; a relative --agent-config is made absolute
    monkeypatch.chdir(tmp_path)
    _init(tmp_path, "state2", "--agent-config", "rel/agent.toml", "--cluster", "/srv/pit/cluster.toml")
    assert tomllib.loads((tmp_path / "rel" / "agent.toml").read_text()) == {
        "state": str(tmp_path / "state2"), "cluster": "/srv/pit/cluster.toml"}
    run_pit(None, "config", "check", tmp_path / "rel" / "agent.toml")


def test_init_refuses_before_creating_the_cluster(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state = "/elsewhere"\nrepo = "/r"\n')
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--agent-config", cfg], "a different file is already there (differs in cluster, repo, state); "
                                  "give --force to replace it"),
        (["--agent-config", tmp_path / "a-file" / "sub" / "agent.toml"], f"{tmp_path / 'a-file'} is not a directory"),
        (["--agent-config", tmp_path], "is a directory (give the file's path"),
        (["--agent-config", tmp_path / "x.toml", "--metrics", "nowhere"], "--metrics: 'nowhere' is not an address"),
        (["--metrics", "127.0.0.1:9474"], "--metrics goes into the agent configuration: give --agent-config FILE"),
        (["--cluster", "/etc/pit/cluster.toml"], "--cluster goes into the agent configuration"),
        (["--force"], "--force goes into the agent configuration"),
    ]
    for extra, needle in cases:
        _one_line(_init(tmp_path, "state", *extra, expect=CONFIG_ERROR), needle)
        assert not (tmp_path / "state").exists(), extra
    assert cfg.read_text() == 'state = "/elsewhere"\nrepo = "/r"\n'
    assert not (tmp_path / "x.toml").exists()
    cfg.write_text("not [ toml")
    _one_line(_init(tmp_path, "state", "--agent-config", cfg, expect=CONFIG_ERROR), "(not TOML)")
    p = _init(tmp_path, "state", "--agent-config", cfg, "--force")
    assert f"replaced agent configuration {cfg} (state, cluster)" in p.stdout.decode()
    run_pit(None, "config", "check", cfg)


def test_the_same_file_is_left_alone(tmp_path):
    """A file that already says the same (other comments, order, spacing) is not rewritten."""
    cfg = tmp_path / "agent.toml"
    same = f'# mine\ncluster   = "{tmp_path / "cluster.toml"}"\nstate = "{tmp_path / "state"}"\n'
    cfg.write_text(same)
    p = _init(tmp_path, "state", "--agent-config", cfg)
    assert "already says this (state, cluster): left as it is" in p.stdout.decode()
    assert cfg.read_text() == same


@pytest.mark.parametrize("name", ['with "quotes"', "back\\slash", "tab\there", "del\x7fchar", "ünï cödé"])
def test_paths_are_written_as_toml_strings(tmp_path, name):
    values = {"state": str(tmp_path / name), "repo": str(tmp_path / name / "repo")}
    plan = C.plan_agent_config(str(tmp_path / "etc" / "agent.toml"), values, "pit join")
    assert plan["action"] == "write"
    assert C.write_agent_config(plan) == "wrote"
    assert C.load_agent_config(plan["path"]).to_wire() == values
    assert C.plan_agent_config(plan["path"], values, "pit join")["action"] == "unchanged"


def test_bad_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="give the file's path"):
        C.plan_agent_config("  ", {"state": "/s"}, "pit join")
    with pytest.raises(ConfigError, match="line break"):
        C.plan_agent_config(str(tmp_path / "a\nb.toml"), {"state": "/s"}, "pit join")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="permission denied"):
            C.plan_agent_config(str(ro / "agent.toml"), {"state": "/s"}, "pit join")
