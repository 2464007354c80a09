"""Reading a master's files: cut, hash and compress once, in worker processes when it pays.

The scanner (scan.py) reads every new or changed file with the function
`pit snapshot` reads with (`store.segments.read_segment`), so a file is cut
the same way on both paths, and in the same worker processes
(`store.workers`): with threads the GIL hand-overs of many small C calls
cost more than they save. Where a sender will want the bytes (a new file
while a replica is connected), the chunks are compressed in the same pass
and the bare payloads handed to the senders (payloads.py): the sender then
sends what the scan read, without reading, hashing or compressing it again.

The senders use the pool too: a catch-up (a new replica, a reconnect) asks
for chunks no scan has in memory, and `worker_ranges` reads, checks and
compresses them in the workers, a few tasks ahead of the sending thread.

One `ReaderPool` per agent. Its processes start on the first big piece of
work and stop after `IDLE_STOP` seconds without any, so an idle master keeps
no worker processes. They are started from a thread of the pool's own that
lives as long as they do: Linux ties a child's death signal to the thread
that forked it (store/workers.py), and the threads that ask for reads
(a set's event loop, a point's connection thread) come and go.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from array import array
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

import blake3
import zstandard

from store import packs as P
from store.chunker import READ_BLOCK, ChunkerParams
from store.errors import StoreError
from store.segments import SEGMENT_BYTES, Segment, SegmentResult, read_segment
from store.workers import process_pool, stop_pool

log = logging.getLogger("pit.master")

LEVEL = 3  # zstd level of the payloads: what the replica stores, so not lowered for speed
TASK_BYTES = 4 * 1024 * 1024  # one worker task: small files up to this much, or one segment of a big file
TASK_FILES = 256
RANGE_TASK_BYTES = 4 * 1024 * 1024  # one worker task of a catch-up: chunk ranges up to this much
POOL_AFTER = 32 * 1024 * 1024  # bytes a scan reads on its own thread before it hands the rest to the workers
IDLE_STOP = 60.0  # seconds without work before the worker processes exit

_all = lambda h: True  # noqa: E731  (every chunk "known": cut and hash, compress nothing)
_none = lambda h: False  # noqa: E731


class Cutter:
    """What one process (a worker, or a scanning thread) keeps between reads: the zstd context and
    the reusable read buffer of `chunker.chunk_into`."""

    def __init__(self) -> None:
        self.cctx = zstandard.ZstdCompressor(level=LEVEL)
        self.bufs: dict[int, bytearray] = {}

    def read(self, seg: Segment, params: ChunkerParams, compress: bool) -> SegmentResult:
        """One segment of a file: ids and lengths, and (with `compress`) every chunk's bare payload."""
        buf = self.bufs.get(params.max_size)
        if buf is None:
            buf = self.bufs[params.max_size] = bytearray(max(READ_BLOCK, 2 * params.max_size))
        return read_segment(seg, params, self.cctx, _none if compress else _all, SEGMENT_BYTES, None, buf,
                            framed=False)

    def read_range(self, path: bytes, off: int, n: int, cid: bytes | None) -> tuple[int, bytes] | None:
        """(flags, payload) of a file's range if it still holds chunk `cid` (any chunk if None); None
        if it changed or cannot be read whole."""
        got = self.read_any(path, off, n, cid)
        return None if got is None else got[1]

    def read_any(self, path: bytes, off: int, n: int, cid: bytes | None = None
                 ) -> tuple[bytes, tuple[int, bytes]] | None:
        """(id, (flags, payload)) of a file's range as it is now (and still `cid`, if given)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                data = os.pread(fd, n, off)
            finally:
                os.close(fd)
        except OSError:
            return None
        h = blake3.blake3(data).digest()
        if len(data) != n or (cid is not None and h != cid):
            return None
        c = self.cctx.compress(data)
        return h, ((P.ZSTD, c) if len(c) < n else (0, data))


_cutter: Cutter | None = None  # this worker process's


def _worker_start() -> None:
    global _cutter
    _cutter = Cutter()


def _noop() -> int:
    return os.getpid()


def worker_segments(params: ChunkerParams, segs: list[Segment], compress: list[bool]) -> list[SegmentResult]:
    assert _cutter is not None
    return [_cutter.read(s, params, c) for s, c in zip(segs, compress)]


def worker_ranges(reqs: list[tuple[bytes, int, int, bytes]]) -> list[tuple[int, bytes] | None]:
    assert _cutter is not None
    return [_cutter.read_range(*r) for r in reqs]


class ReaderPool:
    """The agent's worker processes for reading source files (see the module docstring)."""

    def __init__(self, workers: int | None = None, idle_stop: float = IDLE_STOP) -> None:
        # Two on a two-core machine: the agent's own threads (sending, TLS) and the replica's share the cores.
        self.workers = workers or max(2, min(4, os.cpu_count() or 2))
        self.idle_stop = idle_stop
        self.lock = threading.Lock()
        self.pool: ProcessPoolExecutor | None = None
        self.stop_owner: threading.Event | None = None
        self._box: dict = {}  # the owning thread's: its pool, and whether to kill it when told to stop
        self.last_use = 0.0
        self.users = 0  # scans and catch-ups using the pool now: it is not stopped under them
        self.closed = False

    def _start(self) -> ProcessPoolExecutor:
        ready = threading.Event()
        stop = threading.Event()
        box: dict = {}

        def own() -> None:
            try:
                pool = process_pool(self.workers, _worker_start)
                # one task per process, all at once, so every process starts here, in the owning thread
                for f in [pool.submit(_noop) for _ in range(self.workers)]:
                    f.result()
                box["pool"] = pool
            except (StoreError, OSError, BrokenProcessPool) as exc:
                box["error"] = exc
            ready.set()
            if "pool" in box:
                stop.wait()
                stop_pool(box["pool"], kill=box.get("kill", False))

        threading.Thread(target=own, daemon=True, name="pit-readers").start()
        ready.wait()
        if "error" in box:
            raise StoreError(f"cannot start reader processes: {box['error']}")
        self.stop_owner = stop
        self._box = box
        return box["pool"]

    def acquire(self) -> ProcessPoolExecutor:
        """The running pool (started if needed); release() when done. Raises StoreError."""
        with self.lock:
            if self.closed:
                raise StoreError("the reader processes are stopped")
            if self.pool is None:
                self.pool = self._start()
                log.debug("reader processes started (%d)", self.workers)
            self.users += 1
            self.last_use = time.monotonic()
            return self.pool

    def release(self, pool: ProcessPoolExecutor, broken: bool = False) -> None:
        """Done with `pool`; `broken` (a worker died): stop it, the next acquire starts another. Another
        user of that pool sees it broken too: it must not stop the pool started since."""
        with self.lock:
            self.users -= 1
            self.last_use = time.monotonic()
            if broken and pool is self.pool:
                self._stop(kill=True)

    def _stop(self, kill: bool) -> None:
        if self.pool is not None and self.stop_owner is not None:
            self._box["kill"] = kill
            self.stop_owner.set()
        self.pool = None
        self.stop_owner = None

    def tick(self) -> None:
        """Stop idle worker processes (called from the set loops about once a second)."""
        with self.lock:
            if self.pool is not None and not self.users and time.monotonic() - self.last_use > self.idle_stop:
                log.debug("reader processes idle: stopped")
                self._stop(kill=False)

    @property
    def running(self) -> bool:
        return self.pool is not None

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._stop(kill=True)


def submit(pool: ProcessPoolExecutor, fn, *args) -> Future:
    """pool.submit, with a pool broken meanwhile turned into the BrokenProcessPool its future would carry."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError as exc:  # shut down under us (the agent stopping)
        raise BrokenProcessPool(str(exc)) from exc


class ReadJob:
    """One file to read: what the scanner asked (`tag` is its own) and what came back."""

    __slots__ = ("path", "size", "compress", "tag", "ids", "lens", "failed", "after", "ident", "src", "read")

    def __init__(self, path: bytes, size: int, compress: bool, tag, src: bytes | None = None) -> None:
        self.path, self.size, self.compress, self.tag = path, size, compress, tag
        self.src = src  # what is read, if not `path`: a frozen reflink clone of it (store/capture.py)
        self.read: int | None = None  # bytes read, if not the whole file (a byte-range capture)
        self.ids = bytearray()
        self.lens = array("I")
        self.failed = False  # vanished, unreadable, replaced or no longer a regular file while read
        self.after: tuple | None = None  # (size, mtime_ns, ctime_ns, ino) once the last segment was read
        self.ident: tuple[int, int] | None = None

    def take(self, res: SegmentResult, put: Callable[[bytes, tuple[int, bytes], int], None] | None) -> int | None:
        """Add one segment's result; -> where the next segment starts, None when the file is done."""
        if res.error is not None or res.replaced:
            self.failed = True
            return None
        self.ident = res.ident
        if put is not None:
            for i, (flags, payload, _n) in res.frames.items():
                put(res.ids[i], (flags, payload), res.lens[i])
        self.ids += b"".join(res.ids)
        self.lens.extend(res.lens)
        if res.end is None:
            self.after = res.after
        return res.end

    def restart(self) -> None:
        self.ids, self.lens, self.failed, self.after, self.ident = bytearray(), array("I"), False, None, None


class FileReads:
    """The reads of one scan, in order of asking, done on the caller's thread until POOL_AFTER bytes,
    then in the worker processes: small files travel many to a task, a big file segment after
    segment, at most `depth` tasks in flight. `done(job)` is called on the caller's thread as each
    file completes (not in the order asked); `put` takes the payloads (payloads.py)."""

    def __init__(self, readers: ReaderPool | None, params: ChunkerParams, cutter: Cutter,
                 done: Callable[[ReadJob], None], put: Callable[[bytes, tuple[int, bytes], int], None],
                 brake: Callable[[], None] = lambda: None) -> None:
        self.brake = brake  # after each task's results (or file or segment read here): the scan waits there
        self.readers = readers
        self.params = params
        self.cutter = cutter
        self.done = done
        self.put = put
        self.pool: ProcessPoolExecutor | None = None
        self.local = 0  # bytes read on this thread
        self.batch: list[tuple[ReadJob, Segment]] = []
        self.batch_bytes = 0
        self.inflight: deque[tuple[Future, list[tuple[ReadJob, Segment]]]] = deque()
        self.depth = 0

    def add(self, job: ReadJob) -> None:
        if self.pool is None and self.readers is not None and self.local >= POOL_AFTER:
            try:
                self.pool = self.readers.acquire()
                self.depth = 2 * self.readers.workers + 1
            except StoreError as exc:
                log.warning("reading on the scanning thread: %s", exc)
                self.readers = None
        if self.pool is None:
            self.read_here(job)
            return
        seg = Segment(job.src or job.path, 0, job.size)
        if job.size >= TASK_BYTES:
            self._submit([(job, seg)])
            return
        self.batch.append((job, seg))
        self.batch_bytes += job.size
        if self.batch_bytes >= TASK_BYTES or len(self.batch) >= TASK_FILES:
            self._flush_batch()

    def read_here(self, job: ReadJob) -> None:
        """Read a whole file on this thread (from its start: a file a broken pool had half read too)."""
        job.restart()
        at: int | None = 0
        while at is not None:
            res = self.cutter.read(Segment(job.src or job.path, at, max(0, job.size - at), job.ident), self.params,
                                   job.compress)
            self.local += sum(res.lens)
            at = job.take(res, self.put if job.compress else None)
            if at is not None:
                self.brake()
        self.done(job)
        self.brake()

    def _flush_batch(self) -> None:
        if self.batch:
            items, self.batch, self.batch_bytes = self.batch, [], 0
            self._submit(items)

    def _submit(self, items: list[tuple[ReadJob, Segment]], wait: bool = True) -> None:
        try:
            fut = submit(self.pool, worker_segments, self.params, [s for _, s in items], [j.compress for j, _ in items])
        except BrokenProcessPool:
            self._broken(items)
            return
        self.inflight.append((fut, items))
        while wait and len(self.inflight) > self.depth:
            self._collect()

    def _collect(self) -> None:
        fut, items = self.inflight.popleft()
        try:
            results = fut.result()
        except BrokenProcessPool:
            self._broken(items)
            return
        for (job, seg), res in zip(items, results):
            at = job.take(res, self.put if job.compress else None)
            if at is None:
                self.done(job)
            else:  # the next segment goes to the back of the queue: other files go on meanwhile
                self._submit([(job, Segment(job.src or job.path, at, max(0, job.size - at), job.ident))], wait=False)
        self.brake()

    def _broken(self, items: list[tuple[ReadJob, Segment]]) -> None:
        """A worker died (killed, out of memory): read what was in flight, and the rest, here."""
        log.warning("a reader process died: reading on the scanning thread")
        jobs = {id(j): j for j, _ in items}
        for _, its in self.inflight:
            jobs.update((id(j), j) for j, _ in its)
        jobs.update((id(j), j) for j, _ in self.batch)
        self.inflight.clear()
        self.batch, self.batch_bytes = [], 0
        pool, self.pool = self.pool, None
        if self.readers is not None:
            self.readers.release(pool, broken=True)
            self.readers = None
        for job in jobs.values():
            self.read_here(job)

    def drain(self) -> None:
        """Wait for every read asked (each job's `done` runs), then give the pool back."""
        try:
            if self.pool is not None:
                self._flush_batch()
                while self.inflight:
                    self._collect()
        finally:
            if self.pool is not None and self.readers is not None:
                pool, self.pool = self.pool, None
                self.readers.release(pool)
