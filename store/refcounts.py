"""Reference counts: taking references off blobs, and freeing what reaches zero.

Every blob carries a reference count kept in the same LMDB transactions that
change it: a new tree or filelist increments its children once per mention
(and records them in `kids`); a snapshot increments its root. Taking a
reference off a blob that reaches zero unindexes it and decrements its own
children, and the walk stops at the first blob someone else still
references. Nothing scans the repository, and no global lock is needed
beyond the ordinary writer lock.

The writer (`repository.py`) releases what a session stored but nothing
referenced; `prune.py` drops snapshots through it; `apply.py` moves a set's
head with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from . import packs as P
from .errors import IntegrityError
from .index import REF, U64, BlobEntry, unpack_seqs


@dataclass
class DropStats:
    snapshots: int = 0
    blobs_freed: int = 0
    bytes_freed: int = 0  # stored bytes that became garbage in packs
    leaked: list[str] = field(default_factory=list)  # children we could not read to decrement
    quarantine_released: int = 0  # lost blobs (quarantined by repair) nothing references any more

    def to_json(self) -> dict:
        return {"snapshots": self.snapshots, "blobs_freed": self.blobs_freed,
                "bytes_freed": self.bytes_freed, "leaked": self.leaked,
                "quarantine_released": self.quarantine_released}


_REF_SIZE = REF.size


def decref(writer, root: bytes, stats: DropStats) -> None:
    """Take one reference off blob `root` (a snapshot's root tree, a set's head)."""
    e = writer.entry(root)
    seq = e.seq if e is not None else reserved_seq(writer.txn, writer.db, root)
    if seq is None:
        return  # damage verify reports: nothing to free
    release(writer, {seq: 1}, stats)


def quarantine_record(txn, db: dict, bid: bytes) -> dict | None:
    raw = txn.get(bid, db=db["quarantine"])
    if raw is None:
        return None
    try:
        rec = msgpack.unpackb(raw)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return rec if isinstance(rec, dict) else None


def reserved_seq(txn, db: dict, bid: bytes) -> int | None:
    """The sequence number a repair reserved for a referenced blob it found
    lost (its quarantine record's `seq`), or None."""
    rec = quarantine_record(txn, db, bid)
    seq = rec.get("seq") if rec else None
    return seq if type(seq) is int else None


def release(writer, level: dict[int, int], stats: DropStats) -> None:
    """Take `n` references off each sequence number of `level`; free what
    reaches zero, and so on down.

    Level by level: each level's decrements are summed per blob, then read
    and written back in key order by one `getmulti` and one `putmulti`.
    Counts are keyed by sequence number, so the ~64 chunks of a dropped
    chunk-list leaf (numbered together when first stored) share one or two
    index pages, and a freed object's children come from `kids`, not from
    reading its frame: the pages touched are about what was dropped, not
    what the repository holds. Only a freed blob's own record is looked up
    by id, to unindex it. The counts end the same as one decrement at a
    time: every freed blob decrements each of its children once per mention."""
    db = writer.db
    txn = writer.txn
    refs, blobs, kids = db["refs"], db["blobs"], db["kids"]
    pending_seq = writer._pending_seq
    while level:
        freed: list[tuple[bytes, BlobEntry]] = []
        if pending_seq:
            for seq in [s for s in level if s in pending_seq]:
                bid, n = pending_seq[seq], level.pop(seq)
                left = writer._pending_refs[bid] - n
                if left > 0:
                    writer._pending_refs[bid] = left
                else:
                    freed.append((bid, writer.drop_pending(bid)))
        keep, gone = [], []
        with txn.cursor(db=refs) as cur:
            # A missing record is damage that verify reports: nothing to free.
            for key, raw in cur.getmulti([U64.pack(s) for s in sorted(level)]):
                if len(raw) != _REF_SIZE:
                    # Its blob keeps its references (space leaks, data is never lost): repair recounts.
                    stats.leaked.append(f"reference count record {key.hex()} is corrupt")
                    continue
                count, bid = REF.unpack(raw)
                n = level[U64.unpack(key)[0]]
                if count > n:
                    keep.append((key, REF.pack(count - n, bid)))
                else:
                    gone.append((key, bid))
            cur.putmulti(keep)
        for key, bid in gone:
            txn.delete(key, db=refs)
            raw = txn.get(bid, db=blobs)
            try:
                e = BlobEntry.decode(raw) if raw is not None else None
            except IntegrityError:
                e = None
            if e is None and reserved_seq(txn, db, bid) == U64.unpack(key)[0]:
                # A blob repair found lost, that nothing references any more:
                # its number and its quarantine record go (no frame to free).
                txn.delete(bid, db=db["quarantine"])
                stats.quarantine_released += 1
                continue
            if e is None or U64.pack(e.seq) != key:
                # A damaged index: never unindex a blob that this count does not belong to.
                stats.leaked.append(f"{bid.hex()[:16]}: its count {key.hex()} reached zero but its index "
                                    f"record is missing or numbered otherwise")
                continue
            txn.delete(bid, db=blobs)
            freed.append((bid, e))
        level = {}
        for bid, e in freed:
            if e.kind in (P.TREE, P.FILELIST):
                key = U64.pack(e.seq)
                raw = txn.get(key, db=kids)
                if raw is None:
                    # Its children keep one reference too many (space leaks,
                    # data is never lost); `pit repair` recounts.
                    stats.leaked.append(f"{bid.hex()[:16]}: its children are not in the index")
                else:
                    txn.delete(key, db=kids)
                    try:
                        for k in unpack_seqs(raw):
                            level[k] = level.get(k, 0) + 1
                    except IntegrityError:
                        stats.leaked.append(f"{bid.hex()[:16]}: its children record is corrupt")
            writer._account_dead(e)
            stats.blobs_freed += 1
            stats.bytes_freed += e.stored_len + P.FRAME_OVERHEAD
