"""Pick pitstore's default average chunk size: ingest speed vs what a scattered change costs.

    python bench/chunksize.py [--scale 1.0] [--what db|all] [--sizes 8,16,32,64]
                              [--work /work/bench-data]

For each average size (KiB; min = avg/4, max = avg*4 as ``pit init`` derives):

1. ``pit init --avg-chunk-size`` a repo and snapshot the data (cold cache):
   ingest wall time, MB/s, CPU, repo size, chunk count from ``pit stats --json``;
2. after one mutation (1 % of the db pages rewritten in place; with --what all
   also text edits, adds, deletes), snapshot again (full scan, cold): wall time
   and the bytes the change added to the repo.

A model row per size is computed in process, whether or not pit runs: the
chunks FastCDC cuts (compiled ``fastcdc_cy``), how many distinct ones the
mutation creates, and their raw and zstd-3 (per chunk) bytes.  That is what
an ideal dedup store with that chunker must add, before any metadata.
The default scope is the db file alone (384 MiB at scale 1), the case that
decides the size.  Results: WORK/chunksize/results.md and results.json.
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

import dataset
import measure
from pitdriver import Pit, find_number, pit_available

MB = measure.MB
MIB = measure.MIB


def chunk_ids(path: str, avg: int) -> dict[bytes, int]:
    """{BLAKE3 id: length} of the FastCDC chunks of a file (mmap, not read whole)."""
    import mmap
    out = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            mv = memoryview(mm)
            try:
                for c in fastcdc_cy(mv, avg // 4, avg, avg * 4):
                    piece = mv[c.offset:c.offset + c.length]
                    out[blake3.blake3(piece).digest()] = c.length
                    del piece
            finally:
                mv.release()
    return out


def tree_chunks(root: str, avg: int) -> dict[bytes, int]:
    ids: dict[bytes, int] = {}
    for dirpath, _d, files in os.walk(root):
        for name in files:
            ids.update(chunk_ids(os.path.join(dirpath, name), avg))
    return ids


def new_chunk_bytes(root: str, avg: int, old: set[bytes]) -> dict:
    """Raw and zstd-3 bytes of the chunks under root that are not in ``old``."""
    import mmap
    zc = zstandard.ZstdCompressor(level=3)
    seen = set()
    raw = comp = n = 0
    for dirpath, _d, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    continue
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    mv = memoryview(mm)
                    for c in fastcdc_cy(mv, avg // 4, avg, avg * 4):
                        piece = mv[c.offset:c.offset + c.length]
                        cid = blake3.blake3(piece).digest()
                        if cid not in old and cid not in seen:
                            seen.add(cid)
                            n += 1
                            raw += c.length
                            comp += min(c.length, len(zc.compress(piece)))
                        del piece
                    mv.release()
    return {"new_chunks": n, "new_raw": raw, "new_zstd": comp}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--what", choices=("db", "all"), default="db")
    ap.add_argument("--sizes", default="8,16,32,64", help="average chunk sizes in KiB")
    ap.add_argument("--work", default="/work/bench-data")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--mutate-seed", type=int, default=1)
    ap.add_argument("--no-pit", action="store_true", help="model rows only")
    a = ap.parse_args(argv)

    sizes = [int(s) * 1024 for s in a.sizes.split(",")]
    base = os.path.join(os.path.abspath(a.work), "chunksize")
    data = os.path.join(base, "data")
    logs = os.path.join(base, "logs")
    scratch = os.path.join(base, "scratch")
    for d in (logs, scratch, os.path.join(base, "repos")):
        measure.rmtree(d)
        os.makedirs(d)
    parts = ("db",) if a.what == "db" else ("src", "bin", "db")
    print(f"generating {a.what} (scale {a.scale}) in {data}", file=sys.stderr)
    gen = dataset.generate(data, seed=a.seed, scale=a.scale, parts=parts)
    nbytes = gen["bytes"]
    meta = {"scale": a.scale, "what": a.what, "dataset": gen, "loadavg_start": os.getloadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows = {avg: {"avg": avg} for avg in sizes}

    # model, before: the chunk ids of the original data
    old_ids = {}
    for avg in sizes:
        t, ids = measure.timed(tree_chunks, data, avg)
        old_ids[avg] = set(ids)
        rows[avg].update(model_chunks=len(ids), model_chunk_s=round(t, 2),
                         model_avg_bytes=round(sum(ids.values()) / max(1, len(ids))))

    use_pit = not a.no_pit and pit_available()
    pits = {}
    if use_pit:
        for avg in sizes:
            p = Pit(os.path.join(base, "repos", f"avg{avg // 1024}k"), scratch, logs,
                    label=f"avg{avg // 1024}k", avg_chunk_size=avg)
            pits[avg] = p
            r = p.init()
            if r.rc != 0:
                rows[avg]["error"] = f"init: {r.stderr.strip()[-300:]}"
                continue
            measure.drop_caches()
            print(f"[{time.strftime('%H:%M:%S')}] pit avg {avg // 1024} KiB: ingest",
                  file=sys.stderr, flush=True)
            r = p.backup(data)
            if r.rc != 0:
                rows[avg]["error"] = f"snapshot: {r.stderr.strip()[-300:]}"
                continue
            st = p.stats()
            rows[avg].update(ingest_s=round(r.wall, 2), ingest_cpu=round(r.cpu, 2),
                             ingest_rss_mib=round(r.maxrss_mib, 1),
                             ingest_mbps=round(nbytes / MB / r.wall, 1),
                             repo1=measure.du(p.repo)["disk"], stats1=st,
                             chunks1=_chunks(st))
    else:
        meta["note"] = "pit not run (no --no-pit given but `pit --help` fails)" \
            if not a.no_pit else "pit not run (--no-pit)"

    muts = dataset.scaled_mutation(a.scale)
    if a.what == "db":
        muts.update(text_files=0, add=0, delete=0)
    changed = dataset.mutate(data, a.mutate_seed, **muts)
    meta["mutation"] = dict(muts, changed_paths=len(changed))

    for avg in sizes:
        t, m = measure.timed(new_chunk_bytes, data, avg, old_ids[avg])
        rows[avg].update({f"model_{k}": v for k, v in m.items()})

    for avg, p in pits.items():
        if "error" in rows[avg]:
            continue
        measure.drop_caches()
        print(f"[{time.strftime('%H:%M:%S')}] pit avg {avg // 1024} KiB: snapshot after change",
              file=sys.stderr, flush=True)
        r = p.backup(data)
        if r.rc != 0:
            rows[avg]["error"] = f"snapshot 2: {r.stderr.strip()[-300:]}"
            continue
        st = p.stats()
        repo2 = measure.du(p.repo)["disk"]
        snap = (p.last_snapshot or {}).get("stats") or {}
        rows[avg].update(snap2_s=round(r.wall, 2), snap2_cpu=round(r.cpu, 2), repo2=repo2,
                         added=repo2 - rows[avg]["repo1"], stats2=st, chunks2=_chunks(st),
                         snap2_new_chunks=snap.get("new_chunks"),
                         snap2_new_stored=snap.get("new_stored"),
                         layout2=p.layout())

    meta["loadavg_end"] = os.getloadavg()
    md = to_markdown(meta, rows, sizes, use_pit)
    print(md)
    with open(os.path.join(base, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(base, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": list(rows.values())}, f, indent=1, default=str)
    print(f"wrote {base}/results.md and results.json", file=sys.stderr)
    return 0


def _chunks(stats: dict):
    try:
        return stats["blobs"]["chunk"]["count"]
    except (KeyError, TypeError):
        pass
    for words in (("chunk", "count"), ("chunks",), ("n", "chunk"), ("chunk",)):
        n = find_number(stats, *words)
        if n is not None:
            return n
    return None


def _la(v):
    return "/".join(f"{x:.2f}" for x in v)


def _f(v, d=1, div=1):
    return "" if v is None else f"{v / div:.{d}f}"


def to_markdown(meta, rows, sizes, use_pit) -> str:
    ds, mu = meta["dataset"], meta["mutation"]
    out = [f"# Chunk size sweep ({meta['started']})", "",
           f"- Data: `{meta['what']}` at scale {meta['scale']}: {ds['files']} files, "
           f"{ds['bytes'] / MIB:.1f} MiB. Change: {mu['fraction'] * 100:g} % of db pages "
           f"rewritten in place, {mu['text_files']} text files edited, {mu['add']} added, "
           f"{mu['delete']} deleted.",
           f"- Load average at start {_la(meta['loadavg_start'])}, end {_la(meta['loadavg_end'])}. "
           "MB = 10^6 B. Ingest and snapshot 2 are cold-cache wall times of "
           "`pit snapshot` (full scan).",
           "- Model = FastCDC (min avg/4, max avg*4) + BLAKE3 in process: chunks cut, and the "
           "distinct new chunks the change creates (raw, and zstd-3 per chunk).", ""]
    if use_pit:
        out += ["| avg KiB | ingest s | ingest MB/s | CPU s | RSS MiB | repo MB | chunks (pit stats) "
                "| snapshot 2 s | repo growth from change MB | pit: new blobs, stored MB "
                "| index MB | model chunks | model new chunks | model new raw MB "
                "| model new zstd MB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for avg in sizes:
            r = rows[avg]
            out.append("| " + " | ".join([
                str(avg // 1024), _f(r.get("ingest_s"), 2), _f(r.get("ingest_mbps")),
                _f(r.get("ingest_cpu"), 2), _f(r.get("ingest_rss_mib")),
                _f(r.get("repo1"), 1, MB), str(r.get("chunks2") or r.get("chunks1") or ""),
                _f(r.get("snap2_s"), 2), _f(r.get("added"), 2, MB),
                f"{r.get('snap2_new_chunks', '')}, {_f(r.get('snap2_new_stored'), 2, MB)}",
                _f((r.get("layout2") or {}).get("index"), 1, MB),
                str(r["model_chunks"]), str(r["model_new_chunks"]),
                _f(r["model_new_raw"], 2, MB), _f(r["model_new_zstd"], 2, MB)]) + " |")
            if "error" in r:
                out.append(f"| {avg // 1024} | FAILED: {r['error'][:200]} |")
    else:
        out += ["| avg KiB | chunks | mean chunk B | new chunks after change | new raw MB "
                "| new zstd-3 MB |", "|---|---|---|---|---|---|"]
        for avg in sizes:
            r = rows[avg]
            out.append(f"| {avg // 1024} | {r['model_chunks']} | {r['model_avg_bytes']} | "
                       f"{r['model_new_chunks']} | {_f(r['model_new_raw'], 2, MB)} | "
                       f"{_f(r['model_new_zstd'], 2, MB)} |")
        out += ["", f"_{meta.get('note', '')}_"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
