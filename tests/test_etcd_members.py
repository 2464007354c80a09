"""`pit etcd start | status | stop`: a real one-member etcd for the operator, on 127.0.0.1."""
from __future__ import annotations

import json
import os

import pytest

from etcdlab import ETCD
from test_repl_helpers import free_port, pit


@pytest.mark.skipif(not ETCD, reason="etcd is not installed (make deps installs etcd-server)")
def test_start_status_stop_a_member(tmp_path):
    state = str(tmp_path / "state")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    try:
        out = pit("etcd", "start", "--state", state, "--name", "n1", "--client", client, "--peer", peer).stdout
        assert "healthy" in out
        assert "already runs" in pit("etcd", "start", "--state", state, "--name", "n1", "--client", client,
                                     "--peer", peer).stdout
        st = json.loads(pit("etcd", "status", client, "--json").stdout)
        assert st[client]["healthy"] is True
        pid = open(os.path.join(state, "etcd", "etcd.pid")).read().strip()
        assert b"--pre-vote" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    finally:
        assert "stopped" in pit("etcd", "stop", "--state", state).stdout
    bad = pit("etcd", "status", client, check=False)
    assert bad.returncode == 30 and "unhealthy" in bad.stderr
    assert "no etcd member" in pit("etcd", "stop", "--state", state).stdout
    # a second start reuses the data directory (initial-cluster-state existing)
    try:
        assert "healthy" in pit("etcd", "start", "--state", state, "--name", "n1", "--client", client,
                                "--peer", peer).stdout
    finally:
        pit("etcd", "stop", "--state", state)


def test_bad_url_is_one_line(tmp_path):
    r = pit("etcd", "start", "--state", str(tmp_path), "--name", "n1", "--client", "localhost", "--peer",
            "http://127.0.0.1:1", check=False)
    assert r.returncode == 53 and r.stderr.count("\n") == 1 and "not a URL" in r.stderr
