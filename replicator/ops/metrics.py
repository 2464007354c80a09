"""Prometheus metrics of one `pit agent`, read from `agent.status()` at scrape time.

Nothing here is called from a hot path: a custom collector turns the agent's
own status (the dict `pit status --local` prints) into metric families each
time Prometheus scrapes, on a dedicated `CollectorRegistry` (never the
library's global one), served by `prometheus_client`'s HTTP server:

    server = start_metrics_server(agent, "0.0.0.0:9474")   # GET /metrics
    ...
    server.stop()

Durations of work the agent drives (a snapshot, a prune, a verify) are
reported through a small process-wide registry, `observe(name, seconds,
**labels)` (or `with timed(name, **labels):`), and events through
`inc(name, **labels)`, so that the code measuring them (the agent, around
calls into `store`) needs no metric objects and `store` imports nothing
from here.

Replication lag: the status has no lag figure of its own yet, so
`pit_replication_lag_seconds` is an estimate kept by the collector
(`LagTracker`): the seconds since the sender was last seen up to date
(connected, nothing queued, no catch-up pending) or making progress (an
acknowledged batch since the previous look); 0 while up to date. Behind
it, `pit_replication_queued_paths` and `pit_replication_catchup` say how
much is waiting. When the status one day carries `lag_seconds` and
`lag_bytes` per replica, those are exported instead (and bytes behind as
`pit_replication_lag_bytes`). docs/metrics-alerts.md lists every metric.
"""
from __future__ import annotations

import calendar
import logging
import os
import re
import threading
import time

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..names import parse_listen

log = logging.getLogger("pit.metrics")

PHASES = ("starting", "active", "standby", "replica", "fenced", "waiting", "promoting", "demoted")
VERIFY_RESULTS = ("good", "damaged", "never")
# seconds: a snapshot of a busy set, a prune of a big repository, a deep verify
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# ----------------------------------------------------------------------------- durations
class Durations:
    """Histograms of durations by name and labels, fed by `observe`, thread-safe."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self.lock = threading.Lock()
        # name -> {sorted label items: [bucket counts..., count, sum, last]}
        self.data: dict[str, dict[tuple, list]] = {}

    def observe(self, name: str, seconds: float, **labels) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"duration name {name!r} is not a metric name ([a-zA-Z_][a-zA-Z0-9_]*)")
        for k in labels:
            if not _NAME.fullmatch(k) or k.startswith("__"):
                raise ValueError(f"label {k!r} is not a label name")
        seconds = float(seconds)
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self.lock:
            row = self.data.setdefault(name, {}).get(key)
            if row is None:
                row = self.data[name][key] = [0] * len(self.buckets) + [0, 0.0, 0.0]
            for i, b in enumerate(self.buckets):
                if seconds <= b:
                    row[i] += 1
            n = len(self.buckets)
            row[n] += 1
            row[n + 1] += seconds
            row[n + 2] = seconds

    def collect(self):
        with self.lock:
            data = {name: {k: list(v) for k, v in rows.items()} for name, rows in self.data.items()}
        n = len(self.buckets)
        for name, rows in sorted(data.items()):
            labelnames = sorted({k for key in rows for k, _ in key})
            h = HistogramMetricFamily(f"pit_{name}_duration_seconds", f"Duration of {name} operations",
                                      labels=labelnames)
            last = GaugeMetricFamily(f"pit_{name}_last_duration_seconds", f"Duration of the last {name} operation",
                                     labels=labelnames)
            for key, row in sorted(rows.items()):
                d = dict(key)
                values = [d.get(k, "") for k in labelnames]
                h.add_metric(values, [(_fmt_le(b), row[i]) for i, b in enumerate(self.buckets)] + [("+Inf", row[n])],
                             row[n + 1])
                last.add_metric(values, row[n + 2])
            yield h
            yield last


class Counts:
    """Counters of events by name and labels, fed by `inc` (e.g. failed point hooks), thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, dict[tuple, float]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"counter name {name!r} is not a metric name ([a-zA-Z_][a-zA-Z0-9_]*)")
        for k in labels:
            if not _NAME.fullmatch(k) or k.startswith("__"):
                raise ValueError(f"label {k!r} is not a label name")
        if amount < 0:
            raise ValueError("counters only go up")
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self.lock:
            rows = self.data.setdefault(name, {})
            rows[key] = rows.get(key, 0.0) + float(amount)

    def collect(self):
        with self.lock:
            data = {name: dict(rows) for name, rows in self.data.items()}
        for name, rows in sorted(data.items()):
            labelnames = sorted({k for key in rows for k, _ in key})
            c = CounterMetricFamily(f"pit_{name}", f"{name.replace('_', ' ')} (events counted by the agent)",
                                    labels=labelnames)
            for key, v in sorted(rows.items()):
                d = dict(key)
                c.add_metric([d.get(k, "") for k in labelnames], v)
            yield c


def _fmt_le(b: float) -> str:
    return repr(float(b))


DURATIONS = Durations()


def observe(name: str, seconds: float, **labels) -> None:
    """Record one duration, e.g. `observe("snapshot", 0.42, set="web")`: exported as the histogram
    `pit_snapshot_duration_seconds{set="web"}` and the gauge `pit_snapshot_last_duration_seconds`."""
    DURATIONS.observe(name, seconds, **labels)


COUNTS = Counts()


def inc(name: str, amount: float = 1.0, **labels) -> None:
    """Count an event, e.g. `inc("point_hook_failures", set="web")`: exported as the counter
    `pit_point_hook_failures_total{set="web"}`."""
    COUNTS.inc(name, amount, **labels)


class timed:
    """`with timed("prune", set="web"):` observes the block's wall time, also when it raises."""

    def __init__(self, name: str, **labels) -> None:
        self.name, self.labels = name, labels

    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        observe(self.name, time.monotonic() - self.t0, **self.labels)


# ----------------------------------------------------------------------------- lag
class LagTracker:
    """Per (set, replica): seconds since the sender was last seen up to date or making progress.

    Fed one sender status at a time (`update`), at whatever rate someone looks (scrapes, the alert
    watcher). Up to date: connected, nothing queued, no catch-up pending (a scheduled set between
    runs counts as up to date unless a run is due). Progress: `acked_batches` grew since the last
    look. A sender never seen up to date counts from the first look."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.seen: dict[tuple, tuple[float, int]] = {}  # key -> (last good time, acked batches then)

    @staticmethod
    def current(s: dict) -> bool:
        if not s.get("connected"):
            return "runs" in s and not s.get("due") and not s.get("catchup") and not s.get("queued")
        return not s.get("queued") and not s.get("catchup")

    def update(self, key: tuple, s: dict, now: float | None = None) -> float:
        if "lag_seconds" in s and isinstance(s["lag_seconds"], (int, float)):
            return float(s["lag_seconds"])
        now = self.clock() if now is None else now
        acked = int(s.get("acked_batches") or 0)
        with self.lock:
            last = self.seen.get(key)
            if last is None or self.current(s) or acked > last[1]:
                self.seen[key] = (now, acked)
                return 0.0
            return max(0.0, now - last[0])

    def forget(self, keep: set) -> None:
        with self.lock:
            for k in list(self.seen):
                if k not in keep:
                    del self.seen[k]


def iso_age(text: str | None, now: float | None = None) -> float | None:
    """Seconds since an ISO time of the status ("2026-11-25T10:27:19Z"; UTC), None if unreadable."""
    if not text:
        return None
    try:
        t = calendar.timegm(time.strptime(text.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return None
    return max(0.0, (time.time() if now is None else now) - t)


def disk_usage(path: str) -> tuple[int, int] | None:
    """(free bytes for an unprivileged writer, size in bytes) of the filesystem holding `path`."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def watched_paths(agent) -> dict[str, str]:
    """{"repo": path, "state": path} of the agent's own config (what fills up when a disk does)."""
    cfg = getattr(agent, "cfg", None)
    paths = {k: getattr(cfg, k, None) for k in ("repo", "state")}
    return {k: v for k, v in paths.items() if isinstance(v, str) and v}


# ----------------------------------------------------------------------------- collector
class StatusCollector(Collector):
    """Metric families from `agent.status()`, computed at each scrape."""

    def __init__(self, agent, durations: Durations | None = None, clock=time.monotonic,
                 counts: Counts | None = None) -> None:
        self.agent = agent
        self.durations = durations if durations is not None else DURATIONS
        self.counts = counts if counts is not None else COUNTS
        self.lag = LagTracker(clock)
        self.lock = threading.Lock()
        self.promotions = 0
        self.last_promotion_key = None
        self.started = time.time()
        self.status_errors = 0

    def describe(self):
        return []  # collected at scrape time only: no families worked out at registration

    def collect(self):
        t0 = time.monotonic()
        try:
            st = self.agent.status()
            ok = True
        except Exception as exc:  # the scrape still answers, and says the status failed
            log.warning("metrics: status unavailable: %s", exc)
            st, ok = {}, False
            with self.lock:
                self.status_errors += 1
        g = GaugeMetricFamily("pit_status_up", "1 when the agent's status could be read at this scrape")
        g.add_metric([], 1 if ok else 0)
        yield g
        c = CounterMetricFamily("pit_status_errors", "Scrapes whose agent status could not be read")
        c.add_metric([], self.status_errors)
        yield c
        if ok:
            yield from self._node(st)
            yield from self._sets(st.get("sets") or {})
            if st.get("failover"):
                yield from self._failover(st["failover"])
        yield from self._disk()
        yield from self.durations.collect()
        yield from self.counts.collect()
        g = GaugeMetricFamily("pit_scrape_duration_seconds", "Time to read the agent's status and build the metrics")
        g.add_metric([], time.monotonic() - t0)
        yield g

    # node
    def _node(self, st: dict):
        info = GaugeMetricFamily("pit_node_info", "This node: its id, the configured primary and its roles",
                                 labels=["node", "primary", "roles"])
        info.add_metric([str(st.get("node", "")), str(st.get("primary", "")), "; ".join(st.get("roles") or [])], 1)
        yield info
        if st.get("config_version") is not None:
            g = GaugeMetricFamily("pit_config_version", "Version of the cluster configuration applied here")
            g.add_metric([], st["config_version"])
            yield g
        if st.get("pushed") is not None:
            g = GaugeMetricFamily("pit_config_pushed_version",
                                  "Primary: configuration version each node has acknowledged", labels=["node"])
            for n, v in sorted(st["pushed"].items()):
                g.add_metric([n], v)
            yield g

    # sets
    def _sets(self, sets: dict):
        fam = {
            "connected": GaugeMetricFamily("pit_replication_connected",
                                           "Master side: 1 when the sender to this replica is connected",
                                           labels=["set", "replica"]),
            "queued": GaugeMetricFamily("pit_replication_queued_paths",
                                        "Master side: changed paths waiting to be sent to this replica",
                                        labels=["set", "replica"]),
            "catchup": GaugeMetricFamily("pit_replication_catchup",
                                         "Master side: 1 while a tree comparison (catch-up) is pending or under way",
                                         labels=["set", "replica"]),
            "lag": GaugeMetricFamily("pit_replication_lag_seconds",
                                     "Master side: seconds since the replica was last seen up to date or "
                                     "acknowledging a batch (0 when up to date)", labels=["set", "replica"]),
            "lag_bytes": GaugeMetricFamily("pit_replication_lag_bytes",
                                           "Master side: bytes not yet acknowledged by the replica",
                                           labels=["set", "replica"]),
            "held": GaugeMetricFamily("pit_replication_held_deletes",
                                      "Master side: deletions the replica's mass-delete breaker holds",
                                      labels=["set", "replica"]),
            "bytes": CounterMetricFamily("pit_replication_sent_bytes",
                                         "Master side: bytes sent to this replica (frames, compressed chunks)",
                                         labels=["set", "replica"]),
            "chunks": CounterMetricFamily("pit_replication_sent_chunks",
                                          "Master side: chunks sent to this replica", labels=["set", "replica"]),
            "batches": CounterMetricFamily("pit_replication_acked_batches",
                                           "Master side: batches of changes the replica committed and acknowledged",
                                           labels=["set", "replica"]),
            "ops": CounterMetricFamily("pit_replication_ops_frames",
                                       "Master side: OPS frames (parts of chunk lists too big for one frame)",
                                       labels=["set", "replica"]),
            "error": GaugeMetricFamily("pit_replication_last_error",
                                       "Master side: 1 when the sender's last session ended with an error",
                                       labels=["set", "replica"]),
            "runs": CounterMetricFamily("pit_replication_scheduled_runs",
                                        "Master side, scheduled sets: reconcile runs done for this replica",
                                        labels=["set", "replica"]),
        }
        wfam = {
            "lag_bytes": GaugeMetricFamily("pit_wal_lag_bytes", "Master side, database sets: bytes of database log "
                                           "(WAL) the replica has not confirmed", labels=["set", "replica"]),
            "lag_seconds": GaugeMetricFamily("pit_wal_lag_seconds", "Master side, database sets: the replica's "
                                             "log flush delay while streaming, or seconds since it streamed (the "
                                             "RPO a failover to it would have)", labels=["set", "replica"]),
            "streaming": GaugeMetricFamily("pit_wal_streaming", "Master side, database sets: 1 while the "
                                           "replica's log receiver streams", labels=["set", "replica"]),
        }
        mstats = {
            "files_read": ("pit_master_files_read", "Files chunked and hashed", "counter"),
            "bytes_read": ("pit_master_read_bytes", "Bytes of files chunked and hashed", "counter"),
            "changes": ("pit_master_changes", "Changed paths found", "counter"),
            "unchanged": ("pit_master_unchanged_files", "Files the files-cache rule skipped", "counter"),
            "scans": ("pit_master_scans", "Full scans (start-up and reconcile)", "counter"),
            "cache_rows": ("pit_master_cache_rows", "Rows in the master's files cache", "gauge"),
            "cache_pending": ("pit_master_cache_pending", "Paths not yet written to the files cache", "gauge"),
        }
        mfam = {k: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, "Master side: " + doc,
                                                                                       labels=["set"])
                for k, (name, doc, kind) in mstats.items()}
        rfam = {
            "connected": GaugeMetricFamily("pit_replica_connected",
                                           "Replica side: 1 when the set's master is connected", labels=["set"]),
            "held": GaugeMetricFamily("pit_replica_held_deletes",
                                      "Replica side: deletions held by the mass-delete breaker", labels=["set"]),
            "breaker": GaugeMetricFamily("pit_replica_breaker_holding",
                                         "Replica side: 1 while the mass-delete breaker holds deletions "
                                         "(`pit release-deletes` lets them through)", labels=["set"]),
            "applied": CounterMetricFamily("pit_replica_applied_changes",
                                           "Replica side: path changes committed to the head", labels=["set"]),
            "pending": GaugeMetricFamily("pit_replica_head_pending",
                                         "Replica side: 1 when the head has changes not yet in a snapshot",
                                         labels=["set"]),
            "snapshots": GaugeMetricFamily("pit_snapshots", "Replica side: snapshots kept of the set",
                                           labels=["set"]),
            "point_age": GaugeMetricFamily("pit_last_point_age_seconds",
                                           "Replica side: seconds since the newest snapshot (last consistent point)",
                                           labels=["set"]),
            "point_time": GaugeMetricFamily("pit_last_point_timestamp_seconds",
                                            "Replica side: Unix time of the newest snapshot", labels=["set"]),
            "verify": GaugeMetricFamily("pit_verify_result",
                                        "Replica side: the newest snapshot's verification result "
                                        "(1 for the current one of good, damaged, never)",
                                        labels=["set", "result"]),
            "damaged": GaugeMetricFamily("pit_verify_damaged",
                                         "Replica side: 1 when the newest snapshot's verification found damage",
                                         labels=["set"]),
            "verify_age": GaugeMetricFamily("pit_verify_age_seconds",
                                            "Replica side: seconds since the newest snapshot was last verified",
                                            labels=["set"]),
        }
        alerts = GaugeMetricFamily("pit_set_alerts", "Open alerts of the set (breaker, vanished source, hooks)",
                                   labels=["set", "role"])
        keep = set()
        now_wall = time.time()
        for name, s in sorted(sets.items()):
            reps = s.get("replicas")
            if isinstance(reps, dict):  # master side
                for r, rs in sorted(reps.items()):
                    lab = [name, r]
                    keep.add((name, r))
                    fam["connected"].add_metric(lab, 1 if rs.get("connected") else 0)
                    fam["queued"].add_metric(lab, rs.get("queued") or 0)
                    fam["catchup"].add_metric(lab, 1 if rs.get("catchup") else 0)
                    fam["lag"].add_metric(lab, self.lag.update((name, r), rs))
                    for k in ("lag_bytes", "bytes_behind"):
                        if isinstance(rs.get(k), (int, float)):
                            fam["lag_bytes"].add_metric(lab, rs[k])
                            break
                    fam["held"].add_metric(lab, rs.get("held_deletes") or 0)
                    fam["bytes"].add_metric(lab, rs.get("bytes_sent") or 0)
                    if isinstance(rs.get("chunks_sent"), int):
                        fam["chunks"].add_metric(lab, rs["chunks_sent"])
                    fam["batches"].add_metric(lab, rs.get("acked_batches") or 0)
                    fam["ops"].add_metric(lab, rs.get("ops_frames") or 0)
                    fam["error"].add_metric(lab, 1 if rs.get("last_error") else 0)
                    if "runs" in rs:
                        fam["runs"].add_metric(lab, rs.get("runs") or 0)
                for k, v in (s.get("stats") or {}).items():
                    if k in mfam and isinstance(v, (int, float)):
                        mfam[k].add_metric([name], v)
            for r, w in sorted(((s.get("wal_replicas") or {}).get("replicas") or {}).items()):
                wfam["streaming"].add_metric([name, r], 1 if w.get("streaming") else 0)
                wfam["lag_seconds"].add_metric([name, r], w.get("lag_seconds") or 0)
                if isinstance(w.get("lag_bytes"), int):
                    wfam["lag_bytes"].add_metric([name, r], w["lag_bytes"])
            if s.get("role") == "replica" or "snapshots" in s:  # replica side (a set may be both)
                lab = [name]
                rfam["connected"].add_metric(lab, 1 if s.get("connected") else 0)
                held = s.get("held_deletes") or 0
                rfam["held"].add_metric(lab, held)
                breaker = held > 0 or any("mass delete" in a for a in s.get("alerts") or [])
                rfam["breaker"].add_metric(lab, 1 if breaker else 0)
                rfam["applied"].add_metric(lab, s.get("applied") or 0)
                rfam["pending"].add_metric(lab, 1 if s.get("head_pending") else 0)
                rfam["snapshots"].add_metric(lab, s.get("snapshots") or 0)
                age = iso_age(s.get("latest_time"), now_wall)
                if age is not None:
                    rfam["point_age"].add_metric(lab, age)
                    rfam["point_time"].add_metric(lab, now_wall - age)
                v = s.get("verified")
                if isinstance(v, dict):
                    res = str(v.get("result") or "never")
                    for r in sorted(set(VERIFY_RESULTS) | {res}):
                        rfam["verify"].add_metric([name, r], 1 if r == res else 0)
                    rfam["damaged"].add_metric(lab, 1 if res == "damaged" else 0)
                    vage = iso_age(v.get("time"), now_wall)
                    if vage is not None:
                        rfam["verify_age"].add_metric(lab, vage)
            alerts.add_metric([name, str(s.get("role", ""))], len(s.get("alerts") or []))
        self.lag.forget(keep)
        yield from fam.values()
        yield from mfam.values()
        yield from wfam.values()
        yield from rfam.values()
        yield alerts

    # failover
    def _failover(self, fo: dict):
        phase = str(fo.get("phase") or "")
        g = GaugeMetricFamily("pit_failover_phase", "Failover controller phase (1 for the current one)",
                              labels=["phase"])
        for p in sorted(set(PHASES) | {phase}):
            g.add_metric([p], 1 if p == phase else 0)
        yield g
        g = GaugeMetricFamily("pit_failover_leader_info", "Node holding the leader key (masters the protected sets)",
                              labels=["leader", "primary", "secondary"])
        g.add_metric([str(fo.get("leader") or ""), str(fo.get("primary") or ""), str(fo.get("secondary") or "")], 1)
        yield g
        for key, name, doc in (("token", "pit_failover_token", "The leader's fencing token (etcd revision)"),
                               ("highest_token", "pit_failover_highest_token", "Highest fencing token seen here")):
            if isinstance(fo.get(key), int):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], fo[key])
                yield g
        for key, name, doc in (("holding", "pit_failover_holding", "1 when this node holds the leader key"),
                               ("etcd_ok", "pit_failover_etcd_ok", "1 when etcd answered the last look"),
                               ("primary_reachable", "pit_failover_primary_reachable",
                                "1 when the primary's agent answered the last look")):
            if fo.get(key) is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], 1 if fo[key] else 0)
                yield g
        g = GaugeMetricFamily("pit_failover_unpromoted_sets",
                              "Protected sets the last promotion could not bring up (no good image)")
        g.add_metric([], len(fo.get("unpromoted") or []))
        yield g
        for key, name, doc in (("checks", "pit_failover_check_failures",
                                "Consecutive failures of each failure check (the primary's services)"),
                               ("link", "pit_failover_link_failures",
                                "Consecutive failures of each public-link check (on the primary)")):
            g = GaugeMetricFamily(name, doc, labels=["check"])
            for c in fo.get(key) or []:
                if isinstance(c, dict):
                    g.add_metric([str(c.get("check", ""))], c.get("failures") or 0)
            yield g
        lp = fo.get("last_promotion")
        with self.lock:
            if isinstance(lp, dict):
                k = (lp.get("node"), lp.get("started"), lp.get("token"))
                if k != self.last_promotion_key:
                    # a promotion counts once, and the one persisted from before this process started does not
                    if self.last_promotion_key is not None or (lp.get("started") or 0) >= self.started:
                        self.promotions += 1
                    self.last_promotion_key = k
            promotions = self.promotions
        c = CounterMetricFamily("pit_failover_promotions",
                                "Promotions (failovers) seen by this agent since it started")
        c.add_metric([], promotions)
        yield c
        if isinstance(lp, dict):
            g = GaugeMetricFamily("pit_failover_last_promotion_timestamp_seconds",
                                  "Unix time the last promotion started", labels=["node"])
            g.add_metric([str(lp.get("node", ""))], lp.get("started") or 0)
            yield g
            g = GaugeMetricFamily("pit_failover_last_promotion_ok",
                                  "1 when the last promotion succeeded (every set up, every takeover hook ok)")
            hooks_ok = all(h.get("ok", True) for h in lp.get("takeover_hooks") or [] if isinstance(h, dict))
            sets_ok = all("error" not in v for v in (lp.get("sets") or {}).values() if isinstance(v, dict))
            g.add_metric([], 1 if ("error" not in lp and hooks_ok and sets_ok) else 0)
            yield g
            if isinstance(lp.get("seconds"), (int, float)):
                g = GaugeMetricFamily("pit_failover_last_promotion_seconds", "How long the last promotion took")
                g.add_metric([], lp["seconds"])
                yield g

    # disk
    def _disk(self):
        free = GaugeMetricFamily("pit_disk_free_bytes", "Free bytes on the filesystem of the repository / state",
                                 labels=["what", "path"])
        size = GaugeMetricFamily("pit_disk_size_bytes", "Size of the filesystem of the repository / state",
                                 labels=["what", "path"])
        ratio = GaugeMetricFamily("pit_disk_free_ratio", "Free fraction (0..1) of the filesystem of the "
                                  "repository / state", labels=["what", "path"])
        for what, path in sorted(watched_paths(self.agent).items()):
            u = disk_usage(path)
            if u is None:
                continue
            free.add_metric([what, path], u[0])
            size.add_metric([what, path], u[1])
            ratio.add_metric([what, path], u[0] / u[1] if u[1] else 0.0)
        yield free
        yield size
        yield ratio


# ----------------------------------------------------------------------------- server
def validate_metrics_address(value) -> str:
    """The agent config's `metrics` value checked (replicator.settings); ConfigError naming the key when bad."""
    from ..settings import listen_address

    return listen_address(value, ("metrics",))


class MetricsServer:
    """The running HTTP server (a daemon thread); `stop()` closes it. `port` is the bound port."""

    def __init__(self, httpd, thread: threading.Thread, registry: CollectorRegistry, collector) -> None:
        self.httpd, self.thread, self.registry, self.collector = httpd, thread, registry, collector
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    shutdown = close = stop


def make_registry(agent, durations: Durations | None = None) -> tuple[CollectorRegistry, StatusCollector]:
    reg = CollectorRegistry(auto_describe=False)
    col = StatusCollector(agent, durations)
    reg.register(col)
    try:
        ProcessCollector(namespace="pit", registry=reg)  # CPU, memory, open files (Linux /proc)
    except Exception:  # pragma: no cover - not on Linux
        pass
    return reg, col


def start_metrics_server(agent, address: str) -> MetricsServer:
    """Serve `agent`'s metrics at http://ADDRESS/metrics (a daemon thread); returns a stoppable server."""
    from ..errors import ConfigError

    host, port = parse_listen(address)
    reg, col = make_registry(agent)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as exc:
        raise ConfigError(f"`metrics`: cannot serve metrics on {address}: {exc.strerror or exc}") from None
    srv = MetricsServer(httpd, thread, reg, col)
    log.info("metrics on %s", srv.url)
    return srv
