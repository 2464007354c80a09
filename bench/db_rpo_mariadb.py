"""MariaDB RPO with binlog streaming (issue 16): what a kill of the master loses, what streaming costs, and how
exact a restore to a second is.

One MariaDB master on this machine (a private mariadbd: `--log-bin --binlog-format=ROW`, 127.0.0.1 and a free
port, InnoDB with `innodb_flush_log_at_trx_commit = 1`), and the replica side of replicator/apps/mybinlog.py:
a BinlogReceiver streaming into a directory, and `replay` onto a fresh copy of the image after each kill, as a
promotion does.

1. Throughput: 4 sessions each committing single-row inserts in a server-side loop (no client round trip
   between them) for `--seconds`, without a receiver and with one streaming, in interleaved rounds (medians).
2. Kills: an image is made as the template makes a point (the data directory copied under mysql.lock, which
   records its binlog position); an appender commits numbered inserts one at a time on its own session while
   a second writer loops on another table; after a random 1-4 s mariadbd gets SIGKILL; the receiver is
   stopped, the image copy is replayed with everything received, and the acknowledged ids missing from it are
   counted, with the seconds of acknowledged writes they span (counted back from the kill). The master
   restarts (crash recovery) and the next round begins. RPO p50/p99 over the kills, and the replay time.
3. PITR: an image, then 25 s of the appender and the writer; 20 random whole seconds in that run are
   restored (`replay(target_time=utc_second(TIME))` as `pit restore --at` does: every event stamped before
   TIME). Each result is compared with the rows' own commit-statement times (the `at` column, NOW(6), the
   time the binlog event is stamped with, to the second) and with the appender's acknowledgement log.

    sudo .venv/bin/python bench/db_rpo_mariadb.py [--kills 30] [--seconds 10] [--rounds 3] [--seed 1] [--json F]

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from replicator.apps import mybinlog  # noqa: E402
from replicator.apps.templates import SqlSession, _mysql_lock, _mysql_unlock  # noqa: E402

USER = "mysql" if os.geteuid() == 0 else None
PASSWORD = "pit-bench-repl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Master:
    """A private MariaDB master under `base`: data directory, socket, TCP port on 127.0.0.1."""

    def __init__(self, base: str) -> None:
        self.base, self.port = base, free_port()
        self.data = os.path.join(base, "data")
        self.sock = os.path.join(base, "mysqld.sock")
        self.proc: subprocess.Popen | None = None

    def client(self) -> list[str]:
        return [mybinlog.tool("mariadb"), "--no-defaults", f"--socket={self.sock}", "--user=root"]

    def init(self) -> None:
        subprocess.run([mybinlog.tool("mariadb-install-db"), "--no-defaults", f"--datadir={self.data}",
                        "--skip-test-db", "--auth-root-authentication-method=socket"]
                       + ([f"--user={USER}"] if USER else []), check=True, capture_output=True, timeout=300)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [mybinlog.tool("mariadbd"), "--no-defaults", f"--datadir={self.data}", f"--socket={self.sock}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--log-bin=mysql-bin", "--server-id=1",
             "--binlog-format=ROW", f"--pid-file={self.base}/mysqld.pid", f"--log-error={self.base}/error.log",
             "--innodb-buffer-pool-size=256M", "--max-connections=200"] + ([f"--user={USER}"] if USER else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while subprocess.run([mybinlog.tool("mariadb-admin"), "--no-defaults", f"--socket={self.sock}",
                              "--user=root", "ping"], capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the master did not start: " + open(f"{self.base}/error.log").read()[-1500:])
            time.sleep(0.1)

    def sql(self, q: str) -> str:
        p = subprocess.run(self.client() + ["--batch", "--skip-column-names", "-e", q], capture_output=True,
                           text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{q[:80]}: {p.stdout}{p.stderr}")
        return p.stdout.strip()

    def position(self) -> tuple[str, int]:
        f, pos = self.sql("SHOW MASTER STATUS").split("\t")[:2]
        return f, int(pos)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run([mybinlog.tool("mariadb-admin"), "--no-defaults", f"--socket={self.sock}", "--user=root",
                            "shutdown"], capture_output=True, timeout=300)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.kill()

    def source(self) -> mybinlog.Source:
        pw = os.path.join(self.base, "repl.pw")
        with open(pw, "w") as f:
            f.write(PASSWORD)
        return mybinlog.Source("primary", "127.0.0.1", self.port, "pit_repl", password_file=pw)


def owned_copy(src: str, dest: str) -> str:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("*.pid", "*.sock", "*.sock.lock"))
    st = os.stat(src)
    for dp, _, fns in os.walk(dest):
        os.lchown(dp, st.st_uid, st.st_gid)
        for n in fns:
            os.lchown(os.path.join(dp, n), st.st_uid, st.st_gid)
    return dest


def image_of(m: Master, dest: str) -> str:
    """A point as the template makes it: the data directory copied under mysql.lock (which records the binlog
    position in it)."""
    app, state = {"data": m.data, "client": m.client(), "binlog": "stream"}, {}
    _mysql_lock("bench", app, {}, state, 120)
    try:
        return owned_copy(m.data, dest)
    finally:
        _mysql_unlock("bench", app, {}, state, 120)


def rows_in(data: str, sql: str) -> list[list[str]]:
    """Rows of `sql` on a data directory, read by a private server started on it."""
    work = tempfile.mkdtemp(prefix="pit-bench-read-", dir="/tmp")
    os.chmod(work, 0o755)
    if USER:
        shutil.chown(work, USER, USER)
    srv = mybinlog.PrivateServer(data, work, USER or mybinlog._owner(data))
    p = srv.start(300)
    try:
        out = subprocess.run(srv.client("mariadb", "--batch", "--skip-column-names", "-e", sql), capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(out.stdout + out.stderr)
        return [ln.split("\t") for ln in out.stdout.splitlines() if ln.strip()]
    finally:
        srv.shutdown(p)
        shutil.rmtree(work, ignore_errors=True)


class Appender(threading.Thread):
    """Numbered inserts on one session; an id counts as acknowledged once its INSERT returned."""

    def __init__(self, m: Master, start: int) -> None:
        super().__init__(daemon=True)
        self.m, self.n = m, start
        self.acked: list[tuple[int, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        s = SqlSession(self.m.client() + ["--batch", "--skip-column-names", "--unbuffered"], "appender")
        try:
            while not self.halt.is_set():
                self.n += 1
                s.run(f"INSERT INTO bench.acks (n) VALUES ({self.n})", 30)
                self.acked.append((self.n, time.time()))
        except Exception:
            pass  # the server died
        finally:
            s.kill()


def loop_sql(seconds: float, tag: int) -> str:
    """Single-row autocommit inserts in a server-side loop for `seconds` (SYSDATE: the real time, not the
    statement's start), then the count."""
    return (f"BEGIN NOT ATOMIC DECLARE i INT DEFAULT 0; DECLARE t DATETIME(6) DEFAULT SYSDATE(6) + INTERVAL "
            f"{seconds} SECOND; WHILE SYSDATE(6) < t DO INSERT INTO bench.load (w, x) VALUES ({tag}, i); "
            f"SET i = i + 1; END WHILE; SELECT i; END")


def writer(m: Master, seconds: float, tag: int) -> subprocess.Popen:
    return subprocess.Popen(m.client() + ["--batch", "--skip-column-names", "--delimiter=//", "-e",
                                          loop_sql(seconds, tag)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def throughput(m: Master, seconds: int, sessions: int = 4) -> float:
    ps = [writer(m, seconds, i) for i in range(sessions)]
    total = 0
    for p in ps:
        out, _ = p.communicate(timeout=seconds + 300)
        total += int(out.split()[-1])
    return total / seconds


def caught_up(rec: mybinlog.BinlogReceiver, m: Master, timeout: float = 120) -> None:
    want = m.position()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rec.status()
        if st["file"] == want[0] and st["bytes"] >= want[1]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"receiver not caught up with {want}: {rec.status()}")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, -(-len(s) * q // 100) - 1)] if s else float("nan")


def kills_phase(m: Master, base: str, rng: random.Random, count: int, n: int) -> tuple[list[dict], int]:
    kills = []
    state = os.path.join(base, "state")
    for k in range(count):
        shutil.rmtree(state, ignore_errors=True)  # each round streams from its own image's position on
        rec = mybinlog.BinlogReceiver("db", "r1", state)
        rec.update(m.source())
        image = image_of(m, os.path.join(base, "image"))
        caught_up(rec, m)
        app = Appender(m, n)
        load = writer(m, 600, 100 + k)
        app.start()
        time.sleep(rng.uniform(1.0, 4.0))
        t_kill = time.time()
        m.kill()
        app.join(30)
        load.wait(30)
        time.sleep(0.2)  # whatever the master sent before it died has arrived
        rec.stop()
        copy = owned_copy(image, os.path.join(base, "promoted"))
        res = mybinlog.replay({}, copy, rec.dir)
        have = {int(r[0]) for r in rows_in(copy, f"SELECT n FROM bench.acks WHERE n > {n}")}
        lost = [(i, t) for i, t in app.acked if i not in have]
        span = max(0.0, t_kill - min(t for _, t in lost)) if lost else 0.0
        kills.append({"acked": len(app.acked), "lost": len(lost), "lost_seconds": round(span, 3),
                      "replay_seconds": res["seconds"], "files": res["files"], "note": res["note"]})
        print(f"kill {k + 1}: {len(app.acked)} acknowledged, {len(lost)} lost ({span:.3f} s), replay "
              f"{res['seconds']} s over {res['files']} files; {res['note']}", flush=True)
        n = app.n + 1
        m.start()  # crash recovery
    return kills, n


def pitr_phase(m: Master, base: str, rng: random.Random, n: int, seconds: int = 25, moments: int = 20) -> dict:
    state = os.path.join(base, "state")
    shutil.rmtree(state, ignore_errors=True)
    rec = mybinlog.BinlogReceiver("db", "r1", state)
    rec.update(m.source())
    image = image_of(m, os.path.join(base, "image"))
    app = Appender(m, n)
    load = writer(m, seconds, 999)
    t0 = time.time()
    app.start()
    load.wait(seconds + 120)
    app.halt.set()
    app.join(30)
    t1 = time.time()
    caught_up(rec, m)
    rec.stop()
    stamped = {int(r[0]): float(r[1]) for r in (ln.split("\t") for ln in m.sql(
        f"SELECT n, UNIX_TIMESTAMP(at) FROM bench.acks WHERE n > {n}").splitlines())}
    exact = ack_ok = 0
    details = []
    for _ in range(moments):
        at = float(rng.randint(int(t0) + 1, int(t1) - 1))  # a whole second, as an operator gives TIME
        at_ns = int(at) * 10**9
        copy = owned_copy(image, os.path.join(base, "pitr"))
        res = mybinlog.replay({}, copy, rec.dir, target_time=mybinlog.utc_second(at_ns))
        have = {int(r[0]) for r in rows_in(copy, f"SELECT n FROM bench.acks WHERE n > {n}")}
        second = int(at)
        by_stamp = {i for i, ts in stamped.items() if ts < second}  # every row committed before TIME, none after
        # the ack log: every id acknowledged before TIME is in; none acknowledged after TIME, except one whose
        # statement began before TIME (stamped before it) and was acknowledged just after
        must = {i for i, t in app.acked if t < second}
        may = {i for i, t in app.acked if t < second} | {i for i in stamped if stamped[i] < second}
        ok_stamp, ok_ack = have == by_stamp, must <= have <= may
        exact += ok_stamp
        ack_ok += ok_ack
        after = sum(1 for i in have if stamped.get(i, 0) >= at)
        missed = len(by_stamp - have)
        details.append({"at": at, "rows": len(have), "exact_by_stamp": ok_stamp, "ack_log_ok": ok_ack,
                        "committed_after_at": after, "missing_before_at": missed, "replay_seconds": res["seconds"]})
        print(f"PITR {time.strftime('%H:%M:%S', time.gmtime(at))}.{int(at % 1 * 1000):03d}: {len(have)} rows, "
              f"exact by commit stamp {ok_stamp}, ack log consistent {ok_ack}, rows committed at or after TIME "
              f"{after}, committed before TIME but missing {missed}, replay {res['seconds']} s", flush=True)
    return {"moments": details, "exact": exact, "ack_consistent": ack_ok,
            "replay_p50": statistics.median(d["replay_seconds"] for d in details)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seconds", type=int, default=10, help="each throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (none, streaming)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if any(mybinlog.tool(x) is None for x in ("mariadbd", "mariadb", "mariadb-binlog", "mariadb-install-db")):
        sys.exit("MariaDB (mariadb-server, mariadb-client) is not installed")
    rng = random.Random(a.seed)
    base = tempfile.mkdtemp(prefix="pit-dbrpo-maria-", dir="/tmp")
    os.chmod(base, 0o755)
    if USER:
        shutil.chown(base, USER, USER)
    m = Master(base)
    out: dict = {"seed": a.seed, "version": subprocess.run([mybinlog.tool("mariadbd"), "--version"],
                                                           capture_output=True, text=True).stdout.strip()}
    rec = None
    try:
        m.init()
        m.start()
        m.sql(f"CREATE USER pit_repl@'%' IDENTIFIED BY '{PASSWORD}'; "
              "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO pit_repl@'%'; CREATE DATABASE bench; "
              "CREATE TABLE bench.acks (n INT PRIMARY KEY, at TIMESTAMP(6) NOT NULL DEFAULT NOW(6)); "
              "CREATE TABLE bench.load (id BIGINT AUTO_INCREMENT PRIMARY KEY, w INT, x INT)")
        runs: dict[str, list[float]] = {"none": [], "stream": []}
        for _ in range(a.rounds):
            runs["none"].append(throughput(m, a.seconds))
            rec = mybinlog.BinlogReceiver("db", "r1", os.path.join(base, "tput"))
            rec.update(m.source())
            caught_up(rec, m)
            runs["stream"].append(throughput(m, a.seconds))
            rec.stop()
            rec = None
        tps = {k: statistics.median(v) for k, v in runs.items()}
        out["commits_per_s"], out["commit_runs"] = tps, runs
        print(f"commits/s (4 sessions, single-row autocommit inserts, {a.seconds} s, median of {a.rounds} "
              f"interleaved rounds): no receiver {tps['none']:.0f}, receiver streaming {tps['stream']:.0f} "
              f"({tps['stream'] / tps['none']:.2f}x); runs {runs}", flush=True)
        kills, n = kills_phase(m, base, rng, a.kills, 0)
        out["kills"] = kills
        if kills:
            lost = [k["lost"] for k in kills]
            secs = [k["lost_seconds"] for k in kills]
            rt = [k["replay_seconds"] for k in kills]
            print(f"RPO over {len(kills)} kills: ids lost p50 {pct(lost, 50):g} p99 {pct(lost, 99):g} max {max(lost)};"
                  f" seconds p50 {pct(secs, 50):.3f} p99 {pct(secs, 99):.3f}; {sum(k['acked'] for k in kills)} "
                  f"acknowledged in all, {sum(lost)} lost; replay p50 {statistics.median(rt):.2f} s max "
                  f"{max(rt):.2f} s", flush=True)
        p = pitr_phase(m, base, rng, n + 1)
        out["pitr"] = p
        print(f"PITR on {len(p['moments'])} random moments: {p['exact']} exact by the rows' commit-statement "
              f"stamps (every row committed before TIME, none at or after it), {p['ack_consistent']} "
              f"consistent with the ack log (all acknowledged before TIME, none begun after it); "
              f"replay p50 {p['replay_p50']:.2f} s", flush=True)
    finally:
        if rec is not None:
            rec.stop()
        m.stop()
        shutil.rmtree(base, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
