"""Replication benchmark: change-to-committed latency, bytes on the wire for a small
change in a big file (against rsync's delta when rsync is installed), seeding throughput.

Runs a real primary and one replica (`pit agent` processes) on 127.0.0.1, using the
cluster fixture of tests/test_repl_helpers.py. Figures go to docs/benchmarks.md.

    .venv/bin/python bench/replication.py [--big-mib 128] [--changes 100]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from store.apply import head_root  # noqa: E402
from store.errors import PathNotFound  # noqa: E402
from store.objects import ObjectReader  # noqa: E402
from store.repository import Repository  # noqa: E402
from test_repl_helpers import Cluster, wait_for  # noqa: E402


def bytes_sent(c) -> int:
    st = json.loads(c.primary.ctl("status").stdout)
    return st["sets"]["web"]["replicas"]["r1"]["bytes_sent"]


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mib", type=int, default=128)
    ap.add_argument("--changes", type=int, default=100)
    a = ap.parse_args()
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

        # latency: small files written one at a time, each polled until committed
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
