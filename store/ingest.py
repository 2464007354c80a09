"""Making a snapshot: walk what changed, chunk, dedup, compress, store.

Two ways in, one machine underneath:
- full scan: every source path is "changed"; the files cache (size, mtime,
  ctime, inode) lets unchanged files reuse their content without a read;
- change set: the caller (the replicator) names the paths that changed; we
  start from the parent snapshot's trees and rebuild only those paths and
  their ancestors, so the cost is O(changed paths), not O(tree).

The pipeline uses both cores: the main thread reads and chunks (FastCDC) and
owns the LMDB write transaction; worker threads hash (BLAKE3) and compress
(zstd), both of which release the GIL. Chunks from many small files travel
in one batch, and a directory's tree is written as soon as its last file
is done, so the pipeline never drains at a directory boundary.
"""
from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import blake3
import msgpack
import zstandard

from . import packs as P
from .chunker import chunk_stream
from .errors import InvalidArgument, SourceMissing, StoreError
from .index import filecache_key
from .objects import ObjectReader
from .repository import Repository, Writer, object_id, write_filelist
from .retention import apply_retention
from .snapshots import Snapshot, printable, add_snapshot, check_set_name, list_snapshots, unique_name
from .trees import DIR, FILE, SYMLINK, Entry, encode_tree, subtree_totals, tree_children

BATCH_BYTES = 4 * 1024 * 1024
BATCH_CHUNKS = 1024
MAX_INFLIGHT = 3
RACY_NS = 1_000_000_000  # files modified this close to the scan start are re-read next time
MAX_WARNINGS = 100
PREFETCH_BYTES = 256 * 1024 * 1024  # per directory: what we ask the kernel to read ahead
RESCAN = object()  # marks "this path changed: look at it afresh" in the change trie


@dataclass
class DirNode:
    """A directory whose tree is being built; written when nothing is pending."""

    entries: dict[bytes, Entry]
    parent: "DirNode | None"
    entry: Entry | None  # our entry in the parent (None for the snapshot root)
    pending: int = 0
    listed: bool = False
    totals: tuple = (0, 0, 0)


@dataclass
class FileJob:
    entry: Entry
    node: DirNode
    cache_key: bytes | None
    cache_stat: tuple | None
    ids: list[bytes] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    queued: int = 0
    done_reading: bool = False


def _willneed(path: bytes) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Hasher:
    """Worker side: hash every chunk, compress only those the repository lacks."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.local = threading.local()
        self.level = repo.level

    def __call__(self, views: list[memoryview]) -> list[tuple[bytes, int, bytes | None, int]]:
        """-> (id, flags, encoded frame or None when already stored, stored length) per chunk."""
        loc = self.local
        if not hasattr(loc, "cctx"):
            loc.cctx = zstandard.ZstdCompressor(level=self.level)
        cctx = loc.cctx
        blobs = self.repo.index.db["blobs"]
        encode = P.encode_frame
        out = []
        # A read view of what is committed; chunks new in this session are
        # caught again by the main thread against the session's own ids.
        with self.repo.index.env.begin(db=blobs) as txn:
            get = txn.get
            for v in views:
                h = blake3.blake3(v).digest()
                if get(h) is not None:
                    out.append((h, 0, None, 0))
                    continue
                c = cctx.compress(v)
                if len(c) < len(v):
                    out.append((h, P.ZSTD, encode(P.CHUNK, P.ZSTD, h, c, len(v)), len(c)))
                else:
                    out.append((h, 0, encode(P.CHUNK, 0, h, v, len(v)), len(v)))
        return out


class Ingester:
    def __init__(self, writer: Writer, set_name: str, workers: int = 2,
                 progress: Callable[[dict], None] | None = None) -> None:
        self.w = writer
        self.repo = writer.repo
        self.set = set_name
        self.params = self.repo.params
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pit-hash")
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pit-prefetch")
        self.hasher = _Hasher(self.repo)
        self.batch: list[tuple[FileJob, memoryview]] = []
        self.batch_bytes = 0
        self.inflight: deque[tuple[list[tuple[FileJob, memoryview]], Future]] = deque()
        self.start_ns = time.time_ns()
        # "examined" counts what this run looked at; the snapshot's totals come from the root tree.
        self.stats = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0, "files_read": 0,
                      "bytes_read": 0, "skipped": 0}
        self.totals = (0, 0, 0)
        self.warnings: list[str] = []
        self.progress = progress
        self._last_progress = 0.0
        self.root_tree: bytes | None = None
        fc = self.w.db["filecache"]
        self._fc_get = lambda k: self.w.txn.get(k, db=fc)
        self._fc_put = lambda k, v: self.w.txn.put(k, v, db=fc)

    # ------------------------------------------------------------ warnings
    def warn(self, msg: str) -> None:
        self.stats["skipped"] += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)

    # ------------------------------------------------------------ pipeline
    def _submit(self) -> None:
        if not self.batch:
            return
        batch = self.batch
        fut = self.pool.submit(self.hasher, [v for _, v in batch])
        self.inflight.append((batch, fut))
        self.batch, self.batch_bytes = [], 0
        while len(self.inflight) > MAX_INFLIGHT:
            self._drain_one()

    def _drain_one(self) -> None:
        batch, fut = self.inflight.popleft()
        results = fut.result()
        w = self.w
        for (job, view), (h, flags, frame, stored) in zip(batch, results):
            if frame is not None:
                known = w.new_in_session(h)
                if not (known if known is not None else w.has(h)):
                    w.put_encoded(P.CHUNK, h, flags, frame, stored, len(view))
            job.ids.append(h)
            job.lens.append(len(view))
            if job.done_reading and len(job.ids) == job.queued:
                self._finish_file(job)
        self._report()

    def _drain_all(self) -> None:
        self._submit()
        while self.inflight:
            self._drain_one()

    def _report(self) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._last_progress >= 0.2:
            self._last_progress = now
            self.progress(self.stats)

    # --------------------------------------------------------------- files
    def _ingest_file(self, path: bytes, entry: Entry, node: DirNode, ckey: bytes | None, cstat: tuple | None) -> None:
        job = FileJob(entry, node, ckey, cstat)
        node.pending += 1
        try:
            with open(path, "rb", buffering=0) as f:
                for view in chunk_stream(f, self.params, size_hint=entry.size):
                    self.batch.append((job, view))
                    job.queued += 1
                    self.batch_bytes += len(view)
                    if self.batch_bytes >= BATCH_BYTES or len(self.batch) >= BATCH_CHUNKS:
                        self._submit()
        except OSError as exc:
            # The file vanished or became unreadable mid-read: drop what we queued for it.
            self.batch = [(j, v) for j, v in self.batch if j is not job]
            self.batch_bytes = sum(len(v) for _, v in self.batch)
            job.queued = -1  # never completes; its chunks were queued only
            node.pending -= 1
            node.entries.pop(entry.name, None)
            self.warn(f"{os.fsdecode(path)}: {exc.strerror or exc}")
            return
        self.stats["files_read"] += 1
        self.stats["bytes_read"] += entry.size
        job.done_reading = True
        if len(job.ids) == job.queued:
            self._finish_file(job)

    def _finish_file(self, job: FileJob) -> None:
        e = job.entry
        size = sum(job.lens)
        e.size = size
        e.nchunks = len(job.ids)
        if e.nchunks == 0:
            e.content = None
        elif e.nchunks == 1:
            e.content = job.ids[0]
        else:
            e.content = write_filelist(self.w, job.ids, job.lens)
        if job.cache_key is not None:
            self._fc_put(job.cache_key, msgpack.packb([*job.cache_stat, e.to_list()], use_bin_type=True))
        self._child_done(job.node)

    # ---------------------------------------------------------------- dirs
    def _child_done(self, node: DirNode) -> None:
        node.pending -= 1
        if node.listed and node.pending == 0:
            self._finish_dir(node)

    def _finish_dir(self, node: DirNode) -> None:
        entries = list(node.entries.values())
        totals = subtree_totals(entries)
        node.totals = (totals["f"], totals["d"], totals["b"])
        payload = encode_tree(entries)
        tid = object_id(P.TREE, payload)
        if self.w.put(P.TREE, tid, payload):
            self.w.link(tid, tree_children(entries))
        if node.entry is None:
            self.root_tree = tid
            self.totals = node.totals
        else:
            node.entry.content = tid
            node.entry.size = len(entries)
            node.entry.extra = totals
            self._child_done(node.parent)

    # ---------------------------------------------------------------- walk
    def _prefetch_dir(self, path: bytes, todo: list) -> list:
        """lstat a directory's entries, and ask the kernel to start reading the
        files we will read (not the ones the files cache skips): their I/O then
        overlaps our hashing instead of stalling the main thread file by file."""
        out = []
        budget = PREFETCH_BYTES
        for name, sub in todo:
            p = os.path.join(path, name)
            try:
                st = os.lstat(p)
            except OSError:
                out.append(None)  # _visit reports it
                continue
            out.append(st)
            if sub is RESCAN and stat.S_ISREG(st.st_mode) and 0 < st.st_size and budget > 0 \
                    and self._cached(p, st) is None:
                budget -= st.st_size
                self.prefetch.submit(_willneed, p)
        return out

    def _entry_from_stat(self, name: bytes, st: os.stat_result, typ: int) -> Entry:
        return Entry(name, typ, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size)

    def _visit(self, path: bytes, name: bytes, node: DirNode, change, old: Entry | None, reader: ObjectReader,
               st: os.stat_result | None = None) -> None:
        """Look at `path` afresh (change is RESCAN) or descend into it (change is a trie)."""
        try:
            st = st or os.lstat(path)
        except FileNotFoundError:
            node.entries.pop(name, None)  # deleted since the parent snapshot
            return
        except OSError as exc:
            node.entries.pop(name, None)
            self.warn(f"{os.fsdecode(path)}: {exc.strerror}")
            return
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            e = self._entry_from_stat(name, st, DIR)
            node.entries[name] = e
            self.stats["dirs"] += 1
            base = old.content if (change is not RESCAN and old is not None and old.type == DIR) else None
            self._dir(path, e, node, change if base is not None else RESCAN, base, reader)
        elif stat.S_ISREG(mode):
            self.stats["files"] += 1
            self.stats["bytes"] += st.st_size
            self._file(path, name, st, node)
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(path)
            except OSError as exc:
                self.warn(f"{os.fsdecode(path)}: {exc.strerror}")
                return
            e = self._entry_from_stat(name, st, SYMLINK)
            e.content, e.size = target, len(target)
            node.entries[name] = e
            self.stats["symlinks"] += 1
        else:
            node.entries.pop(name, None)
            self.warn(f"{os.fsdecode(path)}: skipped special file (type {stat.S_IFMT(mode):o})")

    def _cached(self, path: bytes, st: os.stat_result) -> list | None:
        """The files-cache entry when the file is unchanged and its content still stored."""
        raw = self._fc_get(filecache_key(self.set, path))
        if raw is None:
            return None
        size, mtime, ctime, ino, cached = msgpack.unpackb(raw)
        if (size, mtime, ctime, ino) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) and (
                cached[7] is None or self.w.has(cached[7])):
            return cached
        return None

    def _file(self, path: bytes, name: bytes, st: os.stat_result, node: DirNode) -> None:
        e = self._entry_from_stat(name, st, FILE)
        node.entries[name] = e
        ckey = filecache_key(self.set, path)
        cstat = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = self._cached(path, st)
        if cached is not None:
            e.content, e.nchunks = cached[7], cached[8]
            return
        racy = st.st_mtime_ns >= self.start_ns - RACY_NS
        self._ingest_file(path, e, node, None if racy else ckey, cstat)

    def _dir(self, path: bytes, entry: Entry | None, parent: DirNode | None, change, base: bytes | None,
             reader: ObjectReader) -> DirNode:
        old = reader.tree_dict(base)
        node = DirNode(dict(old) if change is not RESCAN else {}, parent, entry)
        if parent is not None:
            parent.pending += 1
        if change is RESCAN:
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                self.warn(f"{os.fsdecode(path)}: {exc.strerror}")
                names = []
            todo = [(n, RESCAN) for n in names]
        else:
            todo = sorted(change.items())
        stats = self._prefetch_dir(path, todo)
        for (name, sub), st in zip(todo, stats):
            self._visit(os.path.join(path, name), name, node, sub, old.get(name), reader, st)
        node.listed = True
        if node.pending == 0:
            self._finish_dir(node)
        return node

    # ----------------------------------------------------------------- run
    def run(self, sources: list[bytes], changes: dict | None, parent_root: bytes | None,
            reader: ObjectReader) -> bytes:
        """Build the new root tree. `changes` maps each source basename to RESCAN or a trie."""
        root = DirNode(reader.tree_dict(parent_root) if changes is not None else {}, None, None)
        try:
            for src in sources:
                name = os.path.basename(src)
                sub = RESCAN if changes is None else changes.get(name)
                if sub is None:
                    continue
                if not os.path.lexists(src):
                    raise SourceMissing(f"source path {os.fsdecode(src)} does not exist")
                self._visit(src, name, root, sub, root.entries.get(name), reader)
            root.listed = True
            self._drain_all()
            if root.pending == 0 and self.root_tree is None:
                self._finish_dir(root)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.prefetch.shutdown(wait=False, cancel_futures=True)
        if self.root_tree is None:  # pragma: no cover - would be a bookkeeping bug
            raise StoreError("internal error: the snapshot root was not completed")
        return self.root_tree


def _change_trie(sources: list[bytes], changed: Iterable[str | bytes]) -> dict:
    """Map changed absolute paths onto the source basenames: {name: RESCAN | {child: ...}}."""
    trie: dict = {}
    by_src = {os.path.normpath(s): os.path.basename(s) for s in sources}
    for raw in changed:
        p = os.path.normpath(os.path.abspath(os.fsencode(raw)))
        for src, name in by_src.items():
            if p == src:
                trie[name] = RESCAN
                break
            if p.startswith(src + b"/"):
                rel = p[len(src) + 1:].split(b"/")
                node = trie.setdefault(name, {})
                if node is RESCAN:
                    break
                for part in rel[:-1]:
                    nxt = node.setdefault(part, {})
                    if nxt is RESCAN:
                        break
                    node = nxt
                else:
                    node[rel[-1]] = RESCAN
                break
        else:
            raise InvalidArgument(f"changed path {os.fsdecode(p)} is not under any source path of the set")
    return trie


def create_snapshot(repo: Repository, set_name: str, paths: list[str], changes: Iterable[str] | None = None,
                    progress: Callable[[dict], None] | None = None, lock_wait: float = 10.0,
                    host: str | None = None, retention: bool = True) -> Snapshot:
    """Snapshot `paths` as set `set_name`, by full scan or from a known change set.

    With `changes`, the parent is the set's latest snapshot; if there is none,
    or its source paths differ, this falls back to a full scan (correct,
    only slower).
    """
    check_set_name(set_name)
    if not paths:
        raise InvalidArgument("give at least one source path")
    sources = [os.path.normpath(os.path.abspath(os.fsencode(p))) for p in paths]
    names = [os.path.basename(s) for s in sources]
    if len(set(names)) != len(names) or b"" in names:
        raise InvalidArgument("source paths must have distinct, non-empty base names")
    for s in sources:
        if not os.path.lexists(s):
            raise SourceMissing(f"source path {os.fsdecode(s)} does not exist")
    t0 = time.monotonic()
    with repo.writer(lock_wait=lock_wait) as w:
        reader = ObjectReader(repo, w.txn)
        prev = list_snapshots(repo, w.txn, set_name)
        parent = prev[-1] if prev else None
        trie = None
        if changes is not None and parent is not None and parent.paths == printable([os.fsdecode(s) for s in sources]):
            trie = _change_trie(sources, changes)
        ing = Ingester(w, set_name, progress=progress)
        root = ing.run(sources, trie, parent.root if (parent and trie is not None) else None, reader)
        now = time.time_ns()
        stats = {f"examined_{k}" if k in ("files", "dirs", "symlinks", "bytes") else k: v
                 for k, v in ing.stats.items()}
        stats["files"], stats["dirs"], stats["bytes"] = ing.totals
        stats.update(new_chunks=w.stats["new_blobs"], new_bytes=w.stats["new_raw"],
                     new_stored=w.stats["new_stored"], duration=round(time.monotonic() - t0, 3),
                     mode="changes" if trie is not None else "scan", warnings=ing.warnings)
        snap = Snapshot(set_name, unique_name(repo, w.txn, set_name, now), now, host or socket.gethostname(),
                        [os.fsdecode(s) for s in sources], root, parent.id if parent else None, stats)
        add_snapshot(w, snap)
        if retention:
            # Same transaction: the commit that adds the 65th snapshot drops one.
            _, dropped = apply_retention(w, set_name)
            snap.stats["retention_dropped"] = dropped.snapshots
    return snap
