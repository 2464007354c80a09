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

import os
import struct
from dataclasses import dataclass, field

from . import packs as P
from . import versions
from .errors import IntegrityError, StoreError
from .files import decode_filelist
from .index import BLOB, BlobEntry, bytime_key  # noqa: F401
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


PARALLEL_MIN = 64      # fewer items than this: no helper threads, no readahead hints
THREADS = 8
_REFS = struct.Struct("<I")
REFS_AT = BLOB.size - _REFS.size  # the reference count ends a blob record
assert BLOB.format.endswith("I")


class _Pool:
    """Threads that fault in the index pages of a level's decrements before
    the writer applies them: py-lmdb releases the GIL in `get`, so the page
    reads overlap (about 3x the random reads per second of one thread on
    our test disk). Started on first use."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.ex = None

    def map(self, fn, items: list) -> list:
        if self.ex is None:
            from concurrent.futures import ThreadPoolExecutor

            self.ex = ThreadPoolExecutor(THREADS, thread_name_prefix="pit-decref")
        size = -(-len(items) // THREADS)
        parts = [items[i:i + size] for i in range(0, len(items), size)]  # neighbours together
        out = []
        for r in self.ex.map(fn, parts):
            out.extend(r)
        return out

    def prefetch(self, keys: list[bytes]) -> None:
        """Fault in the index pages that `keys` (sorted) live on. The pages a
        read transaction walks are those of the last commit: the ones the
        write transaction reads before copying what it changes. Only a cache
        warm-up; the updates stay in the writer's transaction."""
        if len(keys) < PARALLEL_MIN:
            return
        env, db = self.writer.repo.index.env, self.writer.db["blobs"]

        def touch(part):
            with env.begin(buffers=True) as txn:
                get = txn.get
                for k in part:
                    get(k, db=db)
            return ()

        self.map(touch, keys)

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()


def _children(writer, bid: bytes, e: BlobEntry) -> list[bytes]:
    if e.kind not in (P.TREE, P.FILELIST):
        return []
    data = writer.read_entry(bid, e)
    if e.kind == P.TREE:
        return tree_children(decode_tree(data))
    return decode_filelist(data)[0]


def _readahead(repo, freed: list[tuple[bytes, BlobEntry]]) -> None:
    """Ask the kernel to start reading the freed trees and chunk lists (all at
    once, so the reads overlap); `_children` then reads them one by one from
    the page cache. Pack file descriptors stay in the writer's thread (the
    backend's descriptor cache is not shared with helper threads)."""
    reader = getattr(repo.backend, "_reader", None)
    advise = getattr(os, "posix_fadvise", None)
    if reader is None or advise is None or len(freed) < PARALLEL_MIN:
        return
    for _bid, e in freed:
        if e.kind in (P.TREE, P.FILELIST):
            try:
                advise(reader(P.pack_name(e.pack)), e.offset, P.FRAME_HEADER.size + e.stored_len,
                       os.POSIX_FADV_WILLNEED)
            except (OSError, StoreError):
                return  # only a hint: the read itself reports a missing pack


def decref(writer, root: bytes, stats: DropStats) -> None:
    """Take one reference off `root`; free what reaches zero, and so on down.

    Level by level rather than depth first: each level's decrements are
    summed per blob, their index pages faulted in by a few threads, then
    read and written back in key order by one `getmulti` and one
    `putmulti` (no Python per lookup; a kept count is patched in place); the freed trees and chunk
    lists of the level are read in pack order after one readahead hint for
    them all. The counts
    end the same as one decrement at a time: every freed blob decrements
    each of its children once, whatever the order.

    The big case is a dropped snapshot's version of a large file: each of
    its chunk-list leaves that the next snapshot changed is freed and
    decrements its ~64 chunks, nearly all still held by the successor's
    leaf. Each is one index update, which the recount requires; at 10 GiB
    they touch most pages of the `blobs` database, so what remains is the
    time to read and write those pages."""
    pool = _Pool(writer)
    try:
        _decref(writer, root, stats, pool)
    finally:
        pool.close()


def _decref(writer, root: bytes, stats: DropStats, pool: _Pool) -> None:
    level: dict[bytes, int] = {root: 1}
    blobs = writer.db["blobs"]
    pending = writer._pending
    while level:
        keys = sorted(level)
        pool.prefetch([k for k in keys if k not in pending] if pending else keys)
        freed: list[tuple[bytes, BlobEntry]] = []
        if pending:
            for bid in [k for k in keys if k in pending]:
                e, n = pending[bid], level[bid]
                if e.refs > n:
                    e.refs -= n
                else:
                    freed.append((bid, e))
                    writer.delete_entry(bid)
            keys = [k for k in keys if k not in pending]
        # One C call reads them all, one writes the kept counts back (no
        # Python per lookup); a missing blob is damage that verify reports:
        # nothing to free.
        keep, gone = [], []
        with writer.txn.cursor(db=blobs) as cur:
            for bid, raw in cur.getmulti(keys):
                if len(raw) != BLOB.size:
                    BlobEntry.decode(raw)  # raises: a corrupt record
                n = level[bid]
                refs = _REFS.unpack_from(raw, REFS_AT)[0]
                if refs > n:
                    keep.append((bid, raw[:REFS_AT] + _REFS.pack(refs - n)))
                else:
                    gone.append((bid, raw))
            cur.putmulti(keep)
        for bid, raw in gone:
            writer.txn.delete(bid, db=blobs)
            freed.append((bid, BlobEntry.decode(raw)))
        level = {}
        freed.sort(key=lambda be: (be[1].pack, be[1].offset))
        _readahead(writer.repo, freed)
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
