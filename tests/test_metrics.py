"""Prometheus metrics (replicator/ops/metrics.py): scraped with a real HTTP GET on 127.0.0.1 and parsed
with prometheus_client's own text parser; against a status of the shape `pit status --local` prints,
and against a real running cluster (its agents' status read over their control sockets)."""
from __future__ import annotations

import copy
import os
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicator.ops import metrics as M
from replicator.settings import AgentConfig
from test_repl_helpers import Cluster, wait_for

NOW_ISO = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))

# The shape of a real `pit status --local` (a node mastering `web` to r1 and r2, and replicating
# `db`), with the failover section of a secondary that was promoted (Failover.status()).
STATUS = {
    "node": "r1", "primary": "primary", "config_version": 7, "roles": ["primary master", "replica of db"],
    "sets": {
        "web": {
            "role": "master", "set": "web", "mode": "mirror", "alerts": [],
            "stats": {"files_read": 12, "bytes_read": 50000, "changes": 14, "unchanged": 3, "scans": 2,
                      "cache_rows": 15, "cache_loaded": 0, "cache_pending": 0},
            "replicas": {
                "r2": {"connected": True, "queued": 0, "catchup": False, "acked_batches": 5, "held_deletes": 0,
                       "bytes_sent": 379000, "ops_frames": 0, "last_error": ""},
                "r3": {"connected": False, "queued": 42, "catchup": True, "acked_batches": 1, "held_deletes": 0,
                       "bytes_sent": 1000, "ops_frames": 2, "last_error": "connection refused"},
            },
        },
        "db": {
            "role": "replica", "snapshots": 9, "latest": "2026-11-25T10.27.19Z", "latest_time": NOW_ISO,
            "head_pending": True, "alerts": ["mass delete held: 400 of 500 files (80 %) would be deleted"],
            "held_deletes": 400, "applied": 1234, "connected": True,
            "verified": {"result": "damaged", "time": NOW_ISO, "depth": "deep"},
        },
    },
    "failover": {
        "key": "/pit/leader", "phase": "active", "note": "", "me": "r1", "primary": "primary", "secondary": "r1",
        "leader": "r1", "token": 57, "holding": True, "highest_token": 57, "etcd_ok": True,
        "primary_reachable": False,
        "checks": [{"check": "tcp 10.0.0.1:5432", "ok": False, "failures": 4, "detail": "refused"}],
        "link": [],
        "last_promotion": None, "unpromoted": [],
    },
}


class FakeAgent:
    """What the collector needs of an Agent: status() and cfg (repo, state)."""

    def __init__(self, status: dict, cfg: dict | None = None) -> None:
        self.st = status
        self.cfg = AgentConfig(**cfg) if cfg else None
        self.fail = False

    def status(self) -> dict:
        if self.fail:
            raise RuntimeError("index busy")
        return copy.deepcopy(self.st)


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} from a real GET of /metrics."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: dict, name: str, **labels):
    return samples.get((name, frozenset(labels.items())))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server(tmp_path):
    os.makedirs(tmp_path / "state")
    agent = FakeAgent(copy.deepcopy(STATUS), {"state": str(tmp_path / "state"), "repo": str(tmp_path)})
    srv = M.start_metrics_server(agent, "127.0.0.1:0")
    srv.agent = agent
    yield srv
    srv.stop()


def test_scrape_status_of_a_master_replica_and_promoted_secondary(server):
    clock = Clock()
    server.collector.lag.clock = clock
    s = scrape(server.url)
    assert val(s, "pit_status_up") == 1
    assert val(s, "pit_node_info", node="r1", primary="primary", roles="primary master; replica of db") == 1
    assert val(s, "pit_config_version") == 7
    # master side, per replica
    assert val(s, "pit_replication_connected", set="web", replica="r2") == 1
    assert val(s, "pit_replication_connected", set="web", replica="r3") == 0
    assert val(s, "pit_replication_queued_paths", set="web", replica="r3") == 42
    assert val(s, "pit_replication_catchup", set="web", replica="r3") == 1
    assert val(s, "pit_replication_sent_bytes_total", set="web", replica="r2") == 379000
    assert val(s, "pit_replication_acked_batches_total", set="web", replica="r2") == 5
    assert val(s, "pit_replication_ops_frames_total", set="web", replica="r3") == 2
    assert val(s, "pit_replication_last_error", set="web", replica="r3") == 1
    assert val(s, "pit_replication_lag_seconds", set="web", replica="r2") == 0
    assert val(s, "pit_master_files_read_total", set="web") == 12
    assert val(s, "pit_master_read_bytes_total", set="web") == 50000
    assert val(s, "pit_master_cache_rows", set="web") == 15
    # replica side
    assert val(s, "pit_snapshots", set="db") == 9
    assert val(s, "pit_replica_held_deletes", set="db") == 400
    assert val(s, "pit_replica_breaker_holding", set="db") == 1
    assert val(s, "pit_replica_applied_changes_total", set="db") == 1234
    assert val(s, "pit_replica_head_pending", set="db") == 1
    assert 100 <= val(s, "pit_last_point_age_seconds", set="db") < 3600
    assert val(s, "pit_verify_damaged", set="db") == 1
    assert val(s, "pit_verify_result", set="db", result="damaged") == 1
    assert val(s, "pit_verify_result", set="db", result="good") == 0
    assert val(s, "pit_set_alerts", set="db", role="replica") == 1
    # failover
    assert val(s, "pit_failover_phase", phase="active") == 1
    assert val(s, "pit_failover_phase", phase="standby") == 0
    assert val(s, "pit_failover_token") == 57
    assert val(s, "pit_failover_holding") == 1
    assert val(s, "pit_failover_primary_reachable") == 0
    assert val(s, "pit_failover_leader_info", leader="r1", primary="primary", secondary="r1") == 1
    assert val(s, "pit_failover_check_failures", check="tcp 10.0.0.1:5432") == 4
    assert val(s, "pit_failover_promotions_total") == 0
    # disk of the repository and state directory, as statvfs sees them
    st = os.statvfs(server.agent.cfg.state)
    ratio = val(s, "pit_disk_free_ratio", what="state", path=server.agent.cfg.state)
    assert 0 < ratio <= 1
    assert val(s, "pit_disk_size_bytes", what="state", path=server.agent.cfg.state) == st.f_blocks * st.f_frsize
    # the process itself
    assert any(name == "pit_process_resident_memory_bytes" for name, _ in s)


def test_lag_grows_while_a_replica_makes_no_progress_and_drops_when_it_catches_up(server):
    clock = Clock()
    server.collector.lag.clock = clock
    r3 = server.agent.st["sets"]["web"]["replicas"]["r3"]
    scrape(server.url)  # first look: counts from here
    clock.t += 400
    assert val(scrape(server.url), "pit_replication_lag_seconds", set="web", replica="r3") == 400
    r3.update(connected=True, catchup=False, queued=10, acked_batches=2)  # progress: one more batch committed
    assert val(scrape(server.url), "pit_replication_lag_seconds", set="web", replica="r3") == 0
    clock.t += 30
    assert val(scrape(server.url), "pit_replication_lag_seconds", set="web", replica="r3") == 30
    r3.update(queued=0)  # up to date
    clock.t += 30
    assert val(scrape(server.url), "pit_replication_lag_seconds", set="web", replica="r3") == 0
    # a status that carries its own figures wins over the estimate
    r3.update(lag_seconds=12.5, lag_bytes=4096, chunks_sent=77)
    s = scrape(server.url)
    assert val(s, "pit_replication_lag_seconds", set="web", replica="r3") == 12.5
    assert val(s, "pit_replication_lag_bytes", set="web", replica="r3") == 4096
    assert val(s, "pit_replication_sent_chunks_total", set="web", replica="r3") == 77


def test_promotions_counted_once_each_and_the_report_exported(server):
    fo = server.agent.st["failover"]
    before = time.time() - 3600
    fo["last_promotion"] = {"reason": "old", "node": "r1", "started": before, "token": 50, "sets": {}, "seconds": 1.0}
    s = scrape(server.url)
    assert val(s, "pit_failover_promotions_total") == 0  # from before this process started: not counted
    assert val(s, "pit_failover_last_promotion_timestamp_seconds", node="r1") == before
    fo["last_promotion"] = {"reason": "primary silent", "node": "r1", "started": time.time(), "token": 57,
                            "sets": {"web": {"snapshot": "2026-11-25T10.27.19Z"}}, "seconds": 2.5,
                            "takeover_hooks": [{"hook": "start-web", "ok": True}]}
    s = scrape(server.url)
    assert val(s, "pit_failover_promotions_total") == 1
    assert val(s, "pit_failover_last_promotion_ok") == 1
    assert val(s, "pit_failover_last_promotion_seconds") == 2.5
    assert val(scrape(server.url), "pit_failover_promotions_total") == 1  # the same promotion, again
    fo["last_promotion"] = dict(fo["last_promotion"], started=time.time() + 1, token=60,
                                takeover_hooks=[{"hook": "start-web", "ok": False, "error": "exit 1"}])
    s = scrape(server.url)
    assert val(s, "pit_failover_promotions_total") == 2
    assert val(s, "pit_failover_last_promotion_ok") == 0


def test_a_failing_status_still_answers_the_scrape(server):
    server.agent.fail = True
    s = scrape(server.url)
    assert val(s, "pit_status_up") == 0
    assert val(s, "pit_status_errors_total") == 1
    assert val(s, "pit_replication_connected", set="web", replica="r2") is None
    server.agent.fail = False
    assert val(scrape(server.url), "pit_status_up") == 1


def test_durations_observed_by_name_and_labels(server):
    d = M.Durations()
    server.collector.durations = d
    d.observe("snapshot", 0.3, set="web")
    d.observe("snapshot", 7.0, set="web")
    d.observe("snapshot", 0.02, set="db")
    d.observe("prune", 1.5)
    s = scrape(server.url)
    assert val(s, "pit_snapshot_duration_seconds_count", set="web") == 2
    assert val(s, "pit_snapshot_duration_seconds_sum", set="web") == pytest.approx(7.3)
    assert val(s, "pit_snapshot_duration_seconds_bucket", set="web", le="0.5") == 1
    assert val(s, "pit_snapshot_duration_seconds_bucket", set="web", le="10.0") == 2
    assert val(s, "pit_snapshot_duration_seconds_bucket", set="web", le="+Inf") == 2
    assert val(s, "pit_snapshot_last_duration_seconds", set="web") == 7.0
    assert val(s, "pit_snapshot_duration_seconds_count", set="db") == 1
    assert val(s, "pit_prune_duration_seconds_count") == 1
    with pytest.raises(ValueError, match="metric name"):
        d.observe("bad-name", 1.0)
    with pytest.raises(ValueError, match="label"):
        d.observe("ok", 1.0, **{"bad-label": "x"})


def test_module_level_observe_and_timed_reach_the_default_registry(tmp_path):
    agent = FakeAgent({"node": "n", "primary": "n", "sets": {}, "roles": []})
    srv = M.start_metrics_server(agent, "127.0.0.1:0")
    try:
        M.observe("testonly_verify", 0.5, set="web")
        with pytest.raises(KeyError):
            with M.timed("testonly_prune", set="web"):
                raise KeyError("the block failed; its duration still counts")
        s = scrape(srv.url)
        assert val(s, "pit_testonly_verify_duration_seconds_count", set="web") == 1
        assert val(s, "pit_testonly_prune_duration_seconds_count", set="web") == 1
    finally:
        srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(srv.url, timeout=5)  # stopped: nothing listens there any more


def test_listen_addresses():
    assert M.parse_listen("127.0.0.1:9474") == ("127.0.0.1", 9474)
    assert M.parse_listen(":9474") == ("0.0.0.0", 9474)
    assert M.parse_listen("9474") == ("0.0.0.0", 9474)
    assert M.parse_listen("[::1]:9474") == ("::1", 9474)
    for bad in ("localhost", "host:port", "1.2.3.4:70000"):
        with pytest.raises(ValueError, match="not host:port"):
            M.parse_listen(bad)


class ControlSocketAgent:
    """A running `pit agent`, seen through its control socket: status() is its real status."""

    def __init__(self, node) -> None:
        self.node = node
        self.cfg = AgentConfig(state=node.state, repo=node.repo or None)

    def status(self) -> dict:
        from replicator.agent import control_request

        return control_request(self.node.state, None, "status", {}, timeout=20)


def test_metrics_of_a_real_running_cluster(tmp_path):
    c = Cluster(str(tmp_path), replicas=1)
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(os.urandom(200_000))
    c.start()
    servers = []
    try:
        r1 = c.replicas[0]
        wait_for(lambda: c.converged(r1), 30, "seeding")
        c.primary.ctl("point", "--set", "web")
        servers = [M.start_metrics_server(ControlSocketAgent(n), "127.0.0.1:0") for n in (c.primary, r1)]
        p, r = (scrape(s.url) for s in servers)
        assert val(p, "pit_status_up") == 1 and val(r, "pit_status_up") == 1
        assert val(p, "pit_replication_connected", set="web", replica="r1") == 1
        assert val(p, "pit_replication_queued_paths", set="web", replica="r1") == 0
        assert val(p, "pit_replication_sent_bytes_total", set="web", replica="r1") > 200_000
        assert val(p, "pit_replication_acked_batches_total", set="web", replica="r1") >= 1
        assert val(p, "pit_master_files_read_total", set="web") == 1
        assert val(r, "pit_snapshots", set="web") == 1
        assert val(r, "pit_replica_connected", set="web") == 1
        assert val(r, "pit_verify_result", set="web", result="never") == 1
        assert val(r, "pit_last_point_age_seconds", set="web") >= 0
        assert 0 < val(r, "pit_disk_free_ratio", what="repo", path=r1.repo) <= 1
        c.primary.kill()  # the replica's view: its master is gone
        wait_for(lambda: val(scrape(servers[1].url), "pit_replica_connected", set="web") == 0, 30,
                 "the replica to see its master gone")
        assert val(scrape(servers[0].url), "pit_status_up") == 0  # the primary's agent no longer answers
    finally:
        for s in servers:
            s.stop()
        c.stop()


RULES_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "prometheus")


def test_every_metric_the_example_rules_use_is_exported(tmp_path):
    import re

    st = copy.deepcopy(STATUS)
    st["sets"]["web"]["replicas"]["r2"].update(runs=3, due=False, last_run=None)  # a scheduled sender
    st["failover"]["link"] = [{"check": "nic eth0", "ok": True, "failures": 0, "detail": ""}]
    st["failover"]["last_promotion"] = {"node": "r1", "started": time.time(), "token": 57, "sets": {}, "seconds": 1}
    os.makedirs(tmp_path / "state")
    srv = M.start_metrics_server(FakeAgent(st, {"state": str(tmp_path / "state")}), "127.0.0.1:0")
    try:
        exported = {name for name, _ in scrape(srv.url)}
    finally:
        srv.stop()
    rules = open(os.path.join(RULES_DIR, "pit-alerts.yml")).read()
    used = set(re.findall(r"\b(pit_[a-z_]+)", rules))
    assert used, "no pit_ metric found in the rules"
    assert used <= exported, f"used by the rules but not exported: {sorted(used - exported)}"


@pytest.mark.skipif(not __import__("shutil").which("promtool"), reason="promtool (Debian package prometheus) missing")
def test_example_rules_pass_promtool():
    import subprocess

    for args in (["check", "rules", "pit-alerts.yml"], ["test", "rules", "pit-alerts.test.yml"],
                 ["check", "config", "prometheus.yml"]):
        r = subprocess.run(["promtool", *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr


def test_metrics_address_validation():
    from replicator.errors import ConfigError

    assert M.validate_metrics_address("127.0.0.1:9474") == "127.0.0.1:9474"
    for bad in ("localhost", 9474, "x:y"):
        with pytest.raises(ConfigError) as e:
            M.validate_metrics_address(bad)
        assert str(e.value).startswith("`metrics`:") and "\n" not in str(e.value)


def test_event_counters(server):
    cnt = M.Counts()
    server.collector.counts = cnt
    cnt.inc("point_hook_failures", set="web")
    cnt.inc("point_hook_failures", set="web")
    cnt.inc("point_hook_failures", set="db")
    s = scrape(server.url)
    assert val(s, "pit_point_hook_failures_total", set="web") == 2
    assert val(s, "pit_point_hook_failures_total", set="db") == 1
    with pytest.raises(ValueError):
        cnt.inc("x", -1)
    M.inc("testonly_events", kind="a")  # the process-wide one
    assert M.COUNTS.data["testonly_events"][(("kind", "a"),)] >= 1


def test_a_port_in_use_is_a_one_line_error():
    from replicator.errors import ConfigError

    srv = M.start_metrics_server(FakeAgent({"node": "n", "primary": "n", "sets": {}, "roles": []}), "127.0.0.1:0")
    try:
        with pytest.raises(ConfigError, match=r"^`metrics`: cannot serve metrics on 127\.0\.0\.1:\d+: "):
            M.start_metrics_server(FakeAgent({}), f"127.0.0.1:{srv.port}")
    finally:
        srv.stop()


def test_running_agents_serve_metrics_and_page_on_the_breaker(tmp_path):
    from test_repl_helpers import Node, free_port

    c = Cluster(str(tmp_path), replicas=1)
    c.sets["web"]["delete_count"] = 5
    out = tmp_path / "pages.txt"
    ports = {}
    for n in c.nodes():
        ports[n.name] = free_port()
        block = (f'metrics = "127.0.0.1:{ports[n.name]}"\n[alerts]\ninterval = 0.2\n'
                 f'command = \'echo "$PIT_ALERT_NODE $PIT_ALERT_KIND $PIT_ALERT_SEVERITY" >> {out}\'\n')
        n.write_config = (lambda n=n, block=block: lambda extra="": Node.write_config(n, extra + "\n" + block))()
    for i in range(30):
        with open(os.path.join(c.src, f"f{i}"), "wb") as f:
            f.write(b"%d" % i)
    c.start()
    try:
        r1 = c.replicas[0]
        wait_for(lambda: c.converged(r1), 30, "seeding")
        url = {n: f"http://127.0.0.1:{p}/metrics" for n, p in ports.items()}
        wait_for(lambda: val(scrape(url["primary"]), "pit_replication_connected", set="web", replica="r1") == 1,
                 30, "the primary's metrics")
        assert val(scrape(url["primary"]), "pit_master_files_read_total", set="web") == 30
        for i in range(20):
            os.remove(os.path.join(c.src, f"f{i}"))
        wait_for(lambda: val(scrape(url["r1"]), "pit_replica_breaker_holding", set="web") == 1, 30, "the breaker")
        wait_for(lambda: out.exists() and "r1 breaker critical" in out.read_text(), 30, "the breaker's page")
    finally:
        c.stop()
    assert "Traceback" not in c.logs()


def test_database_log_lag_per_replica(server):
    """A database set's master reports each replica's WAL lag (issue 16): bytes, seconds, streaming or not."""
    server.agent.st["sets"]["pg"] = {"wal_replicas": {"error": None, "replicas": {
        "r1": {"slot": "pit_r1", "streaming": True, "lag_bytes": 8192, "lag_seconds": 0.004},
        "r2": {"slot": "pit_r2", "streaming": False, "lag_bytes": None, "lag_seconds": 75.0}}}}
    s = scrape(server.url)
    assert val(s, "pit_wal_lag_bytes", set="pg", replica="r1") == 8192
    assert val(s, "pit_wal_lag_seconds", set="pg", replica="r1") == 0.004
    assert val(s, "pit_wal_streaming", set="pg", replica="r1") == 1
    assert val(s, "pit_wal_streaming", set="pg", replica="r2") == 0
    assert val(s, "pit_wal_lag_seconds", set="pg", replica="r2") == 75.0
    assert val(s, "pit_wal_lag_bytes", set="pg", replica="r2") is None  # no slot yet: unknown, not 0
