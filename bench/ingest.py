"""Side-by-side ingest benchmark: pitstore vs restic vs borg on one dataset, in one run.

    python bench/ingest.py [--scale 1.0] [--work /work/bench-data] [--no-peers]
                           [--only pit,restic,borg] [--no-limits] [--encrypt]

Steps (every tool backs up the same directory, so all see byte-identical data):

1. generate the dataset (bench/dataset.py) into WORK/data;
2. physical limits on it (bench/limits.py) unless --no-limits;
3. each tool: init, backup 1 (initial, cold page cache);
4. mutate 1 % once (db pages rewritten in place, text files edited, files
   added and deleted); the change set goes to WORK/changes-1.txt;
5. each tool: backup 2 (full scan, cold).  pitstore runs twice on two repos:
   ``pit`` snapshots by full scan, ``pit-cs`` by ``--changes`` (the change set
   a replicator would know);
6. each tool: backup 3, no change (cold), then 3b (warm);
7. each tool: full restore (cold) checked file by file (BLAKE3 of content)
   against the source; ``pit-cs`` is restored too, to prove the change-set
   snapshot is complete;
8. each tool: deep check (restic ``check --read-data``, borg ``check
   --verify-data``, pit ``verify`` when the CLI has it), cold.

"cold" = ``sync; echo 3 > /proc/sys/vm/drop_caches`` just before the step.
MB = 10^6 bytes.  Backup/restore MB/s = logical dataset bytes / wall; check
MB/s = repository bytes / wall.  Output: a markdown report printed and written
to WORK/results.md, everything in WORK/results.json, logs in WORK/logs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import dataset
import limits
import measure
import peers
from pitdriver import Pit, pit_available

MB = measure.MB
MIB = measure.MIB

OPS = [  # key, label, cache
    ("init", "init", "n/a"),
    ("backup1", "backup 1, initial", "cold"),
    ("backup2", "backup 2, after 1 % mutate", "cold"),
    ("backup3", "backup 3, no change", "cold"),
    ("backup3w", "backup 3b, no change", "warm"),
    ("restore", "full restore (then verified)", "cold"),
    ("check", "deep check", "cold"),
]
OP_LABEL = {k: l for k, l, _c in OPS}


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = os.path.abspath(args.work)
        self.data = os.path.join(self.work, "data")
        self.logs = os.path.join(self.work, "logs")
        self.scratch = os.path.join(self.work, "scratch")
        self.repos = os.path.join(self.work, "repos")
        self.restore_dir = os.path.join(self.work, "restore")
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.meta: dict = {}
        self.dead: dict[str, str] = {}       # tool label -> why it stopped
        self.sizes: dict[str, dict] = {}     # label -> {after step: disk bytes}
        self.pit_stats: dict[str, dict] = {}

    # ----------------------------------------------------------------- set-up
    def prepare(self):
        for d in (self.logs, self.scratch, self.repos, self.restore_dir):
            measure.rmtree(d)
            os.makedirs(d)
        self.meta.update(
            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            host=platform.node(), kernel=platform.release(), python=platform.python_version(),
            cpus=os.cpu_count(), cpu_model=_cpu_model(), mem_gib=_mem_gib(),
            loadavg_start=os.getloadavg(), scale=self.a.scale, seed=self.a.seed,
            mutate_seed=self.a.mutate_seed, work=self.work)

    def tools(self) -> list:
        only = set(self.a.only.split(",")) if self.a.only else {"pit", "restic", "borg"}
        ts = []
        if "pit" in only:
            if pit_available():
                ts.append(Pit(os.path.join(self.repos, "pit"), self.scratch, self.logs,
                              label="pit", avg_chunk_size=self.a.avg_chunk_size, encrypt=self.a.encrypt))
                if not self.a.no_changeset:
                    ts.append(Pit(os.path.join(self.repos, "pit-cs"), self.scratch, self.logs,
                                  label="pit-cs", avg_chunk_size=self.a.avg_chunk_size,
                                  encrypt=self.a.encrypt))
            else:
                self.notes.append("pitstore skipped: `pit --help` does not run yet.")
        want_peers = not self.a.no_peers and only & {"restic", "borg"}
        if want_peers:
            versions = peers.ensure_installed()
            self.meta["peer_versions"] = versions
            for key, cls in (("restic", peers.Restic), ("borg", peers.Borg)):
                if key not in only:
                    continue
                if versions.get(key):
                    ts.append(cls(os.path.join(self.repos, key), self.scratch, self.logs))
                else:
                    self.notes.append(f"{key} skipped: not installed and apt-get failed.")
        return ts

    # ------------------------------------------------------------------ steps
    def step(self, tool, key: str, fn, *, cold: bool, mb_basis: int | None = None,
             op_label: str | None = None, extra: dict | None = None):
        """Run one timed step of a tool and record a row; a failure stops the tool."""
        if tool.label in self.dead:
            return None
        cache = "n/a"
        if cold:
            cache = "cold" if measure.drop_caches() else "warm (drop_caches refused)"
        elif key != "init":
            cache = "warm"
        load = os.getloadavg()[0]
        print(f"[{time.strftime('%H:%M:%S')}] {tool.label}: {op_label or OP_LABEL.get(key, key)} "
              f"({cache})", file=sys.stderr, flush=True)
        row = {"tool": tool.name, "label": tool.label, "version": tool.version, "op": key,
               "operation": op_label or OP_LABEL.get(key, key), "cache": cache,
               "load1_before": round(load, 2)}
        try:
            r = fn()
        except Exception as e:  # a tool that cannot do a step is reported, not fatal
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
            self.rows.append(row)
            self.dead[tool.label] = row["error"]
            print(f"    FAILED: {row['error']}", file=sys.stderr)
            return None
        size = tool.size()
        prev = self.sizes.setdefault(tool.label, {})
        growth = size["disk"] - prev["last"] if "last" in prev else None
        prev[key] = size["disk"]
        prev["last"] = size["disk"]
        row.update(ok=r.rc == 0, rc=r.rc, wall=round(r.wall, 3), cpu=round(r.cpu, 3),
                   user=round(r.user, 3), sys=round(r.sys, 3), maxrss_mib=round(r.maxrss_mib, 1),
                   repo_disk=size["disk"], repo_apparent=size["apparent"], growth=growth,
                   mbps=round(mb_basis / MB / r.wall, 1) if mb_basis and r.wall else None)
        if extra:
            row.update(extra)
        snap = getattr(tool, "last_snapshot", None)
        if key.startswith("backup") and isinstance(snap, dict):
            row["snapshot_stats"] = snap.get("stats")
        self.rows.append(row)
        if r.rc != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
            row["error"] = " | ".join(tail)
            self.dead[tool.label] = row["error"]
            print(f"    FAILED rc={r.rc}: {row['error']}", file=sys.stderr)
        else:
            print(f"    {r.wall:.2f} s wall, {r.cpu:.2f} s CPU, {r.maxrss_mib:.0f} MiB RSS, "
                  f"repo {size['disk'] / MB:.1f} MB", file=sys.stderr)
        return row

    def restore_and_verify(self, tool, expected: dict, nbytes: int):
        target = os.path.join(self.restore_dir, tool.label)
        measure.rmtree(target)
        os.makedirs(target)
        row = self.step(tool, "restore", lambda: tool.restore(target), cold=True,
                        mb_basis=nbytes)
        if row and row["ok"]:
            try:
                got = measure.tree_digest(tool.restored_root(target, self.data))
                diffs = measure.compare_digests(expected, got)
            except FileNotFoundError as e:
                diffs = [str(e)]
            row["verified"] = not diffs
            row["verify_diffs"] = diffs[:20]
            if diffs:
                row["ok"] = False
                self.dead[tool.label] = f"restore differs from source: {diffs[:3]}"
                print(f"    VERIFY FAILED: {diffs[:5]}", file=sys.stderr)
            else:
                print(f"    verified: {len(got)} files identical", file=sys.stderr)
        measure.rmtree(target)

    # -------------------------------------------------------------------- run
    def run(self):
        a = self.a
        self.prepare()
        t_start = time.perf_counter()
        print(f"generating dataset (scale {a.scale}) in {self.data}", file=sys.stderr)
        gen = dataset.generate(self.data, seed=a.seed, scale=a.scale)
        self.meta["dataset"] = gen
        print(f"    {gen}", file=sys.stderr)

        if not a.no_limits:
            print("measuring physical limits", file=sys.stderr)
            self.meta["limits"] = limits.measure_limits(self.data)

        tools = self.tools()
        self.meta["tools"] = {t.label: {"name": t.name, "version": t.version, "repo": t.repo,
                                        "source": getattr(t, "source_digest", None)}
                              for t in tools}
        nbytes = gen["bytes"]

        for t in tools:
            self.step(t, "init", t.init, cold=False)
            self.step(t, "backup1", lambda t=t: t.backup(self.data), cold=True, mb_basis=nbytes)
        self._pit_stats(tools, "after_backup1")

        muts = dataset.scaled_mutation(a.scale)
        changes = os.path.join(self.work, f"changes-{a.mutate_seed}.txt")
        changed = dataset.mutate(self.data, a.mutate_seed, changes_file=changes, **muts)
        after = dataset.summarize(self.data)
        npages = round(dataset.DB_BYTES * a.scale) // dataset.PAGE_SIZE
        self.meta["mutation"] = dict(muts, seed=a.mutate_seed, changed_paths=len(changed),
                                     db_pages=npages,
                                     db_pages_rewritten=min(npages, round(npages * muts["fraction"])),
                                     changes_file=changes, dataset_after=after)
        nbytes = after["bytes"]

        for t in tools:
            if t.label == "pit-cs":
                self.step(t, "backup2", lambda t=t: t.backup(self.data, changes=changes),
                          cold=True, mb_basis=nbytes,
                          op_label="backup 2, after 1 % mutate, `--changes` (change set)")
            else:
                self.step(t, "backup2", lambda t=t: t.backup(self.data), cold=True,
                          mb_basis=nbytes)
        self._pit_stats(tools, "after_backup2")

        empty = os.path.join(self.work, "changes-empty.txt")
        open(empty, "w").close()
        for t in tools:
            if t.label == "pit-cs":
                self.step(t, "backup3", lambda t=t: t.backup(self.data, changes=empty),
                          cold=True, mb_basis=nbytes,
                          op_label="backup 3, no change, `--changes` (empty set)")
                continue
            self.step(t, "backup3", lambda t=t: t.backup(self.data), cold=True, mb_basis=nbytes)
            self.step(t, "backup3w", lambda t=t: t.backup(self.data), cold=False,
                      mb_basis=nbytes)

        print("hashing the source for restore verification", file=sys.stderr)
        expected = measure.tree_digest(self.data)
        for t in tools:
            self.restore_and_verify(t, expected, nbytes)

        for t in tools:
            if t.label == "pit-cs" or a.no_check:
                continue
            if isinstance(t, Pit) and t.check_command() is None:
                self.notes.append("pit deep check skipped: the CLI has no `verify` command yet.")
                continue
            repo_bytes = t.size()["apparent"]
            self.step(t, "check", t.check, cold=True, mb_basis=repo_bytes)
        self._pit_stats(tools, "final")
        self.meta["pit_layout"] = {t.label: t.layout() for t in tools if isinstance(t, Pit)}

        self.meta["loadavg_end"] = os.getloadavg()
        self.meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
        self.meta["dead"] = self.dead
        self.write()

    def _pit_stats(self, tools, when: str):
        for t in tools:
            if isinstance(t, Pit) and t.label not in self.dead:
                self.pit_stats.setdefault(t.label, {})[when] = t.stats()

    # ----------------------------------------------------------------- report
    def write(self):
        md = self.markdown()
        print(md)
        with open(os.path.join(self.work, "results.md"), "w") as f:
            f.write(md)
        with open(os.path.join(self.work, "results.json"), "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows, "sizes": self.sizes,
                       "pit_stats": self.pit_stats, "notes": self.notes}, f, indent=1,
                      default=str)
        print(f"wrote {self.work}/results.md and results.json", file=sys.stderr)

    def _row(self, label: str, op: str) -> dict | None:
        for r in self.rows:
            if r["label"] == label and r["op"] == op:
                return r
        return None

    def markdown(self) -> str:
        m = self.meta
        ds = m["dataset"]
        mu = m.get("mutation", {})
        out = [f"# pitstore ingest benchmark ({m['started']})", ""]
        out.append(f"- Machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['mem_gib']} GiB RAM, "
                   f"kernel {m['kernel']}, Python {m['python']}. Load average (1/5/15 min) "
                   f"at start {_la(m['loadavg_start'])}, at end {_la(m.get('loadavg_end'))}.")
        vers = ", ".join(f"{k} {v['version']}" + (f" (store/*.py digest {v['source']})"
                                                   if v.get("source") else "")
                         for k, v in m.get("tools", {}).items())
        out.append(f"- Tools: {vers or 'none'}.")
        out.append(f"- Dataset: scale {m['scale']}, seed {m['seed']}: {ds['files']} files, "
                   f"{ds['dirs']} dirs, {ds['bytes']:,} B ({ds['bytes'] / MIB:.1f} MiB), "
                   f"generated in {ds['seconds']} s.")
        if mu:
            out.append(f"- Mutation (seed {mu['seed']}): {mu['db_pages_rewritten']} of "
                       f"{mu['db_pages']} db pages rewritten in place, {mu['text_files']} text "
                       f"files edited, {mu['add']} added, {mu['delete']} deleted "
                       f"({mu['changed_paths']} paths in the change set).")
        out.append("- cold = page cache dropped just before the step; MB = 10^6 B; backup and "
                   "restore MB/s = dataset bytes / wall; check MB/s = repo bytes / wall; "
                   "repo size = bytes allocated on disk (du).")
        out.append(f"- Whole run: {m.get('total_seconds')} s.")
        out += ["", "## Every step", "",
                "| tool | repo | operation | cache | wall s | CPU s | max RSS MiB | MB/s | "
                "repo size MB | repo growth MB | result |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            result = "ok" if r.get("ok") else f"FAILED: {str(r.get('error', ''))[:120]}"
            if r["op"] == "restore" and r.get("ok"):
                result = "ok, verified identical" if r.get("verified") else result
            out.append("| " + " | ".join([
                f"{r['tool']} {r['version'] or ''}".strip(), r["label"], r["operation"],
                r["cache"], _f(r.get("wall"), 2), _f(r.get("cpu"), 2),
                _f(r.get("maxrss_mib"), 1), _f(r.get("mbps"), 1),
                _f(r["repo_disk"] / MB if r.get("repo_disk") is not None else None, 1),
                _f(r["growth"] / MB if r.get("growth") is not None else None, 1),
                result]) + " |")
        pit_rows = [r for r in self.rows if r.get("snapshot_stats")]
        if pit_rows:
            out += ["", "## pitstore snapshots as pit reports them", "",
                    "| repo | operation | mode | files read | MB read | new chunks | new raw MB "
                    "| new stored MB | pit's own duration s |", "|---|---|---|---|---|---|---|---|---|"]
            for r in pit_rows:
                s = r["snapshot_stats"]
                out.append("| " + " | ".join([
                    r["label"], r["operation"], str(s.get("mode", "")),
                    str(s.get("files_read", "")), _f(_div(s.get("bytes_read"), MB), 1),
                    str(s.get("new_chunks", "")), _f(_div(s.get("new_bytes"), MB), 2),
                    _f(_div(s.get("new_stored"), MB), 2), _f(s.get("duration"), 2)]) + " |")
        for label, lay in m.get("pit_layout", {}).items():
            if lay:
                parts = ", ".join(f"{k} {v / MB:.1f} MB" for k, v in lay.items() if v >= 1e5)
                out.append(f"\n{label} repo on disk at the end: {parts}.")
        out += ["", "## pitstore against the peers (wall time; ratio > 1 means pitstore is "
                "faster or smaller)", ""]
        out += self.comparison()
        if "limits" in m:
            out += ["", "## Physical limits on the same data (one thread, in process)", "",
                    limits.to_markdown(m["limits"]).rstrip()]
        if self.notes or self.dead:
            out += ["", "## Notes", ""]
            out += [f"- {n}" for n in self.notes]
            out += [f"- {k} stopped: {v}" for k, v in self.dead.items()]
        return "\n".join(out) + "\n"

    def comparison(self) -> list[str]:
        lines = ["| operation | pitstore | restic | borg | restic ÷ pitstore | "
                 "borg ÷ pitstore |", "|---|---|---|---|---|---|"]

        def cmp(label, pit_val, r_val, b_val, unit, digits=2):
            def fmt(v):
                return "–" if v is None else f"{v:.{digits}f} {unit}"

            def ratio(v):
                return "–" if v is None or not pit_val else f"{v / pit_val:.2f}"
            lines.append(f"| {label} | {fmt(pit_val)} | {fmt(r_val)} | {fmt(b_val)} | "
                         f"{ratio(r_val)} | {ratio(b_val)} |")

        def wall(label, op):
            r = self._row(label, op)
            return r["wall"] if r and r.get("ok") else None

        for key, label, cache in OPS:
            cmp(f"{label} ({cache})", wall("pit", key), wall("restic", key),
                wall("borg", key), "s")
            if key == "backup2" and self._row("pit-cs", "backup2"):
                cmp("backup 2 with `--changes` (pit-cs) vs peers' full backup 2",
                    wall("pit-cs", "backup2"), wall("restic", "backup2"),
                    wall("borg", "backup2"), "s")
            if key == "backup3" and self._row("pit-cs", "backup3"):
                cmp("backup 3 with empty `--changes` (pit-cs) vs peers' backup 3",
                    wall("pit-cs", "backup3"), wall("restic", "backup3"),
                    wall("borg", "backup3"), "s")

        def size(label, key):
            s = self.sizes.get(label, {})
            return s[key] / MB if key in s else None

        def growth(label):
            s = self.sizes.get(label, {})
            return (s["backup2"] - s["backup1"]) / MB if "backup2" in s and "backup1" in s \
                else None
        cmp("repo size after backup 1", size("pit", "backup1"), size("restic", "backup1"),
            size("borg", "backup1"), "MB", 1)
        cmp("repo growth from the 1 % change", growth("pit"), growth("restic"),
            growth("borg"), "MB", 1)
        if "pit-cs" in self.sizes:
            cmp("repo growth from the 1 % change, `--changes` (pit-cs)", growth("pit-cs"),
                growth("restic"), growth("borg"), "MB", 1)
        cmp("repo size at the end", size("pit", "last"), size("restic", "last"),
            size("borg", "last"), "MB", 1)
        return lines


def _f(v, digits):
    return "" if v is None else f"{v:.{digits}f}"


def _div(v, d):
    return None if v is None else v / d


def _la(v):
    return "?" if not v else "/".join(f"{x:.2f}" for x in v)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="dataset size factor (1.0 = ~1 GiB; 0.05 for a quick run)")
    ap.add_argument("--work", default="/work/bench-data",
                    help="data, repos, logs and results go here (keep it outside the repo)")
    ap.add_argument("--no-peers", action="store_true", help="do not run restic and borg")
    ap.add_argument("--only", help="comma list of pit,restic,borg")
    ap.add_argument("--no-limits", action="store_true", help="skip bench/limits.py")
    ap.add_argument("--no-check", action="store_true", help="skip the deep checks")
    ap.add_argument("--no-changeset", action="store_true",
                    help="skip the second pitstore repo (the --changes snapshot)")
    ap.add_argument("--avg-chunk-size", type=int, help="pit init --avg-chunk-size")
    ap.add_argument("--encrypt", action="store_true",
                    help="pit init --encrypt (a key file in the scratch directory): encryption at rest")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--mutate-seed", type=int, default=1)
    a = ap.parse_args(argv)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = os.path.abspath(a.work)
    if work == repo_root or work.startswith(repo_root + os.sep):
        ap.error(f"--work must be outside the git repository ({repo_root})")
    try:
        Bench(a).run()
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
