"""Helpers for the maintenance tests (retention, prune, compact, verify, repair,
corruption, crash, disk full). Real files, real LMDB, real `pit` subprocesses.

Everything that opens a repository in this process closes it again before
returning, so a `pit` subprocess can take the writer lock right after.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager

from store import packs as P
from store.index import REF, BlobEntry, PackEntry, U64
from store.objects import ObjectReader
from store.repository import Repository
from store.restore import Restorer
from store.snapshots import list_snapshots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIT = os.path.join(os.path.dirname(sys.executable), "pit")
if not os.path.exists(PIT):  # pragma: no cover - venv without the console script
    PIT = None

MiB = 1024 * 1024


# ----------------------------------------------------------------- running pit
def pit_cmd(repo: str, *args: str) -> list[str]:
    base = [PIT] if PIT else [sys.executable, "-c", "from store.cli import main; main()"]
    return [*base, "--repo", str(repo), *map(str, args)]


def pit(repo: str, *args: str, expect: int | tuple | None = 0, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run `pit --repo REPO ARGS...`; check the exit code and that no traceback leaked."""
    p = subprocess.run(pit_cmd(repo, *args), capture_output=True, timeout=timeout, input=input,
                       env=pit_env())
    err = p.stderr.decode(errors="replace")
    assert "Traceback" not in err, f"pit {' '.join(map(str, args))} printed a traceback:\n{err}"
    assert "internal error" not in err, f"pit {' '.join(map(str, args))} hit an internal error:\n{err}"
    if expect is not None:
        codes = expect if isinstance(expect, tuple) else (expect,)
        assert p.returncode in codes, (
            f"pit {' '.join(map(str, args))} exited {p.returncode}, wanted {codes}\n"
            f"stdout: {p.stdout.decode(errors='replace')[-3000:]}\nstderr: {err[-3000:]}")
    return p


def pit_json(repo: str, *args: str, expect: int | tuple | None = 0, **kw):
    p = pit(repo, *args, "--json", expect=expect, **kw)
    return json.loads(p.stdout), p


def pit_env() -> dict:
    env = dict(os.environ)
    env.pop("PIT_REPO", None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -------------------------------------------------------------- source trees
def write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_tree(root: str, rng: random.Random, nfiles: int = 12, size_range=(1000, 60_000),
              subdirs: int = 3) -> list[str]:
    """Random incompressible files under root (some in subdirectories) and one symlink."""
    os.makedirs(root, exist_ok=True)
    made = []
    for i in range(nfiles):
        d = root if i % (subdirs + 1) == 0 else os.path.join(root, f"d{i % (subdirs + 1)}")
        p = os.path.join(d, f"f{i:03d}.bin")
        write_file(p, rng.randbytes(rng.randint(*size_range)))
        made.append(p)
    link = os.path.join(root, "link")
    if not os.path.lexists(link):
        os.symlink("f000.bin", link)
    return made


def mutate_tree(root: str, rng: random.Random, n: int = 2, size_range=(1000, 60_000)) -> None:
    """Change a few files: rewrite, append, add or delete (never leaves root empty)."""
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
                   if not os.path.islink(os.path.join(dp, f)))
    for _ in range(n):
        op = rng.choice(("rewrite", "append", "add", "delete"))
        if op == "delete" and len(files) > 3:
            victim = files.pop(rng.randrange(len(files)))
            os.unlink(victim)
        elif op == "append" and files:
            with open(rng.choice(files), "ab") as f:
                f.write(rng.randbytes(rng.randint(100, 20_000)))
        elif op == "rewrite" and files:
            write_file(rng.choice(files), rng.randbytes(rng.randint(*size_range)))
        else:
            p = os.path.join(root, f"d{rng.randint(0, 3)}", f"n{rng.getrandbits(40):010x}.bin")
            write_file(p, rng.randbytes(rng.randint(*size_range)))
            files.append(p)


def tree_digest(root: str) -> dict:
    """Relative path -> (type, mode, size, sha256 or link target). The restore comparison."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    h = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, h)
    return out


# -------------------------------------------------------------- repositories
def init_repo(path: str, pack_mib: int = 1, avg_chunk: int = 4096) -> str:
    """A fresh repository with small packs (so they seal) and small chunks."""
    Repository.init(path, avg_chunk=avg_chunk, pack_size=pack_mib * MiB).close()
    return path


@contextmanager
def opened(path: str, readonly: bool = True):
    repo = Repository(path, readonly=readonly)
    try:
        yield repo
    finally:
        repo.close()


def snap(path: str, set_name: str, sources: list[str], **kw):
    """create_snapshot through the Python API (the quick way to make many)."""
    from store.ingest import create_snapshot

    with opened(path, readonly=False) as repo:
        return create_snapshot(repo, set_name, sources, **kw)


def snapshots(path: str, set_name: str | None = None):
    with opened(path) as repo, repo.reading() as txn:
        return list_snapshots(repo, txn, set_name)


def snapshot_ids(path: str, set_name: str | None = None) -> list[str]:
    return [s.hex for s in snapshots(path, set_name)]


def restore_digest(path: str, sid: str, workdir: str | None = None) -> dict:
    """Restore snapshot `sid` (hex) into a scratch directory and digest it.

    Keys are relative to the restore target, so a snapshot of source `src`
    has its files under `basename(src)/...`."""
    tmp = tempfile.mkdtemp(prefix="pit-restore-", dir=workdir)
    try:
        with opened(path) as repo, repo.reading() as txn:
            from store.snapshots import get_snapshot

            s = get_snapshot(repo, txn, bytes.fromhex(sid))
            assert s is not None, f"snapshot {sid[:12]} is not in the repository"
            r = ObjectReader(repo, txn)
            root = r.lookup(s.root, "")
            Restorer(r, owners=False).restore(root, tmp)
        return tree_digest(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def source_digest(*sources: str) -> dict:
    """The digest a restore of a snapshot of `sources` should have."""
    out = {}
    for src in sources:
        name = os.path.basename(os.path.normpath(src))
        st = os.lstat(src)
        out[name] = ("d", stat.S_IMODE(st.st_mode))
        for k, v in tree_digest(src).items():
            out[os.path.join(name, k)] = v
    return out


def structural_verify(path: str):
    """Whole-repository structural verify (refcounts against a recount), not recorded."""
    from store.verify import verify

    with opened(path) as repo:
        return verify(repo, record=False)


def assert_verify_clean(path: str, deep: bool = False) -> None:
    from store.verify import verify

    with opened(path) as repo:
        rep = verify(repo, depth="deep" if deep else "structural", record=False)
    assert rep.clean, "verify is not clean:\n" + "\n".join(
        rep.problems[:20] + [f"{d.kind} {d.blob[:16]} {d.where}: {d.reason} {d.paths[:3]}" for d in rep.damage[:20]])


# ------------------------------------------------------------ reaching inside
def reachable(path: str, sid: str) -> dict[bytes, str]:
    """Every blob (tree, filelist, chunk) a snapshot reaches, with its kind, by our own walk."""
    from store.files import decode_filelist_level
    from store.snapshots import get_snapshot
    from store.trees import DIR, FILE, decode_tree

    out: dict[bytes, str] = {}
    with opened(path) as repo, repo.reading() as txn:
        s = get_snapshot(repo, txn, bytes.fromhex(sid))
        stack = [s.root]
        while stack:
            t = stack.pop()
            if t in out:
                continue
            out[t] = "tree"
            for e in decode_tree(repo.read_blob(txn, t)):
                if e.type == DIR:
                    stack.append(e.content)
                elif e.type == FILE and e.nchunks == 1:
                    out[e.content] = "chunk"
                elif e.type == FILE and e.nchunks > 1:
                    # a leaf (entries are chunks) or an index (entries are leaves)
                    lists = [e.content]
                    while lists:
                        fl = lists.pop()
                        out[fl] = "filelist"
                        level, kids, _ = decode_filelist_level(repo.read_blob(txn, fl))
                        for c in kids:
                            if level == 2:
                                lists.append(c)
                            else:
                                out[c] = "chunk"
    return out


def file_chunks(path: str, sid: str, relpath: str) -> list[bytes]:
    """Chunk ids of one file of a snapshot (relpath inside the snapshot root)."""
    from store.snapshots import get_snapshot

    with opened(path) as repo, repo.reading() as txn:
        s = get_snapshot(repo, txn, bytes.fromhex(sid))
        r = ObjectReader(repo, txn)
        return list(r.chunk_list(r.lookup(s.root, relpath)).ids)


def blob_entry(path: str, bid: bytes) -> BlobEntry | None:
    with opened(path) as repo, repo.reading() as txn:
        return repo.blob_entry(txn, bid)


def all_blobs(path: str) -> dict[bytes, BlobEntry]:
    with opened(path) as repo, repo.reading() as txn:
        with txn.cursor(db=repo.index.db["blobs"]) as cur:
            return {bytes(k): BlobEntry.decode(v) for k, v in cur}


def all_refs(path: str) -> dict[bytes, int]:
    """Blob id -> its reference count, as the index keeps it."""
    with opened(path) as repo, repo.reading() as txn:
        with txn.cursor(db=repo.index.db["refs"]) as cur:
            return {bid: n for n, bid in (REF.unpack(v) for v in cur.iternext(keys=False, values=True))}


def set_refcount(path: str, bid: bytes, count: int) -> None:
    """Overwrite one blob's reference count in the index (to corrupt it)."""
    e = all_blobs(path)[bid]
    lmdb_put(path, "refs", U64.pack(e.seq), REF.pack(count, bid))


def pack_entries(path: str) -> dict[int, PackEntry]:
    with opened(path) as repo, repo.reading() as txn:
        with txn.cursor(db=repo.index.db["packs"]) as cur:
            return {U64.unpack(k)[0]: PackEntry.decode(v) for k, v in cur}


def open_pack_number(path: str) -> int | None:
    with opened(path) as repo, repo.reading() as txn:
        raw = txn.get(b"open_pack", db=repo.index.db["meta"])
        return U64.unpack(raw)[0] if raw else None


def pack_path(repo_path: str, num: int) -> str:
    name = P.pack_name(num)
    return os.path.join(repo_path, "packs", name.split(".")[0][-2:], name)


def pack_files(repo_path: str) -> dict[str, int]:
    """Pack file name -> size on disk."""
    out = {}
    root = os.path.join(repo_path, "packs")
    for dp, _, fns in os.walk(root):
        for n in fns:
            if n.endswith(".pack"):
                out[n] = os.path.getsize(os.path.join(dp, n))
    return out


def packs_bytes(repo_path: str) -> int:
    return sum(pack_files(repo_path).values())


def flip_byte(file: str, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def lmdb_put(repo_path: str, dbname: str, key: bytes, value: bytes | None) -> None:
    """Overwrite (or with None delete) one record of the index directly."""
    with opened(repo_path, readonly=False) as repo:
        with repo.index.env.begin(write=True) as txn:
            if value is None:
                txn.delete(key, db=repo.index.db[dbname])
            else:
                txn.put(key, value, db=repo.index.db[dbname])


def get_snapmeta(repo_path: str, sid: str) -> dict:
    from store.snapmeta import get_meta

    with opened(repo_path) as repo, repo.reading() as txn:
        return get_meta(repo, txn, bytes.fromhex(sid))
