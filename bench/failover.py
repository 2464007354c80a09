"""Failover benchmark (issue 7): takeover time, image selection time, failback bytes and time.

Everything runs on 127.0.0.1 with real `pit agent` processes and a real etcd member
(tests/etcdlab.py), using the FailoverCluster of tests/test_failover.py: a primary
master serving set `web` over HTTP (a takeover hook starts `python -m http.server` on
the live files), r1 the secondary station, r2 an archive replica.

1. takeover: SIGKILL the primary's agent (and its web server: the host died), poll
   the service on r1 every 20 ms. Reported: wall clock from the kill to the first good
   GET, and the agent's own split from `failover.last_promotion` (Failover.promote):
   detection = promotion start - kill (the lease expiring, seen by r1's next tick),
   key = detect_to_key (campaign in etcd), selection + materialise, takeover hooks.
2. selection: a repository with 64 snapshots of one set (a shared base plus a file
   rewritten at every snapshot); the newest N (0, 1, 2, 8) corrupted by flipping a
   byte in a chunk only that image references (as tests/test_select.py does);
   `replicator.failover.select.select_image` timed with the default recheck window (chunks
   read good once are not read again) and with `recheck_after=0`, verify only and
   verify + materialise (a callable check that passes).
3. failback: after the takeover, a small change on r1 (64 KiB rewritten in the middle
   of one file, one new 4 KiB file); the old primary returns, is fenced, keeps its
   state as a snapshot and catches up from r1 by delta: bytes r1 sent it
   (`pit status`, sets.web.replicas.primary.bytes_sent) and time from its agent's
   start to its view equalling r1's live files; then `pit failback`. Against a full
   re-seed: a fresh cluster seeding an empty replica with the same data.

    .venv/bin/python bench/failover.py [--runs 3] [--ttl 2,5] [--data-mib 64] [--images 64]
        [--image-mib 64] [--corrupt 0,1,2,8] [--repeats 3] [--parts takeover,select,failback] [--work DIR] [--json FILE]

Figures go to docs/benchmarks.md ("Failover").
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
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from etcdlab import EtcdMember  # noqa: E402
from test_failover import FailoverCluster, fo, status, write  # noqa: E402
from test_repl_helpers import Cluster, read_tree, replica_head, wait_for  # noqa: E402

MiB = 1024 * 1024


def make_data(src: str, mib: int, rng: random.Random) -> None:
    write(f"{src}/index.html", b"<h1>shop v1</h1>")
    n = max(1, mib // 8)
    for i in range(n):
        write(f"{src}/files/blob{i:02d}.bin", rng.randbytes(mib * MiB // n))


def get(port: int, path: str, timeout: float = 0.5) -> bytes | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=timeout).read()
    except OSError:
        return None


def sent_to(node, set_name: str, replica: str) -> int:
    return int(status(node)["sets"][set_name]["replicas"][replica]["bytes_sent"])


# ------------------------------------------------------------------ 1 + 3: takeover, failback
def takeover_run(work: str, i: int, args, ttl: int, failback: bool) -> dict:
    tmp = os.path.join(work, f"takeover-{ttl}-{i}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    etcd = EtcdMember(os.path.join(tmp, "etcd")).start()
    c = FailoverCluster(tmp, etcd.endpoint, ttl=ttl)
    out: dict = {"run": i, "ttl": ttl}
    try:
        make_data(c.src, args.data_mib, random.Random(42 + i))
        c.start()
        p, r1, r2 = c.primary, c.replicas[0], c.replicas[1]
        wait_for(lambda: fo(p).get("holding"), 60, "the primary to take the leader key")
        wait_for(lambda: get(c.web_port, "index.html") == b"<h1>shop v1</h1>", 30, "the primary's web service")
        wait_for(lambda: fo(r1).get("phase") == "standby", 30, "r1 standing by")
        for attempt in range(10):  # seeded, and a consistent point on r1 and r2 (r1 restarts once at start)
            if p.ctl("point", "--set", "web", "--timeout", "50", check=False).returncode == 0:
                break
            time.sleep(1)
        else:
            raise RuntimeError("no consistent point on r1 and r2:\n" + c.logs())
        # let r1's live mirror reach the point (failover.mirror), as it would have long before a real failure
        time.sleep(6)

        t_kill = time.time()
        p.kill(signal.SIGKILL)
        subprocess.run(c.hook("stop"), shell=True, check=True,
                       env=dict(os.environ, PIT_NODE="primary", PIT_ROLE="died"))
        while get(c.web_port, "index.html", timeout=0.2) != b"<h1>shop v1</h1>":
            time.sleep(0.02)
            if time.time() - t_kill > 300:
                raise RuntimeError("r1 did not serve within 300 s:\n" + c.logs())
        t_get = time.time()
        wait_for(lambda: fo(r1).get("phase") == "active", 60, "r1 active")
        rep = fo(r1)["last_promotion"]
        sets = rep["sets"]["web"]
        out.update(kill_to_get=t_get - t_kill, detection=rep["started"] - t_kill, key=rep["detect_to_key"],
                   selection_and_materialise=rep["selection_and_materialise"], selection=sets["selection_seconds"],
                   hooks=rep["hooks_seconds"], promote_total=rep["seconds"],
                   after_promotion_to_get=t_get - (rep["started"] + rep["seconds"]),
                   files_written=sets["materialised"]["files_written"],
                   files_unchanged=sets["materialised"]["files_unchanged"])
        if not failback:
            return out

        # a small change on the new primary
        big = os.path.join(c.live, "files", "blob00.bin")
        size = os.path.getsize(big)
        with open(big, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(64 * 1024))
        write(f"{c.live}/changed-on-r1.txt", os.urandom(4096))
        wait_for(lambda: replica_head(r2.repo, "web") == read_tree(c.live), 120, "r2 to follow r1")

        # the old primary returns: fenced, keeps its state, catches up from r1 by delta
        p.write_config(f'cluster = "{c.cluster_file}"')
        t0 = time.monotonic()
        p.start()
        want = read_tree(c.live)
        wait_for(lambda: replica_head(p.repo, "web") == want, 300, "the old primary to catch up", interval=0.25)
        out["delta_seconds"] = time.monotonic() - t0
        out["delta_bytes"] = sent_to(r1, "web", "primary")
        out["data_bytes"] = sum(len(v) for v in want.values() if isinstance(v, bytes))
        t0 = time.monotonic()
        fb = json.loads(p.ctl("failback", "--json").stdout)
        out["failback_cli_seconds"] = time.monotonic() - t0
        out["failback_switch"] = fb.get("switch_seconds")
        out["failback_freeze"] = fb.get("freeze_seconds")
        wait_for(lambda: get(c.web_port, "changed-on-r1.txt") is not None, 30, "the service back on the primary")
        return out
    finally:
        c.stop()
        etcd.stop()


def reseed_run(work: str, args) -> dict:
    """An empty replica seeded with the same data (same sizes, same generator) from a primary: timed,
    like the delta, from the replica's agent start (already joined) to its view equalling the source."""
    from test_repl_helpers import pit

    tmp = os.path.join(work, "reseed")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    c = Cluster(tmp, replicas=1)
    try:
        make_data(c.src, args.data_mib, random.Random(42))
        p, r = c.primary, c.replicas[0]
        os.makedirs(p.dir, exist_ok=True)
        from test_repl_helpers import free_port

        pit("cluster", "init", "--state", p.state, "--node", "primary", "--address", p.address,
            "--join-address", f"127.0.0.1:{free_port()}")
        p.write_config(f'cluster = "{c.cluster_file}"')
        c.write_sets()
        p.start()
        c.add(r, start=False)
        want = read_tree(c.src)
        t0 = time.monotonic()
        r.start()
        wait_for(lambda: replica_head(r.repo, "web") == want, 600, "the seed", interval=0.25)
        secs = time.monotonic() - t0
        return {"reseed_seconds": secs, "reseed_bytes": sent_to(p, "web", "r1")}
    finally:
        c.stop()


# ------------------------------------------------------------------ 2: image selection
def build_images(work: str, args) -> tuple[str, list]:
    from maint_helpers import snap
    from store.repository import Repository

    repo = os.path.join(work, "select", "repo")
    shutil.rmtree(os.path.dirname(repo), ignore_errors=True)
    os.makedirs(os.path.dirname(repo))
    Repository.init(repo).close()
    src = os.path.join(work, "select", "src")
    rng = random.Random(7)
    n = max(1, args.image_mib // 4)
    for i in range(n):
        write(f"{src}/base/f{i:03d}.bin", rng.randbytes(args.image_mib * MiB // n))
    snaps = []
    for g in range(args.images):
        write(f"{src}/current.bin", rng.randbytes(256 * 1024))  # each image's own chunks
        write(f"{src}/gen.txt", f"generation {g}\n".encode())
        snaps.append(snap(repo, "a", [src], retention=False))
    return repo, snaps


def corrupt_newest(repo: str, snaps: list, n: int) -> None:
    from maint_helpers import all_blobs, file_chunks, flip_byte, pack_path
    from store import packs as P

    blobs = all_blobs(repo)
    for s in snaps[len(snaps) - n:]:
        cid = file_chunks(repo, s.hex, "src/current.bin")[0]
        e = blobs[cid]
        flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + e.stored_len // 2)


def selection_bench(work: str, args) -> list[dict]:
    """Each figure is the median of `--repeats` runs, each on a fresh copy of the repository (no
    verify records yet), after one warm-up run; the page cache is warm (the copy was just written)."""
    from replicator.failover.select import select_image
    from replicator.apps.templates import CheckResult

    repo, snaps = build_images(work, args)
    variants = (("default", {}), ("recheck0", {"recheck_after": 0}),
                ("materialise", {"check": lambda d, s: CheckResult(True, "ok")}))

    def once(n: int, kw: dict) -> tuple[float, int]:
        copy = os.path.join(work, "select", f"repo-{n}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(repo, copy)
        corrupt_newest(copy, snaps, n)
        subprocess.run(["sync"])
        t0 = time.monotonic()
        sel = select_image(copy, "a", scratch_dir=os.path.join(work, "select", "scratch"), **kw)
        secs = time.monotonic() - t0
        assert sel.chosen.id == snaps[len(snaps) - 1 - n].hex, (n, sel.chosen)
        assert [i.status for i in sel.images[:n]] == ["skipped"] * n
        shutil.rmtree(copy, ignore_errors=True)
        return secs, sum((i.verify or {}).get("chunks_read", 0) for i in sel.images)

    once(0, {})  # warm-up: imports, page cache
    rows = []
    for n in args.corrupt:
        row = {"corrupt": n}
        for label, kw in variants:
            runs = [once(n, kw) for _ in range(args.repeats)]
            row[label] = statistics.median(r[0] for r in runs)
            row[label + "_all"] = [round(r[0], 3) for r in runs]
            row[label + "_chunks_read"] = runs[0][1]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ output
def fmt(v: float) -> str:
    return f"{v:.2f}"


def table(rows: list[list[str]], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ttl", default="2,5", help="lease TTLs to run the takeover with (comma-separated)")
    ap.add_argument("--data-mib", type=int, default=64)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--corrupt", default="0,1,2,8")
    ap.add_argument("--repeats", type=int, default=3, help="selection runs per figure (median)")
    ap.add_argument("--parts", default="takeover,select,failback")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.corrupt = [int(x) for x in args.corrupt.split(",")]
    ttls = [int(x) for x in args.ttl.split(",")]
    parts = set(args.parts.split(","))
    work = args.work or tempfile.mkdtemp(prefix="pit-bench-failover-")
    os.makedirs(work, exist_ok=True)
    res: dict = {"args": vars(args), "load": os.getloadavg()}
    try:
        if "takeover" in parts or "failback" in parts:
            runs = []
            for ttl in ttls:
                for i in range(args.runs if "takeover" in parts else 1):
                    runs.append(takeover_run(work, i, args, ttl, failback=(i == 0 and ttl == ttls[0]
                                                                           and "failback" in parts)))
                    print(json.dumps(runs[-1]), flush=True)
                if "takeover" not in parts:
                    break
            res["takeover"] = runs
            if "failback" in parts:
                res["reseed"] = reseed_run(work, args)
                print(json.dumps(res["reseed"]), flush=True)
        if "select" in parts:
            res["select"] = selection_bench(work, args)
            for r in res["select"]:
                print(json.dumps(r), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    res["load_after"] = os.getloadavg()

    print()
    if "takeover" in res:
        keys = [("kill_to_get", "kill to first good GET on r1"), ("detection", "detection (kill to promotion start)"),
                ("key", "leader key won (detect_to_key)"), ("selection_and_materialise", "selection + materialise"),
                ("selection", "of which selection"), ("hooks", "takeover hooks"),
                ("after_promotion_to_get", "promotion done to first good GET")]
        rows = []
        for ttl in ttls:
            runs = [r for r in res["takeover"] if r["ttl"] == ttl]
            if not runs:
                continue
            for k, label in keys:
                vals = [r[k] for r in runs]
                rows.append([str(ttl), label, fmt(statistics.median(vals)), fmt(min(vals)), fmt(max(vals))])
        print(f"Takeover ({args.runs} runs per TTL, {args.data_mib} MiB set), seconds")
        print(table(rows, ["ttl", "step", "median", "min", "max"]))
        print()
    if "reseed" in res:
        r0 = res["takeover"][0]
        rows = [["delta to the returning old primary", f"{r0['delta_bytes'] / 1e6:.3f} MB", fmt(r0["delta_seconds"])],
                ["full re-seed of an empty replica", f"{res['reseed']['reseed_bytes'] / 1e6:.3f} MB",
                 fmt(res["reseed"]["reseed_seconds"])],
                ["`pit failback` (freeze, final point, switch)", "", fmt(r0["failback_cli_seconds"])]]
        print(f"Failback ({args.data_mib} MiB set; change on r1: 64 KiB rewritten + one 4 KiB file)")
        print(table(rows, ["what", "bytes sent", "seconds"]))
        print()
    if "select" in res:
        rows = [[str(r["corrupt"]), fmt(r["default"]), str(r["default_chunks_read"]), fmt(r["recheck0"]),
                 str(r["recheck0_chunks_read"]), fmt(r["materialise"])] for r in res["select"]]
        print(f"Image selection, {args.images} images of {args.image_mib} MiB, newest N corrupt, seconds "
              f"(median of {args.repeats})")
        print(table(rows, ["N corrupt", "verify (recheck window)", "chunks read", "verify (recheck 0)",
                           "chunks read", "verify + materialise"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
