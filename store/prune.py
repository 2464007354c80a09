"""Dropping snapshots by reference counting, in O(what only they referenced).

Dropping a snapshot decrements its root's reference count; a blob that
reaches zero is unindexed and decrements its own children, and the walk
stops at the first blob someone else still references (`refcounts.py`).
Nothing scans the repository, and no global lock is needed beyond the
ordinary writer lock.

The dropped snapshot leaves a TOMBSTONE frame in the open pack so that a
repair from packs alone does not bring it back.
"""
from __future__ import annotations

from . import history
from . import packs as P
from .index import bytime_key
from .refcounts import DropStats, decref, quarantine_record, release, reserved_seq
from .snapshots import Snapshot

__all__ = ["DropStats", "decref", "drop_hooks", "drop_snapshot", "quarantine_record", "release", "reserved_seq"]

# Called with (writer, snapshot) inside the transaction that drops it, before
# its catalogue entries go: derived indexes (the previous-versions index)
# stay exact through this.
drop_hooks: list = [history.forget_snapshot]


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
