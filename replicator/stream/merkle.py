"""The digest both sides compare during catch-up.

Store tree ids cannot be compared across the wire: the replica builds its
own trees (directory metadata and subtree totals are its own). So both
sides hash what they agree on: a file or symlink's (type, mode, uid, gid,
mtime, size, content id) and a directory's sorted (name, child digest)
pairs. The master keeps these digests in its in-memory tree; the replica
derives them from its head tree, memoised by tree id (a tree id fixes the
digest, so the memo never goes stale).
"""
from __future__ import annotations

import blake3
import msgpack

from store.objects import ObjectReader
from store.trees import DIR, Entry


def leaf_digest(typ: int, mode: int, uid: int, gid: int, mtime_ns: int, size: int, content: bytes | None) -> bytes:
    return blake3.blake3(msgpack.packb([typ, mode, uid, gid, mtime_ns, size, content], use_bin_type=True)).digest()


def dir_digest(children: list[tuple[bytes, bytes]]) -> bytes:
    h = blake3.blake3(b"D")
    for name, d in sorted(children):
        h.update(len(name).to_bytes(2, "big") + name + d)
    return h.digest()


class TreeDigests:
    """Replica side: digests of stored trees, memoised by tree id (bounded)."""

    def __init__(self, limit: int = 200_000) -> None:
        self.memo: dict[bytes, bytes] = {}
        self.limit = limit

    def entry(self, reader: ObjectReader, e: Entry) -> bytes:
        if e.type == DIR:
            return self.tree(reader, e.content)
        return leaf_digest(e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.content)

    def tree(self, reader: ObjectReader, tid: bytes | None) -> bytes:
        if tid is None:
            return dir_digest([])
        d = self.memo.get(tid)
        if d is None:
            d = dir_digest([(e.name, self.entry(reader, e)) for e in reader.tree(tid)])
            if len(self.memo) >= self.limit:
                self.memo.clear()
            self.memo[tid] = d
        return d
