"""Re-chunk only the parts of a file that were written, given its old chunk list.

Why this works: a FastCDC cut depends only on the bytes of the chunk it
ends (the rolling hash starts afresh at each chunk start, and a chunk is cut
at max_size at the latest). So chunking from any old cut point yields the old
cuts for as long as the content is unchanged, and once a new cut lands on an
old boundary whose chunk was not written, every old chunk from there up to
the next written one is exactly what a full pass would produce. We therefore:

- keep the old chunks wholly before the first written chunk;
- re-chunk from the start of that chunk (an old cut point), reading old
  chunk by old chunk, until a new cut coincides with an old boundary whose
  chunk is unwritten; then reuse old chunks until the next written one;
- treat a size change as a write of the tail from one byte before the
  shorter size (the old last chunk ended at the end of the file, not at a
  content cut).

The result is the chunk list a full re-read would give; only the written
chunks and the few after them (until the cuts line up again) are read.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

from .chunker import ChunkerParams, _fastcdc
from .errors import ShortRead


READ_MAX = 8 * 1024 * 1024  # one read at most this much more than an old chunk (a long written run, a grown tail)


@dataclass
class Rechunked:
    """The new file as pieces: an old chunk's index, or the bytes of a new chunk."""

    pieces: list[int | bytes] = field(default_factory=list)
    bytes_read: int = 0
    new_chunks: int = 0
    reused_chunks: int = 0


def written_chunks(starts: list[int], ranges: list[tuple[int, int]], new_size: int) -> list[bool]:
    """Which old chunks (by the cumulative `starts`, len n+1) hold a written byte."""
    n = len(starts) - 1
    old_size = starts[-1]
    hit = [False] * n
    for off, length in ranges:
        if length <= 0 or off >= old_size:
            continue
        first = bisect.bisect_right(starts, off) - 1
        last = bisect.bisect_right(starts, min(old_size, off + length) - 1) - 1
        for i in range(first, last + 1):
            hit[i] = True
    if new_size != old_size and n:
        tail = min(old_size, new_size) - 1
        k = 0 if tail < 0 else bisect.bisect_right(starts, tail) - 1
        for i in range(k, n):
            hit[i] = True
    return hit


def rechunk(old_lens: list[int], ranges: list[tuple[int, int]], new_size: int,
            read: Callable[[int, int], bytes], params: ChunkerParams) -> Rechunked:
    """The chunk pieces of the new file of `new_size` bytes, reading through
    `read(offset, length)` only what the written `ranges` make necessary."""
    starts = [0]
    for n in old_lens:
        starts.append(starts[-1] + n)
    n = len(old_lens)
    hit = written_chunks(starts, ranges, new_size)
    boundary = {s: i for i, s in enumerate(starts[:-1])}  # old cut point -> the chunk starting there
    out = Rechunked()
    mn, avg, mx = params.min_size, params.avg_size, params.max_size

    def realigned(pos: int) -> int | None:
        k = boundary.get(pos)
        return k if k is not None and not hit[k] else None

    def fetch(pos: int, stop: int) -> bytes:
        data = read(pos, stop - pos)
        out.bytes_read += len(data)
        if len(data) != stop - pos:
            raise ShortRead(f"short read at {pos}: {len(data)} of {stop - pos} bytes")
        return data

    i = 0
    while i < n or (n == 0 and not out.pieces and new_size > 0):  # no old chunks: all of it is new
        if n and not hit[i]:
            out.pieces.append(i)
            out.reused_chunks += 1
            i += 1
            continue
        # re-chunk from the old cut point starts[i] (0 when there were no old chunks)
        bstart = starts[i] if n else 0
        buf = b""
        end = bstart
        nxt: int | None = None
        while nxt is None:
            eof = end >= new_size
            if not eof:
                if end < starts[-1]:
                    j = bisect.bisect_right(starts, end) - 1
                    stop = starts[j + 1]
                    while j + 1 < n and hit[j + 1] and stop - end < READ_MAX:  # a run of written chunks: one read
                        j += 1
                        stop = starts[j + 1]
                else:
                    stop = end + READ_MAX  # grown past the old end
                stop = min(stop, new_size)
                buf += fetch(end, stop)
                end = stop
                eof = end >= new_size
            cuts = [(c.offset, c.length) for c in _fastcdc(buf, mn, avg, mx)] if buf else []
            keep = len(cuts) if eof else len(cuts) - 1
            consumed = 0
            for off, ln in cuts[:keep]:
                out.pieces.append(bytes(buf[off:off + ln]))
                out.new_chunks += 1
                consumed = off + ln
                k = realigned(bstart + consumed)
                if k is not None:
                    nxt = k
                    break
            if nxt is not None:
                break
            if eof:
                nxt = n
                break
            buf = buf[consumed:]
            bstart += consumed
            k = realigned(end)
            if k is not None and buf:
                # Is the tail piece cut at `end` by its content, or only by the
                # buffer's end? A cut never depends on later bytes: one more
                # byte tells.
                first = next(iter(_fastcdc(buf + b"\0", mn, avg, mx)))
                if first.length == len(buf):
                    out.pieces.append(bytes(buf))
                    out.new_chunks += 1
                    nxt = k
        i = nxt
        if n == 0:
            break
    return out
