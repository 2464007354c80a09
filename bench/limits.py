"""Physical limits on the benchmark data: what any engine on this machine is bound by.

Measured in process, one thread, on the same dataset as the ingest bench:
raw read (cold, then warm), metadata walk (cold), BLAKE3, zstd level 3 and
FastCDC (the compiled ``fastcdc.fastcdc_cy``; min = avg/4, max = avg*4 as
pitstore derives them), plus a per-chunk pipeline (chunk, hash, compress each
chunk) that approximates a serial Python engine.  Text files are compressed
whole, one by one; the db and binaries in 1 MiB slices.  MB = 10^6 bytes.

    python bench/limits.py /work/bench-data/data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import blake3
import zstandard
from fastcdc.fastcdc_cy import fastcdc_cy

import measure

MB = measure.MB
SLICE = 1 << 20


def _files(root: str) -> list[tuple[str, str]]:
    """(category, path) for every file, in a stable order."""
    out = []
    for dirpath, dnames, fnames in os.walk(root):
        dnames.sort()
        rel = os.path.relpath(dirpath, root)
        cat = rel.split(os.sep)[0] if rel != "." else "."
        out.extend((cat, os.path.join(dirpath, n)) for n in sorted(fnames))
    return out


def read_all(paths: list[str]) -> int:
    buf = bytearray(SLICE)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def walk_stat(root: str) -> int:
    n = 0
    for dirpath, dnames, fnames in os.walk(root):
        for name in dnames + fnames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def _slices(data: bytes, whole: bool):
    if whole:
        yield data
    else:
        mv = memoryview(data)
        for i in range(0, len(mv), SLICE):
            yield mv[i:i + SLICE]


def measure_limits(root: str, cold: bool = True, chunk_sizes=(16384, 65536)) -> dict:
    files = _files(root)
    paths = [p for _c, p in files]
    res: dict = {"root": root, "files": len(files)}

    if cold:
        res["drop_caches"] = measure.drop_caches()
    t, n = measure.timed(walk_stat, root)
    res["walk_stat"] = {"entries": n, "s": round(t, 3), "cache": "cold" if cold else "warm"}
    if cold:
        measure.drop_caches()
    t, total = measure.timed(read_all, paths)
    res["read_cold" if cold else "read_first"] = {"bytes": total, "s": round(t, 3),
                                                  "MB/s": round(total / MB / t, 1)}
    t, total = measure.timed(read_all, paths)
    res["read_warm"] = {"bytes": total, "s": round(t, 3), "MB/s": round(total / MB / t, 1)}

    zc = zstandard.ZstdCompressor(level=3)
    ops: dict[str, dict[str, list[float]]] = {}   # op -> cat -> [seconds, in bytes, out bytes]

    def add(op, cat, secs, nin, nout=0):
        slot = ops.setdefault(op, {}).setdefault(cat, [0.0, 0, 0])
        slot[0] += secs
        slot[1] += nin
        slot[2] += nout

    pc = time.perf_counter
    for cat, p in files:
        with open(p, "rb") as f:
            data = f.read()
        n = len(data)
        t0 = pc()
        blake3.blake3(data).digest()
        add("blake3", cat, pc() - t0, n)
        out = 0
        t0 = pc()
        for piece in _slices(data, cat == "src"):
            out += len(zc.compress(piece))
        add("zstd3", cat, pc() - t0, n, out)
        for avg in chunk_sizes:
            if n == 0:
                continue
            t0 = pc()
            cuts = [c.length for c in fastcdc_cy(data, avg // 4, avg, avg * 4)]
            add(f"fastcdc_{avg // 1024}k", cat, pc() - t0, n, len(cuts))
            # serial engine estimate: chunk, then BLAKE3 and zstd-3 per chunk
            mv = memoryview(data)
            out = 0
            t0 = pc()
            for c in fastcdc_cy(data, avg // 4, avg, avg * 4):
                piece = mv[c.offset:c.offset + c.length]
                blake3.blake3(piece).digest()
                out += len(zc.compress(piece))
            add(f"pipeline_{avg // 1024}k", cat, pc() - t0, n, out)

    for op, cats in ops.items():
        row = {}
        tot = [0.0, 0, 0]
        for cat, (secs, nin, nout) in sorted(cats.items()):
            row[cat] = _fmt(op, secs, nin, nout)
            tot = [tot[0] + secs, tot[1] + nin, tot[2] + nout]
        row["all"] = _fmt(op, *tot)
        res[op] = row
    return res


def _fmt(op: str, secs: float, nin: int, nout: int) -> dict:
    d = {"s": round(secs, 3), "MB/s": round(nin / MB / secs, 1) if secs else None}
    if op.startswith(("zstd", "pipeline")) and nout:
        d["ratio"] = round(nin / nout, 3)
    if op.startswith("fastcdc") and nout:
        d["chunks"] = nout
        d["avg_bytes"] = round(nin / nout)
    return d


def to_markdown(res: dict) -> str:
    lines = ["| what | src | bin | db | all |", "|---|---|---|---|---|"]
    if "read_cold" in res:
        r = res["read_cold"]
        lines.append(f"| raw read, cold (page cache dropped) | | | | {r['MB/s']} MB/s ({r['s']} s) |")
    r = res["read_warm"]
    lines.append(f"| raw read, warm | | | | {r['MB/s']} MB/s ({r['s']} s) |")
    w = res["walk_stat"]
    lines.append(f"| walk + lstat of {w['entries']} entries, {w['cache']} | | | | {w['s']} s |")
    names = {"blake3": "BLAKE3, one thread, whole file",
             "zstd3": "zstd-3 compress (text per file, others 1 MiB slices)"}
    for op in res:
        if not isinstance(res[op], dict) or "all" not in res[op]:
            continue
        label = names.get(op) or (
            f"FastCDC cy, avg {op.split('_')[1]} (chunk only)" if op.startswith("fastcdc")
            else f"pipeline avg {op.split('_')[1]}: FastCDC + BLAKE3 + zstd-3 per chunk")
        cells = []
        for cat in ("src", "bin", "db", "all"):
            c = res[op].get(cat)
            if not c:
                cells.append("")
                continue
            extra = f" (x{c['ratio']})" if "ratio" in c else ""
            extra += f" ({c['chunks']} chunks)" if "chunks" in c and cat in ("db", "all") else ""
            cells.append(f"{c['MB/s']}{extra}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nMB/s with MB = 10^6 bytes; one pass, one thread, data in memory.\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    res = measure_limits(a.root, cold=not a.warm)
    print(to_markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
