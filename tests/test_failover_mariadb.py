"""Failover of a real MariaDB database whose binary log is streamed between points (issue 16): real agents,
a real etcd, a real mariadbd on each side.

The primary's data directory is set `db`, made with the mysql template (`binlog = "stream"`, its default):
every consistent point is taken under `FLUSH TABLES WITH READ LOCK` (the `mysql.lock` hook, which writes the
binlog position into the image), and r1's agent runs `mariadb-binlog --raw --stop-never` against the primary's
server between points (apps/mybinlog.BinlogReceiver). An appender commits numbered rows, each recorded once its
INSERT returned; a point is made while it writes, and it writes on after. Once r1's copy of the binary log
reaches the master's position of a moment when `confirmed` rows were acknowledged, the host dies (agent and
mariadbd SIGKILL). r1 takes over: the newest image, the binlog received after it replayed onto it by a
private server (the controller's _replay_wal, kind "mysql"), then the takeover hook starts MariaDB on the live
copy, which must hold every row acknowledged before `confirmed`, not only those of the point.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile

import jsonschema
import pytest

from etcdlab import etcd  # noqa: F401  (the fixture)
from test_failover import FailoverCluster, fo, status
from test_failover_pg import PgFailoverCluster
from test_mybinlog import MARIADBD, NEEDED, USER, Appender, make_master
from test_repl_helpers import wait_for
from test_status import SCHEMA
from replicator.apps import mybinlog
from replicator.apps.templates import build_set

pytestmark = pytest.mark.skipif(MARIADBD is None or any(mybinlog.tool(n) is None for n in NEEDED)
                                or not shutil.which("etcd"), reason="MariaDB or etcd is not installed")


def takeover_hook(base: str, data: str, sock: str) -> str:
    """start|stop MariaDB on r1's live copy (the other nodes have nothing to start here)."""
    script = os.path.join(base, "my-hook.sh")
    admin = f"{mybinlog.tool('mariadb-admin')} --no-defaults --socket={sock} --user=root"
    user = f"--user={USER}" if USER else ""
    with open(script, "w") as f:
        f.write(f"""#!/bin/sh
set -e
[ "$PIT_NODE" = r1 ] || exit 0
echo "$1 $PIT_ROLE $PIT_TOKEN" >> {base}/hook-r1.log
case "$1" in
start)
  if {admin} ping >/dev/null 2>&1; then echo "already running"; exit 0; fi
  rm -f {data}/*.pid
  setsid {MARIADBD} --no-defaults --datadir={data} --socket={sock} --skip-networking \\
      --log-bin=mysql-bin --server-id=2 --binlog-format=ROW --pid-file={base}/r1.pid \\
      --log-error={base}/r1-error.log --innodb-buffer-pool-size=64M {user} </dev/null >/dev/null 2>&1 &
  i=0
  until {admin} ping >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 1200 ] || {{ tail -20 {base}/r1-error.log; exit 1; }}; sleep 0.1
  done;;
stop)
  {admin} shutdown >/dev/null 2>&1 || true;;
esac
""")
    os.chmod(script, 0o755)
    return script


class MariaDbFailoverCluster(PgFailoverCluster):
    """The PostgreSQL test's cluster of one set `db`, its hooks starting MariaDB instead."""

    def __init__(self, tmp, etcd_endpoint: str, table: dict, live: str, hook: str) -> None:
        FailoverCluster.__init__(self, tmp, etcd_endpoint, takeover=[f"{hook} start"], demote=[f"{hook} stop"],
                                 hook_timeout=400)
        self.table, self.live, self.sets = table, live, {"db": table}


def behind(node, replica: str) -> dict:
    return ((status(node)["sets"].get("db") or {}).get("wal_replicas") or {}).get("replicas", {}).get(replica) or {}


def received(node) -> dict:
    return (status(node)["sets"].get("db") or {}).get("wal") or {}


def test_mariadb_failover_keeps_the_rows_committed_after_the_point(tmp_path, etcd):  # noqa: F811
    m = make_master()
    base = tempfile.mkdtemp(prefix="pit-myfo-", dir="/tmp")  # reachable by the mysql user
    os.chmod(base, 0o755)
    live = os.path.join(base, "r1-live", "data")  # r1's live copy: the same base name as the set's path
    os.makedirs(os.path.dirname(live))
    sock = os.path.join(base, "r1.sock")  # the socket only: a TCP port chosen early was once taken by then
    if USER:
        shutil.chown(base, USER, USER)
    app = c = None
    try:
        src = m.source()
        table = build_set("mysql", "db", [m.data], ["r1", "r2"], "primary", {
            "client": " ".join(m.client()), "binlog_host": "127.0.0.1", "binlog_port": m.port,
            "binlog_user": src.user, "binlog_password_file": src.password_file})
        assert table["app"]["binlog"] == "stream" and table["app"]["pre"] == ["builtin:mysql.lock"]
        hook = takeover_hook(base, live, sock)
        c = MariaDbFailoverCluster(str(tmp_path), etcd.endpoint, table, live, hook)
        c.start()
        p, r1 = c.primary, c.replicas[0]
        wait_for(lambda: fo(p).get("holding"), 30, "the primary to take the leader key")
        wait_for(lambda: fo(r1).get("phase") == "standby", 30, "r1 to stand by")
        app = Appender(m, 0)
        app.start()
        wait_for(lambda: len(app.acked) > 200, 60, "writes")
        out = p.ctl("point", "--set", "db", "--timeout", "240").stdout
        assert set(dict(ln.split("\t") for ln in out.splitlines())) == {"r1", "r2"}, out
        at_point = len(app.acked)
        wait_for(lambda: len(app.acked) > at_point + 500, 60, "writes after the point")
        wait_for(lambda: received(r1).get("streaming"), 60, "r1 to stream the binlog")
        assert "db: receiving the database log from primary: streaming" in r1.ctl("status").stdout
        confirmed = len(app.acked)  # acknowledged by now: in the master's binlog up to `want`...
        want = m.position()
        wait_for(lambda: (received(r1).get("file"), received(r1).get("bytes", 0)) >= want, 60,
                 f"r1's copy of the binlog to reach {want}")  # ...and then in r1's copy
        # the master's view of each replica's copy (apps/mybinlog.BinlogMonitor, from the replicas' status)
        wait_for(lambda: (behind(p, "r1").get("streaming") and isinstance(behind(p, "r1").get("lag_bytes"), int)),
                 60, "the master to see r1's lag")
        assert "db -> r1: database log streaming" in p.ctl("status").stdout
        jsonschema.validate(json.loads(p.ctl("status", "--json").stdout), SCHEMA)
        # the host dies: its agent, its database, its client
        p.kill(signal.SIGKILL)
        m.kill()
        app.join(30)
        acked = list(app.acked)
        wait_for(lambda: fo(r1).get("phase") == "active", 600, "r1 to take over")
        rep = fo(r1)["last_promotion"]
        chosen = rep["sets"]["db"]
        assert chosen["skipped"] == [] and "error" not in chosen.get("wal", {}), chosen
        assert chosen["wal"]["files"] >= 1, chosen["wal"]
        errlog = os.path.join(base, "r1-error.log")
        assert [h["ok"] for h in rep["takeover_hooks"]] == [True], (
            rep["takeover_hooks"], open(errlog).read()[-3000:] if os.path.exists(errlog) else "")
        q = subprocess.run([mybinlog.tool("mariadb"), "--no-defaults", f"--socket={sock}", "--user=root", "--batch",
                            "--skip-column-names", "-e", "SELECT n FROM shop.acks ORDER BY n"],
                           capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stdout + q.stderr
        rows = [int(x) for x in q.stdout.split()]
        missing = [n for n in acked[:confirmed] if n not in set(rows)]
        if missing:  # evidence for whoever reads the failure: what each agent did around the point
            for node in (p, r1):
                with open(node.log, errors="replace") as f:
                    print(f"---- {node.log} (last 150 lines)\n" + "".join(f.readlines()[-150:]))
        assert not missing, (f"{len(missing)} rows acknowledged before r1 held their binlog are missing "
                             f"(point at {at_point}): {missing[:10]}; replay {chosen['wal']}")
        assert confirmed > at_point + 500
        assert max(rows) <= len(acked) + 1  # nothing invented (one insert may have committed unacknowledged)
        print(f"acknowledged {len(acked)}, point held {at_point}, confirmed {confirmed}, "
              f"promoted holds {len(rows)}")
        with open(r1.log, errors="replace") as f:
            assert "binlog replayed from" in f.read()
    finally:
        if app is not None:
            app.halt.set()
        if c is not None:
            c.stop()
        subprocess.run([mybinlog.tool("mariadb-admin"), "--no-defaults", f"--socket={sock}", "--user=root",
                        "shutdown"], capture_output=True, timeout=120)
        m.kill()
        shutil.rmtree(m.base, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
