"""Deterministic benchmark dataset: source tree, random binaries, a paged database.

The mix is the one restic 0.14 and borg 1.2.4 were first measured on (the peer baseline):

- ``src/``  ~20,000 source-like text files, ~300 MiB, lognormal sizes (mean
  ~15 KiB) in ~1,500 nested directories; zstd-3 compresses them ~2.8x.
- ``bin/``  11 incompressible random files, ~300 MiB in all.
- ``db/main.db``  384 MiB of 8 KiB pages (header, text and random records,
  zero-filled free space); zstd-3 compresses it ~2.5x.

``mutate`` is the "1 %" change a replicator would see: it rewrites a fraction of
the db pages in place (pwrite at the page offset, as a database engine does),
edits some text files, adds and deletes a few, and returns the change set as
absolute paths.

Everything comes from ``random.Random`` seeded per component, so the same seed
and scale give byte-identical trees (file mtimes are fixed too).  Generation
streams: no more than a few MiB is held in memory at once.  stdlib only.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import sys
import time
import zlib

MIB = 1 << 20
PAGE_SIZE = 8192
BASE_MTIME = 1_700_000_000          # 2023-11-14, fixed so runs are identical
MUTATION_MTIME_STEP = 86_400        # mutate(seed) stamps BASE + (seed+1) days

# Full-scale (scale=1.0) shape.
SRC_FILES = 20_000
SRC_BYTES = 300 * MIB
SRC_DIRS = 1_500
BIN_FILES = 11
BIN_BYTES = 300 * MIB
DB_BYTES = 384 * MIB

# Fraction of a db page's payload made of random (incompressible) records;
# tuned so zstd-3 gives ~2.5x on the db file as a whole.
DB_RANDOM_SHARE = 0.24

_SYLLABLES = ("ka to ri mu se lo an ex in or un de re co pro ma ne qu ix ur "
              "ba el fi go hu ja ki lu mo nu pa ra si tu va we xy zo st tr").split()
_KEYWORDS = ("if else for while return def class import from const let var "
             "int char void struct static public private self this None True "
             "False null try except finally with as yield async await break "
             "continue switch case default new delete sizeof unsigned").split()
_WORDS = ("the a of to and in is it that for on with as by this be are from "
          "at or an not value list index count error buffer file path node "
          "user data result state config cache size offset length table row "
          "check update create remove handle parse write read open close "
          "request response server client key hash chunk pack tree").split()
_EXTS = (".py", ".c", ".h", ".js", ".go", ".rs", ".java", ".md", ".txt", ".sql")


# --------------------------------------------------------------------------- text

def _identifiers(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        parts = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3)))
                 for _ in range(rng.randint(1, 3))]
        out.append(("_" if rng.random() < 0.5 else "").join(parts)
                   if rng.random() < 0.7 else
                   "".join(p.capitalize() for p in parts))
    return out


def _line_pool(rng: random.Random, n: int = 1 << 16, n_idents: int = 200
               ) -> list[str]:
    """Source-like lines; files are random draws from this pool.

    ``n_idents`` sets the vocabulary and so the compressibility (200 gives
    zstd-3 about 2.8x on files of this size mix)."""
    idents = _identifiers(rng, n_idents)
    pool = []
    for _ in range(n):
        indent = " " * (4 * min(int(rng.expovariate(0.8)), 6))
        kind = rng.random()
        if kind < 0.08:
            pool.append("\n")
            continue
        if kind < 0.25:       # comment
            words = rng.choices(_WORDS, k=rng.randint(3, 12))
            body = "# " + " ".join(words)
        elif kind < 0.45:     # assignment with literal
            lit = rng.choices((
                str(rng.randint(0, 1 << rng.randint(2, 16))),
                f'"{" ".join(rng.choices(_WORDS, k=rng.randint(1, 5)))}"',
                f"0x{rng.getrandbits(32):08x}",
                f"{rng.random():.3f}",
            ), weights=(4, 4, 1, 1))[0]
            body = f"{rng.choice(idents)} = {lit}"
        elif kind < 0.75:     # call
            args = ", ".join(rng.choices(idents, k=rng.randint(0, 4)))
            body = f"{rng.choice(idents)}.{rng.choice(idents)}({args})"
        else:                 # keyword statement
            toks = [rng.choice(_KEYWORDS)] + rng.choices(idents, k=rng.randint(1, 4))
            body = " ".join(toks) + rng.choice((":", " {", ";", ""))
        pool.append(indent + body + "\n")
    return pool


def _text(rng: random.Random, pool: list[str], size: int, header: str = "") -> bytes:
    """About ``size`` bytes (exactly, unless size < len(header)) of pooled lines."""
    parts = [header]
    have = len(header)
    while have < size:
        need = max(8, (size - have) // 30 + 8)
        lines = rng.choices(pool, k=need)
        parts.extend(lines)
        have += sum(map(len, lines))
    data = "".join(parts).encode()
    return data[:max(size, len(header.encode()))]


def _lognormal_sizes(rng: random.Random, n: int, total: int, sigma: float = 1.1,
                     lo: int = 64) -> list[int]:
    """n sizes, lognormally distributed, summing exactly to ``total``."""
    raw = [rng.lognormvariate(0.0, sigma) for _ in range(n)]
    scale = (total - lo * n) / sum(raw)
    sizes = [lo + int(r * scale) for r in raw]
    sizes[-1] += total - sum(sizes)
    return sizes


# ----------------------------------------------------------------------------- db

_PAGE_HDR = struct.Struct("<4sIQBHHI")   # magic, page no, lsn, type, nrec, used, crc


def _db_page(rng: random.Random, pool: list[str], pageno: int, lsn: int) -> bytes:
    """One 8 KiB page: header, records packed from the front, zeros after."""
    body_cap = PAGE_SIZE - _PAGE_HDR.size
    target = int(body_cap * rng.uniform(0.35, 0.95))
    recs = []
    used = 0
    while used < target:
        if rng.random() < DB_RANDOM_SHARE:
            rec = rng.randbytes(rng.randint(16, 240))
        else:                 # a "row": id, a few text columns
            cols = [str(rng.getrandbits(40))] + [
                rng.choice(pool).strip() for _ in range(rng.randint(1, 4))]
            rec = "|".join(cols).encode()[:600]
        rec = struct.pack("<H", len(rec)) + rec
        if used + len(rec) > body_cap:
            break
        recs.append(rec)
        used += len(rec)
    body = b"".join(recs)
    body += bytes(body_cap - len(body))
    crc = zlib.crc32(body)
    hdr = _PAGE_HDR.pack(b"PITD", pageno, lsn, 1 + (pageno % 3), len(recs), used, crc)
    return hdr + body


# ---------------------------------------------------------------------- generate

def _rng(seed: int, what: str) -> random.Random:
    return random.Random(f"{seed}:{what}")


def _makedirs_tree(rng: random.Random, root: str, n: int) -> list[str]:
    """n nested directories under root; returns their relative paths."""
    dirs = [""]
    names = _identifiers(rng, 600)
    for i in range(n):
        parent = dirs[min(len(dirs) - 1, int(rng.expovariate(1.0 / max(1, len(dirs) / 3))))
                      ] if rng.random() < 0.7 else rng.choice(dirs)
        d = os.path.join(parent, f"{rng.choice(names)}{i}")
        dirs.append(d)
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    return dirs


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _set_tree_mtimes(root: str, mtime: int) -> None:
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.utime(os.path.join(dirpath, name), (mtime, mtime))
        os.utime(dirpath, (mtime, mtime))


def generate(root: str, seed: int = 42, scale: float = 1.0, quiet: bool = True,
             parts: tuple[str, ...] = ("src", "bin", "db")) -> dict:
    """Create the dataset under ``root`` (which is replaced). Returns a summary.

    ``parts`` picks a subset of src/bin/db; each part's bytes do not depend
    on which others are generated."""
    t0 = time.perf_counter()
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    root = os.path.abspath(root)

    pool = _line_pool(_rng(seed, "pool"))
    if "src" in parts:
        _gen_src(root, seed, scale, pool)
    if "bin" in parts:
        _gen_bin(root, seed, scale)
    if "db" in parts:
        _gen_db(root, seed, scale, pool)

    _set_tree_mtimes(root, BASE_MTIME)
    summary = summarize(root)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if not quiet:
        print(f"generated {root}: {summary}", file=sys.stderr)
    return summary


def _gen_src(root: str, seed: int, scale: float, pool: list[str]) -> None:
    rng = _rng(seed, "src")
    src = os.path.join(root, "src")
    os.makedirs(src)
    n_files = max(1, round(SRC_FILES * scale))
    dirs = _makedirs_tree(rng, src, max(1, round(SRC_DIRS * scale)))
    sizes = _lognormal_sizes(rng, n_files, int(SRC_BYTES * scale))
    stems = _identifiers(rng, 800)
    for i, size in enumerate(sizes):
        rel = os.path.join(rng.choice(dirs), f"{rng.choice(stems)}_{i}{rng.choice(_EXTS)}")
        header = f"# {rel}\n# generated file {i}, seed {seed}\n"
        _write(os.path.join(src, rel), _text(rng, pool, size, header))



def _gen_bin(root: str, seed: int, scale: float) -> None:
    """Random files, sizes spread 5.8..43.6 MiB at full scale."""
    rng = _rng(seed, "bin")
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir)
    weights = [rng.uniform(0.12, 1.0) for _ in range(BIN_FILES)]
    total = int(BIN_BYTES * scale)
    bsizes = [int(total * w / sum(weights)) for w in weights]
    bsizes[-1] += total - sum(bsizes)
    for i, size in enumerate(bsizes):
        with open(os.path.join(bindir, f"blob{i:02d}.bin"), "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MIB)
                f.write(rng.randbytes(n))
                left -= n



def _gen_db(root: str, seed: int, scale: float, pool: list[str]) -> None:
    """db/main.db: pages, written 1 MiB at a time."""
    rng = _rng(seed, "db")
    dbdir = os.path.join(root, "db")
    os.makedirs(dbdir)
    npages = max(1, round(DB_BYTES * scale) // PAGE_SIZE)
    with open(os.path.join(dbdir, "main.db"), "wb") as f:
        batch = []
        for p in range(npages):
            batch.append(_db_page(rng, pool, p, lsn=1000 + p))
            if len(batch) == 128:
                f.write(b"".join(batch))
                batch.clear()
        if batch:
            f.write(b"".join(batch))


def summarize(root: str) -> dict:
    files = dirs = nbytes = 0
    for _dirpath, dnames, fnames in os.walk(root):
        dirs += len(dnames)
        for name in fnames:
            files += 1
            nbytes += os.lstat(os.path.join(_dirpath, name)).st_size
    return {"files": files, "dirs": dirs, "bytes": nbytes}


# ------------------------------------------------------------------------ mutate

def _text_files(root: str) -> list[str]:
    out = []
    src = os.path.join(root, "src")
    for dirpath, dnames, fnames in os.walk(src):
        dnames.sort()
        out.extend(os.path.join(dirpath, n) for n in sorted(fnames))
    return out


def mutate(root: str, seed: int, fraction: float = 0.01, add: int = 10,
           delete: int = 10, text_files: int = 200, changes_file: str | None = None
           ) -> list[str]:
    """Apply a deterministic change to the dataset; return the changed paths.

    The db pages are rewritten in place with ``os.pwrite`` (the file is not
    rewritten or truncated), text files are edited in the middle, and files
    are added and deleted.  The returned list (sorted absolute paths of every
    modified, added and deleted file) is also written one per line to
    ``changes_file`` when given.
    """
    root = os.path.abspath(root)
    rng = _rng(seed, "mutate")
    pool = _line_pool(_rng(seed, "mutate-pool"), 1 << 12)
    mtime = BASE_MTIME + MUTATION_MTIME_STEP * (seed + 1)
    changed: set[str] = set()
    touched_dirs: set[str] = set()

    # db: rewrite `fraction` of the pages in place
    db = os.path.join(root, "db", "main.db")
    npages = os.path.getsize(db) // PAGE_SIZE
    k = min(npages, round(npages * fraction))
    if k:
        fd = os.open(db, os.O_WRONLY)
        try:
            for p in sorted(rng.sample(range(npages), k)):
                os.pwrite(fd, _db_page(rng, pool, p, lsn=10_000_000 * (seed + 1) + p),
                          p * PAGE_SIZE)
        finally:
            os.close(fd)
        os.utime(db, (mtime, mtime))
        changed.add(db)

    texts = _text_files(root)
    picked = rng.sample(texts, min(len(texts), text_files + delete))
    edits, doomed = picked[:text_files], picked[text_files:]

    # edit: replace a run of lines in the middle and append a few
    for path in edits:
        with open(path, "rb") as f:
            lines = f.read().decode().splitlines(keepends=True)
        at = rng.randrange(max(1, len(lines)))
        n = rng.randint(1, 8)
        lines[at:at + n] = rng.choices(pool, k=rng.randint(1, 10))
        lines.extend(rng.choices(pool, k=rng.randint(0, 3)))
        _write(path, "".join(lines).encode())
        os.utime(path, (mtime, mtime))
        changed.add(path)

    for path in doomed:
        os.unlink(path)
        touched_dirs.add(os.path.dirname(path))
        changed.add(path)

    dirs = sorted({os.path.dirname(p) for p in texts})
    for i in range(add):
        d = rng.choice(dirs)
        path = os.path.join(d, f"added_s{seed}_{i}.txt")
        size = int(rng.lognormvariate(9.3, 1.0))
        _write(path, _text(rng, pool, size, f"# added by mutate seed {seed}\n"))
        os.utime(path, (mtime, mtime))
        touched_dirs.add(d)
        changed.add(path)

    for d in touched_dirs:
        if os.path.isdir(d):
            os.utime(d, (mtime, mtime))

    out = sorted(changed)
    if changes_file:
        with open(changes_file, "w") as f:
            f.writelines(p + "\n" for p in out)
    return out


def scaled_mutation(scale: float) -> dict:
    """mutate() counts for a dataset of the given scale (1 % of db pages always)."""
    return {"fraction": 0.01,
            "text_files": max(1, round(200 * scale)),
            "add": max(1, round(10 * scale)),
            "delete": max(1, round(10 * scale))}


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("root")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--scale", type=float, default=1.0)
    m = sub.add_parser("mutate")
    m.add_argument("root")
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--fraction", type=float, default=0.01)
    m.add_argument("--add", type=int, default=10)
    m.add_argument("--delete", type=int, default=10)
    m.add_argument("--text-files", type=int, default=200)
    m.add_argument("--changes-file")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        print(generate(a.root, a.seed, a.scale))
    else:
        paths = mutate(a.root, a.seed, a.fraction, a.add, a.delete, a.text_files,
                       a.changes_file)
        print(f"{len(paths)} paths changed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
