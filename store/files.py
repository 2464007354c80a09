"""Files as ordered chunk lists, with an offset table for random reads.

A file of one chunk points straight at that chunk; a longer file points at
a *filelist* blob: the chunk ids concatenated, then their lengths as
little-endian u32. Cumulative offsets are rebuilt on load, so reading byte
N of a 100 GiB file is one bisect plus one chunk read.
"""
from __future__ import annotations

import bisect
import sys
import itertools
from array import array
from dataclasses import dataclass
from typing import Callable, Iterator

import msgpack

from .errors import IntegrityError

FILELIST_VERSION = 1


def encode_filelist(ids: list[bytes], lengths: list[int]) -> bytes:
    lens = array("I", lengths)
    if lens.itemsize != 4:  # pragma: no cover - every platform we run on
        raise RuntimeError("array('I') is not 32-bit here")
    if sys.byteorder == "big":  # pragma: no cover - the format is little-endian everywhere
        lens.byteswap()
    return msgpack.packb([FILELIST_VERSION, b"".join(ids), lens.tobytes()], use_bin_type=True)


def decode_filelist(data: bytes) -> tuple[list[bytes], list[int]]:
    try:
        version, idblob, lenblob = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed filelist: {exc}") from None
    if version != FILELIST_VERSION or len(idblob) % 32 or len(lenblob) % 4 or len(idblob) // 32 != len(lenblob) // 4:
        raise IntegrityError("malformed filelist")
    ids = [idblob[i:i + 32] for i in range(0, len(idblob), 32)]
    lens = array("I")
    lens.frombytes(lenblob)
    if sys.byteorder == "big":  # pragma: no cover
        lens.byteswap()
    return ids, lens.tolist()


@dataclass
class ChunkList:
    ids: list[bytes]
    lengths: list[int]

    def __post_init__(self) -> None:
        self.starts = [0, *itertools.accumulate(self.lengths)]

    @property
    def size(self) -> int:
        return self.starts[-1]


class FileReader:
    """Random-access reads over a chunk list; only the chunks touched are read."""

    def __init__(self, chunks: ChunkList, read_chunk: Callable[[bytes], bytes]) -> None:
        self.chunks = chunks
        self.read_chunk = read_chunk
        self.size = chunks.size

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        starts = self.chunks.starts
        i = bisect.bisect_right(starts, offset) - 1
        parts = []
        pos = offset
        while pos < end:
            data = self.read_chunk(self.chunks.ids[i])
            if len(data) != self.chunks.lengths[i]:
                raise IntegrityError("chunk length differs from the file's chunk list")
            lo = pos - starts[i]
            hi = min(len(data), end - starts[i])
            parts.append(data[lo:hi])
            pos = starts[i] + hi
            i += 1
        return b"".join(parts)

    def iter_chunks(self) -> Iterator[bytes]:
        for cid, n in zip(self.chunks.ids, self.chunks.lengths):
            data = self.read_chunk(cid)
            if len(data) != n:
                raise IntegrityError("chunk length differs from the file's chunk list")
            yield data


