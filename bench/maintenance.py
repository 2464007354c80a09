"""Maintenance benchmark (issue 4): deep verify, 64 snapshots, drop the oldest, reclaim.

    python bench/maintenance.py [--scale 1.0] [--work /work/bench-data/maint-1]
                                [--only pit,restic,borg] [--snapshots 64] [--rounds 2]

pitstore, restic and borg side by side on the same data, in one run:

1. generate the dataset (bench/dataset.py, seed 42, ``--scale``);
2. each tool: init, backup 1 (initial, cold page cache);
3. (a) deep verify, cold: ``pit verify --deep --recheck-after 0`` (read every
   chunk, ignoring chunks verified recently), ``restic check --read-data``,
   ``borg check --verify-data``.  MB/s = repository bytes / wall;
4. (b) snapshots 2..N: ``mutate(seed=100+i, fraction=0.001, add=2, delete=2,
   text_files=20)`` (the counts times ``--scale``; the db fraction stays 0.1 %),
   then one backup per tool (warm cache, like the peer baseline's "snapshots
   5-64").  pitstore snapshots with ``--changes`` (the change set a replicator
   hands over; the repository is the same as a full scan's).  Repo size on
   disk (du) after N snapshots;
5. (c) ``--rounds`` times: drop the oldest snapshot (cold) and reclaim its
   space (warm, right after), reported separately:
   - pitstore: ``pit forget --set bench <oldest id> --json`` (the drop), then
     ``pit compact --threshold 0.25 --json`` (the default threshold) and
     ``pit compact --threshold 0 --json`` (every pack with any garbage: all the
     space the drop freed);
   - restic: ``restic forget <oldest id> --prune`` (drop and reclaim in one);
   - borg: ``borg delete ::sNNN`` (the drop), then ``borg compact`` (reclaim);
6. pitstore correctness after the drops: ``pit verify`` (structural, exit 0
   required) and a cold restore of the newest snapshot compared file by file
   (BLAKE3) with the source.

MB = 10^6 bytes.  Output: WORK/results.md, WORK/results.json, logs in WORK/logs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import dataset
import measure
import peers
from pitdriver import PIT_SRC, SET, Pit, _json, pit_available

MB = measure.MB
MIB = measure.MIB


# ------------------------------------------------------------------ tool ops

def deep_check_cmd(t) -> list[str]:
    if isinstance(t, Pit):
        return t.cmd("verify", "--deep", "--recheck-after", "0", "--json")
    if isinstance(t, peers.Restic):
        return ["restic", "check", "--read-data"]
    return ["borg", "check", "--verify-data"]


def list_snapshots(t) -> list[dict]:
    """[{"id", "name", "time"}] oldest first."""
    if isinstance(t, Pit):
        r = t._run("snapshots", t.cmd("snapshots", "--set", SET, "--json"))
        snaps = _json(r.stdout) if r.rc == 0 else []
        out = [{"id": s["id"], "name": s.get("name"), "time": s.get("time_ns") or s["time"]}
               for s in snaps] if isinstance(snaps, list) else []
    elif isinstance(t, peers.Restic):
        r = t._run("snapshots", ["restic", "snapshots", "--json"])
        snaps = _json(r.stdout) if r.rc == 0 else []
        out = [{"id": s["id"], "name": s.get("short_id"), "time": s["time"]}
               for s in snaps] if isinstance(snaps, list) else []
    else:
        r = t._run("list", ["borg", "list", "--json"])
        d = _json(r.stdout) if r.rc == 0 else {}
        out = [{"id": a["name"], "name": a["name"], "time": a["start"]}
               for a in d.get("archives", [])] if isinstance(d, dict) else []
    return sorted(out, key=lambda s: s["time"])


def drop_cmds(t, oldest: dict) -> list[tuple[str, list[str], bool]]:
    """[(step, command, cold)] that drop ``oldest`` and then reclaim its space."""
    if isinstance(t, Pit):
        return [("drop", t.cmd("forget", "--set", SET, oldest["id"], "--json"), True),
                ("compact 0.25", t.cmd("compact", "--threshold", "0.25", "--json"), False),
                ("compact 0", t.cmd("compact", "--threshold", "0", "--json"), False)]
    if isinstance(t, peers.Restic):
        return [("drop+prune", ["restic", "forget", oldest["id"], "--prune"], True)]
    return [("drop", ["borg", "delete", f"::{oldest['id']}"], True),
            ("compact", ["borg", "compact", "--verbose"], False)]


# --------------------------------------------------------------------- bench

class Maint:
    def __init__(self, a):
        self.a = a
        self.work = os.path.abspath(a.work)
        self.data = os.path.join(self.work, "data")
        self.logs = os.path.join(self.work, "logs")
        self.scratch = os.path.join(self.work, "scratch")
        self.repos = os.path.join(self.work, "repos")
        self.meta: dict = {}
        self.res: dict = {}          # label -> results
        self.dead: dict[str, str] = {}
        self.notes: list[str] = []

    def tools(self) -> list:
        only = set(self.a.only.split(","))
        ts = []
        if "pit" in only:
            if not pit_available():
                raise SystemExit("pit does not run (.venv/bin/pit)")
            ts.append(Pit(os.path.join(self.repos, "pit"), self.scratch, self.logs, label="pit"))
        if only & {"restic", "borg"}:
            versions = peers.ensure_installed()
            for key, cls in (("restic", peers.Restic), ("borg", peers.Borg)):
                if key in only and versions.get(key):
                    ts.append(cls(os.path.join(self.repos, key), self.scratch, self.logs))
                elif key in only:
                    self.notes.append(f"{key} skipped: not installed and apt-get failed.")
        return ts

    def timed(self, t, step: str, cmd: list[str], *, cold: bool, cwd=None) -> dict | None:
        """Run one command of tool t; a failure is recorded and stops the tool."""
        if t.label in self.dead:
            return None
        cache = ("cold" if measure.drop_caches() else "warm (drop refused)") if cold else "warm"
        load = os.getloadavg()[0]
        r = measure.run(cmd, env=t.env(), cwd=cwd,
                        log_prefix=os.path.join(self.logs, f"{t.label}-{step.replace(' ', '_')}"))
        size = t.size()
        row = {"step": step, "cmd": " ".join(cmd), "cache": cache, "load1": round(load, 2),
               "rc": r.rc, "wall": round(r.wall, 3), "cpu": round(r.cpu, 3),
               "maxrss_mib": round(r.maxrss_mib, 1), "repo_disk": size["disk"],
               "repo_apparent": size["apparent"]}
        if isinstance(t, Pit) and r.stdout.strip().startswith(("{", "[")):
            row["json"] = _json(r.stdout)
        else:
            row["out_tail"] = (r.stdout + r.stderr).strip().splitlines()[-60:]
        if r.rc != 0 and not (isinstance(t, peers.Borg) and r.rc == 1):   # borg 1 = warning
            row["error"] = " | ".join((r.stderr or r.stdout).strip().splitlines()[-6:])
            self.dead[t.label] = f"{step}: rc={r.rc}: {row['error']}"
            print(f"    {t.label} {step} FAILED rc={r.rc}: {row['error']}", file=sys.stderr)
        return row

    def backup(self, t, changes: str | None) -> measure.Result | None:
        if t.label in self.dead:
            return None
        r = t.backup(self.data, changes=changes if isinstance(t, Pit) else None)
        if r.rc != 0 and not (isinstance(t, peers.Borg) and r.rc == 1):
            self.dead[t.label] = f"backup {t.nsnap}: rc={r.rc}: " + " | ".join(
                (r.stderr or r.stdout).strip().splitlines()[-6:])
            print(f"    {self.dead[t.label]}", file=sys.stderr)
        return r

    def run(self):
        a = self.a
        for d in (self.logs, self.scratch, self.repos):
            measure.rmtree(d)
            os.makedirs(d)
        t_start = time.perf_counter()
        self.meta.update(
            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            kernel=platform.release(), python=platform.python_version(), cpus=os.cpu_count(),
            loadavg_start=os.getloadavg(), scale=a.scale, seed=a.seed, snapshots=a.snapshots,
            pit_src=PIT_SRC, pit_commit=_commit())
        log(f"generating dataset (scale {a.scale}) in {self.data}")
        gen = dataset.generate(self.data, seed=a.seed, scale=a.scale)
        self.meta["dataset"] = gen
        log(f"    {gen}")
        tools = self.tools()
        self.meta["tools"] = {t.label: {"name": t.name, "version": t.version,
                                        "source": getattr(t, "source_digest", None)}
                              for t in tools}
        for t in tools:
            self.res[t.label] = {"tool": t.name, "version": t.version, "backups": [],
                                 "sizes": [], "drops": []}

        # 1. init + initial backup (cold)
        for t in tools:
            r = t.init()
            if r.rc != 0:
                self.dead[t.label] = f"init: {r.stderr.strip()[-300:]}"
                continue
            measure.drop_caches()
            log(f"{t.label}: backup 1 (initial, cold)")
            r = self.backup(t, None)
            if r is not None:
                self.res[t.label]["backup1"] = {"wall": round(r.wall, 3), "cpu": round(r.cpu, 3),
                                                "maxrss_mib": round(r.maxrss_mib, 1),
                                                "repo_disk": t.size()["disk"]}
                log(f"    {r.wall:.2f} s")

        # 2. (a) deep verify, cold
        for t in tools:
            if a.no_verify:
                break
            log(f"{t.label}: deep verify (cold)")
            row = self.timed(t, "deep verify", deep_check_cmd(t), cold=True)
            if row:
                row["mbps"] = round(row["repo_apparent"] / MB / row["wall"], 1)
                self.res[t.label]["verify"] = row
                log(f"    {row['wall']:.2f} s, {row['mbps']} MB/s")

        # 3. (b) snapshots 2..N of a 0.1 %-per-step changing dataset
        sc = a.scale
        muts = dict(fraction=0.001, add=max(1, round(2 * sc)), delete=max(1, round(2 * sc)),
                    text_files=max(1, round(20 * sc)))
        self.meta["mutation"] = dict(muts, seeds=f"100+i, i = 1..{a.snapshots - 1}")
        changes = os.path.join(self.work, "changes.txt")
        t_series = time.perf_counter()
        mutate_s = []
        for i in range(1, a.snapshots):
            t0 = time.perf_counter()
            dataset.mutate(self.data, seed=100 + i, changes_file=changes, **muts)
            mutate_s.append(time.perf_counter() - t0)
            walls = []
            for t in tools:
                r = self.backup(t, changes)
                if r is None:
                    continue
                rec = {"n": i + 1, "wall": round(r.wall, 3), "cpu": round(r.cpu, 3),
                       "maxrss_mib": round(r.maxrss_mib, 1)}
                if isinstance(t, Pit) and t.last_snapshot:
                    st = t.last_snapshot.get("stats") or {}
                    rec.update({k: st.get(k) for k in ("bytes_read", "new_stored",
                                                       "retention_dropped", "duration")})
                self.res[t.label]["backups"].append(rec)
                self.res[t.label]["sizes"].append(t.size()["disk"])
                walls.append(f"{t.label} {r.wall:.2f}")
            if i % 8 == 0 or i == a.snapshots - 1:
                log(f"snapshot {i + 1}/{a.snapshots}: " + ", ".join(walls)
                    + f"  (load {os.getloadavg()[0]:.2f})")
        self.meta["series_seconds"] = round(time.perf_counter() - t_series, 1)
        self.meta["mutate_seconds_median"] = round(statistics.median(mutate_s), 3) \
            if mutate_s else None

        for t in tools:
            if t.label in self.dead:
                continue
            snaps = list_snapshots(t)
            self.res[t.label]["count_after_series"] = len(snaps)
            self.res[t.label]["repo_after_series"] = t.size()
            if len(snaps) != a.snapshots:
                self.notes.append(f"{t.label}: {len(snaps)} snapshots after the series, "
                                  f"expected {a.snapshots}.")
            if isinstance(t, Pit):
                self.res[t.label]["stats_after_series"] = t.stats()
                self.res[t.label]["layout_after_series"] = t.layout()

        # 4. (c) drop the oldest and reclaim, --rounds times
        for rnd in range(1, a.rounds + 1):
            for t in tools:
                if t.label in self.dead:
                    continue
                snaps = list_snapshots(t)
                if not snaps:
                    self.dead[t.label] = "no snapshots listed"
                    continue
                oldest = snaps[0]
                log(f"{t.label}: round {rnd}: drop the oldest of {len(snaps)} ({oldest['name']})")
                before = t.size()["disk"]
                steps = []
                for step, cmd, cold in drop_cmds(t, oldest):
                    row = self.timed(t, f"r{rnd} {step}", cmd, cold=cold)
                    if row is None:
                        break
                    row["step"] = step
                    steps.append(row)
                    log(f"    {step}: {row['wall']:.2f} s, repo {row['repo_disk'] / MB:.1f} MB")
                after = list_snapshots(t)
                self.res[t.label]["drops"].append({
                    "round": rnd, "of": len(snaps), "oldest": oldest, "repo_before": before,
                    "steps": steps, "count_after": len(after),
                    "oldest_gone": all(s["id"] != oldest["id"] for s in after)})

        # 5. pitstore correctness after the drops
        for t in tools:
            if not isinstance(t, Pit) or t.label in self.dead:
                continue
            log("pit: structural verify after the drops")
            row = self.timed(t, "verify after", t.cmd("verify", "--json"), cold=False)
            self.res[t.label]["verify_after"] = row
            if a.no_restore:
                continue
            log("pit: restore newest (cold) and compare with the source")
            target = os.path.join(self.work, "restore")
            measure.rmtree(target)
            os.makedirs(target)
            row = self.timed(t, "restore", t.cmd("restore", f"{SET}@latest", "--target",
                                                 target), cold=True)
            if row and row["rc"] == 0:
                expected = measure.tree_digest(self.data)
                got = measure.tree_digest(t.restored_root(target, self.data))
                diffs = measure.compare_digests(expected, got)
                row["verified"] = not diffs
                row["diffs"] = diffs[:20]
                log(f"    {row['wall']:.2f} s, " + ("identical" if not diffs else f"DIFFERS {diffs[:5]}"))
            self.res[t.label]["restore"] = row
            measure.rmtree(target)

        self.meta["loadavg_end"] = os.getloadavg()
        self.meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
        self.meta["dead"] = self.dead
        md = self.markdown()
        print(md)
        with open(os.path.join(self.work, "results.md"), "w") as f:
            f.write(md)
        with open(os.path.join(self.work, "results.json"), "w") as f:
            json.dump({"meta": self.meta, "results": self.res, "notes": self.notes}, f,
                      indent=1, default=str)
        log(f"wrote {self.work}/results.md and results.json")

    # ------------------------------------------------------------- report
    def markdown(self) -> str:
        m, R = self.meta, self.res
        ds = m["dataset"]
        labels = list(R)
        out = [f"# pitstore maintenance benchmark, scale {m['scale']} ({m['started']})", "",
               f"- {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}. Load average "
               f"(1/5/15 min) at start {_la(m['loadavg_start'])}, at end "
               f"{_la(m.get('loadavg_end'))}. Whole run {m.get('total_seconds')} s "
               f"(the {m['snapshots'] - 1} mutate + backup rounds: {m.get('series_seconds')} s).",
               "- Tools: " + ", ".join(
                   f"{k} {v['version']}" + (f" (store/*.py digest {v['source']})"
                                            if v.get("source") else "")
                   for k, v in m["tools"].items()) + ".",
               f"- pitstore code: {'`PIT_SRC` ' + m['pit_src'] if m.get('pit_src') else 'the work tree'}"
               f", commit {m.get('pit_commit')}.",
               f"- Dataset: scale {m['scale']}, seed {m['seed']}: {ds['files']} files, "
               f"{ds['bytes']:,} B ({ds['bytes'] / MIB:.1f} MiB).",
               f"- Each of snapshots 2..{m['snapshots']}: mutate(seed=100+i, fraction="
               f"{m['mutation']['fraction']}, add={m['mutation']['add']}, delete="
               f"{m['mutation']['delete']}, text_files={m['mutation']['text_files']}), then one "
               "backup per tool, warm cache; pitstore with `--changes`.",
               "- MB = 10^6 B. Repo size = bytes allocated on disk (du). cold = page cache "
               "dropped just before the step.", ""]

        out += ["## (a) Deep verify, cold cache", "",
                "| tool | command | wall s | CPU s | max RSS MiB | repo MB | MB/s | load1 |",
                "|---|---|---|---|---|---|---|---|"]
        for lb in labels:
            v = R[lb].get("verify")
            if v:
                cmd = v["cmd"].split(" --repo ")[-1] if lb == "pit" else v["cmd"]
                cmd = "pit " + cmd.split(" ", 1)[1] if lb == "pit" else cmd
                out.append(f"| {lb} | `{cmd}` | {v['wall']:.2f} | {v['cpu']:.2f} | "
                           f"{v['maxrss_mib']:.0f} | {v['repo_apparent'] / MB:.1f} | "
                           f"{v['mbps']:.1f} | {v['load1']} |")
        out += ["", f"## (b) {m['snapshots']} snapshots", "",
                "| tool | initial backup s (cold) | repo after 1 MB | backups 2..N: median s "
                "(min-max) | median growth per backup MB | repo after N MB | snapshots listed |",
                "|---|---|---|---|---|---|---|"]
        for lb in labels:
            r = R[lb]
            b1 = r.get("backup1") or {}
            walls = [b["wall"] for b in r["backups"]]
            sizes = [b1.get("repo_disk", 0)] + r["sizes"]
            growth = [(y - x) / MB for x, y in zip(sizes, sizes[1:])]
            ra = r.get("repo_after_series", {}).get("disk")
            out.append("| " + " | ".join([
                lb, _f(b1.get("wall"), 2), _f(_div(b1.get("repo_disk"), MB), 1),
                f"{statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})"
                if walls else "", _f(statistics.median(growth), 2) if growth else "",
                _f(_div(ra, MB), 1), str(r.get("count_after_series", ""))]) + " |")
        out += ["", "## (c) Drop the oldest snapshot, then reclaim its space", "",
                "| tool | round | of | step | cache | wall s | CPU s | max RSS MiB | repo after MB "
                "| freed by this step MB | load1 | what the tool says |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for lb in labels:
            for d in R[lb]["drops"]:
                prev = d["repo_before"]
                for s in d["steps"]:
                    out.append("| " + " | ".join([
                        lb, str(d["round"]), str(d["of"]), s["step"], s["cache"],
                        f"{s['wall']:.2f}", f"{s['cpu']:.2f}", f"{s['maxrss_mib']:.0f}",
                        f"{s['repo_disk'] / MB:.1f}", f"{(prev - s['repo_disk']) / MB:.1f}",
                        str(s["load1"]), _says(s)]) + " |")
                    prev = s["repo_disk"]
                if not d["oldest_gone"]:
                    out.append(f"| {lb} | {d['round']} | | **oldest still listed** | | | | | | "
                               "| | |")
        for lb in labels:
            r = R[lb]
            if "verify_after" in r and r["verify_after"]:
                v = r["verify_after"]
                res = (v.get("json") or {}).get("result", v.get("out_tail"))
                out.append(f"\n{lb} after the drops: `verify` (structural) exit {v['rc']}, "
                           f"result {res}, {v['wall']:.2f} s.")
            if r.get("restore"):
                v = r["restore"]
                out.append(f"{lb} restore of the newest snapshot (cold): {v['wall']:.2f} s, "
                           + ("identical to the source." if v.get("verified") else
                              f"**differs**: {v.get('diffs')} (rc {v['rc']})."))
            if r.get("layout_after_series"):
                lay = r["layout_after_series"]
                out.append(f"{lb} repo after {m['snapshots']} snapshots: " + ", ".join(
                    f"{k} {v / MB:.1f} MB" for k, v in lay.items() if v >= 1e5) + ".")
        if self.notes or self.dead:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes] + \
                   [f"- {k} stopped: {v}" for k, v in self.dead.items()]
        return "\n".join(out) + "\n"


def _says(s: dict) -> str:
    j = s.get("json")
    if isinstance(j, dict):
        if "dropped" in j:
            d = j["dropped"]
            return (f"dropped {d.get('snapshots')} snapshot, {d.get('blobs_freed')} blobs, "
                    f"{(d.get('bytes_freed') or 0) / MB:.2f} MB freed")
        if "packs_compacted" in j:
            return (f"{j['packs_compacted']} packs rewritten, {j['bytes_copied'] / MB:.1f} MB "
                    f"copied, {j['bytes_reclaimed'] / MB:.1f} MB reclaimed, "
                    f"{j['packs_deleted']} deleted, {j['packs_waiting']} waiting")
    tail = [ln.strip() for ln in s.get("out_tail") or []
            if any(w in ln for w in ("to repack", "this removes", "total prune", "frees",
                                     "freed", "compaction", "unused size"))]
    return "; ".join(tail)[:300].replace("|", "/")


def _commit() -> str | None:
    """The commit of the pinned source (PIT_SRC/COMMIT), else the work tree's HEAD."""
    if PIT_SRC and os.path.exists(os.path.join(PIT_SRC, "COMMIT")):
        with open(os.path.join(PIT_SRC, "COMMIT")) as f:
            return f.read().strip()[:12]
    r = measure.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                     "--short=12", "HEAD"])
    return r.stdout.strip() + (" (+ uncommitted changes, if any)" if r.rc == 0 else "") \
        if r.rc == 0 else None


def _f(v, d):
    return "" if v is None else f"{v:.{d}f}"


def _div(v, d):
    return None if v is None else v / d


def _la(v):
    return "?" if not v else "/".join(f"{x:.2f}" for x in v)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", default=None,
                    help="default /work/bench-data/maint-<scale>; keep it outside the repo")
    ap.add_argument("--only", default="pit,restic,borg")
    ap.add_argument("--snapshots", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="drop-the-oldest rounds")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-verify", action="store_true", help="skip (a), the deep verify")
    ap.add_argument("--no-restore", action="store_true", help="skip the final pit restore")
    a = ap.parse_args(argv)
    a.work = a.work or f"/work/bench-data/maint-{a.scale:g}"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = os.path.abspath(a.work)
    if work == repo_root or work.startswith(repo_root + os.sep):
        ap.error(f"--work must be outside the git repository ({repo_root})")
    try:
        Maint(a).run()
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
