"""Randomized failover schedules (issue 14): N seeds in a row, the RTO and RPO distributions, and how many
runs held every invariant.

Two harnesses:

* default: the loopback harness (tests/failover_harness.py): three agents and etcd on 127.0.0.1; the
  nemesis pushes configuration, SIGKILLs the archive replica or the secondary's agent, crashes the primary
  (then its return and `pit failback`);
* `--netns`: the network-namespace harness (tests/failover_harness_netns.py, root, `ip netns`, nftables):
  partitions of the primary from the secondary, isolation of the primary, link flaps, SIGKILL of etcd and of
  the secondary's agent, configuration pushes, failback;
* `--pg`: the same in namespaces with PostgreSQL as the application (tests/failover_harness_pg.py: the
  postgresql template, pgbench plus an appender of acknowledged ids, and SIGKILL of the primary host too);
  also needs PostgreSQL's server binaries. `--keep` keeps a run's cluster directory (/tmp/pit-pgh-*).

Each run prints one line (seed, operations, acknowledged ids, RPO, RTO, outcome); at the end the RTO (seconds
from the fault to the secondary serving, over every unplanned failover), the RPO (acknowledged ids lost per
unplanned failover in namespaces, and the seconds of acknowledged writes they span; per run on loopback,
where the harness counts them per run) as min / median / p90 / max, and how many runs held every
invariant. A seed replays: `--seed N --runs 1`.

    sudo .venv/bin/python bench/failover_harness.py [--netns | --pg] [--seed 1000] [--runs 10] [--steps 6]
        [--work DIR] [--keep] [--json FILE] [-v]

Figures go to docs/benchmarks.md ("Failover").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


def dist(xs: list[float]) -> str:
    if not xs:
        return "n=0"
    s = sorted(xs)
    p90 = s[max(0, -(-len(s) * 9 // 10) - 1)]  # nearest rank
    return (f"n={len(s)} min {s[0]:.2f} median {statistics.median(s):.2f} p90 {p90:.2f} max {s[-1]:.2f}")


def run_loopback(seed: int, steps: int, work: str, etcd_endpoint: str, log=print):
    from failover_harness import run_schedule
    from test_failover import FailoverCluster, write

    c = FailoverCluster(work, etcd_endpoint)
    c.failover["checks"] = [{"http": f"http://127.0.0.1:{c.web_port}/index.html", "status": 200, "timeout": 1}]
    write(f"{c.src}/index.html", b"<h1>shop</h1>")
    try:
        c.start()
        return run_schedule(c, seed, steps, log=log)
    finally:
        c.stop()


def run_netns(seed: int, steps: int, work: str, log=print):
    from failover_harness_netns import netns_cluster, run_netns_schedule

    with netns_cluster(work) as c:
        return run_netns_schedule(c, seed, steps, log=log)


def run_pg(seed: int, steps: int, work: str, keep: bool, log=print):
    from failover_harness_pg import pg_cluster, run_pg_schedule

    with pg_cluster(work, keep=keep) as c:
        return run_pg_schedule(c, seed, steps, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", action="store_true", help="the network-namespace harness (root)")
    ap.add_argument("--pg", action="store_true", help="the namespace harness with PostgreSQL (root)")
    ap.add_argument("--seed", type=int, default=1000, help="first seed")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=6, help="operations per schedule")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (logs, fencing logs)")
    ap.add_argument("--json", default=None, help="write the per-run results here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each operation as it starts")
    a = ap.parse_args(argv)

    work = a.work or tempfile.mkdtemp(prefix="pit-harness-")
    os.makedirs(work, exist_ok=True)
    etcd = None
    if a.pg:
        from failover_harness_pg import why_not

        why = why_not()
        if why:
            print(f"cannot run the PostgreSQL harness: {why}", file=sys.stderr)
            return 2
    elif a.netns:
        from failover_harness_netns import why_not

        why = why_not()
        if why:
            print(f"cannot run the namespace harness: {why}", file=sys.stderr)
            return 2
    else:
        from etcdlab import ETCD, EtcdMember

        if not ETCD:
            print("etcd is not installed (Debian: etcd-server)", file=sys.stderr)
            return 2
        etcd = EtcdMember(os.path.join(work, "etcd")).start()

    results, rto, rpo_ids, rpo_s, held = [], [], [], [], 0
    t0 = time.time()
    try:
        for seed in range(a.seed, a.seed + a.runs):
            d = os.path.join(work, f"seed{seed}")
            os.makedirs(d, exist_ok=True)
            started = time.time()
            try:
                log = (lambda m: print(m, flush=True)) if a.verbose else (lambda m: None)
                out = (run_pg(seed, a.steps, d, a.keep, log) if a.pg
                       else run_netns(seed, a.steps, d, log) if a.netns
                       else run_loopback(seed, a.steps, d, etcd.endpoint, log))
            except Exception as exc:  # noqa: BLE001 - a run that could not even finish is a failed run
                traceback.print_exc()
                print(f"seed {seed}: ERROR {type(exc).__name__}: {exc}", flush=True)
                results.append({"seed": seed, "error": f"{type(exc).__name__}: {exc}",
                                "seconds": round(time.time() - started, 1)})
                continue
            finally:
                if not a.keep:
                    shutil.rmtree(d, ignore_errors=True)
            ok = not out.problems
            held += ok
            rto += out.rto
            if a.netns or a.pg:
                rpo_ids += [n for n, _ in out.rpo]
                rpo_s += [s for _, s in out.rpo]
            else:
                rpo_ids.append(out.lost_allowed)
            results.append({"seed": seed, "ops": out.ops, "acked": out.acked, "lost_allowed": out.lost_allowed,
                            "rto": [round(x, 3) for x in out.rto],
                            "rpo": [list(x) for x in getattr(out, "rpo", [])],
                            "problems": out.problems, "notes": getattr(out, "notes", []),
                            "seconds": round(time.time() - started, 1)})
            print(out.line(), flush=True)
    finally:
        if etcd is not None:
            etcd.stop()
        if not a.work and not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'PostgreSQL' if a.pg else 'namespaces' if a.netns else 'loopback'} harness: {a.runs} run(s) from seed {a.seed}, "
          f"{a.steps} operations each, {time.time() - t0:.0f} s")
    print(f"RTO (s, fault to the secondary serving, per unplanned failover): {dist(rto)}")
    if a.netns or a.pg:
        print(f"RPO (acknowledged ids lost, per unplanned failover):            {dist(rpo_ids)}")
        print(f"RPO (s of acknowledged writes lost, per unplanned failover):     {dist(rpo_s)}")
    else:
        print(f"RPO (acknowledged ids lost after the last point, per run):      {dist(rpo_ids)}")
    print(f"runs that held every invariant: {held}/{a.runs}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"netns": a.netns, "pg": a.pg, "seed": a.seed, "runs": results, "held": held}, f, indent=1)
    return 0 if held == a.runs else 1


if __name__ == "__main__":
    sys.exit(main())
