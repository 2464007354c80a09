"""Making a snapshot: walk what changed, chunk, dedup, compress, store.

Two ways in, one machine underneath:
- full scan: every source path is "changed"; the files cache (size, mtime,
  ctime, inode) lets unchanged files reuse their content without a read;
- change set: the caller (the replicator) names the paths that changed; we
  start from the parent snapshot's trees and rebuild only those paths and
  their ancestors, so the cost is O(changed paths), not O(tree).

The pipeline uses every core: the main thread walks the sources, owns the
LMDB write transaction and appends to packs; files are read, chunked, hashed
and compressed segment by segment (store/segments.py) in worker processes
once the snapshot has read enough to pay for starting them, and on the main
thread before that. Many small files travel in one task, a big file goes
segment after segment, and a directory's tree is written as soon as its last
file is done, so the pipeline never drains at a directory boundary.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Iterable

import msgpack
import zstandard

from . import packs as P
from .changeset import ChangeSet, FileRanges
from .chunker import READ_BLOCK
from .errors import InvalidArgument, SourceMissing, StoreError
from .filters import NO_FILTER, Filter, FilterRules
from .index import filecache_key
from .ingest_ranges import RangeIngestMixin
from .objects import ObjectReader
from .repository import SPOOL_DIR, Repository, Writer, clear_spool, object_id, write_filelist
from .retention import apply_retention
from .segments import SEGMENT_BYTES, Segment, SegmentResult, TaskResult, read_segment, worker_init, worker_run
from .snapshots import Snapshot, printable, add_snapshot, check_set_name, list_snapshots, unique_name
from .trees import DIR, FILE, SYMLINK, X_ATTRS, X_DATA, X_INODE, Entry, encode_tree, subtree_totals, tree_children
from .workers import default_workers, process_pool, stop_pool

TASK_BYTES = 4 * 1024 * 1024  # one worker task: small files up to this much, or one segment
TASK_FILES = 256
POOL_AFTER = 32 * 1024 * 1024  # bytes read on the main thread before worker processes start
READY_MAX = 8  # tasks the walk may build ahead of the workers
MAIN_READS_UP_TO = 2  # cores: on a machine this small, one worker process and the main thread read
MAX_RESTARTS = 3  # a file replaced while read is read again from its start this often
MAX_REREADS = 3   # a file written to while read is read again this often, then stored as read and named
HOLE_MIN = 64 * 1024  # smaller holes of a sparse file are stored as the zeros they read as
MAX_EXTENTS = 4096    # a sparse file's data extents kept in its tree entry at most
MAX_CHANGED_LISTED = 1000
RACY_NS = 1_000_000_000  # files modified this close to the scan start are re-read next time
MAX_WARNINGS = 100
PREFETCH_BYTES = 256 * 1024 * 1024  # per directory: what we ask the kernel to read ahead
CLONE_DIR = b".pit-clones"  # a source's reflink clones (store/capture.py): never in a snapshot
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
    path: bytes
    entry: Entry
    node: DirNode
    cache_key: bytes | None
    cache_stat: tuple | None
    ids: list[bytes] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    ident: tuple[int, int] | None = None  # the file its first segment read
    restarts: int = 0
    rereads: int = 0  # times read again because it changed while read
    extents: list[tuple[int, int]] | None = None  # a sparse file's data extents (None: dense)
    ext_i: int = 0    # the extent being read
    ext_read: list[int] = field(default_factory=list)  # bytes read of each extent so far
    check_stat: tuple | None = None  # read from a frozen clone: its stat, for the written-while-read check
    premade: tuple[bytes, int, int] | None = None  # (filelist id, chunks, size) stored already (range ingest)


def _xattrs(path: bytes) -> list[list[bytes]] | None:
    """Every extended attribute this process may read (user.*, ACLs in
    system.posix_acl_*, security.* labels), never through a symlink."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return None  # no xattr support here, or gone: the walk reports a vanished file
    out = []
    for name in sorted(os.fsencode(n) for n in names):
        try:
            out.append([name, os.getxattr(path, name, follow_symlinks=False)])
        except OSError:
            continue  # removed meanwhile, or not readable by us
    return out or None


def _data_extents(path: bytes, size: int) -> list[tuple[int, int]] | None:
    """A sparse file's data extents (SEEK_DATA/SEEK_HOLE), holes below
    HOLE_MIN counted as data; None when the file has no hole worth keeping."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        runs: list[list[int]] = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here on
                    break
                return None  # SEEK_DATA unsupported: read it whole
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            if start >= size:
                break
            runs.append([start, end - start])
            pos = end
    except OSError:
        return None
    finally:
        os.close(fd)
    gap = HOLE_MIN
    while True:
        merged: list[list[int]] = []
        for off, n in runs:
            if merged and off - (merged[-1][0] + merged[-1][1]) < gap:
                merged[-1][1] = off + n - merged[-1][0]
            else:
                merged.append([off, n])
        if len(merged) <= MAX_EXTENTS:
            break
        gap *= 2
    if merged == [[0, size]] or (merged and sum(n for _, n in merged) >= size):
        return None
    return [(o, n) for o, n in merged]


def _willneed(paths: list[bytes], stop: threading.Event) -> None:
    """Start the kernel reading these files (on the prefetch thread: one task
    per directory, since a task per file cost the walking thread ~15 us each).
    `stop`: the snapshot is over, no file may be opened any more (a source
    on a mount being unmounted right after must not find it busy)."""
    for path in paths:
        if stop.is_set():
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


Task = list[tuple["FileJob", Segment]]


def reader_plan(workers: int | None) -> tuple[int, bool]:
    """(worker processes, whether the main thread reads segments too).

    On up to MAIN_READS_UP_TO cores the main thread is one of the readers,
    beside a single worker process: the second process cost ~50 MiB (an
    interpreter, a segment, its frames and their pickle; docs/benchmarks.md,
    issue 17 part 3) for no more throughput, two cores being two cores, and
    what the main thread reads does not travel between processes. It reads
    only when every worker is busy and no result waits (_pump), so it never
    keeps a finished worker from its next task for long. Given `workers`,
    only processes read."""
    if workers:
        return workers, False
    if (os.cpu_count() or 2) <= MAIN_READS_UP_TO:
        return 1, True
    return default_workers(), False


class _Done(Future):
    """A task run on the main thread: its result is there at once."""

    def __init__(self, result) -> None:
        super().__init__()
        self.set_result(result)


class Ingester(RangeIngestMixin):
    def __init__(self, writer: Writer, set_name: str, workers: int | None = None,
                 progress: Callable[[dict], None] | None = None, filt: Filter = NO_FILTER,
                 ranges: Callable[[bytes, os.stat_result], FileRanges | None] | None = None,
                 skip_paths: frozenset[bytes] = frozenset()) -> None:
        self.w = writer
        self.filt = filt
        self._src = b""       # the source being walked, its stored name and its device (one_file_system)
        self._src_name = b""
        self._root_dev = 0
        self.repo = writer.repo
        self.set = set_name
        self.params = self.repo.params
        self.workers, self.main_reads = reader_plan(workers)
        self.buf = bytearray(max(READ_BLOCK, 2 * self.params.max_size))  # what read_segment reads into here
        self.pool: ProcessPoolExecutor | None = None  # started once POOL_AFTER bytes were read here
        self.read_here = 0
        self.pool_failed = False
        self.cctx = zstandard.ZstdCompressor(level=self.repo.level)
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pit-prefetch")
        self.prefetch_stop = threading.Event()
        self.task: Task = []  # being filled by the walk
        self.task_bytes = 0
        self.ready: deque[Task] = deque()  # built, waiting for a worker
        self.running: dict[Future, Task] = {}
        self.start_ns = time.time_ns()
        # "examined" counts what this run looked at; the snapshot's totals come from the root tree.
        self.stats = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0, "files_read": 0,
                      "bytes_read": 0, "skipped": 0, "excluded": 0}
        self.totals = (0, 0, 0)
        self.warnings: list[str] = []
        self.changed_while_read: list[str] = []  # stored as read after MAX_REREADS: not one moment's content
        self.changed_count = 0
        self.progress = progress
        self._last_progress = 0.0
        self.root_tree: bytes | None = None
        self.xattrs_here = hasattr(os, "listxattr")
        fc = self.w.db["filecache"]
        self._fc_get = lambda k: self.w.txn.get(k, db=fc)
        self._fc_put = lambda k, v: self.w.txn.put(k, v, db=fc)
        # written byte ranges of files (store/ingest_ranges.py): where they come from, the parent to apply them to
        self.ranges = ranges
        self.skip_paths = skip_paths  # never snapshotted (a capture's clone directory)
        self.parent_root: bytes | None = None
        self.reader: ObjectReader | None = None
        self._range_init()

    # ------------------------------------------------------------ warnings
    def warn(self, msg: str) -> None:
        self.stats["skipped"] += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)

    # ------------------------------------------------------------ pipeline
    def _queue(self, job: FileJob, start: int) -> None:
        if job.extents is None:
            seg = Segment(job.path, start, max(0, job.entry.size - start), job.ident)
        else:
            off, n = job.extents[job.ext_i]
            seg = Segment(job.path, start, off + n - start, job.ident, off + n)
        if start or job.restarts or job.rereads:  # the rest (or a new start) of a file under way: the longest chain goes first
            self.ready.appendleft([(job, seg)])
            return
        self.task.append((job, seg))
        self.task_bytes += min(seg.size_hint, SEGMENT_BYTES)
        if self.task_bytes >= TASK_BYTES or len(self.task) >= TASK_FILES:
            self._close_task()

    def _close_task(self) -> None:
        if self.task:
            self.ready.append(self.task)
            self.task, self.task_bytes = [], 0
        self._pump()

    def _pump(self, block: bool = False) -> None:
        """Hand ready tasks to free workers and gather finished ones. The walk
        runs at most READY_MAX tasks ahead; `block` waits for one to finish."""
        while True:
            while self.ready and len(self.running) < self.workers + 1:
                self._start(self.ready.popleft())
            if self.main_reads and self.ready and self.pool is not None and not any(f.done() for f in self.running):
                self._read_here(self.ready.popleft())  # every worker busy, nothing to gather: read one here
            done = [f for f in self.running if f.done()]
            if not done and self.running and (block or len(self.ready) > READY_MAX):
                done = list(wait(self.running, return_when=FIRST_COMPLETED)[0])
            if not done:
                return
            for f in done:
                self._gather(self.running.pop(f), f)
            block = False  # one round done; loop on only while there is more to start or gather

    def _start(self, task: Task) -> None:
        segs = [seg for _, seg in task]
        if self.pool is None and self.read_here >= POOL_AFTER and not self.pool_failed:
            try:
                self.pool = process_pool(self.workers, worker_init,
                                         (self.repo.index_dir, self.params, self.repo.level, SEGMENT_BYTES,
                                          self.repo.codec.spec(), self._spool_dir()))
            except StoreError as exc:  # slower here, but the snapshot is still taken
                self.pool_failed = True
                self.warnings.append(f"{exc}; reading every file in this process")
        if self.pool is not None:
            try:
                self.running[self.pool.submit(worker_run, segs)] = task
                return
            except BrokenProcessPool as exc:
                self.repo.index.env.reader_check()  # the dead worker's LMDB reader slot
                raise StoreError(f"a snapshot worker process died: {exc}") from exc
            except OSError as exc:  # the processes start here (EAGAIN, ENOMEM): go on in this one
                if self.running:
                    raise StoreError(f"cannot start more worker processes: {exc}") from exc
                stop_pool(self.pool, kill=True)
                self.pool, self.pool_failed = None, True
                self.warnings.append(f"cannot start worker processes: {exc}; reading every file in this process")
        self._read_here(task)

    def _spool_dir(self) -> str | None:
        """Where the workers write their frames for the writer to copy
        (store/segments.py); None (frames travel by pipe) when it cannot be made."""
        path = os.path.join(self.repo.path, SPOOL_DIR)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            self.warnings.append(f"cannot make {path} ({exc.strerror}): chunks travel from the workers by pipe")
            return None
        return path

    def _read_here(self, task: Task) -> None:
        segs = [seg for _, seg in task]
        self.read_here += sum(min(s.size_hint, SEGMENT_BYTES) for s in segs)
        # here, the writer's own transaction also knows what this session stored,
        # and each new frame goes into the pack as it is made
        self._gather(task, _Done(TaskResult([read_segment(sg, self.params, self.cctx, self.w.has, SEGMENT_BYTES,
                                                          self.repo.codec, self.buf, sink=self._put_here)
                                             for sg in segs])))

    def _put_here(self, _i: int, h: bytes, n: int, flags: int, frame: bytes, stored: int) -> None:
        try:
            self.w.put_encoded(P.CHUNK, h, flags, frame, stored, n)
        except OSError as exc:  # the pack's disk, not the file read: fail the snapshot (segments.Sink)
            raise StoreError(f"cannot write a pack: {exc.strerror or exc}") from exc

    def _gather(self, task: Task, fut: Future) -> None:
        try:
            out: TaskResult = fut.result()
        except BrokenProcessPool as exc:
            self.repo.index.env.reader_check()  # the dead worker's LMDB reader slot
            raise StoreError(f"a snapshot worker process died: {exc}") from exc
        if out.spool is None:
            self._gather_results(task, out.results, -1)
            return
        try:
            fd = os.open(out.spool, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"a snapshot worker's spool {out.spool} is gone: {exc.strerror}") from exc
        try:
            self._gather_results(task, out.results, fd)
        finally:
            os.close(fd)
            try:
                os.unlink(out.spool)
            except OSError:
                pass

    def _store_spooled(self, res: SegmentResult, fd: int) -> None:
        """Copy a spooled segment's new frames into the pack, in runs of
        frames that lie back to back in the spool (a chunk stored meanwhile,
        by another segment or earlier in this one, breaks a run)."""
        w = self.w
        run: list[tuple[bytes, int, bytes, int, int]] = []
        in_run: set[bytes] = set()
        pos = run_off = res.spool_off
        for i, flags, flen, stored, sid in res.spooled or ():
            h = res.ids[i]
            if h in in_run or w.has(h):
                if run:
                    w.put_spooled(P.CHUNK, fd, run_off, run)
                    run, in_run = [], set()
            else:
                if not run:
                    run_off = pos
                run.append((h, flags, sid, stored, res.lens[i]))
                in_run.add(h)
            pos += flen
        if run:
            w.put_spooled(P.CHUNK, fd, run_off, run)

    def _gather_results(self, task: Task, results: list[SegmentResult], spool_fd: int) -> None:
        w = self.w
        for (job, seg), res in zip(task, results):
            if res.error is not None:
                self._drop(job, res.error)
                continue
            if res.replaced:  # renamed over while read: read the new file from its start
                job.restarts += 1
                if job.restarts > MAX_RESTARTS:
                    self._drop(job, "replaced again and again while being read")
                else:
                    self._read_again(job)
                continue
            job.ident = res.ident
            if res.spooled is not None:
                self._store_spooled(res, spool_fd)
            frames = res.frames
            for i, (h, n) in enumerate(zip(res.ids, res.lens)):
                enc = frames.get(i)
                if enc is not None:
                    if not w.has(h):
                        w.put_encoded(P.CHUNK, h, enc[0], enc[1], enc[2], n)
            job.ids += res.ids
            job.lens += res.lens
            if res.end is not None:
                self._queue(job, res.end)
                continue
            if job.extents is not None:
                job.ext_read.append(sum(job.lens) - sum(job.ext_read))
                if job.ext_i + 1 < len(job.extents):
                    job.ext_i += 1
                    self._queue(job, job.extents[job.ext_i][0])
                    continue
            if res.after is not None and res.after[:3] != (job.check_stat or job.cache_stat)[:3]:
                # Written to while we read it: what we have may mix two versions.
                if job.rereads < MAX_REREADS:
                    job.rereads += 1
                    job.cache_stat = res.after
                    job.entry.mtime_ns = res.after[1]
                    job.entry.size = res.after[0]
                    self._read_again(job)
                    continue
                self._changed_while_read(job)
            self.stats["files_read"] += 1
            self.stats["bytes_read"] += sum(job.lens)
            self._finish_file(job)
        self._report()

    def _read_again(self, job: FileJob) -> None:
        """Start a file over: the bytes read so far are dropped (stored chunks
        nothing references are swept at commit)."""
        job.ids, job.lens, job.ident = [], [], None
        job.ext_i, job.ext_read = 0, []
        if job.extents is not None or job.entry.extra.get(X_DATA) is not None:
            job.extents = _data_extents(job.path, job.entry.size)
            self._set_extents(job)
        if job.extents == []:
            self._finish_file(job)
            return
        self._queue(job, job.extents[0][0] if job.extents else 0)

    def _set_extents(self, job: FileJob) -> None:
        if job.extents is None:
            job.entry.extra.pop(X_DATA, None)
        else:
            job.entry.extra[X_DATA] = [list(x) for x in job.extents]

    def _changed_while_read(self, job: FileJob) -> None:
        """Still changing after MAX_REREADS reads: keep what the last read got,
        and say so (borg: "file changed while we backed it up")."""
        path = os.fsdecode(job.path)
        self.changed_count += 1
        if len(self.changed_while_read) < MAX_CHANGED_LISTED:
            self.changed_while_read.append(path)
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"{path}: changed while being read ({MAX_REREADS + 1} reads); "
                                 f"stored as last read")
        job.cache_key = None  # never let the files cache vouch for it

    def _drain_all(self) -> None:
        self._close_task()
        while self.ready or self.running:
            self._pump(block=True)

    def _report(self) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._last_progress >= 0.2:
            self._last_progress = now
            self.progress(self.stats)

    # --------------------------------------------------------------- files
    def _new_job(self, path: bytes, entry: Entry, node: DirNode, ckey: bytes | None, cstat: tuple) -> FileJob:
        return FileJob(path, entry, node, ckey, cstat)

    def _ingest_file(self, path: bytes, entry: Entry, node: DirNode, ckey: bytes | None, cstat: tuple,
                     st: os.stat_result, check_stat: tuple | None = None) -> None:
        node.pending += 1
        job = FileJob(path, entry, node, ckey, cstat, check_stat=check_stat)
        if st.st_blocks * 512 + HOLE_MIN <= st.st_size:  # fewer blocks than bytes: maybe holes
            job.extents = _data_extents(path, st.st_size)
            self._set_extents(job)
            if job.extents == []:  # all hole
                self._finish_file(job)
                return
        self._queue(job, job.extents[0][0] if job.extents else 0)

    def _drop(self, job: FileJob, why: str) -> None:
        """The file vanished or became unreadable while read: leave it out
        (what of it was stored already is unreferenced and swept at commit)."""
        job.node.entries.pop(job.entry.name, None)
        self.warn(f"{os.fsdecode(job.path)}: {why}")
        self._child_done(job.node)

    def _finish_file(self, job: FileJob) -> None:
        e = job.entry
        size = sum(job.lens)
        if job.premade is not None:  # range ingest stored the filelist itself (store/ingest_ranges.py)
            e.content, e.nchunks, e.size = job.premade
            if job.cache_key is not None:
                self._fc_put(job.cache_key, msgpack.packb([*job.cache_stat, e.to_list()], use_bin_type=True))
            self._child_done(job.node)
            return
        if job.extents is not None:
            # the extents as read (a file that changed under us may have given
            # fewer bytes than planned): the chunk list must hold exactly them
            ext = [(off, n) for (off, _), n in zip(job.extents, job.ext_read) if n > 0]
            job.extents = ext
            self._set_extents(job)
            e.size = max(e.size, ext[-1][0] + ext[-1][1]) if ext else e.size
        else:
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
        # Sorted as the tree is encoded: the children record in the index must
        # list them in the order a reader of the tree finds them.
        entries = sorted(node.entries.values(), key=lambda e: e.name)
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
            node.entry.extra.update(totals)
            self._child_done(node.parent)

    # ---------------------------------------------------------------- walk
    def _prefetch_dir(self, path: bytes, todo: list) -> list:
        """lstat a directory's entries, and ask the kernel to start reading the
        files we will read (not the ones the files cache skips): their I/O then
        overlaps our hashing instead of stalling the main thread file by file."""
        out = []
        wanted = []
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
                wanted.append(p)
        if wanted:
            self.prefetch.submit(_willneed, wanted, self.prefetch_stop)
        return out

    def _entry_from_stat(self, name: bytes, st: os.stat_result, typ: int, path: bytes) -> Entry:
        e = Entry(name, typ, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size)
        if self.xattrs_here:
            attrs = _xattrs(path)
            if attrs:
                e.extra[X_ATTRS] = attrs
        if typ == FILE and st.st_nlink > 1:
            e.extra[X_INODE] = [st.st_dev, st.st_ino]
        return e

    def _visit(self, path: bytes, name: bytes, node: DirNode, change, old: Entry | None, reader: ObjectReader,
               st: os.stat_result | None = None) -> None:
        """Look at `path` afresh (change is RESCAN) or descend into it (change is a trie)."""
        if path in self.skip_paths:
            node.entries.pop(name, None)
            return
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
        if self.filt.active and path != self._src:
            rel = self._src_name + path[len(self._src):]
            isdir = stat.S_ISDIR(mode)
            if self.filt.dir_excluded(rel, path) if isdir else self.filt.match(rel, False):
                node.entries.pop(name, None)
                self.stats["excluded"] += 1
                return
            if isdir and self.filt.other_device(st, self._root_dev):
                # another file system (one_file_system): kept as an empty directory, the mount point
                e = self._entry_from_stat(name, st, DIR, path)
                node.entries[name] = e
                self.stats["dirs"] += 1
                self.stats["excluded"] += 1
                self._dir(path, e, node, RESCAN, None, reader, empty=True)
                return
        if stat.S_ISDIR(mode):
            e = self._entry_from_stat(name, st, DIR, path)
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
            e = self._entry_from_stat(name, st, SYMLINK, path)
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
        e = self._entry_from_stat(name, st, FILE, path)
        node.entries[name] = e
        ckey = filecache_key(self.set, path)
        cstat = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = self._cached(path, st)
        if cached is not None:
            e.content, e.nchunks = cached[7], cached[8]
            ext = (cached[9] or {}).get(X_DATA)
            if ext is not None:
                e.extra[X_DATA] = ext
            return
        racy = st.st_mtime_ns >= self.start_ns - RACY_NS
        plan = self.ranges(path, st) if self.ranges is not None else None
        if plan is not None:
            if self._range_file(path, e, node, None if racy else ckey, cstat, st, plan):
                return
            if plan.read_path is not None:  # read whole, from the frozen clone
                cst = os.stat(plan.read_path)
                self._ingest_file(plan.read_path, e, node, None if racy else ckey, cstat, st,
                                  (cst.st_size, cst.st_mtime_ns, cst.st_ctime_ns, cst.st_ino))
                return
        self._ingest_file(path, e, node, None if racy else ckey, cstat, st)

    def _dir(self, path: bytes, entry: Entry | None, parent: DirNode | None, change, base: bytes | None,
             reader: ObjectReader, empty: bool = False) -> DirNode:
        if self.running:  # a long stretch of unchanged files: keep the workers fed meanwhile
            self._pump()
        old = reader.tree_dict(base)
        node = DirNode(dict(old) if change is not RESCAN else {}, parent, entry)
        if parent is not None:
            parent.pending += 1
        if empty:
            todo = []
        elif change is RESCAN:
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
        self.reader = reader
        failed = True
        try:
            for src in sources:
                name = os.path.basename(src)
                sub = RESCAN if changes is None else changes.get(name)
                if sub is None:
                    continue
                if not os.path.lexists(src):
                    raise SourceMissing(f"source path {os.fsdecode(src)} does not exist")
                self._src, self._src_name, self._root_dev = src, name, os.lstat(src).st_dev
                self.skip_paths = self.skip_paths | {os.path.join(src, CLONE_DIR)}
                self._visit(src, name, root, sub, root.entries.get(name), reader)
            root.listed = True
            self._drain_all()
            if root.pending == 0 and self.root_tree is None:
                self._finish_dir(root)
            failed = False
        finally:
            if self.pool is not None:
                stop_pool(self.pool, kill=failed)
                if failed:  # what the workers spooled for tasks never gathered
                    clear_spool(self.repo.path)
            self.prefetch_stop.set()
            self.prefetch.shutdown(wait=True, cancel_futures=True)  # no source file open after the snapshot
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


def create_snapshot(repo: Repository, set_name: str, paths: list[str],
                    changes: Iterable[str] | ChangeSet | None = None,
                    progress: Callable[[dict], None] | None = None, lock_wait: float = 10.0,
                    host: str | None = None, retention: bool = True,
                    filters: FilterRules | None = None, capture=None) -> Snapshot:
    """Snapshot `paths` as set `set_name`, by full scan or from a known change set.

    With `changes`, the parent is the set's latest snapshot; if there is none,
    or its source paths or its filter differ, this falls back to a full scan
    (correct, only slower). `filters` leaves paths out (store/filters.py);
    the snapshot records them (`stats.filter`).

    A ChangeSet may give files' written byte ranges, and `capture`
    (store/capture.py) computes them for big files as they are met; either
    way a file with ranges is ingested from them (store/ingest_ranges.py)
    when its parent entry allows, else read whole, and the stats say which.
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
    table: dict[bytes, FileRanges] = {}
    if isinstance(changes, ChangeSet):
        table, changes = changes.ranges, changes.paths
    rules = filters or FilterRules()
    filt = rules.compile(sources)  # a bad pattern fails here, before the writer lock is taken
    t0 = time.monotonic()
    with repo.writer(lock_wait=lock_wait) as w:
        reader = ObjectReader(repo, w.txn)
        prev = list_snapshots(repo, w.txn, set_name)
        parent = prev[-1] if prev else None
        trie = None
        same = parent is not None and parent.paths == printable([os.fsdecode(s) for s in sources]) \
            and parent.stats.get("filter", {}) == printable(rules.to_json())
        if changes is not None and same:
            trie = _change_trie(sources, changes)

        def ranges_of(path: bytes, st: os.stat_result) -> FileRanges | None:
            fr = table.get(path)
            return fr if fr is not None or capture is None else capture.for_file(path, st)

        ing = Ingester(w, set_name, progress=progress, filt=filt,
                       ranges=ranges_of if (table or capture is not None) else None,
                       skip_paths=capture.skip_paths if capture is not None else frozenset())
        ing.parent_root = parent.root if same else None
        root = ing.run(sources, trie, parent.root if (parent and trie is not None) else None, reader)
        now = time.time_ns()
        stats = {f"examined_{k}" if k in ("files", "dirs", "symlinks", "bytes") else k: v
                 for k, v in ing.stats.items()}
        stats["files"], stats["dirs"], stats["bytes"] = ing.totals
        stats.update(new_chunks=w.stats["new_blobs"], new_bytes=w.stats["new_raw"],
                     new_stored=w.stats["new_stored"], duration=round(time.monotonic() - t0, 3),
                     mode="changes" if trie is not None else "scan", warnings=ing.warnings)
        if w.stats.get("healed"):  # blobs a repair had lost, stored again from intact source data
            stats["healed"] = w.stats["healed"]
        stats.update(ing.range_stats())
        if capture is not None:
            stats["capture"] = capture.mode
        if rules:
            stats["filter"] = rules.to_json()
        if ing.changed_count:
            stats["changed_while_read"] = ing.changed_while_read
            stats["changed_while_read_count"] = ing.changed_count
        snap = Snapshot(set_name, unique_name(repo, w.txn, set_name, now), now, host or socket.gethostname(),
                        [os.fsdecode(s) for s in sources], root, parent.id if parent else None, stats)
        add_snapshot(w, snap)
        if retention:
            # Same transaction: the commit that adds the 65th snapshot drops one.
            _, dropped = apply_retention(w, set_name)
            snap.stats["retention_dropped"] = dropped.snapshots
    return snap
