"""Restore-view benchmark: GET throughput over WebDAV vs `pit cat`, PROPFIND
Depth 1 of a 10,000-entry folder, listing one file's versions across 64
snapshots, and `ls -R` + `cat` through `pit mount`.

    .venv/bin/python bench/views.py [--size-mib 1024] [--work DIR]

Prints a Markdown table (paste into docs/benchmarks.md, "Restore views")."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
PIT = os.path.join(BIN, "pit")


def timed(fn, repeat=3):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        d = time.perf_counter() - t
        best = d if best is None or d < best else best
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    from store.ingest import create_snapshot
    from store.repository import Repository
    from store import versions as V
    from davserver.config import hash_password

    work = a.work or tempfile.mkdtemp(prefix="pit-bench-views-")
    rows = []
    try:
        src = os.path.join(work, "data")
        os.makedirs(os.path.join(src, "many"))
        with open(os.path.join(src, "big.bin"), "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        for i in range(10_000):
            with open(os.path.join(src, "many", f"f{i:05}.txt"), "w") as f:
                f.write(str(i))
        repo = Repository.init(os.path.join(work, "repo"))
        create_snapshot(repo, "b", [src])
        for i in range(63):
            with open(os.path.join(src, "doc.txt"), "w") as f:
                f.write(f"version {i}")
            create_snapshot(repo, "b", [src], changes=[os.path.join(src, "doc.txt")])
        with repo.reading() as txn:
            n = len(V.list_versions(repo, txn, "b", b"data/doc.txt"))

            def lv():
                with repo.reading() as t2:
                    V.list_versions(repo, t2, "b", b"data/doc.txt")
            t_lv = timed(lv, 20)
        rows.append(("list versions of one file across 64 snapshots (in process)", f"{t_lv * 1000:.2f} ms",
                     f"{n} versions", "< 50 ms"))
        repo.close()

        out = os.path.join(work, "out.bin")
        size = os.path.getsize(os.path.join(src, "big.bin"))
        t_cat = timed(lambda: subprocess.run(f"{PIT} -r {work}/repo cat b@latest:data/big.bin > {out}",
                                             shell=True, check=True), 2)
        cfg = os.path.join(work, "serve.toml")
        with open(cfg, "w") as f:
            f.write(f'[users.u]\npassword = "{hash_password("pw")}"\nsets = ["*"]\n')
        port = 18000 + os.getpid() % 1000
        srv = subprocess.Popen([PIT, "-r", os.path.join(work, "repo"), "serve", "-c", cfg, "--port", str(port)],
                               stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)
            url = f"http://127.0.0.1:{port}"
            cu = ["curl", "-s", "-u", "u:pw"]
            t_get = timed(lambda: subprocess.run(cu + ["-o", out, f"{url}/b/latest/data/big.bin"], check=True), 2)
            t_pf = timed(lambda: subprocess.run(cu + ["-o", "/dev/null", "-X", "PROPFIND", "-H", "Depth: 1",
                                                     f"{url}/b/latest/data/many/"], check=True), 3)
            t_vh = timed(lambda: subprocess.run(cu + ["-o", "/dev/null", "-X", "PROPFIND", "-H", "Depth: 1",
                                                     f"{url}/b/.versions/data/doc.txt/"], check=True), 5)
        finally:
            srv.terminate()
            srv.wait()
        rows.insert(0, (f"GET {a.size_mib} MiB file over WebDAV (HTTP, curl)", f"{size / t_get / 1e6:.0f} MB/s",
                        f"`pit cat` {size / t_cat / 1e6:.0f} MB/s ({t_get / t_cat:.2f}x its time)",
                        ">= 300 MB/s and >= half of pit cat"))
        rows.insert(1, ("PROPFIND Depth 1, 10,000-entry folder", f"{t_pf:.2f} s", "allprop", "< 0.5 s"))
        rows.append(("PROPFIND Depth 1 of a file's .versions folder (64 snapshots)", f"{t_vh * 1000:.0f} ms",
                     "over HTTP incl. curl start", ""))

        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt)
        m = subprocess.Popen([PIT, "mount", os.path.join(work, "repo"), mnt], stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if os.path.exists(os.path.join(mnt, "b")):
                    break
                time.sleep(0.05)
            snapname = sorted(n for n in os.listdir(os.path.join(mnt, "b")) if n[0].isdigit())[0]
            t_ls = timed(lambda: subprocess.run(["ls", "-R", os.path.join(mnt, "b", snapname)],
                                                stdout=subprocess.DEVNULL, check=True), 1)
            t_mc = timed(lambda: subprocess.run(["cat", os.path.join(mnt, "b", snapname, "data", "big.bin")],
                                                stdout=subprocess.DEVNULL, check=True), 1)
        finally:
            subprocess.run(["fusermount3", "-u", mnt])
            m.wait()
        rows.append(("`pit mount`: ls -R of one snapshot (10,003 entries), cold", f"{t_ls:.2f} s", "", ""))
        rows.append((f"`pit mount`: cat {a.size_mib} MiB file", f"{size / t_mc / 1e6:.0f} MB/s", "", ""))
        if shutil.which("restic"):
            rows.append(("restic mount", "not measured yet", "", ""))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| measurement | result | note | goal |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
