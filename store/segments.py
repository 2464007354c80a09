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

import os
import stat
from dataclasses import dataclass, field
from typing import Callable

import blake3
import zstandard

from . import packs as P
from .chunker import READ_BLOCK, ChunkerParams, chunk_into, chunk_stream
from .crypto import FrameCodec, codec_from_spec

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


def read_segment(seg: Segment, params: ChunkerParams, cctx: zstandard.ZstdCompressor,
                 known: Callable[[bytes], bool], limit: int = SEGMENT_BYTES,
                 codec: FrameCodec | None = None, buf: bytearray | None = None,
                 framed: bool = True) -> SegmentResult:
    """`codec` is the repository's frame codec (crypto.py): an encrypted
    repository's chunks are sealed here, in the worker, like they are compressed.
    `buf` (a worker's, see chunker.chunk_into) is read into instead of
    allocating each block afresh. Without `framed` the frames are the bare
    payloads (compressed or raw, no pack frame around them): what the
    replicating master hands its senders (replicator/stream/readers.py)."""
    out = SegmentResult()
    ids, lens, frames = out.ids, out.lens, out.frames
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
                        frames[len(ids)] = (P.ZSTD, frame, len(frame) - overhead)
                    else:
                        frame = encode(P.CHUNK, 0, h, view, n)
                        frames[len(ids)] = (0, frame, len(frame) - overhead)
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


def worker_init(index_dir: str, params: ChunkerParams, level: int, limit: int = SEGMENT_BYTES,
                codec_spec: tuple | None = None) -> None:
    """Each worker reads the committed index itself (LMDB readers may live
    in any process) to skip compressing chunks the repository has.
    `codec_spec` (FrameCodec.spec()) carries an encrypted repository's key
    material to the worker, which seals the frames it encodes."""
    from .index import Index

    _state["index"] = Index(index_dir, readonly=True)
    _state["params"] = params
    _state["cctx"] = zstandard.ZstdCompressor(level=level)
    _state["limit"] = limit
    _state["buf"] = bytearray(max(READ_BLOCK, 2 * params.max_size))  # chunk_into's, reused for every segment
    _state["codec"] = codec_from_spec(codec_spec)


def worker_run(segs: list[Segment]) -> list[SegmentResult]:
    idx = _state["index"]
    with idx.env.begin(db=idx.db["blobs"], buffers=True) as txn:
        get = txn.get
        known = lambda h: get(h) is not None  # noqa: E731
        return [read_segment(s, _state["params"], _state["cctx"], known, _state["limit"], _state["codec"],
                             _state["buf"])
                for s in segs]
