"""The configuration model (replicator/settings.py): one place for every key's type, default and meaning.

The reference in docs/operators.md is generated from it and must not drift; the wire form the primary pushes
and hashes parses back to the same typed values; a bad value is a ConfigError carrying the key's path."""
from __future__ import annotations

import os
import re

import pytest

from replicator import config as C
from replicator.errors import ConfigError
from replicator.settings import AgentConfig, Check, FailoverConfig, SetConfig, build, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_reference_in_the_docs_is_the_generated_one():
    with open(os.path.join(ROOT, "docs", "operators.md")) as f:
        text = f.read()
    m = re.search(r"<!-- generated: python -m replicator.settings -->\n(.*?)<!-- end generated -->", text, re.S)
    assert m, "docs/operators.md lost its generated configuration reference"
    assert m.group(1) == reference(), "regenerate it: python -m replicator.settings"


def test_every_key_is_in_the_reference_with_its_default():
    ref = reference()
    for cls in (AgentConfig, SetConfig, FailoverConfig):
        for name in cls.__dataclass_fields__:
            f = cls.__dataclass_fields__[name]
            if f.metadata.get("doc"):
                assert f"| `{f.metadata.get('key') or name}` |" in ref, name
    assert "| `ttl` | integer | 5 |" in ref and "| `mode` | \"mirror\" or \"archive\" | \"mirror\" |" in ref


def test_sets_and_failover_round_trip_through_the_wire_form(tmp_path):
    raw = {"sets": {"web": {"master": "a", "replicas": ["b", "c"], "paths": ["/srv/www/"], "mode": "archive",
                            "schedule": {"every": "15m"}, "delete_count": 5},
                    "db": {"master": "a", "replicas": ["b"], "paths": ["/var/lib/db"],
                           "app": {"template": "sqlite"}}},
           "failover": {"secondary": "b", "etcd": ["http://127.0.0.1:2379"], "ttl": 3,
                        "checks": [{"tcp": "127.0.0.1:5432"}, {"http": "http://127.0.0.1/", "status": 200}],
                        "takeover": "/usr/local/bin/start"}}
    sets = C.normalise_sets(raw)
    fo = C.normalise_failover(raw["failover"], sets)
    web = sets["web"]
    assert web.name == "web" and web.paths == ("/srv/www",) and web.replicas == ("b", "c")
    assert web.schedule == {"every": 900.0} and web.delete_count == 5 and web.point_quiet == 5.0
    assert fo.ttl == 3 and fo.heartbeat == 0.5 and fo.takeover == ("/usr/local/bin/start",)
    assert fo.checks == (Check("tcp", "127.0.0.1:5432"), Check("http", "http://127.0.0.1/", status=200))
    cfg = C.versioned(str(tmp_path), sets, {"a": {"address": "127.0.0.1:7400"}}, "a", fo)
    assert cfg.version == 1
    wire = cfg.to_wire()
    assert "schedule" not in wire["sets"]["db"] and "app" not in wire["sets"]["web"]
    back = C.check_pushed(wire)
    assert back == cfg
    # the same content keeps its version; a change makes a new one
    assert C.versioned(str(tmp_path), sets, cfg.roster, "a", fo).version == 1
    assert C.versioned(str(tmp_path), sets, cfg.roster, "a", None).version == 2
    C.save_pushed(str(tmp_path), cfg)
    assert C.load_pushed(str(tmp_path)) == cfg


@pytest.mark.parametrize("table, key", [
    ({"master": "a", "replicas": ["b"], "paths": ["/x"], "point_quiet": -1}, ("sets", "s", "point_quiet")),
    ({"master": "a", "replicas": ["b"], "paths": ["/x"], "queue": 1.5}, ("sets", "s", "queue")),
    ({"master": "a", "replicas": ["b"], "paths": ["/x"], "debounce": True}, ("sets", "s", "debounce")),
    ({"master": "a", "replicas": ["a"], "paths": ["/x"]}, ("sets", "s", "replicas")),
    ({"master": "a", "replicas": ["b"], "paths": ["/x/w", "/y/w"]}, ("sets", "s", "paths")),
    ({"master": "a", "replicas": ["b"], "paths": ["x"]}, ("sets", "s", "paths")),
    ({"master": "a", "replicas": ["b", "B!"], "paths": ["/x"]}, ("sets", "s", "replicas", 1)),
    ({"master": "a", "replicas": ["b"], "paths": ["/x"], "mood": "mirror"}, ("sets", "s", "mood")),
    ({"replicas": ["b"], "paths": ["/x"]}, ("sets", "s")),
])
def test_a_bad_set_names_its_key(table, key):
    with pytest.raises(ConfigError) as e:
        build(SetConfig, table, ("sets", "s"))
    assert e.value.key == key and "\n" not in str(e.value), str(e.value)


def test_a_pushed_configuration_is_checked_like_the_file():
    with pytest.raises(ConfigError, match="lacks a version"):
        C.check_pushed({"sets": {}})
    with pytest.raises(ConfigError, match="pushed configuration: `sets.web.mode`"):
        C.check_pushed({"version": 3, "roster": {}, "sets": {"web": {"master": "a", "replicas": ["b"],
                                                                     "paths": ["/x"], "mode": "both"}}})


def test_a_kept_configuration_this_version_cannot_read_is_waited_out(tmp_path):
    (tmp_path / "cluster.json").write_text('{"version": 4, "roster": {}, "sets": {"web": {"master": 1}}}')
    assert not C.load_pushed(str(tmp_path)) and C.load_pushed(str(tmp_path)).version == 0


def test_agent_paths_are_made_absolute_against_the_file(tmp_path):
    f = tmp_path / "etc" / "agent.toml"
    f.parent.mkdir()
    f.write_text('state = "state"\nrepo = "/var/lib/pit/repo"\nlive = {web = ["/srv/www"]}\n')
    cfg = C.load_agent_config(str(f))
    assert cfg.state == str(tmp_path / "etc" / "state") and cfg.repo == "/var/lib/pit/repo"
    assert cfg.live == {"web": ("/srv/www",)} and cfg.alerts is None and cfg.metrics is None
