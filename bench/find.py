"""`pit find` benchmark: 64 snapshots of a set of 200,000 files (the issue 19 target: under a second).

    .venv/bin/python bench/find.py [--files 200000] [--snapshots 64] [--changes 500] [--work DIR]

Builds the repository once (a full snapshot, then change-set snapshots each
rewriting `--changes` files and adding one `report.txt` somewhere new), then
times `pit find` as a process (start-up included, best of 3) for a name
that matches a few paths, a glob that matches many, and a path pattern, and
the in-process query alone. Prints a Markdown table (docs/benchmarks.md,
"Finding a file")."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
PIT = os.path.join(BIN, "pit")


def best_of(fn, repeat=3):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        d = time.perf_counter() - t
        best = d if best is None or d < best else best
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--snapshots", type=int, default=64)
    ap.add_argument("--changes", type=int, default=500)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    from store.find import find
    from store.ingest import create_snapshot
    from store.repository import Repository

    work = a.work or tempfile.mkdtemp(prefix="pit-find-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    src, repo_path = os.path.join(work, "office"), os.path.join(work, "repo")
    rnd = random.Random(19)
    if not os.path.exists(repo_path):
        t0 = time.perf_counter()
        files = []
        for i in range(a.files):
            d = os.path.join(src, f"dept{i % 20}", f"proj{i % 500}", f"y{i % 7}")
            if i % 1000 == 0 or not os.path.isdir(d):
                os.makedirs(d, exist_ok=True)
            p = os.path.join(d, f"file{i}.{('txt', 'xlsx', 'pdf', 'docx')[i % 4]}")
            with open(p, "wb") as f:
                f.write(b"%d\n" % i)
            files.append(p)
        Repository.init(repo_path).close()
        repo = Repository(repo_path)
        create_snapshot(repo, "office", [src])
        for n in range(1, a.snapshots):
            changed = rnd.sample(files, a.changes)
            for p in changed:
                with open(p, "ab") as f:
                    f.write(b"v%d\n" % n)
            new = os.path.join(src, f"dept{n % 20}", f"proj{n}", "report.txt")
            os.makedirs(os.path.dirname(new), exist_ok=True)
            with open(new, "wb") as f:
                f.write(b"report %d\n" % n)
            create_snapshot(repo, "office", [src], changed + [new])
        repo.close()
        print(f"built {a.snapshots} snapshots of {a.files} files in {time.perf_counter() - t0:.0f} s "
              f"({work})", file=sys.stderr)
    rows = []
    repo = Repository(repo_path, readonly=True)
    for pattern in ("report.txt", "file1234*", "*.pdf", "proj7/*/file*.docx"):
        dt, hits = best_of(lambda: find(repo, pattern))
        dp, _ = best_of(lambda: subprocess.run([PIT, "-r", repo_path, "find", pattern, "--json"],
                                               check=True, capture_output=True))
        rows.append((pattern, len(hits), dt, dp))
    repo.close()
    print("| pattern | hits (versions) | query | `pit find --json` (process) |")
    print("| --- | ---: | ---: | ---: |")
    for pattern, n, dt, dp in rows:
        print(f"| `{pattern}` | {n} | {dt:.2f} s | {dp:.2f} s |")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
