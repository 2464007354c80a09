"""Database RPO with WAL streaming (issue 16): what a kill of the primary loses, and what streaming costs.

One PostgreSQL 15 primary on this machine (a private socket), a base image (pg_basebackup), and the
replica side of replicator/apps/pgwal.py: a WalReceiver streaming into a directory, and `replay` onto a
fresh copy of the image after each kill, as a promotion does.

1. Throughput: pgbench (`-c 4 -j 2 -T SECONDS`, scale 10) without a receiver, with one streaming
   asynchronously, and with `sync = true` (`--synchronous`, the WalMonitor keeps synchronous_standby_names),
   in interleaved rounds (the median of each).
2. Kills: an appender commits numbered inserts one at a time on its own session while pgbench writes
   beside it; after a random 1-4 s the postmaster gets SIGKILL; the receiver is stopped, the image copy
   is replayed with everything received, and the acknowledged ids missing from it are counted, with the
   seconds of acknowledged writes they span. Then the primary restarts (crash recovery) and the next round
   begins. RPO p50/p99 over the kills, and the replay time (the RTO's WAL part). `--sync` runs the kills
   with `sync = true`.

    sudo .venv/bin/python bench/db_rpo.py [--kills 30] [--seconds 20] [--rounds 3] [--sync] [--seed 1] [--json F]

Figures go to docs/benchmarks.md ("Database RPO").
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from replicator.apps import pgwal  # noqa: E402
from replicator.apps.templates import SqlSession, as_user, pg_bindir  # noqa: E402

PG_BIN = pg_bindir("15") or pg_bindir()
USER = "postgres" if os.geteuid() == 0 else None


def run(argv, timeout=600, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(as_user(argv, USER), capture_output=True, text=True, timeout=timeout, cwd="/")
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stdout}{p.stderr}")
    return p


class Primary:
    def __init__(self, base: str) -> None:
        self.base = base
        self.data = os.path.join(base, "primary")
        self.sock = os.path.join(base, "sock")
        os.makedirs(self.sock)
        if USER:
            shutil.chown(self.sock, USER, USER)

    def start(self) -> None:
        run([f"{PG_BIN}/pg_ctl", "start", "-w", "-t", "300", "-D", self.data, "-l", self.data + ".log",
             "-o", f"-c listen_addresses='' -c unix_socket_directories={self.sock} -c port=5432"])

    def sql(self, q: str) -> str:
        return run([f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.sock, "-U", "postgres",
                    "-d", "postgres", "-c", q]).stdout.strip()

    def kill(self) -> None:
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            os.kill(int(f.readline()), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while run([f"{PG_BIN}/pg_isready", "-q", "-h", self.sock], check=False).returncode == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the primary did not die")
            time.sleep(0.05)
        time.sleep(0.5)  # its backends exit after the postmaster

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            run([f"{PG_BIN}/pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data], check=False)


class Appender(threading.Thread):
    """Numbered inserts on one session; an id counts as acknowledged once its INSERT returned."""

    def __init__(self, sock: str, start: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.n = sock, start
        self.acked: list[tuple[int, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        argv = as_user([f"{PG_BIN}/psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.sock, "-U",
                        "postgres", "-d", "postgres"], USER)
        s = SqlSession(argv, "appender")
        try:
            while not self.halt.is_set():
                self.n += 1
                if s.run(f"INSERT INTO acks VALUES ({self.n}) RETURNING n", 30).strip() == str(self.n):
                    self.acked.append((self.n, time.time()))
        except Exception:
            pass  # the server died
        finally:
            s.kill()


def pgbench(p: Primary, seconds: int) -> float:
    out = run([f"{PG_BIN}/pgbench", "-n", "-c", "4", "-j", "2", "-T", str(seconds), "-h", p.sock, "-U", "postgres",
               "postgres"], timeout=seconds + 120).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"no tps in pgbench's output: {out[-300:]}")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, -(-len(s) * q // 100) - 1)] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seconds", type=int, default=20, help="each pgbench throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (none, async, sync)")
    ap.add_argument("--sync", action="store_true", help="kills with sync = true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not PG_BIN:
        sys.exit("PostgreSQL server binaries are not installed")
    rng = random.Random(a.seed)
    base = tempfile.mkdtemp(prefix="pit-dbrpo-", dir="/tmp")
    os.chmod(base, 0o755)
    if USER:
        shutil.chown(base, USER, USER)
    p = Primary(base)
    rec = None
    out: dict = {"seed": a.seed, "sync": a.sync}
    try:
        run([f"{PG_BIN}/initdb", "-D", p.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        with open(os.path.join(p.data, "postgresql.conf"), "a") as f:
            f.write("shared_buffers = 128MB\nmax_wal_size = 1GB\n")
        p.start()
        run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", "10", "-h", p.sock, "-U", "postgres", "postgres"])
        p.sql("CREATE TABLE acks (n integer PRIMARY KEY)")
        src = pgwal.Source("primary", p.sock, 5432, "postgres", PG_BIN)
        mon = pgwal.WalMonitor("db")
        mon.app = {"os_user": "postgres", "superuser": "postgres", "bindir": PG_BIN, "socket_dir": p.sock,
                   "port": 5432, "dbname": "postgres", "sync": True}
        mon.replicas = ("r1",)

        sync_src = pgwal.Source("primary", p.sock, 5432, "postgres", PG_BIN, sync=True)
        runs: dict[str, list[float]] = {"none": [], "async": [], "sync": []}
        for _ in range(a.rounds):  # interleaved, so that the order (a checkpoint, the cache) favours none
            if rec is not None:
                rec.stop()
                rec = None
            mon.app["sync"] = False
            mon.keep_sync()
            runs["none"].append(pgbench(p, a.seconds))
            rec = pgwal.WalReceiver("db", "r1", os.path.join(base, "state"))
            rec.update(src)
            while not mon.poll()["r1"]["streaming"]:
                time.sleep(0.2)
            runs["async"].append(pgbench(p, a.seconds))
            rec.update(sync_src)  # --synchronous: each write flushed and confirmed
            while not mon.poll()["r1"]["streaming"]:
                time.sleep(0.2)
            mon.app["sync"] = True
            mon.keep_sync()
            runs["sync"].append(pgbench(p, a.seconds))
        if a.sync:
            src = sync_src
        else:
            mon.app["sync"] = False
            mon.keep_sync()
            rec.update(src)
        tps = {k: statistics.median(v) for k, v in runs.items()}
        out["tps"], out["tps_runs"] = tps, runs
        print(f"pgbench tps (-c 4, {a.seconds} s, scale 10, median of {a.rounds} interleaved rounds): no streaming "
              f"{tps['none']:.0f}, async streaming {tps['async']:.0f} ({tps['async'] / tps['none']:.2f}x), "
              f"sync {tps['sync']:.0f} ({tps['sync'] / tps['none']:.2f}x); runs {runs}", flush=True)

        image = os.path.join(base, "image")
        run([f"{PG_BIN}/pg_basebackup", "-D", image, "-X", "fetch", "-c", "fast", "-h", p.sock, "-U", "postgres"])
        kills = []
        n = 0
        for k in range(a.kills):
            app = Appender(p.sock, n)
            bench = subprocess.Popen(as_user([f"{PG_BIN}/pgbench", "-n", "-c", "2", "-T", "600", "-h", p.sock, "-U",
                                              "postgres", "postgres"], USER), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
            app.start()
            time.sleep(rng.uniform(1.0, 4.0))
            t_kill = time.time()
            p.kill()
            app.join(30)
            bench.wait(30)
            rec.stop()
            copy = os.path.join(base, "promoted")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(image, copy, symlinks=True)
            res = pgwal.replay({"os_user": "postgres", "superuser": "postgres", "bindir": PG_BIN}, copy, rec.dir)
            probe = Primary.__new__(Primary)
            probe.data, probe.sock = copy, os.path.join(base, "probe-sock")
            os.makedirs(probe.sock, exist_ok=True)
            if USER:
                shutil.chown(probe.sock, USER, USER)
            probe.start()
            have = {int(x) for x in probe.sql(f"SELECT n FROM acks WHERE n > {n}").split()}
            probe.stop()
            lost = [(i, t) for i, t in app.acked if i not in have]
            # seconds of acknowledged writes lost, counted back from the kill; an insert acknowledged after the
            # SIGKILL was sent (the backends outlive the postmaster by milliseconds) counts as 0
            span = max(0.0, t_kill - min(t for _, t in lost)) if lost else 0.0
            kills.append({"acked": len(app.acked), "lost": len(lost), "lost_seconds": round(span, 3),
                          "replay_seconds": res.get("seconds"), "segments": res.get("segments")})
            print(f"kill {k + 1}: {len(app.acked)} acknowledged, {len(lost)} lost ({span:.3f} s), replay "
                  f"{res.get('seconds')} s over {res.get('segments')} segments", flush=True)
            n = app.n + 1
            for attempt in range(20):  # crash recovery; the next round goes on (its old backends may linger)
                try:
                    p.start()
                    break
                except RuntimeError:
                    if attempt == 19:
                        raise
                    time.sleep(1.0)
            rec = pgwal.WalReceiver("db", "r1", os.path.join(base, "state"))
            rec.update(src)
            while not mon.poll()["r1"]["streaming"]:
                time.sleep(0.2)
            if a.sync:
                mon.keep_sync()
        out["kills"] = kills
        if kills:
            lost = [k["lost"] for k in kills]
            secs = [k["lost_seconds"] for k in kills]
            rt = [k["replay_seconds"] for k in kills]
            print(f"RPO over {len(kills)} kills ({'sync' if a.sync else 'async'}): ids lost p50 {pct(lost, 50):g} "
                  f"p99 {pct(lost, 99):g} max {max(lost)}; seconds p50 {pct(secs, 50):.3f} p99 {pct(secs, 99):.3f}; "
                  f"{sum(k['acked'] for k in kills)} acknowledged in all, {sum(lost)} lost; "
                  f"replay p50 {statistics.median(rt):.2f} s max {max(rt):.2f} s")
    finally:
        if rec is not None:
            rec.stop()
        p.stop()
        shutil.rmtree(base, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
