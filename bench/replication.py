"""Replication benchmark: change-to-committed latency, bytes on the wire for a small
change in a big file (against rsync's delta when rsync is installed), seeding throughput
against rsync and against a local `pit snapshot`, and the CPU of an idle agent over
100,000 files.

Runs a real primary and one replica (`pit agent` processes) on 127.0.0.1, using the
cluster fixture of tests/test_repl_helpers.py. Figures go to docs/benchmarks.md.

    .venv/bin/python bench/replication.py [--big-mib 128] [--changes 100]      # latency, 64 KiB change
    .venv/bin/python bench/replication.py --seed-scale 1.0 [--seed-runs 3] [--seed-catchup]  # seeding vs rsync, ingest
    .venv/bin/python bench/replication.py --seed-scale 1.0 --seed-runs 1 --seed-kill 0.5    # replica killed mid-seeding
    .venv/bin/python bench/replication.py --idle-files 100000 [--idle-s 60]    # idle agent CPU

Parts can be combined; `--work DIR` keeps the data (default: a temporary directory).
"""
from __future__ import annotations

import argparse
import threading
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from store.apply import head_root  # noqa: E402
from store.errors import PathNotFound  # noqa: E402
from store.objects import ObjectReader  # noqa: E402
from store.repository import Repository  # noqa: E402
from test_repl_helpers import PIT, Cluster, free_port, wait_for  # noqa: E402


def agent_status(c) -> dict:
    """The master agent's status over its control socket, from this process: a `pit status` process
    every 0.1 s (0.15-0.2 s of CPU each) took most of a core from the run it was polling."""
    from replicator.agent import control_request

    return control_request(None, c.primary.config, "status", {})


def bytes_sent(c) -> int:
    return agent_status(c)["sets"]["web"]["replicas"]["r1"]["bytes_sent"]


def committed(repo: Repository, path: str, size: int) -> bool:
    with repo.reading() as txn:
        root = head_root(repo, txn, "web")
        if root is None:
            return False
        try:
            e = ObjectReader(repo, txn).lookup(root, path)
        except PathNotFound:
            return False
        return e.size == size


def rsync_delta(old: str, new: str) -> int | None:
    if not shutil.which("rsync"):
        return None
    with tempfile.TemporaryDirectory() as d:
        dst = os.path.join(d, "f")
        shutil.copy(old, dst)
        r = subprocess.run(["rsync", "--no-whole-file", "--stats", new, dst], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if line.startswith("Total bytes sent:"):
                return int(line.split(":")[1].strip().replace(",", ""))
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its children, live (the master's reader
    processes, replicator/stream/readers.py) or waited for (cutime + cstime), from /proc/PID/stat."""
    from measure import children

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    own = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(c) for c in children(pid))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def master_stats(c) -> dict:
    return agent_status(c)["sets"]["web"]["stats"]


def dir_bytes(root: str) -> tuple[int, int]:
    n = size = 0
    for dp, _, files in os.walk(root):
        for f in files:
            n += 1
            size += os.lstat(os.path.join(dp, f)).st_size
    return n, size


def rsync_daemon_copy(src: str, work: str) -> dict:
    """`rsync -a` from src to a module of an rsync daemon on 127.0.0.1 (no ssh here), and a plain
    local `rsync -a` for reference; both into empty destinations. `_synced_s`: the same clock stopped
    after a `sync`, i.e. with the destination's writeback (pit's figures include their fsyncs)."""
    from measure import which_or_install

    if not which_or_install("rsync", "rsync"):
        return {}
    out: dict = {}
    dst = os.path.join(work, "rsync-daemon-dst")
    local = os.path.join(work, "rsync-local-dst")
    for d in (dst, local):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    port = free_port()
    conf = os.path.join(work, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"use chroot = no\nuid = root\ngid = root\npid file = {work}/rsyncd.pid\n"
                f"[dst]\n  path = {dst}\n  read only = no\n")
    d = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                          "--address=127.0.0.1"])
    try:
        wait_for(lambda: _port_open(port), 10, "rsync daemon")
        subprocess.run(["sync"])
        t = time.monotonic()
        subprocess.run(["rsync", "-a", src + "/", f"rsync://127.0.0.1:{port}/dst/"], check=True)
        out["rsync_daemon_s"] = time.monotonic() - t
        subprocess.run(["sync"])
        out["rsync_daemon_synced_s"] = time.monotonic() - t
    finally:
        d.terminate()
        d.wait(10)
    subprocess.run(["sync"])
    t = time.monotonic()
    subprocess.run(["rsync", "-a", src + "/", local + "/"], check=True)
    out["rsync_local_s"] = time.monotonic() - t
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    return out


def _port_open(port: int) -> bool:
    import socket

    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pit_ingest(src: str, work: str) -> tuple[float, float]:
    """A local `pit snapshot` of the same data into a fresh repository (the ingest figure):
    (wall, CPU of the process and its workers)."""
    import resource

    repo = os.path.join(work, "ingest-repo")
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run([PIT, "--repo", repo, "init"], check=True, capture_output=True)
    subprocess.run(["sync"])
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    subprocess.run([PIT, "--repo", repo, "snapshot", "--set", "s", src], check=True, capture_output=True)
    dt = time.monotonic() - t
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(repo, ignore_errors=True)
    return dt, ru2.ru_utime - ru.ru_utime + ru2.ru_stime - ru.ru_stime


def seed_once(data: str, work: str, catchup: bool, kill_at: float = 0.0, profile: str | None = None) -> dict:
    """One seeding of a fresh replica. Streaming (default): the data set is moved into the empty,
    watched source of a running cluster; the clock runs until `pit point` returns (every file
    committed on the replica and a snapshot made). `catchup`: the data is in the source when the
    agents start (a replica joined to a running file server): the clock runs from the start through
    the master's first scan and the catch-up to the point. `kill_at` (a fraction, streaming only):
    the replica is SIGKILLed once the master has sent that much of the data set's ~640 MB of
    payload, and started again; `sent_after_kill_bytes` is what the master sent from then on.
    `profile` (a directory): py-spy samples both agents (the master's reader processes too) while
    the clock runs, and the busiest functions of each are printed (profile_report)."""
    from measure import _TreeRss

    tmp = os.path.join(work, "cluster-seed")
    shutil.rmtree(tmp, ignore_errors=True)
    c = Cluster(tmp, replicas=1)
    res: dict = {}
    try:
        if catchup:
            os.rename(data, os.path.join(c.src, "dataset"))
            subprocess.run(["sync"])
            t = time.monotonic()
            c.start()
            r = c.replicas[0]
            rss = [_TreeRss(c.primary.proc.pid, root=True), _TreeRss(r.proc.pid, root=True)]
            # a point asked before the sender exists (the first scan) or has connected fails at once
            wait_for(lambda: agent_status(c)["sets"]["web"]["replicas"].get("r1", {}).get("connected"), 600,
                     "the sender to connect", interval=0.2)
        else:
            c.start()
            r = c.replicas[0]
            wait_for(lambda: c.converged(r), 60, "the empty set")
            rss = [_TreeRss(c.primary.proc.pid, root=True), _TreeRss(r.proc.pid, root=True)]
            subprocess.run(["sync"])
            spies = start_profiles(profile, {"master": c.primary.proc.pid, "replica": r.proc.pid})
            t = time.monotonic()
            changes = master_stats(c)["changes"]
            os.rename(data, os.path.join(c.src, "dataset"))  # one event: the watcher walks the new tree
            # the master has seen the event once its walk has queued the paths; the point follows them
            if kill_at:
                wait_for(lambda: bytes_sent(c) > kill_at * 640e6, 600, "the kill point", interval=0.05)
                r.kill(signal.SIGKILL)
                res["sent_before_kill_bytes"] = bytes_sent(c)
                r.start()
            wait_for(lambda: master_stats(c)["changes"] > changes, 600, "the master to walk the data set",
                     interval=0.1)
        try:
            subprocess.run([PIT, "point", "--set", "web", "--timeout", "900", "--config", c.primary.config],
                           check=True, capture_output=True)
            res["s"] = time.monotonic() - t
            for m in rss:
                m.stop()
            stop_profiles(spies)
            res["rss_master_peak_mib"], res["rss_replica_peak_mib"] = (round(m.peak_kib / 1024, 1) for m in rss)
            res["cpu_master_s"] = cpu_seconds(c.primary.proc.pid)
            res["cpu_replica_s"] = cpu_seconds(r.proc.pid)
            res["wire_bytes"] = bytes_sent(c)
            if kill_at:
                res["sent_after_kill_bytes"] = res["wire_bytes"] - res["sent_before_kill_bytes"]
            st = master_stats(c)
            res["chunks_from_scan"], res["chunks_read_again"] = st.get("chunks_from_scan"), st.get("chunks_read_again")
            res["replica_equals_master"] = c.converged(r)  # checked after the clock stopped
        finally:
            os.rename(os.path.join(c.src, "dataset"), data)
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def start_profiles(where: str | None, pids: dict[str, int]) -> list:
    """py-spy on each named process (and its children), raw folded stacks into `where`."""
    if not where:
        return []
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    os.makedirs(where, exist_ok=True)
    return [(name, subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "-r", "100", "-f", "raw",
                                     "-o", os.path.join(where, f"{name}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for name, pid in pids.items()]


def stop_profiles(spies: list) -> None:
    for name, p in spies:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        profile_report(p.args[-1], name)


def profile_report(path: str, name: str, top: int = 25) -> None:
    """Where each process of a py-spy raw profile spent its samples: self time by function, idle waits
    (locks, selects, socket and pipe reads) left out."""
    import collections
    import re

    idle = ("wait (threading.py", "select (selectors.py", "_recv_into", "recv_into (ssl.py", "_worker (concurrent",
            "Connection._recv (multiprocessing", "main (multiprocessing/resource_tracker", "_poll (",
            "read (ssl.py", "accept (socket.py", "sleep")
    per: dict = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            procs = [i for i, fr in enumerate(frames) if fr.startswith("process ")]
            pid = re.match(r"process (\d+)", frames[procs[-1]]).group(1) if procs else "?"
            total[pid] += int(n)
            leaf = frames[-1]
            if any(s in leaf for s in idle):
                continue
            per[pid][re.sub(r"\s+", " ", leaf)[:100]] += int(n)
    for pid, c in per.items():
        busy = sum(c.values())
        print(f"profile {name} pid {pid}: {busy} busy samples of {total[pid]} (100 Hz)", flush=True)
        for leaf, n in c.most_common(top):
            print(f"    {n:6d} {100 * n / max(1, busy):5.1f} %  {leaf}", flush=True)


def seed_part(a, work: str) -> dict:
    """Seeding a replica from nothing against rsync to a daemon and a local `pit snapshot` of the
    same data, `--seed-runs` rounds (each: rsync, ingest, seeding), medians and ratios at the end."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dataset

    data = os.path.join(work, "dataset")
    if not os.path.isdir(data):
        dataset.generate(data, scale=a.seed_scale)
    files, size = dir_bytes(data)
    res: dict = {"files": files, "bytes": size, "runs": []}
    for _ in range(a.seed_runs):
        run = rsync_daemon_copy(data, work)
        run["pit_snapshot_s"], run["pit_snapshot_cpu_s"] = pit_ingest(data, work)
        seed = seed_once(data, work, a.seed_catchup, a.seed_kill, a.profile)
        run.update({"pit_seed_" + k: v for k, v in seed.items()})
        print(json.dumps(run), flush=True)
        res["runs"].append(run)
    med = {k: statistics.median(r[k] for r in res["runs"]) for k in res["runs"][0]
           if isinstance(res["runs"][0][k], float)}
    res["median"] = {k: round(v, 2) for k, v in med.items()}
    gb = size / 1e9
    res["pit_seed_mb_s"] = round(size / med["pit_seed_s"] / 1e6, 1)
    res["pit_snapshot_mb_s"] = round(size / med["pit_snapshot_s"] / 1e6, 1)
    res["seed_speed_vs_ingest"] = round(med["pit_snapshot_s"] / med["pit_seed_s"], 2)  # goal >= 0.90
    if "rsync_daemon_synced_s" in med:
        res["seed_speed_vs_rsync_daemon_synced"] = round(med["rsync_daemon_synced_s"] / med["pit_seed_s"], 2)  # goal >= 2
    res["master_cpu_s_per_gb"] = round(med["pit_seed_cpu_master_s"] / gb, 2)
    res["replica_cpu_s_per_gb"] = round(med["pit_seed_cpu_replica_s"] / gb, 2)
    res["ingest_cpu_s_per_gb"] = round(med["pit_snapshot_cpu_s"] / gb, 2)
    return res


def make_many(root: str, n: int) -> None:
    """n small files (100-300 bytes) in n/100 directories of 100, two levels deep."""
    for i in range(n):
        d = os.path.join(root, f"d{i // 10000:02d}", f"e{i // 100 % 100:02d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:06d}.txt"), "wb") as f:
            f.write(b"%d\n" % i * (20 + i % 40))


def idle_part(a, work: str) -> dict:
    """CPU of the master agent over a set of `--idle-files` files: seeding, idle without a rescan, one
    reconcile scan (stat only: nothing read), idle after it, and a restart (the files cache)."""
    tmp = os.path.join(work, "cluster-idle")
    shutil.rmtree(tmp, ignore_errors=True)
    c = Cluster(tmp, replicas=1)
    c.sets["web"]["rescan"] = a.rescan
    make_many(c.src, a.idle_files)
    res = {"files": a.idle_files, "rescan_every_s": a.rescan, "idle_window_s": a.idle_s}
    try:
        t = time.monotonic()
        c.start()
        subprocess.run([PIT, "point", "--set", "web", "--timeout", "1800", "--config", c.primary.config],
                       check=True, capture_output=True)
        res["seed_s"] = time.monotonic() - t
        pid = c.primary.proc.pid
        res["seed_cpu_master_s"] = cpu_seconds(pid)

        def quiet_window(label: str) -> float:
            """CPU seconds over `--idle-s` of idle; checks that no scan fell inside."""
            st = master_stats(c)
            c0 = cpu_seconds(pid)
            time.sleep(a.idle_s)
            st2 = master_stats(c)
            used = cpu_seconds(pid) - c0
            res[f"{label}_cpu_s"] = round(used, 3)
            res[f"{label}_scans_inside"] = st2["scans"] - st["scans"]
            res[f"{label}_files_read_inside"] = st2["files_read"] - st["files_read"]
            return used / a.idle_s

        # the windows start right after a scan has finished, so none falls inside (`rescan` > idle-s + a scan)
        scans = master_stats(c)["scans"]
        wait_for(lambda: master_stats(c)["scans"] > scans, a.rescan + 120, "a reconcile scan", interval=0.2)
        rate_before = quiet_window("idle_before_rescan")
        # up to and through the first reconcile scan (stat of every file, nothing read)
        st0, c0, t0 = master_stats(c), cpu_seconds(pid), time.monotonic()
        wait_for(lambda: master_stats(c)["scans"] > st0["scans"], a.rescan + 120, "a reconcile scan", interval=0.2)
        st1 = master_stats(c)
        dt, used = time.monotonic() - t0, cpu_seconds(pid) - c0
        res["rescan_cpu_s"] = round(used - rate_before * dt, 3)
        res["rescan_files_read"] = st1["files_read"] - st0["files_read"]
        res["rescan_unchanged"] = st1["unchanged"] - st0["unchanged"]
        quiet_window("idle_after_rescan")
        res["rss_mib"] = round(rss_mib(pid), 1)

        # restart (SIGTERM; the cache survives SIGKILL as well, see tests/test_repl_cache.py)
        c.primary.kill(signal.SIGTERM)
        t = time.monotonic()
        c.primary.start()
        pid = c.primary.proc.pid
        wait_for(lambda: master_stats(c)["scans"] >= 1, 600, "the start-up scan", interval=0.2)
        st = master_stats(c)
        res["restart_to_first_scan_s"] = round(time.monotonic() - t, 1)
        res["restart_cpu_s"] = round(cpu_seconds(pid), 3)
        res["restart_files_read"] = st["files_read"]
        res["restart_cache_loaded"] = st["cache_loaded"]
        res["restart_rss_mib"] = round(rss_mib(pid), 1)
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def steady_load(src: str, kib_s: int, stop: threading.Event) -> None:
    """Write `kib_s` KiB a second, in 10 steps a second: half appended to a log, half as random 8 KiB
    pages rewritten in place in a 64 MiB database file (the shape of a database under load)."""
    import random

    rng = random.Random(1)
    db = os.path.join(src, "load", "db.pages")
    log_path = os.path.join(src, "load", "app.log")
    os.makedirs(os.path.dirname(db), exist_ok=True)
    with open(db, "wb") as f:
        f.truncate(64 << 20)
    step = kib_s * 1024 // 10
    with open(db, "r+b") as dbf, open(log_path, "ab") as logf:
        while not stop.is_set():
            t = time.monotonic()
            logf.write(os.urandom(step // 2))
            logf.flush()
            for _ in range(max(1, step // 2 // 8192)):
                dbf.seek(rng.randrange(0, (64 << 20) // 8192) * 8192)
                dbf.write(os.urandom(8192))
            dbf.flush()
            stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mib", type=int, default=128)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--seed-scale", type=float, default=0.0, help="seeding vs rsync on bench/dataset.py at this scale")
    ap.add_argument("--seed-runs", type=int, default=3, help="rounds of rsync, ingest and seeding (medians)")
    ap.add_argument("--seed-kill", type=float, default=0.0,
                    help="SIGKILL the replica once this fraction of the payload is sent, then start it again")
    ap.add_argument("--profile", default=None, help="seeding: py-spy both agents into this directory, "
                    "print where each spent its CPU")
    ap.add_argument("--seed-catchup", action="store_true",
                    help="seed by catch-up: the data in the source before the agents start (a replica joined)")
    ap.add_argument("--idle-files", type=int, default=0, help="idle agent CPU over this many files")
    ap.add_argument("--idle-s", type=int, default=60)
    ap.add_argument("--rescan", type=int, default=150, help="reconcile scan interval for the idle part")
    ap.add_argument("--work", default=None)
    ap.add_argument("--load-kib-s", type=int, default=0,
                    help="steady write load during the latency part: KiB/s appended to a log and rewritten "
                         "as 8 KiB pages of a 64 MiB database file")
    a = ap.parse_args()
    if a.seed_scale or a.idle_files:
        work = a.work or tempfile.mkdtemp(prefix="pit-bench-repl-")
        os.makedirs(work, exist_ok=True)
        out = {}
        try:
            if a.seed_scale:
                out["seed"] = seed_part(a, work)
                print(json.dumps(out["seed"], indent=2), flush=True)
            if a.idle_files:
                out["idle"] = idle_part(a, work)
                print(json.dumps(out["idle"], indent=2), flush=True)
        finally:
            if not a.work:
                shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(out, indent=2))
        return
    tmp = tempfile.mkdtemp(prefix="pit-bench-repl-")
    c = Cluster(tmp, replicas=1)
    c.sets["web"]["debounce"] = 0.05
    big = os.path.join(c.src, "big.img")
    size = a.big_mib * 1024 * 1024
    with open(big, "wb") as f:
        for _ in range(a.big_mib):
            f.write(os.urandom(1024 * 1024))
    res = {}
    try:
        t0 = time.monotonic()
        c.start()
        r = c.replicas[0]
        repo = Repository(r.repo, readonly=True)
        wait_for(lambda: committed(repo, "data/big.img", size), 600, "seeding", interval=0.05)
        res["seed_s"] = time.monotonic() - t0
        res["seed_mb_s"] = size / res["seed_s"] / 1e6

        # 64 KiB changed in the middle of the big file: bytes on the wire
        before = bytes_sent(c)
        old_copy = os.path.join(tmp, "old.img")
        shutil.copy(big, old_copy)
        with open(big, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(64 * 1024))
        time.sleep(1.0)
        wait_for(lambda: bytes_sent(c) > before, 60, "the change")
        time.sleep(1.0)
        res["wire_64k_change"] = bytes_sent(c) - before
        res["rsync_64k_change"] = rsync_delta(old_copy, big)

        # latency: small files written one at a time, each polled until committed, optionally while a
        # steady load writes elsewhere in the set (a log appended, database pages rewritten)
        stop_load = threading.Event()
        loader = None
        if a.load_kib_s:
            loader = threading.Thread(target=steady_load, args=(c.src, a.load_kib_s, stop_load), daemon=True)
            loader.start()
            time.sleep(2.0)  # the load is under way before the first measured change
        lat = []
        for i in range(a.changes):
            p = os.path.join(c.src, "lat", f"f{i}")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            data = os.urandom(4096)
            t = time.monotonic()
            with open(p, "wb") as f:
                f.write(data)
            wait_for(lambda: committed(repo, f"data/lat/f{i}", 4096), 30, "commit", interval=0.005)
            lat.append(time.monotonic() - t)
        stop_load.set()
        if loader is not None:
            loader.join(10)
            res["load_kib_s"] = a.load_kib_s
        lat.sort()
        res["latency_p50_s"] = statistics.median(lat)
        res["latency_p99_s"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        repo.close()
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
