"""Snapshots: the catalogue of immutable point-in-time roots, per replication set.

A snapshot record is msgpack, stored twice: as a SNAPSHOT frame in a pack
(so repair can find it) and in the LMDB `snapshots` database (so listing is
fast). Its id is the BLAKE3 of the record bytes. Mutable facts about a
snapshot (verification, pins) live beside it in `snapmeta`, never in the
record, so the id never changes.

The record and the catalogue's reads are in `catalogue.py` (and importable
from here); this module names, resolves and commits snapshots. A commit
keeps the previous-versions index (`history.py`) in the same transaction.
"""
from __future__ import annotations

import re
import time

import lmdb

from . import packs as P
from .catalogue import RECORD_VERSION, Snapshot, get_snapshot, list_sets, list_snapshots, printable
from .errors import AmbiguousSnapshot, InvalidArgument, SnapshotNotFound
from .index import bytime_key
from .repository import blob_id

__all__ = ["RECORD_VERSION", "SET_NAME", "Snapshot", "add_snapshot", "check_set_name", "display_name", "get_snapshot",
           "list_sets", "list_snapshots", "printable", "resolve", "unique_name"]

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_set_name(name: str) -> str:
    if not SET_NAME.match(name or ""):
        raise InvalidArgument(
            f"set name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def display_name(time_ns: int) -> str:
    """Windows-legal (no ':') and sortable: 2026-11-24T14.05.00Z."""
    return time.strftime("%Y-%m-%dT%H.%M.%SZ", time.gmtime(time_ns // 1_000_000_000))


def resolve(repo, txn: lmdb.Transaction, spec: str) -> Snapshot:
    """Find a snapshot by `SET@latest`, `SET@-N` (N before latest), `SET@NAME`,
    a display name, or an id prefix (at least 4 hex digits)."""
    spec = spec.strip()
    if not spec:
        raise SnapshotNotFound("no snapshot given")
    if "@" in spec:
        set_name, sel = spec.split("@", 1)
        snaps = list_snapshots(repo, txn, set_name)
        if not snaps:
            raise SnapshotNotFound(f"set {set_name!r} has no snapshots")
        if sel in ("latest", "-0", ""):
            return snaps[-1]
        if re.fullmatch(r"-\d+", sel):
            n = int(sel[1:])
            if n >= len(snaps):
                raise SnapshotNotFound(f"set {set_name!r} has only {len(snaps)} snapshots")
            return snaps[-1 - n]
        hits = [s for s in snaps if s.name == sel or s.hex.startswith(sel.lower())]
        return _one(hits, spec)
    hits = []
    db_snap = repo.index.db["snapshots"]
    if re.fullmatch(r"[0-9a-fA-F]{4,64}", spec):
        prefix = bytes.fromhex(spec[: len(spec) // 2 * 2])
        with txn.cursor(db=db_snap) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                if cur.key().hex().startswith(spec.lower()):
                    hits.append(Snapshot.decode(cur.value(), cur.key()))
                ok = cur.next()
    if not hits:
        hits = [s for s in list_snapshots(repo, txn) if s.name == spec]
    return _one(hits, spec)


def _one(hits: list[Snapshot], spec: str) -> Snapshot:
    if not hits:
        raise SnapshotNotFound(f"no snapshot matches {spec!r}")
    if len(hits) > 1:
        names = ", ".join(f"{s.set}@{s.name} ({s.short})" for s in hits[:5])
        raise AmbiguousSnapshot(f"{spec!r} matches {len(hits)} snapshots: {names}")
    return hits[0]


def unique_name(repo, txn: lmdb.Transaction, set_name: str, time_ns: int) -> str:
    """The display name, made unique within the set (two points in one second get -2, -3...)."""
    base = display_name(time_ns)
    taken = {s.name for s in list_snapshots(repo, txn, set_name)[-64:]}
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def add_snapshot(writer, snap: Snapshot) -> Snapshot:
    """Commit a snapshot into the writer's transaction: pack frame, catalogue, root reference,
    previous-versions index."""
    data = snap.encode()
    snap.id = blob_id(data)
    writer.put_record(P.SNAPSHOT, snap.id, data)
    db = writer.db
    writer.txn.put(snap.id, data, db=db["snapshots"])
    writer.txn.put(bytime_key(snap.set, snap.time_ns, snap.id), b"", db=db["bytime"])
    writer.incref(snap.root)
    from . import history  # the previous-versions index, kept in O(changed paths)

    history.record_snapshot(writer, snap)
    return snap
