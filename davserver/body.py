"""A file's bytes for GET, read in large runs instead of chunk by chunk.

A file is stored as content-defined chunks of 16 KiB on average, so a 1 GiB
GET is ~65,000 chunks. Read through `ViewFile.read` (what wsgidav's GET
called, 256 KiB at a time) each chunk cost a read transaction, an index
lookup, a `pread`, a copy into the chunk cache and a copy out of it: the
read path took ~2.9 s of CPU per GiB, three times the TLS encryption of the
same bytes, and was what kept `pit serve` at a third of a raw TLS socket
(profile in docs/benchmarks.md, "Restore views"). Here:

- the chunks of a file are looked up a batch at a time in one short read
  transaction (a file sent for an hour still pins no old index view);
- frames that lie next to each other in a pack (the usual case: ingest
  writes a file's new chunks in order) are read with one `pread` of up to
  `RUN_MAX` bytes;
- a stored (uncompressed) chunk is a slice of that read, not a copy, and is
  checked against its id (BLAKE3) like every read of the store; a compressed
  one is decompressed by the thread's decompressor;
- nothing goes through the shared chunk cache (a download reads each chunk
  once; caching it would evict the chunks listings and small files use).

A chunk that cannot be read this way (moved by compaction between the
lookup and the read, or damaged) is read again by the store's own per-chunk
path, which finds it at its new place or raises the store's error.
"""
from __future__ import annotations

import bisect
import queue
import threading
from typing import Iterator

from store.errors import BlobMissing, IntegrityError
from store.files import data_places
from store.packs import FRAME_HEADER, pack_name
from store.packs import CRC
from store.repository import frame_data

RUN_MAX = 256 * 1024  # the most one pread reads (small enough for malloc to reuse, and to stay in cache)
GAP_MAX = 64 * 1024  # two frames this close are read together (the bytes between are skipped)
FIRST_BATCH, MAX_BATCH = 8, 256  # chunks per lookup transaction: small first (a short Range), then more
HOLE_PIECE = 1 << 20
READ_AHEAD_MIN = 4 * 1024 * 1024  # a body with this much left is read ahead by a thread of its own
DEPTH = 4  # blocks read ahead at most
STOP_POLL = 1.0  # seconds: how soon a read-ahead thread notices its answer was abandoned
_HDR = FRAME_HEADER.size
_TRAIL = CRC.size


def _frame_data(repo, cid: bytes, e, buf: memoryview, off: int):
    """The plain bytes of the frame at `off` in `buf`, checked as Repository.read_entry checks them
    (through the repository's frame codec: an encrypted repository's frames are opened here)."""
    try:
        return frame_data(repo.codec, repo.dctx(), cid, buf, off, e.stored_len)
    except IntegrityError as exc:
        raise IntegrityError(f"blob {cid.hex()[:16]}: {exc}") from None


def chunk_data(vf, first: int, last: int) -> Iterator[bytes | memoryview]:
    """The plain bytes of chunks [first, last) of view file `vf`, in order."""
    repo, ids, lengths = vf.repo, vf.chunks.ids, vf.chunks.lengths
    batch = FIRST_BATCH
    i = first
    while i < last:
        cids = ids[i:min(last, i + batch)]
        with repo.reading() as txn:
            ents = [repo.blob_entry(txn, cid) for cid in cids]
        j = 0
        while j < len(cids):
            e = ents[j]
            if e is None:  # the store's path says what is wrong (or finds it moved)
                yield _checked(vf._chunk(cids[j], cache=False), lengths[i + j])
                j += 1
                continue
            start, end = e.offset, e.offset + _HDR + e.stored_len + _TRAIL
            k = j + 1
            while k < len(cids):
                f = ents[k]
                if (f is None or f.pack != e.pack or f.offset < end or f.offset - end > GAP_MAX
                        or f.offset + _HDR + f.stored_len + _TRAIL - start > RUN_MAX):
                    break
                end = f.offset + _HDR + f.stored_len + _TRAIL
                k += 1
            try:
                buf = memoryview(repo.backend.read(pack_name(e.pack), start, end - start))
            except BlobMissing:
                buf = None
            for m in range(j, k):
                data = None
                if buf is not None:
                    try:
                        data = _frame_data(repo, cids[m], ents[m], buf, ents[m].offset - start)
                    except IntegrityError:
                        data = None
                if data is None:
                    data = vf._chunk(cids[m], cache=False)
                yield _checked(data, lengths[i + m])
            j = k
        i += len(cids)
        batch = min(MAX_BATCH, batch * 2)


def _checked(data, n: int):
    if len(data) != n:
        raise IntegrityError("chunk length differs from the file's chunk list")
    return data


def _data(vf, start: int, end: int) -> Iterator[bytes | memoryview]:
    """Bytes [start, end) of `vf`'s chunk data (its stored runs back to back)."""
    starts = vf.chunks.starts
    first = bisect.bisect_right(starts, start) - 1
    last = bisect.bisect_left(starts, end)
    pos = starts[first]
    for data in chunk_data(vf, first, last):
        lo, hi = max(start - pos, 0), min(len(data), end - pos)
        yield data if (lo, hi) == (0, len(data)) else data[lo:hi]
        pos += len(data)


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        k = min(n, HOLE_PIECE)
        yield bytes(k)
        n -= k


def pieces(vf, start: int = 0, end: int | None = None) -> Iterator[bytes | memoryview]:
    """Bytes [start, end) of view file `vf` in pieces; a sparse file's holes as zeros."""
    end = vf.size if end is None else min(end, vf.size)
    if start >= end:
        return
    pos, dbase = start, 0  # dbase: where the current run of data starts in the chunk data
    for off, n in data_places(vf.extents, vf.size):
        if off >= end:
            break
        if off + n > start:
            lo, hi = max(off, start), min(off + n, end)
            yield from _zeros(lo - pos)
            d = dbase + lo - off
            yield from _data(vf, d, d + hi - lo)
            pos = hi
        dbase += n
    yield from _zeros(end - pos)


class _ReadAhead:
    """`pieces` read by a thread of its own into blocks of exactly `block` bytes (the last may be
    shorter), at most `DEPTH` ahead: reading and checking the next block (pread, BLAKE3, zstd, all
    without the GIL) overlaps with TLS sending the one before on the worker thread. An error
    while reading is raised by `next` in the worker; `close` stops the thread within `STOP_POLL`."""

    def __init__(self, stream: Iterator, block: int, first: int) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=DEPTH)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, args=(stream, block, first), daemon=True,
                                       name="pit-serve-read")
        self.thread.start()

    def _run(self, stream: Iterator, block: int, first: int) -> None:
        """The first block is `first` bytes (what the read that started us still wants), so that
        the reads after it, of `block` bytes each, get one whole block each."""
        try:
            out, got, size = [], 0, first
            for piece in stream:
                piece = memoryview(piece)
                while got + len(piece) >= size:
                    k = size - got
                    out.append(piece[:k])
                    if not self._put(out[0].tobytes() if len(out) == 1 else b"".join(out)):
                        return
                    out, got, piece, size = [], 0, piece[k:], block
                if piece:
                    out.append(piece)
                    got += len(piece)
            if out and not self._put(b"".join(out)):
                return
            self._put(None)
        except BaseException as exc:  # handed to the worker, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.stopped:
            try:
                self.q.put(item, timeout=STOP_POLL)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            self.stopped = True
            raise item
        return item

    def close(self) -> None:
        self.stopped = True
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass


class Body:
    """A seekable, read-only file object over a view file (what wsgidav's GET wants).

    The first read after a seek is read here; if more follow (a body, not a short Range) and
    at least `READ_AHEAD_MIN` bytes are left, the rest comes from a `_ReadAhead` in blocks of
    `block` bytes, and a read of exactly one block returns it without a copy."""

    def __init__(self, vf, block: int = 256 * 1024) -> None:
        self.vf, self.block = vf, block
        self.pos = 0
        self._stream: Iterator | None = None  # pieces from self.pos on (after _spare)
        self._ahead: _ReadAhead | None = None
        self._spare: memoryview | None = None  # read from the stream, not yet returned
        self._reads = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.vf.size + pos)
        if pos != self.pos:
            self.close()
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def _next(self, want: int):
        if self._ahead is not None:
            return self._ahead.next()
        if self._stream is None:
            self._stream = pieces(self.vf, self.pos)
        elif self._reads > 1 and self.vf.size - self.pos >= READ_AHEAD_MIN:
            self._ahead = _ReadAhead(self._stream, self.block, want)
            return self._ahead.next()
        return next(self._stream, None)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.vf.size - self.pos
        if n <= 0 or self.pos >= self.vf.size:
            return b""
        self._reads += 1
        out, got = [], 0
        if self._spare is not None:
            piece, self._spare = self._spare, None
            out.append(piece[:n])
            got = len(out[0])
            if len(piece) > n:
                self._spare = piece[n:]
        while got < n:
            piece = self._next(n - got)
            if piece is None:
                break
            if isinstance(piece, bytes) and len(piece) == n - got:
                if not got:
                    self.pos += n
                    return piece  # a read-ahead block, as it is
                out.append(piece)
                got = n
                break
            piece = memoryview(piece)
            if got + len(piece) > n:
                self._spare = piece[n - got:]
                piece = piece[:n - got]
            out.append(piece)
            got += len(piece)
        self.pos += got
        return b"".join(out)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        self._stream, self._ahead, self._spare, self._reads = None, None, None, 0
