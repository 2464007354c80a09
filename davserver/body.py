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
from typing import Iterator

from store.errors import BlobMissing, IntegrityError
from store.files import data_places
from store.packs import FRAME_HEADER, FRAME_MAGIC, ZSTD, pack_name
from store.packs import CRC
from store.repository import object_id

RUN_MAX = 256 * 1024  # the most one pread reads (small enough for malloc to reuse, and to stay in cache)
GAP_MAX = 64 * 1024  # two frames this close are read together (the bytes between are skipped)
FIRST_BATCH, MAX_BATCH = 8, 256  # chunks per lookup transaction: small first (a short Range), then more
HOLE_PIECE = 1 << 20
_HDR = FRAME_HEADER.size
_TRAIL = CRC.size


def _frame_data(repo, cid: bytes, e, buf: memoryview, off: int):
    """The plain bytes of the frame at `off` in `buf`, checked as Repository.read_entry checks them."""
    magic, kind, flags, _r, stored, raw_len, fid = FRAME_HEADER.unpack_from(buf, off)
    if magic != FRAME_MAGIC or fid != cid or stored != e.stored_len:
        raise IntegrityError(f"blob {cid.hex()[:16]}: frame header does not match the index")
    payload = buf[off + _HDR:off + _HDR + stored]
    if flags & ZSTD:
        data = repo.dctx().decompress(payload, max_output_size=raw_len)
    else:
        data = payload
    if len(data) != raw_len or object_id(kind, data) != cid:
        raise IntegrityError(f"blob {cid.hex()[:16]}: content does not match its id")
    return data


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


class Body:
    """A seekable, read-only file object over a view file (what wsgidav's GET wants):
    sequential reads come from one `pieces` stream; a seek elsewhere starts a new one."""

    def __init__(self, vf) -> None:
        self.vf = vf
        self.pos = 0
        self._stream: Iterator | None = None
        self._spare: memoryview | None = None  # read from the stream, not yet returned

    def seek(self, pos: int, whence: int = 0) -> int:
        pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.vf.size + pos)
        if pos != self.pos:
            self._stream, self._spare = None, None
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.vf.size - self.pos
        if n <= 0 or self.pos >= self.vf.size:
            return b""
        if self._stream is None:
            self._stream = pieces(self.vf, self.pos)
        out, got = [], 0
        if self._spare is not None:
            piece, self._spare = self._spare, None
            out.append(piece[:n])
            got = len(out[0])
            if len(piece) > n:
                self._spare = piece[n:]
        while got < n:
            piece = next(self._stream, None)
            if piece is None:
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
        self._stream, self._spare = None, None
