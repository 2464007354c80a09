"""Shared helpers for the storage-engine tests (issue 3).

Real files, real LMDB, real `pit` subprocesses. Anything that opens a
repository in this process closes it before returning: py-lmdb refuses to
open one environment twice in a process, and a `pit` subprocess needs the
writer lock free.

Tree specs for `make_tree` (names may be str or bytes):

    {"a.txt": b"bytes",                      # a file
     "d": {"x": b""},                        # a directory
     "l": Link("a.txt"),                     # a symlink
     "f": F(b"data", mode=0o600, mtime=...), # a file with metadata
     "e": D({}, mode=0o700)}                 # a directory with metadata

Files and directories get a fixed mtime in the past unless told otherwise, so
the files cache's racy-mtime rule (store/ingest.py, RACY_NS) does not apply.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import blake3
import pytest
from click.testing import CliRunner

try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("pit", database=None, deadline=None, print_blob=True)
    _hsettings.load_profile("pit")
except ImportError:  # pragma: no cover - the test extra installs it
    pass

from store import packs as P
from store.index import BlobEntry
from store.repository import Repository

PIT = os.path.join(os.path.dirname(sys.executable), "pit")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
#: mtime given to generated files unless a spec says otherwise (2020-09-13).
BASE_MTIME_NS = 1_600_000_000_123_456_789


# ------------------------------------------------------------------ data
def rand_bytes(n: int, seed: int | str | bytes = 0, offset: int = 0) -> bytes:
    """Deterministic incompressible bytes: the BLAKE3 XOF of the seed (seekable)."""
    if isinstance(seed, int):
        seed = seed.to_bytes(8, "little", signed=True)
    elif isinstance(seed, str):
        seed = seed.encode()
    return blake3.blake3(seed).digest(length=n, seek=offset) if n else b""


def write_stream(path, size: int, seed, block: int = 4 * MiB) -> None:
    """Write `size` deterministic random bytes without holding them in memory."""
    h = blake3.blake3(seed if isinstance(seed, bytes) else str(seed).encode())
    with open(path, "wb") as f:
        for off in range(0, size, block):
            f.write(h.digest(length=min(block, size - off), seek=off))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ trees
@dataclass
class Link:
    target: str | bytes
    mtime: int | None = None


@dataclass
class F:
    data: bytes
    mode: int | None = None
    mtime: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass
class D:
    children: dict = field(default_factory=dict)
    mode: int | None = None
    mtime: int | None = None


def _b(name) -> bytes:
    return name if isinstance(name, bytes) else os.fsencode(name)


def make_tree(root, spec: dict, mtime: int | None = BASE_MTIME_NS) -> None:
    """Create `spec` under `root` (created if missing). Directory metadata is
    applied after its children so their creation does not bump it."""
    root_b = _b(str(root))
    os.makedirs(root_b, exist_ok=True)
    _fill(root_b, spec, mtime)


def _fill(dirpath: bytes, spec: dict, mtime: int | None) -> None:
    for i, (name, node) in enumerate(spec.items()):
        p = os.path.join(dirpath, _b(name))
        default_mtime = None if mtime is None else mtime + i * 1_000_003
        if isinstance(node, (bytes, bytearray)):
            node = F(bytes(node))
        if isinstance(node, dict):
            node = D(node)
        if isinstance(node, F):
            if os.path.lexists(p) and not os.path.isfile(p) or os.path.islink(p):
                remove(p)
            with open(p, "wb") as f:
                f.write(node.data)
            if node.mode is not None:
                os.chmod(p, node.mode)
            if node.uid is not None or node.gid is not None:
                os.chown(p, node.uid if node.uid is not None else -1, node.gid if node.gid is not None else -1)
            t = node.mtime if node.mtime is not None else default_mtime
            if t is not None:
                os.utime(p, ns=(t, t))
        elif isinstance(node, D):
            if os.path.lexists(p) and (os.path.islink(p) or not os.path.isdir(p)):
                remove(p)
            os.makedirs(p, exist_ok=True)
            _fill(p, node.children, mtime)
            if node.mode is not None:
                os.chmod(p, node.mode)
            t = node.mtime if node.mtime is not None else default_mtime
            if t is not None:
                os.utime(p, ns=(t, t))
        elif isinstance(node, Link):
            if os.path.lexists(p):
                remove(p)
            os.symlink(_b(node.target), p)
            t = node.mtime if node.mtime is not None else default_mtime
            if t is not None:
                os.utime(p, ns=(t, t), follow_symlinks=False)
        else:  # pragma: no cover - a bad spec
            raise TypeError(f"bad tree spec node {node!r}")


def remove(path) -> None:
    """Remove a file, symlink or directory tree."""
    import shutil

    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def tree_digest(root, owners: bool = True, mtimes: bool = True) -> dict:
    """path (bytes, relative) -> a comparable description of every entry below
    `root` (not of root itself): type, permission bits, mtime (ns), owner,
    and the content hash (files) or the target (symlinks)."""
    root_b = _b(str(root))
    out: dict = {}

    def walk(d: bytes, rel: bytes) -> None:
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            r = rel + b"/" + name if rel else name
            st = os.lstat(p)
            desc = {"mode": stat.S_IMODE(st.st_mode)}
            if mtimes:
                desc["mtime"] = st.st_mtime_ns
            if owners:
                desc["owner"] = (st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                desc["type"] = "symlink"
                desc["target"] = os.readlink(p)
                desc.pop("mode")  # symlink permission bits mean nothing on Linux
            elif stat.S_ISDIR(st.st_mode):
                desc["type"] = "dir"
                walk(p, r)
            elif stat.S_ISREG(st.st_mode):
                desc["type"] = "file"
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                desc["size"] = st.st_size
                desc["sha256"] = h.hexdigest()
            else:
                desc["type"] = f"special {stat.S_IFMT(st.st_mode):o}"
            out[r] = desc

    walk(root_b, b"")
    return out


def files_digest(root) -> dict:
    """Content-only view (path -> sha256 / symlink target / 'dir')."""
    return {p: d.get("sha256") or d.get("target") or d["type"] for p, d in tree_digest(root).items()}


# -------------------------------------------------------------- repository
def init_repo(path, avg_chunk: int | None = None, pack_size: int | None = None) -> str:
    kw = {}
    if avg_chunk:
        kw["avg_chunk"] = avg_chunk
    if pack_size:
        kw["pack_size"] = pack_size
    Repository.init(str(path), **kw).close()
    return str(path)


@contextmanager
def opened(repo_path, readonly: bool = False):
    repo = Repository(str(repo_path), readonly=readonly)
    try:
        yield repo
    finally:
        repo.close()


def snapshot(repo_path, set_name: str, paths, changes=None, **kw):
    """create_snapshot through the API; returns the Snapshot (repository closed again)."""
    from store.ingest import create_snapshot

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    with opened(repo_path) as repo:
        return create_snapshot(repo, set_name, [str(p) for p in paths],
                               None if changes is None else [str(c) for c in changes], **kw)


def restore(repo_path, spec: str, target, path: str = ""):
    """Restore snapshot `spec` (anything `resolve` accepts), or `path` in it, into target."""
    from store.objects import ObjectReader
    from store.restore import Restorer
    from store.snapshots import resolve

    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        snap = resolve(repo, txn, spec)
        r = ObjectReader(repo, txn)
        return Restorer(r).restore(r.lookup(snap.root, path), str(target))


def list_snaps(repo_path, set_name: str | None = None):
    from store.snapshots import list_snapshots

    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        return list_snapshots(repo, txn, set_name)


def blob_ids(repo_path, kind: int | None = P.CHUNK) -> dict[bytes, BlobEntry]:
    """Every indexed blob (of `kind`, or all) -> its index entry."""
    out = {}
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        with txn.cursor(db=repo.index.db["blobs"]) as cur:
            for k, v in cur:
                e = BlobEntry.decode(v)
                if kind is None or e.kind == kind:
                    out[bytes(k)] = e
    return out


# ---------------------------------------------------------------- the CLI
def pit_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("PIT_REPO", None)
    env.pop("PIT_DEBUG", None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_pit(repo, *args, expect: int | None = 0, timeout: float = 120, input: bytes | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`pit --repo REPO ARGS...` as a real process; checks the exit code and
    that no traceback reached stderr."""
    cmd = [PIT] + (["--repo", str(repo)] if repo is not None else []) + [str(a) for a in args]
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input, env=env or pit_env())
    err = p.stderr.decode(errors="replace")
    assert "Traceback" not in err, f"{cmd} printed a traceback:\n{err}"
    if expect is not None:
        assert p.returncode == expect, (
            f"{cmd} exited {p.returncode}, wanted {expect}\nstdout: {p.stdout[-2000:]!r}\nstderr: {err[-2000:]}")
    return p


def pit_json(repo, *args, **kw):
    return json.loads(run_pit(repo, *args, "--json", **kw).stdout)


def cli(repo, *args, expect: int | None = 0, input=None):
    """`pit` in this process through click's CliRunner (fast). Returns the Result."""
    from store.cli import main

    argv = (["--repo", str(repo)] if repo is not None else []) + [str(a) for a in args]
    res = CliRunner().invoke(main, argv, input=input, catch_exceptions=True)
    if expect is not None:
        assert res.exit_code == expect, (
            f"pit {argv} exited {res.exit_code}, wanted {expect}\noutput: {res.output[-2000:]}\n"
            f"exception: {res.exc_info[1] if res.exc_info else None!r}")
    return res


def cli_json(repo, *args, **kw):
    return json.loads(cli(repo, *args, "--json", **kw).stdout)


# --------------------------------------------------------------- fixtures
@pytest.fixture
def repo_path(tmp_path) -> str:
    """A fresh repository with the default parameters."""
    return init_repo(tmp_path / "repo")


@pytest.fixture
def small_repo(tmp_path) -> str:
    """A fresh repository with 1 KiB average chunks (many chunks from little data)."""
    return init_repo(tmp_path / "repo", avg_chunk=1024)


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(request.node.nodeid)


def add_crafted_snapshots(repo_path, like, records: list[dict]) -> list:
    """Commit snapshot records sharing `like`'s root (through the store's own
    writer and add_snapshot): lets a test choose names, sets and times."""
    from store.snapshots import Snapshot, add_snapshot

    out = []
    with opened(repo_path) as repo, repo.writer() as w:
        for r in records:
            s = Snapshot(r.get("set", like.set), r["name"], r.get("time_ns", like.time_ns), r.get("host", like.host),
                         list(like.paths), like.root, None, {})
            out.append(add_snapshot(w, s))
    return out


def colliding_records(like, set_name: str = "collide") -> tuple[str, list[dict]]:
    """Two snapshot records whose ids share their first 4 hex digits (found by
    trying hosts: a birthday search over 16 bits, a few hundred BLAKE3 calls)."""
    from store.snapshots import Snapshot

    seen: dict[str, dict] = {}
    for i in range(100_000):
        rec = {"set": set_name, "name": f"c{i}", "time_ns": like.time_ns + i, "host": f"host{i}"}
        s = Snapshot(set_name, rec["name"], rec["time_ns"], rec["host"], list(like.paths), like.root, None, {})
        from store.repository import blob_id

        pre = blob_id(s.encode()).hex()[:4]
        if pre in seen:
            return pre, [seen[pre], rec]
        seen[pre] = rec
    raise AssertionError("no collision found")  # pragma: no cover
