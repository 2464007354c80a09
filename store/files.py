"""Files as ordered chunk lists, with an offset table for random reads.

A file of one chunk points straight at that chunk; a longer file points at
a *filelist* blob: the chunk ids concatenated, then their lengths as
little-endian u32. Cumulative offsets are rebuilt on load, so reading byte
N of a 100 GiB file is one bisect plus one chunk read.

A big file (more than LEAF_SPLIT chunks) gets two levels: *leaf* filelists
of ~64 chunks each, cut where a chunk id says so (content-defined, so an
edit moves no boundary but its own), under an *index* filelist (version 2)
that lists the leaves and their byte lengths. A database changed in a few
pages then shares all but a few leaves with its previous version: a new
snapshot stores, and dropping an old one decrements, only those, not one
entry per chunk of the whole file.
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

FILELIST_VERSION = 1   # a leaf: its entries are chunks
INDEX_VERSION = 2      # an index: its entries are leaf filelists
LEAF_SPLIT = 256       # files with more chunks than this get two levels
LEAF_MASK = 63         # a leaf ends after a chunk whose id's first two bytes & 63 == 0 (~64 chunks)
LEAF_MAX = 1024        # ...or at this many chunks


def encode_filelist(ids: list[bytes], lengths: list[int], version: int = FILELIST_VERSION) -> bytes:
    lens = array("I", lengths)
    if lens.itemsize != 4:  # pragma: no cover - every platform we run on
        raise RuntimeError("array('I') is not 32-bit here")
    if sys.byteorder == "big":  # pragma: no cover - the format is little-endian everywhere
        lens.byteswap()
    return msgpack.packb([version, b"".join(ids), lens.tobytes()], use_bin_type=True)


def decode_filelist(data: bytes) -> tuple[list[bytes], list[int]]:
    """The entries of a filelist: chunks (a leaf) or leaves (an index), with byte lengths."""
    return decode_filelist_level(data)[1:]


def decode_filelist_level(data: bytes) -> tuple[int, list[bytes], list[int]]:
    try:
        version, idblob, lenblob = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed filelist: {exc}") from None
    if version not in (FILELIST_VERSION, INDEX_VERSION) or len(idblob) % 32 or len(lenblob) % 4 or len(idblob) // 32 != len(lenblob) // 4:
        raise IntegrityError("malformed filelist")
    ids = [idblob[i:i + 32] for i in range(0, len(idblob), 32)]
    lens = array("I")
    lens.frombytes(lenblob)
    if sys.byteorder == "big":  # pragma: no cover
        lens.byteswap()
    return version, ids, lens.tolist()


@dataclass
class FilelistPlan:
    """The filelist blobs one file needs: (payload, children) leaves first, then the top."""

    blobs: list[tuple[bytes, list[bytes]]]
    top: bytes  # id of the blob the tree entry points at


def plan_filelist(ids: list[bytes], lengths: list[int], make_id: Callable[[bytes], bytes]) -> FilelistPlan:
    """Encode a file of more than one chunk as one leaf, or leaves under an index."""
    if len(ids) <= LEAF_SPLIT:
        payload = encode_filelist(ids, lengths)
        return FilelistPlan([(payload, ids)], make_id(payload))
    blobs: list[tuple[bytes, list[bytes]]] = []
    leaf_ids: list[bytes] = []
    leaf_lens: list[int] = []
    start = 0
    for end in leaf_ends(ids):
        part, plens = ids[start:end], lengths[start:end]
        payload = encode_filelist(part, plens)
        blobs.append((payload, part))
        leaf_ids.append(make_id(payload))
        leaf_lens.append(sum(plens))
        start = end
    top = encode_filelist(leaf_ids, leaf_lens, INDEX_VERSION)
    blobs.append((top, leaf_ids))
    return FilelistPlan(blobs, make_id(top))


def leaf_ends(ids: list[bytes], to_end: bool = True) -> list[int]:
    """Where each leaf of a chunk list ends (exclusive chunk index): after a
    chunk whose id says so, or at LEAF_MAX chunks. The cuts depend only on
    the chunks since the previous cut, so a list re-planned from a leaf
    boundary cuts as the whole list does. `to_end`: the list's end closes its
    last leaf (a whole file); else a trailing partial leaf gets no end."""
    ends = []
    start = 0
    for i, cid in enumerate(ids):
        if ((cid[0] << 8 | cid[1]) & LEAF_MASK) == 0 or i + 1 - start >= LEAF_MAX:
            ends.append(i + 1)
            start = i + 1
    if to_end and start < len(ids):
        ends.append(len(ids))
    return ends


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
    """Random-access reads over a chunk list; only the chunks touched are read.

    A sparse file's chunk list holds only its data extents, back to back;
    `extents` maps them to their places in the file and everything else
    reads as zeros, so a 1 GiB file with 1 MiB of data costs 1 MiB to read."""

    def __init__(self, chunks: ChunkList, read_chunk: Callable[[bytes], bytes],
                 extents: list[tuple[int, int]] | None = None, size: int | None = None) -> None:
        self.chunks = chunks
        self.read_chunk = read_chunk
        self.extents = extents
        self.size = chunks.size if size is None else size
        if extents is not None:
            # extent i starts at file offset ext_off[i] and data offset ext_data[i]
            self.ext_off = [o for o, _ in extents]
            self.ext_data = [0, *itertools.accumulate(n for _, n in extents)]

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        if self.extents is None:
            return self._read_data(offset, end)
        out = bytearray(end - offset)  # holes are zeros
        i = max(0, bisect.bisect_right(self.ext_off, offset) - 1)
        while i < len(self.extents):
            off, n = self.extents[i]
            if off >= end:
                break
            lo, hi = max(off, offset), min(off + n, end)
            if lo < hi:
                d = self.ext_data[i] + lo - off
                out[lo - offset:hi - offset] = self._read_data(d, d + hi - lo)
            i += 1
        return bytes(out)

    def _read_data(self, offset: int, end: int) -> bytes:
        """Bytes [offset, end) of the chunk list's data."""
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
        """The data chunks in order (a sparse file's holes are not in them)."""
        for cid, n in zip(self.chunks.ids, self.chunks.lengths):
            data = self.read_chunk(cid)
            if len(data) != n:
                raise IntegrityError("chunk length differs from the file's chunk list")
            yield data


def data_places(extents: list[tuple[int, int]] | None, size: int) -> Iterator[tuple[int, int]]:
    """(file offset, length) of each run of stored data, in order: the whole
    file for a dense one. A writer walks the chunks against these to put each
    byte at its place and leave the holes unwritten."""
    if extents is None:
        if size:
            yield 0, size
        return
    yield from extents
