"""Content-defined chunking with the compiled FastCDC.

We chunk a stream, not a file in memory: read a block, cut it, keep every
chunk but the last (its end is where the block ended, not where the content
says), and start the next block with that tail. The cut points are then the
same as if the whole file had been chunked in one piece, which is what makes
an 8 KiB change cost one or two chunks wherever it lands.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import ChunkerUnavailable, InvalidArgument

try:  # the Cython build; the pure-Python fallback is ~100x slower
    from fastcdc.fastcdc_cy import fastcdc_cy as _fastcdc
except ImportError as exc:  # pragma: no cover - depends on the wheel installed
    raise ChunkerUnavailable(
        "the compiled FastCDC (fastcdc.fastcdc_cy) is not importable; "
        "reinstall the `fastcdc` wheel for this platform"
    ) from exc

#: Default average chunk size. Chosen with bench/chunksize.py: see docs/benchmarks.md.
DEFAULT_AVG = 16 * 1024
READ_BLOCK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ChunkerParams:
    """Fixed per repository at `init`: changing them would break dedup."""

    min_size: int
    avg_size: int
    max_size: int

    @classmethod
    def for_average(cls, avg: int) -> "ChunkerParams":
        if avg < 1024 or avg > 8 * 1024 * 1024 or avg & (avg - 1):
            raise InvalidArgument(f"average chunk size must be a power of two between 1 KiB and 8 MiB, not {avg}")
        return cls(avg // 4, avg, avg * 4)

    def to_dict(self) -> dict:
        return {"algorithm": "fastcdc-2020-cy", "min": self.min_size, "avg": self.avg_size, "max": self.max_size}

    @classmethod
    def from_dict(cls, d: dict) -> "ChunkerParams":
        return cls(int(d["min"]), int(d["avg"]), int(d["max"]))


def chunk_stream(f: BinaryIO, params: ChunkerParams, block: int = READ_BLOCK,
                 size_hint: int | None = None) -> Iterator[memoryview]:
    """Yield the chunks of a binary stream as memoryviews.

    Each block is a fresh bytes object, so a yielded view stays valid for as
    long as the caller holds it (the view keeps its block alive). With
    `size_hint` (the stat size) a small file is read with one right-sized
    read: asking for 4 MiB to get 15 KiB costs a 4 MiB allocation and its
    page faults, per file.
    """
    block = max(block, params.max_size * 2)
    want = block if size_hint is None else max(1, min(block, size_hint + 1))
    tail = b""
    while True:
        data = f.read(want)
        want = block
        if not data:
            break
        buf = tail + data if tail else data
        view = memoryview(buf)
        pending = None
        for c in _fastcdc(buf, params.min_size, params.avg_size, params.max_size):
            if pending is not None:
                yield view[pending[0]:pending[0] + pending[1]]
            pending = (c.offset, c.length)
        tail = bytes(view[pending[0]:]) if pending is not None else b""
    if tail:
        yield from chunk_bytes(tail, params)


def chunk_bytes(data: bytes, params: ChunkerParams) -> Iterator[memoryview]:
    """Chunk a buffer that is already whole (small files, tests)."""
    view = memoryview(data)
    for c in _fastcdc(data, params.min_size, params.avg_size, params.max_size):
        yield view[c.offset:c.offset + c.length]


def chunk_into(f: BinaryIO, params: ChunkerParams, buf: bytearray, size_hint: int | None = None
               ) -> Iterator[memoryview]:
    """Like chunk_stream, but every block is read into `buf` (at least twice
    the largest chunk), again and again, so a worker that chunks gigabytes
    allocates, and faults in, one buffer instead of two fresh 4 MiB objects
    per block (the block and the block joined to the previous one's tail),
    which glibc keeps as heap long after they are freed.

    A yielded view points into `buf`: it is valid only until the next chunk
    is asked for, so the caller must copy what it keeps (hashing,
    compressing and framing all copy)."""
    size = len(buf)
    if size < 2 * params.max_size:
        raise InvalidArgument(f"a chunking buffer of {size} bytes is under twice the largest chunk")
    mv = memoryview(buf)
    tail = 0  # buf[:tail]: the previous block's last chunk, whose end was the block's end, not a cut
    want = size if size_hint is None else max(1, min(size, size_hint + 1))
    while True:
        n = f.readinto(mv[tail:tail + min(want, size - tail)])
        want = size
        if not n:
            break
        end = tail + n
        data = mv[:end]
        pending = None
        for c in _fastcdc(data, params.min_size, params.avg_size, params.max_size):
            if pending is not None:
                yield data[pending[0]:pending[0] + pending[1]]
            pending = (c.offset, c.length)
        start = pending[0] if pending is not None else end
        tail = end - start
        if start:
            mv[:tail] = bytes(mv[start:end])
    if tail:
        yield from chunk_bytes(mv[:tail], params)
