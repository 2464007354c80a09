"""Failover of a SQLite database whose WAL is shipped between points (issue 16): real agents, a real etcd.

The primary's database is set `db`, made with the sqlite template (`wal = "stream"`, its default): its
agent ships every committed WAL frame to r1 and r2 over the agents' mTLS port (stream/logship.py). A writer
commits numbered rows (each number recorded once its commit returned); a point is made while it writes, and
it writes on for seconds after. Then the writer is killed, and once `pit status` shows r1 has every frame
(lag 0 bytes), the primary's agent gets SIGKILL: r1 takes over with the point's copy plus the frames received
after it, and must hold every acknowledged row, not only those of the point.
"""
from __future__ import annotations

import os
import signal
import sqlite3

from etcdlab import etcd  # noqa: F401  (the fixture)
from test_failover import FailoverCluster, fo, status
from test_failover_pg import PgFailoverCluster
from test_repl_helpers import wait_for
from test_sqlitewal import acked, rows, start_writer
from replicator.apps.templates import build_set


class SqliteFailoverCluster(PgFailoverCluster):
    """The PostgreSQL test's cluster of one set `db`, with hooks that start nothing (SQLite has no server)."""

    def __init__(self, tmp, etcd_endpoint: str, table: dict, live: str) -> None:
        FailoverCluster.__init__(self, tmp, etcd_endpoint, takeover=["true"], demote=["true"])
        self.table, self.live, self.sets = table, live, {"db": table}


def lag(node, replica: str) -> dict:
    return ((status(node)["sets"].get("db") or {}).get("wal_replicas") or {}).get("replicas", {}).get(replica) or {}


def test_sqlite_failover_keeps_the_rows_committed_after_the_point(tmp_path, etcd):  # noqa: F811
    base = str(tmp_path)
    db = os.path.join(base, "shop", "sales.db")
    os.makedirs(os.path.dirname(db))
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, v BLOB)")
    con.close()
    side = os.path.join(base, "side", "db")
    table = build_set("sqlite", "db", [db], ["r1", "r2"], "primary", {"side_dir": side})
    live = os.path.join(base, "r1-live", "db")
    c = SqliteFailoverCluster(base, etcd.endpoint, table, live)
    acks = os.path.join(base, "acks")
    w = None
    try:
        c.start()
        p, r1 = c.primary, c.replicas[0]
        wait_for(lambda: fo(p).get("holding"), 30, "the primary to take the leader key")
        wait_for(lambda: fo(r1).get("phase") == "standby", 30, "r1 to stand by")
        w = start_writer(db, acks, 1616)
        wait_for(lambda: os.path.exists(acks) and len(acked(acks)) > 200, 30, "writes")
        p.ctl("point", "--set", "db", "--timeout", "120")
        at_point = len(acked(acks))
        wait_for(lambda: len(acked(acks)) > at_point + 2000, 60, "writes after the point")
        wait_for(lambda: lag(p, "r1").get("streaming"), 30, "r1 to stream the log")
        assert "db -> r1: database log streaming" in p.ctl("status").stdout
        w.kill()
        w.wait()
        w = None
        want = acked(acks)
        wait_for(lambda: lag(p, "r1").get("lag_bytes") == 0 and not status(p)["sets"]["db"]["wal_replicas"]["error"],
                 60, "r1 to hold every shipped frame")
        rst = status(r1)["sets"]["db"]["wal"]
        assert rst["running"] and rst["error"] is None, rst
        import json

        import jsonschema
        from test_status import SCHEMA
        jsonschema.validate(json.loads(p.ctl("status", "--json").stdout), SCHEMA)  # both sides of the log
        p.kill(signal.SIGKILL)
        wait_for(lambda: fo(r1).get("phase") == "active", 120, "r1 to take over")
        report = status(r1)
        got = rows(os.path.join(live, "sales.db"))
        assert got[:len(want)] == want, (len(got), len(want), at_point, report.get("failover"))
        assert len(got) - len(want) <= 2
        assert len(want) > at_point + 2000
        with open(r1.log, errors="replace") as f:
            text = f.read()
        assert "frames of" in text and "applied" in text, text[-3000:]
    finally:
        if w is not None:
            w.kill()
        c.stop()
