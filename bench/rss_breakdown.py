"""Where a command's memory goes, process by process: peak RSS, PSS and
private/shared bytes of each process in its tree, and the peak of their sum.

    python bench/rss_breakdown.py [--cold] [--every 0.05] -- CMD ARGS...

bench/measure.py gives one number per command (GNU time's %M, or the summed
tree RSS when higher); to cut that number down one needs to know which
process holds what. Every `--every` seconds this reads
/proc/PID/smaps_rollup of the command and of each descendant: Rss, Pss,
Private_* (what the process alone holds) and Shared_* (pages of libraries
and files also mapped elsewhere, counted once per process in a summed RSS).
Prints a table and, with --json, writes the samples' peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from measure import children  # bench/ is the script's directory: on sys.path

FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Anonymous")


def rollup(pid: int) -> dict[str, int] | None:
    """KiB per field of /proc/PID/smaps_rollup; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            out = {}
            for line in f:
                k, _, rest = line.partition(":")
                if k in FIELDS:
                    out[k] = int(rest.split()[0])
            return out
    except (OSError, ValueError, IndexError):
        return None


def label(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    if "resource_tracker" in text:
        return "resource tracker"
    if "forkserver" in text:
        return "forkserver"
    if "spawn_main" in text or "multiprocessing" in text:
        return "worker"
    return os.path.basename(argv[0].decode(errors="replace")) + " " + " ".join(
        a.decode(errors="replace") for a in argv[1:3])


class Sampler:
    """Per-process peaks (by pid) and the peak of the summed Rss and Pss."""

    def __init__(self, root: int, every: float) -> None:
        self.root, self.every = root, every
        self.peaks: dict[int, dict[str, int]] = {}
        self.labels: dict[int, str] = {}
        self.peak_rss_sum = self.peak_pss_sum = 0
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._done.wait(self.every):
            todo, rss, pss = [self.root], 0, 0
            while todo:
                pid = todo.pop()
                todo += children(pid)
                r = rollup(pid)
                if r is None:
                    continue
                if pid not in self.labels:
                    self.labels[pid] = label(pid)
                p = self.peaks.setdefault(pid, dict.fromkeys(FIELDS, 0))
                for k in FIELDS:
                    p[k] = max(p[k], r.get(k, 0))
                rss += r.get("Rss", 0)
                pss += r.get("Pss", 0)
            self.peak_rss_sum = max(self.peak_rss_sum, rss)
            self.peak_pss_sum = max(self.peak_pss_sum, pss)

    def stop(self) -> None:
        self._done.set()
        self._t.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.05)
    ap.add_argument("--cold", action="store_true", help="drop the page cache first (root only)")
    ap.add_argument("--json")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if a.cold:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    s = Sampler(p.pid, a.every)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    s.stop()
    rc = os.waitstatus_to_exitcode(status)
    mib = lambda kib: kib / 1024  # noqa: E731
    print(f"rc {rc}  wall {wall:.2f} s  cpu {ru.ru_utime + ru.ru_stime:.2f} s "
          f"(user {ru.ru_utime:.2f}, sys {ru.ru_stime:.2f})  load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"peak of summed RSS {mib(s.peak_rss_sum):.1f} MiB, of summed PSS {mib(s.peak_pss_sum):.1f} MiB")
    print(f"{'process':<28} {'Rss':>7} {'Pss':>7} {'Shr_Cln':>7} {'Prv_Cln':>7} {'Prv_Drt':>7} {'Anon':>7}  (peak MiB each)")
    for pid, pk in s.peaks.items():
        print(f"{s.labels[pid][:28]:<28} {mib(pk['Rss']):7.1f} {mib(pk['Pss']):7.1f} {mib(pk['Shared_Clean']):7.1f} "
              f"{mib(pk['Private_Clean']):7.1f} {mib(pk['Private_Dirty']):7.1f} {mib(pk['Anonymous']):7.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cmd": cmd, "rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "load": load,
                       "peak_rss_sum_kib": s.peak_rss_sum, "peak_pss_sum_kib": s.peak_pss_sum,
                       "processes": [{"label": s.labels[pid], **pk} for pid, pk in s.peaks.items()]}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
