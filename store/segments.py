"""The CPU-heavy half of making a snapshot: read a file, cut it into chunks
(FastCDC), name them (BLAKE3) and compress (zstd) the ones the repository
lacks, ready to append to a pack.

It works on a *segment*: from an offset that is a cut point to the first cut
at or past SEGMENT_BYTES further on (or the end of the file). Chunking
starts afresh at every cut, so a file cut segment by segment gets exactly
the chunks it would get in one pass, and a big file never has to travel
whole between processes. The ingester runs segments in worker processes
(store/workers.py) once a snapshot is big enough to pay for starting them,
and in its own thread before that.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Callable

import blake3
import zstandard

from . import packs as P
from .backend import LocalAppend
from .chunker import READ_BLOCK, ChunkerParams, chunk_into, chunk_stream
from .crypto import FrameCodec, codec_from_spec
from .errors import DiskFull, StoreError

SEGMENT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Segment:
    path: bytes
    start: int      # a cut point: 0, or where the previous segment ended
    size_hint: int  # bytes expected from `start` on (the stat size), to size the first read
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) the earlier segments read
    stop: int | None = None  # a sparse file's data extent ends here; None: read to the end of the file


@dataclass
class SegmentResult:
    ids: list[bytes] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    # chunk index -> (flags, encoded frame, stored length), for chunks the
    # repository's committed index did not have when the worker looked
    frames: dict[int, tuple[int, bytes, int]] = field(default_factory=dict)
    end: int | None = None    # where the next segment starts; None at the end of the file
    error: str | None = None  # the file could not be read (vanished, unreadable)
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read
    replaced: bool = False    # another file has the name now: the earlier segments are not its start
    # (size, mtime_ns, ctime_ns, ino) once the last segment of a file (or of a
    # data extent) is read: compared with the stat taken before the first,
    # it tells a file written to while it was read
    after: tuple[int, int, int, int] | None = None
    # A worker with a spool (worker_init) writes `frames` there instead of
    # returning them: (chunk index, flags, frame length, stored length, id as
    # stored) per frame, in spool order from `spool_off` on.
    spooled: list[tuple[int, int, int, int, bytes]] | None = None
    spool_off: int = 0


@dataclass
class TaskResult:
    """What a worker hands back for one task: a result per segment and the
    spool file its frames went to (None: they travel in the results)."""
    results: list[SegmentResult]
    spool: str | None = None


class _Window:
    """At most `left` bytes of a file: one data extent of a sparse file."""

    def __init__(self, f, left: int) -> None:
        self.f, self.left = f, left

    def read(self, n: int) -> bytes:
        if self.left <= 0:
            return b""
        data = self.f.read(min(n, self.left))
        self.left -= len(data)
        return data

    def readinto(self, b: memoryview) -> int:
        if self.left <= 0:
            return 0
        n = self.f.readinto(b[:min(len(b), self.left)])
        self.left -= n
        return n


# Where read_segment hands each new chunk's frame instead of keeping it in the
# result: (chunk index, chunk id, raw length, flags, frame, stored length). It must not raise
# OSError, which would read as the file failing (the file would be left out):
# a failure to store is the snapshot's, and is raised as a StoreError.
Sink = Callable[[int, bytes, int, int, bytes, int], None]


def read_segment(seg: Segment, params: ChunkerParams, cctx: zstandard.ZstdCompressor,
                 known: Callable[[bytes], bool], limit: int = SEGMENT_BYTES,
                 codec: FrameCodec | None = None, buf: bytearray | None = None,
                 framed: bool = True, sink: Sink | None = None) -> SegmentResult:
    """`codec` is the repository's frame codec (crypto.py): an encrypted
    repository's chunks are sealed here, in the worker, like they are compressed.
    `buf` (a worker's, see chunker.chunk_into) is read into instead of
    allocating each block afresh. Without `framed` the frames are the bare
    payloads (compressed or raw, no pack frame around them): what the
    replicating master hands its senders (replicator/stream/readers.py).
    With `sink` each frame goes there as it is made, so a segment's frames
    (megabytes) are never held together."""
    out = SegmentResult()
    ids, lens, frames = out.ids, out.lens, out.frames
    put = sink if sink is not None else lambda i, _h, _n, fl, fr, st: frames.__setitem__(i, (fl, fr, st))
    if framed:
        encode = P.encode_frame if codec is None else codec.encode
        overhead = P.FRAME_OVERHEAD
    else:
        encode, overhead = _bare, 0
    done = 0
    try:
        # Each segment opens the file again: never through a symlink, never
        # blocking on a FIFO swapped in, and only the file the earlier
        # segments read (an editor's save-by-rename or a log rotation in
        # between would otherwise splice two files into one).
        fd = os.open(seg.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return SegmentResult(error="is no longer a regular file")
            out.ident = (st.st_dev, st.st_ino)
            if seg.ident is not None and out.ident != seg.ident:
                return SegmentResult(replaced=True)
            if seg.start:
                f.seek(seg.start)
            src = f if seg.stop is None else _Window(f, seg.stop - seg.start)
            chunks = chunk_stream(src, params, size_hint=seg.size_hint) if buf is None \
                else chunk_into(src, params, buf, seg.size_hint)
            for view in chunks:
                h = blake3.blake3(view).digest()
                n = len(view)
                if not known(h):
                    c = cctx.compress(view)
                    if len(c) < n:
                        frame = encode(P.CHUNK, P.ZSTD, h, c, n)
                        put(len(ids), h, n, P.ZSTD, frame, len(frame) - overhead)
                    else:
                        frame = encode(P.CHUNK, 0, h, view, n)
                        put(len(ids), h, n, 0, frame, len(frame) - overhead)
                ids.append(h)
                lens.append(n)
                done += n
                if done >= limit:
                    out.end = seg.start + done  # every chunk but a file's last ends at a cut
                    return out
            st = os.fstat(fd)
            out.after = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    except OSError as exc:
        return SegmentResult(error=exc.strerror or str(exc))
    return out


def _bare(kind: int, flags: int, blob_id: bytes, payload, raw_len: int) -> bytes:
    return bytes(payload)  # a view into a reused buffer must be copied out


# ------------------------------------------------------- in a worker process

_state: dict = {}
SPOOL_BATCH = 1 << 20  # frames a worker holds before writing them to its spool


def worker_init(index_dir: str, params: ChunkerParams, level: int, limit: int = SEGMENT_BYTES,
                codec_spec: tuple | None = None, spool_dir: str | None = None) -> None:
    """Each worker reads the committed index itself (LMDB readers may live
    in any process) to skip compressing chunks the repository has.
    `codec_spec` (FrameCodec.spec()) carries an encrypted repository's key
    material to the worker, which seals the frames it encodes. With
    `spool_dir` the worker writes each task's frames to a file there, which
    the writer copies into its pack in the kernel (Writer.put_spooled):
    pickling megabytes of frames, piping them and unpickling them again cost
    the main process, which is the one writer, ~1 s per GB (issue 17 part 3,
    docs/benchmarks.md)."""
    from .index import Index

    _state["index"] = Index(index_dir, readonly=True)
    _state["params"] = params
    _state["cctx"] = zstandard.ZstdCompressor(level=level)
    _state["limit"] = limit
    _state["buf"] = bytearray(max(READ_BLOCK, 2 * params.max_size))  # chunk_into's, reused for every segment
    _state["codec"] = codec_from_spec(codec_spec)
    _state["spool_dir"] = spool_dir
    _state["tasks"] = 0


class _Spool:
    """A worker's spool file for one task, written as the frames come: a
    pwritev per SPOOL_BATCH bytes, so a worker holds at most that much of
    them. Made on the first frame; a task whose files are all known makes none.
    Every failure to write it is the snapshot's (a StoreError, see Sink)."""

    def __init__(self, spool_dir: str) -> None:
        self.dir = spool_dir
        self.out: LocalAppend | None = None
        self.path: str | None = None
        self.bufs: list[bytes] = []
        self.held = 0
        self.spooled: list[tuple[int, int, int, int, bytes]] = []

    def segment(self) -> int:
        """Start a segment's frames: where they begin in the file."""
        self.spooled = []
        return (self.out.tell() if self.out is not None else 0) + self.held

    def __call__(self, i: int, _h: bytes, _n: int, flags: int, frame: bytes, stored: int) -> None:
        if self.out is None:
            _state["tasks"] += 1
            self.path = os.path.join(self.dir, f"{os.getpid()}-{_state['tasks']}")
            try:
                self.out = LocalAppend(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                                0o600), 0)
            except OSError as exc:
                raise _spool_error(exc) from None
        self.spooled.append((i, flags, len(frame), stored, bytes(frame[16:48])))
        self.bufs.append(frame)
        self.held += len(frame)
        if self.held >= SPOOL_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.bufs:
            return
        try:
            self.out.write_parts(self.bufs, "spooling a snapshot's chunks")
        except OSError as exc:  # not a full disk (that is DiskFull already): the spool's file system failed
            raise _spool_error(exc) from None
        self.bufs, self.held = [], 0

    def close(self, failed: bool) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None
        if failed and self.path is not None:
            _unlink(self.path)


def worker_run(segs: list[Segment]) -> TaskResult:
    idx = _state["index"]
    spool = _Spool(_state["spool_dir"]) if _state["spool_dir"] is not None else None
    failed = True
    try:
        with idx.env.begin(db=idx.db["blobs"], buffers=True) as txn:
            get = txn.get
            known = lambda h: get(h) is not None  # noqa: E731
            out = TaskResult([])
            for s in segs:
                start = spool.segment() if spool is not None else 0
                res = read_segment(s, _state["params"], _state["cctx"], known, _state["limit"], _state["codec"],
                                   _state["buf"], sink=spool)
                if spool is not None and spool.spooled and res.error is None and not res.replaced:
                    res.spooled, res.spool_off = spool.spooled, start
                out.results.append(res)
            if spool is not None:
                spool.flush()
                out.spool = spool.path
            failed = False
            return out
    finally:
        if spool is not None:
            spool.close(failed)


def _spool_error(exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"no space left on device while spooling a snapshot's chunks ({exc.filename or ''})")
    return StoreError(f"cannot spool a snapshot's chunks: {exc.strerror or exc}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
