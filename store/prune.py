"""Dropping snapshots by reference counting, in O(what only they referenced).

Every blob carries a reference count kept in the same LMDB transactions that
change it: a new tree or filelist increments its children once; a snapshot
increments its root. Dropping a snapshot decrements its root; a blob that
reaches zero is unindexed and decrements its own children, and the walk
stops at the first blob someone else still references. Nothing scans the
repository, and no global lock is needed beyond the ordinary writer lock.

The dropped snapshot leaves a TOMBSTONE frame in the open pack so that a
repair from packs alone does not bring it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import packs as P
from . import versions
from .errors import IntegrityError, StoreError
from .files import decode_filelist
from .index import BlobEntry, bytime_key  # noqa: F401
from .snapshots import Snapshot
from .trees import decode_tree, tree_children

# Called with (writer, snapshot) inside the transaction that drops it, before
# its catalogue entries go: derived indexes (the previous-versions index)
# stay exact through this.
drop_hooks: list = [versions.forget_snapshot]


@dataclass
class DropStats:
    snapshots: int = 0
    blobs_freed: int = 0
    bytes_freed: int = 0  # stored bytes that became garbage in packs
    leaked: list[str] = field(default_factory=list)  # children we could not read to decrement

    def to_json(self) -> dict:
        return {"snapshots": self.snapshots, "blobs_freed": self.blobs_freed,
                "bytes_freed": self.bytes_freed, "leaked": self.leaked}


def _children(writer, bid: bytes, e: BlobEntry) -> list[bytes]:
    if e.kind not in (P.TREE, P.FILELIST):
        return []
    data = writer.read_entry(bid, e)
    if e.kind == P.TREE:
        return tree_children(decode_tree(data))
    return decode_filelist(data)[0]


def decref(writer, root: bytes, stats: DropStats) -> None:
    """Take one reference off `root`; free what reaches zero, and so on down.

    Level by level rather than depth first: each level's decrements are
    summed per blob, applied in key order through one cursor (neighbouring
    keys share LMDB pages, and a positioned cursor skips the descent from
    the root), and the freed blobs of the level are read in pack order. The
    counts end the same as one decrement at a time: every freed blob
    decrements each of its children once, whatever the order.

    The big case is a dropped snapshot's version of a large file: each of
    its chunk-list leaves that the next snapshot changed is freed and
    decrements its ~64 chunks, nearly all still held (by the successor's
    leaf) — one index update each, which the recount requires."""
    level: dict[bytes, int] = {root: 1}
    blobs = writer.db["blobs"]
    pending = writer._pending
    while level:
        freed: list[tuple[bytes, BlobEntry]] = []
        with writer.txn.cursor(db=blobs) as cur:
            for bid in sorted(level):
                n = level[bid]
                if bid in pending:
                    e = pending[bid]
                    if e.refs > n:
                        e.refs -= n
                        continue
                    freed.append((bid, e))
                    writer.delete_entry(bid)
                    continue
                if not cur.set_key(bid):
                    continue  # already missing (damage that verify reports); nothing to free
                e = BlobEntry.decode(cur.value())
                if e.refs > n:
                    e.refs -= n
                    cur.put(bid, e.encode())
                    continue
                freed.append((bid, e))
                cur.delete()
        level = {}
        freed.sort(key=lambda be: (be[1].pack, be[1].offset))
        for bid, e in freed:
            try:
                kids = _children(writer, bid, e)
            except (IntegrityError, StoreError) as exc:
                # We cannot learn its children: they keep one reference too many
                # (space leaks, data is never lost). `pit repair` recounts.
                stats.leaked.append(f"{bid.hex()[:16]}: {exc}")
                kids = []
            writer._account_dead(e)
            stats.blobs_freed += 1
            stats.bytes_freed += e.stored_len + P.FRAME_OVERHEAD
            for k in kids:
                level[k] = level.get(k, 0) + 1


def drop_snapshot(writer, snap: Snapshot, stats: DropStats | None = None) -> DropStats:
    stats = stats or DropStats()
    db = writer.db
    for hook in drop_hooks:
        hook(writer, snap)
    writer.put_record(P.TOMBSTONE, snap.id, b"")
    writer.txn.delete(snap.id, db=db["snapshots"])
    writer.txn.delete(bytime_key(snap.set, snap.time_ns, snap.id), db=db["bytime"])
    writer.txn.delete(snap.id, db=db["snapmeta"])
    decref(writer, snap.root, stats)
    stats.snapshots += 1
    return stats
