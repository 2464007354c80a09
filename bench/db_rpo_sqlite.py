"""SQLite RPO with WAL shipping (issue 16): what the death of the master's host loses, and what shipping costs.

The master side runs in its own process, as the master's agent does: a Shipper (replicator/apps/sqlitewal.py)
and the LogShipping server of stream/logship.py on 127.0.0.1 (plain TCP here: the agents add mTLS). This
process is the replica: a LogReceiver writing what arrives (fsync per piece) and acknowledging it.

1. Throughput: a writer commits single-row inserts (mixed 40-byte and 4 KB rows) as fast as it can for
   SECONDS, without a shipper and with one, in interleaved rounds (the median of each).
2. Kills: each round a fresh database and writer (numbered inserts, each number written to a side file once
   its commit returned), a point copy after 0.3 s (the template's backup hook), then after a random 1-4 s the
   writer and the master process both get SIGKILL at once (the host dies). After a second the receiver stops;
   the copy is replayed with what it received (`sqlitewal.replay`, as a promotion does) and the acknowledged
   ids missing from it are counted, with the seconds of acknowledged writes they span. RPO p50/p99 over the
   kills, and the replay time.

    .venv/bin/python bench/db_rpo_sqlite.py [--kills 30] [--seconds 10] [--rounds 3] [--seed 1] [--json F]

Figures go to docs/benchmarks.md ("Database RPO").
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from replicator.apps import sqlitewal as sw  # noqa: E402
from replicator.apps.templates import BUILTIN_HOOKS, build_set  # noqa: E402
from replicator.stream import protocol  # noqa: E402
from replicator.stream.logship import LogReceiver  # noqa: E402

WRITER = r"""
import os, sqlite3, sys, time
db, acks, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
con = sqlite3.connect(db, isolation_level=None, timeout=30)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v BLOB)")
f = open(acks, "a", buffering=1) if acks != "-" else None
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    n += 1
    con.execute("INSERT INTO t VALUES (?, ?)", (n, os.urandom(4000 if n % 5 == 0 else 40)))
    if f:
        f.write(f"{n} {time.time_ns()}\n")
print(n)
"""

MASTER = r"""
import os, socket, sys, threading
sys.path.insert(0, sys.argv[4])
from replicator.settings import SetConfig
from replicator.stream import protocol
from replicator.stream.logship import LogShipping
db, state, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ls = LogShipping("s", state)
ls.update(SetConfig(master="m", replicas=("r1",), paths=(os.path.dirname(db) + "/side",),
                    app={"template": "sqlite", "wal": "stream", "databases": [db], "side_dir": os.path.dirname(db) + "/side"},
                    name="s"))
srv = socket.create_server(("127.0.0.1", port))
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=ls.serve, args=(protocol.Conn(c, "r1"), "r1"), daemon=True).start()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_master(db: str, state: str, port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", MASTER, db, state, str(port), ROOT], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def writer(db: str, acks: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, db, acks, str(seconds)], stdout=subprocess.PIPE,
                            text=True)


def init_db(db: str) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, v BLOB)")
    con.close()


def throughput(seconds: float, rounds: int) -> dict:
    out: dict[str, list[float]] = {"without": [], "shipping": []}
    for _ in range(rounds):
        for mode in ("without", "shipping"):
            d = tempfile.mkdtemp(prefix="pit-sqlbench-")
            db = os.path.join(d, "app.db")
            init_db(db)
            m = start_master(db, os.path.join(d, "state"), free_port()) if mode == "shipping" else None
            try:
                w = writer(db, "-", seconds)
                n = int(w.communicate()[0])
                out[mode].append(n / seconds)
            finally:
                if m is not None:
                    m.kill()
                    m.wait()
                shutil.rmtree(d, ignore_errors=True)
    return {k: round(statistics.median(v)) for k, v in out.items()} | {"rounds": rounds}


def kill_round(rnd: random.Random) -> dict:
    d = tempfile.mkdtemp(prefix="pit-sqlkill-")
    try:
        db, acks = os.path.join(d, "app.db"), os.path.join(d, "acks")
        init_db(db)
        port = free_port()
        m = start_master(db, os.path.join(d, "master"), port)
        rec = LogReceiver("s", os.path.join(d, "replica"),
                          lambda _m: protocol.Conn(socket.create_connection(("127.0.0.1", port)), "m"))
        rec.update("m")
        w = writer(db, acks, 60)
        time.sleep(0.3)
        app = build_set("sqlite", "s", [db], ["r1"], "m", {"side_dir": os.path.join(d, "side")})["app"]
        BUILTIN_HOOKS["sqlite.backup"]("s", app, {}, {}, 60)
        copy = os.path.join(d, "side", "app.db")
        time.sleep(rnd.uniform(1.0, 4.0))
        for p in (w, m):
            os.kill(p.pid, signal.SIGKILL)
        for p in (w, m):
            p.wait()
        time.sleep(1.0)
        rec.stop()
        t0 = time.monotonic()
        res = sw.replay(copy, os.path.join(rec.dir, "app.db"))
        replay_s = time.monotonic() - t0
        con = sqlite3.connect(copy)
        have = {r[0] for r in con.execute("SELECT n FROM t")}
        con.close()
        acked = []
        with open(acks) as f:
            for line in f:
                if line.endswith("\n"):
                    n, t = line.split()
                    acked.append((int(n), int(t)))
        missing = [(n, t) for n, t in acked if n not in have]
        span = (acked[-1][1] - missing[0][1]) / 1e9 if missing else 0.0
        return {"acked": len(acked), "lost": len(missing), "rpo_s": round(span, 4), "replay_s": round(replay_s, 3),
                "frames": res["frames"], "generations": res["generations"]}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    tp = throughput(a.seconds, a.rounds)
    print(f"throughput (commits/s, median of {a.rounds}): without shipping {tp['without']}, shipping "
          f"{tp['shipping']} ({tp['shipping'] / tp['without']:.2f}x)")
    kills = []
    for i in range(a.kills):
        k = kill_round(rnd)
        kills.append(k)
        print(f"kill {i + 1}: {k}")
    rpo = [k["rpo_s"] for k in kills]
    lost = [k["lost"] for k in kills]
    out = {"seed": a.seed, "throughput": tp, "kills": kills,
           "rpo_s": {"p50": pct(rpo, 0.5), "p99": pct(rpo, 0.99), "max": max(rpo)},
           "lost_ids": {"p50": pct(lost, 0.5), "p99": pct(lost, 0.99), "total": sum(lost),
                        "acked_total": sum(k["acked"] for k in kills)},
           "replay_s": {"p50": pct([k["replay_s"] for k in kills], 0.5), "max": max(k["replay_s"] for k in kills)}}
    print(f"RPO over {len(kills)} kills: p50 {out['rpo_s']['p50']} s, p99 {out['rpo_s']['p99']} s, max "
          f"{out['rpo_s']['max']} s; acknowledged ids lost {out['lost_ids']['total']} of "
          f"{out['lost_ids']['acked_total']} (p99 per kill {out['lost_ids']['p99']}); replay p50 "
          f"{out['replay_s']['p50']} s, max {out['replay_s']['max']} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
