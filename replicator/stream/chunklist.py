"""A file's chunk list, and the delta between two versions of it.

The master keeps every file as its chunk list (`Chunks`: ids and lengths,
compact) and sends a changed file *relative to the version before*
(`delta_ops`: keep ranges of the old list and new (id, length) pairs), so a
64 KiB change in a 512 MiB file costs the changed chunks plus a few hundred
bytes on the wire. `content_id` names a list the way the replica's store
names the same content (a single chunk's id, or the filelist id).
"""
from __future__ import annotations

from array import array

from store.repository import filelist_id


class Chunks:
    """A file's chunk list, compact: the ids concatenated (32 bytes each) and the lengths in an
    array('I'), about 36 bytes a chunk instead of ~150 as a list of (id, length) tuples (a 1 TiB
    image at 16 KiB is 64 million chunks). Indexes, slices and iterates as (id, length) pairs."""

    __slots__ = ("ids", "lens")

    def __init__(self, ids: bytes = b"", lens: array | None = None) -> None:
        self.ids = bytes(ids)
        self.lens = lens if lens is not None else array("I")
        if len(self.ids) != 32 * len(self.lens):
            raise ValueError("chunk ids and lengths differ in number")

    def __len__(self) -> int:
        return len(self.lens)

    def __iter__(self):
        ids = self.ids
        for i, n in enumerate(self.lens):
            yield ids[i * 32:i * 32 + 32], n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.lens)))]
        if i < 0:
            i += len(self.lens)
        if not 0 <= i < len(self.lens):
            raise IndexError("chunk index out of range")
        return self.ids[i * 32:i * 32 + 32], self.lens[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, Chunks):
            return self.ids == other.ids and self.lens == other.lens
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Chunks({len(self)} chunks, {self.total()} bytes)"

    def total(self) -> int:
        return sum(self.lens)

    def id_list(self) -> list[bytes]:
        ids = self.ids
        return [ids[i:i + 32] for i in range(0, len(ids), 32)]


def content_id(chunks: Chunks) -> bytes | None:
    if not chunks:
        return None
    if len(chunks) == 1:
        return chunks[0][0]
    # The replica stores the same filelist, so the same id (store.apply.store_file_content).
    return filelist_id(chunks.id_list(), chunks.lens.tolist())


_BLOCK = 4096  # chunks compared at once (as bytes) when looking for the common prefix and suffix


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    if isinstance(a, Chunks) and isinstance(b, Chunks):
        while i + _BLOCK <= n and a.ids[i * 32:(i + _BLOCK) * 32] == b.ids[i * 32:(i + _BLOCK) * 32] \
                and a.lens[i:i + _BLOCK] == b.lens[i:i + _BLOCK]:
            i += _BLOCK
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a, b, limit: int) -> int:
    la, lb = len(a), len(b)
    k = 0
    if isinstance(a, Chunks) and isinstance(b, Chunks):
        while k + _BLOCK <= limit and \
                a.ids[(la - k - _BLOCK) * 32:(la - k) * 32] == b.ids[(lb - k - _BLOCK) * 32:(lb - k) * 32] \
                and a.lens[la - k - _BLOCK:la - k] == b.lens[lb - k - _BLOCK:lb - k]:
            k += _BLOCK
    while k < limit and a[la - 1 - k] == b[lb - 1 - k]:
        k += 1
    return k


def delta_ops(old, new) -> list:
    """Keep/new ranges turning `old` into `new` (Chunks, or lists of (id, length)): common prefix
    and suffix are kept."""
    if not old:
        return [[1, [list(c) for c in new]]] if new else []
    pre = _common_prefix(old, new)
    suf = _common_suffix(old, new, min(len(old), len(new)) - pre)
    ops: list = []
    if pre:
        ops.append([0, 0, pre])
    mid = new[pre:len(new) - suf]
    if mid:
        ops.append([1, [list(c) for c in mid]])
    if suf:
        ops.append([0, len(old) - suf, suf])
    return ops
