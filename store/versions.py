"""Previous versions, as the views read them: the distinct versions of a path
and every name a directory ever held, from the previous-versions index.

The index (its layout, the words *event*, *state*, *version* and *base*, and
its upkeep inside the writer's transaction at every snapshot commit and
drop) is `history.py`, on the snapshots floor; this module, on the views
floor, only reads it, and names from it stay importable from here.

Each query runs in a read transaction of its own: O(entries shown), never a
walk of every snapshot's tree.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import lmdb

from .catalogue import Snapshot, list_snapshots
from .history import (BASE, DB_NAMES, DB_NAMES_V1, DB_NAMES_V2, DB_NAMES_V3, MAX_KEY, NAME_MAX, OLD_LAYOUTS,
                      PARENT_ROOM, SUFFIX, TS, Dbs, State, _marks_match, decode_state, dir_prefix, encode_state,
                      forget_snapshot, path_key, record_snapshot, reindex_set, snap_suffix, state_changes,
                      writer_dbs)

__all__ = ["BASE", "DB_NAMES", "DB_NAMES_V1", "DB_NAMES_V2", "DB_NAMES_V3", "MAX_KEY", "NAME_MAX", "OLD_LAYOUTS",
           "PARENT_ROOM", "SUFFIX", "TS", "Child", "Dbs", "State", "Version", "decode_state", "dir_prefix",
           "encode_state", "forget_snapshot", "is_current", "list_children", "list_versions", "path_key",
           "record_snapshot", "reindex_set", "snap_suffix", "state_changes", "writer_dbs"]


# ---------------------------------------------------------------- queries
@contextmanager
def _query(repo, txn=None):
    """(handles, transaction) for a query: always a read transaction of our
    own, with the handles opened inside it and the transaction committed.
    Before any writer has rebuilt an older layout, the queries read it
    (they are the same for every layout).

    Measured with py-lmdb 3.0 / LMDB 0.9.36: a handle opened in one read
    transaction and committed is *not* usable in read transactions begun
    later (py-lmdb renews cached transaction objects), and opening outside a
    transaction takes a write transaction (it would wait behind the
    replicator). Opening per query inside the query's transaction works,
    from many threads. `txn` (the caller's) is accepted for symmetry only."""
    env = repo.index.env
    own = env.begin()
    try:
        dbs = None
        for names in (DB_NAMES, *OLD_LAYOUTS):
            try:
                dbs = Dbs(*(env.open_db(n, txn=own, create=False) for n in names))
                break
            except lmdb.NotFoundError:
                continue
        yield dbs, own
    finally:
        own.commit()  # a read-only commit: only keeps the handles valid


def is_current(repo, txn, set_name: str) -> bool:
    """True when the index covers exactly the set's snapshots (O(snapshots))."""
    with _query(repo, txn) as (dbs, txn):
        if dbs is None:
            return not list_snapshots(repo, txn, set_name)
        return _marks_match(repo, txn, dbs, set_name)


@dataclass
class Version:
    """One distinct version of a path: a run of snapshots with the same content."""

    state: State
    time_ns: int               # time of the first snapshot holding it
    snapshots: list = field(default_factory=list)  # Snapshot records, oldest first

    @property
    def first(self):
        return self.snapshots[0]


def list_versions(repo, txn, set_name: str, path: bytes) -> list[Version]:
    """Every distinct version of `path` in a set, oldest first: O(events + snapshots shown)."""
    with _query(repo, txn) as (dbs, txn):
        if dbs is None:
            return []
        return _list_versions(repo, txn, dbs, set_name, path)


def _list_versions(repo, txn, dbs: Dbs, set_name: str, path: bytes) -> list[Version]:
    pk = path_key(set_name, path.strip(b"/"))
    events = []
    with txn.cursor(db=dbs.events) as cur:
        ok = cur.set_range(pk)
        while ok and cur.key().startswith(pk):
            k = cur.key()
            if len(k) == len(pk) + SUFFIX:
                events.append((k[-SUFFIX:], decode_state(cur.value())))
            ok = cur.next()
    out = []
    prefix = set_name.encode() + b"\0"
    db_time, db_snap = repo.index.db["bytime"], repo.index.db["snapshots"]
    with txn.cursor(db=db_time) as cur:
        for i, (suffix, state) in enumerate(events):
            if state is None:
                continue
            end = prefix + events[i + 1][0] if i + 1 < len(events) else None
            snaps = []
            ok = cur.set_range(prefix + suffix)
            while ok and cur.key().startswith(prefix) and (end is None or cur.key() < end):
                sid = cur.key()[-32:]
                raw = txn.get(sid, db=db_snap)
                if raw is not None:
                    snaps.append(Snapshot.decode(raw, sid))
                ok = cur.next()
            if snaps:
                out.append(Version(state, snaps[0].time_ns, snaps))
    return out


@dataclass
class Child:
    name: bytes
    state: State          # the last state it had while present
    present: bool         # present in the newest snapshot


def list_children(repo, txn, set_name: str, dirpath: bytes) -> list[Child]:
    """Every name that ever existed directly below `dirpath` in the set, with
    its last known state: O(names × log n), skipping over each name's events."""
    with _query(repo, txn) as (dbs, txn):
        if dbs is None:
            return []
        return _list_children(txn, dbs, set_name, dirpath)


def _list_children(txn, dbs: Dbs, set_name: str, dirpath: bytes) -> list[Child]:
    prefix = dir_prefix(set_name, dirpath.strip(b"/"))
    out = []
    with txn.cursor(db=dbs.events) as cur:
        ok = cur.set_range(prefix)
        while ok and cur.key().startswith(prefix):
            rest = cur.key()[len(prefix):]
            name = rest[:-SUFFIX - 1]
            nxt = prefix + name + b"\x01"  # first key past every event of `name`
            ok = cur.set_range(nxt)
            # walk back over this name's events to its last present state
            back = cur.prev() if ok else cur.last()
            last_present, newest_present, first = None, False, True
            while back and cur.key().startswith(prefix + name + b"\0"):
                st = decode_state(cur.value())
                if first:
                    newest_present = st is not None
                    first = False
                if st is not None:
                    last_present = st
                    break
                back = cur.prev()
            if last_present is not None:
                out.append(Child(name, last_present, newest_present))
            ok = cur.set_range(nxt)
    return out
