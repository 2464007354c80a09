"""`pit status`: every node's status asked over mTLS, checked against docs/schema/status.schema.json;
a dead node is reported, not fatal; the human view names roles, links and snapshots."""
from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest

from test_repl_helpers import Cluster, wait_for

SCHEMA = json.load(open(os.path.join(os.path.dirname(__file__), "..", "docs", "schema", "status.schema.json")))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path), replicas=2)
    yield c
    c.stop()


def test_cluster_status_json_schema_and_human_view(cluster):
    c = cluster
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"alpha")
    c.start()
    r1, r2 = c.replicas
    wait_for(lambda: c.converged(r1) and c.converged(r2), 30, "seeding")
    c.primary.ctl("point", "--set", "web")

    st = json.loads(r2.ctl("status", "--json").stdout)  # asked from a replica: it asks the others
    jsonschema.validate(st, SCHEMA)
    assert set(st["nodes"]) == {"primary", "r1", "r2"} and st["asked_by"] == "r2"
    p = st["nodes"]["primary"]
    assert p["sets"]["web"]["role"] == "master" and set(p["sets"]["web"]["replicas"]) == {"r1", "r2"}
    assert all(s["connected"] for s in p["sets"]["web"]["replicas"].values())
    assert p["roles"] == ["master of web"]
    rs = st["nodes"]["r1"]["sets"]["web"]
    assert rs["role"] == "replica" and rs["snapshots"] == 1 and rs["verified"]["result"] == "never"
    assert st["nodes"]["r1"]["roles"] == ["replica of web"]

    human = c.primary.ctl("status").stdout
    assert "primary master: primary" in human
    assert "web -> r1: connected" in human and "web: 1 snapshots, latest" in human

    r1.kill(signal.SIGKILL)  # a dead node: one line, the rest still answers
    st = json.loads(c.primary.ctl("status", "--json").stdout)
    jsonschema.validate(st, SCHEMA)
    assert st["nodes"]["r1"]["error"].startswith("unreachable")
    assert "r1" in c.primary.ctl("status").stdout.split("DOWN")[0].splitlines()[-1]
