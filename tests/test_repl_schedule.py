"""Scheduled replication: a set with `schedule = {every = ...}` or `{daily = [...]}`
does not stream on events; the master reconciles at the scheduled times (full
scan, tree comparison, a consistent point), or on demand with `pit point`.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import time

import pytest

from replicator.config import normalise_sets
from replicator.errors import ConfigError
from replicator.schedule import next_due
from test_repl_helpers import cluster, read_tree, replica_head, replica_snapshots, wait_for  # noqa: F401  (cluster: the fixture)

BASE = {"master": "p", "replicas": ["r"], "paths": ["/srv/www"]}


def sched(v):
    return normalise_sets({"sets": {"web": {**BASE, "schedule": v}}}, "cluster.toml")["web"].schedule


def test_schedule_config():
    assert sched({"every": "15m"}) == {"every": 900.0}
    assert sched({"every": 90}) == {"every": 90.0}
    assert sched({"every": "2h"}) == {"every": 7200.0}
    assert sched({"daily": ["13:00", "2:05"]}) == {"daily": ["02:05", "13:00"]}
    assert sched({}) is None
    # normalised sets normalise to themselves (the pushed copy is checked again on every node)
    once = normalise_sets({"sets": {"web": {**BASE, "schedule": {"every": "2s"}}}})
    assert normalise_sets({"sets": {n: s.to_wire() for n, s in once.items()}}) == once
    # a set without `schedule` is unchanged (real-time, same configuration version as before)
    assert "schedule" not in normalise_sets({"sets": {"web": BASE}})["web"].to_wire()


@pytest.mark.parametrize("value, key", [
    ({"every": "15x"}, "schedule.every"),
    ({"every": 0}, "schedule.every"),
    ({"every": "-5m"}, "schedule.every"),
    ({"daily": ["25:00"]}, "schedule.daily"),
    ({"daily": ["2pm"]}, "schedule.daily"),
    ({"daily": []}, "schedule.daily"),
    ({"evry": "1m"}, "'evry'"),
    ({"every": "1m", "daily": ["01:00"]}, "not both"),
    ("15m", "schedule` must be a table"),
])
def test_bad_schedule_is_one_line_naming_the_key(value, key):
    with pytest.raises(ConfigError) as e:
        sched(value)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and msg.startswith("cluster.toml: `sets.web.schedule"), msg


def test_next_due():
    now = dt.datetime(2026, 3, 10, 12, 30).timestamp()
    at = lambda *a: dt.datetime(*a).timestamp()  # noqa: E731
    assert next_due({"every": 60.0}, now) == now                     # first run at start
    assert next_due({"every": 60.0}, now, now - 10) == now + 50
    assert next_due({"every": 60.0}, now, now - 600) == now          # overdue: now
    daily = {"daily": ["02:00", "13:00"]}
    assert next_due(daily, now) == at(2026, 3, 10, 13, 0)
    assert next_due(daily, at(2026, 3, 10, 13, 0)) == at(2026, 3, 11, 2, 0)  # strictly after
    assert next_due(daily, at(2026, 3, 10, 23, 59)) == at(2026, 3, 11, 2, 0)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def status(node):
    return json.loads(node.ctl("status", "--local").stdout)


def test_daily_schedule_sends_nothing_until_due_or_asked(cluster):
    c = cluster(replicas=1)
    far = (dt.datetime.now() + dt.timedelta(hours=12)).strftime("%H:%M")
    c.sets["web"]["schedule"] = {"daily": [far]}
    write(f"{c.src}/a.txt", b"before start")
    c.start()
    r = c.replicas[0]
    wait_for(lambda: status(c.primary)["sets"].get("web", {}).get("schedule", {}).get("next_run"), 20,
             "the schedule to be armed")
    st = status(c.primary)["sets"]["web"]
    assert st["schedule"]["runs"] == 0 and st["schedule"]["daily"] == [far]
    write(f"{c.src}/b.txt", b"changed while not due")
    time.sleep(1.0)  # several debounce periods: a real-time set would have streamed by now
    assert replica_head(r.repo, "web") == {}
    assert not status(c.primary)["sets"]["web"]["replicas"]["r1"]["connected"]
    human = c.primary.ctl("status").stdout  # idle between runs is not a broken link
    assert "web -> r1: scheduled, last run none yet, next " in human and "DISCONNECTED" not in human, human

    # on demand: a full scan, a reconcile and a consistent point
    out = c.primary.ctl("point", "--set", "web").stdout
    assert "r1" in out
    want = read_tree(c.src)
    assert replica_snapshots(r.repo, "web")[-1][1] == want
    assert replica_head(r.repo, "web") in ({}, want)  # the head became the snapshot

    write(f"{c.src}/c.txt", b"after the point")
    time.sleep(1.0)
    assert replica_snapshots(r.repo, "web")[-1][1] == want  # still the state at the point


def test_every_schedule_reconciles_with_points(cluster):
    c = cluster(replicas=2)
    c.sets["web"]["schedule"] = {"every": "2s"}
    for i in range(20):
        write(f"{c.src}/d{i % 2}/f{i}", os.urandom(1000 + i))
    c.start()
    for r in c.replicas:
        wait_for(lambda: replica_snapshots(r.repo, "web") and
                 replica_snapshots(r.repo, "web")[-1][1] == read_tree(c.src), 30, f"{r.name}: first run")
    runs = status(c.primary)["sets"]["web"]["schedule"]["runs"]
    assert runs >= 1

    write(f"{c.src}/d0/f0", b"edited")
    os.remove(f"{c.src}/d1/f1")
    write(f"{c.src}/new/x", b"new")
    want = read_tree(c.src)
    for r in c.replicas:
        # each run ends with a consistent point: the newest snapshot is the master's tree
        wait_for(lambda: replica_snapshots(r.repo, "web")[-1][1] == want, 30, f"{r.name}: a later run")
    st = status(c.primary)["sets"]["web"]
    assert st["schedule"]["runs"] > runs
    assert all(s["runs"] >= 2 for s in st["replicas"].values()), st

    # A bad schedule in the running cluster's file: one line naming the key; the old version stays.
    version = status(c.primary)["config_version"]
    c.sets["web"]["schedule"] = {"every": "soon"}
    c.write_sets()
    wait_for(lambda: "schedule.every" in c.primary.logtext(), 20, "the configuration error in the log")
    line = next(ln for ln in c.primary.logtext().splitlines() if "schedule.every" in ln)
    assert "'soon'" in line and f"keeping version {version}" in line
    assert status(c.primary)["config_version"] == version
