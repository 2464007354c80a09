"""Snapshots: the catalogue of immutable point-in-time roots, per replication set.

A snapshot record is msgpack, stored twice: as a SNAPSHOT frame in a pack
(so repair can find it) and in the LMDB `snapshots` database (so listing is
fast). Its id is the BLAKE3 of the record bytes. Mutable facts about a
snapshot (verification, pins) live beside it in `snapmeta`, never in the
record, so the id never changes.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import lmdb
import msgpack

from . import packs as P
from .errors import AmbiguousSnapshot, IntegrityError, InvalidArgument, SnapshotNotFound
from .index import bytime_key
from .repository import blob_id

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RECORD_VERSION = 1


def check_set_name(name: str) -> str:
    if not SET_NAME.match(name or ""):
        raise InvalidArgument(
            f"set name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def printable(v):
    """Names that are not UTF-8 (os.fsdecode gives surrogates) are kept
    readable with backslash escapes; msgpack cannot encode surrogates."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
            return v
        except UnicodeEncodeError:
            return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(v, list):
        return [printable(x) for x in v]
    if isinstance(v, dict):
        return {k: printable(x) for k, x in v.items()}
    return v


def display_name(time_ns: int) -> str:
    """Windows-legal (no ':') and sortable: 2026-11-24T14.05.00Z."""
    return time.strftime("%Y-%m-%dT%H.%M.%SZ", time.gmtime(time_ns // 1_000_000_000))


@dataclass
class Snapshot:
    set: str
    name: str
    time_ns: int
    host: str
    paths: list[str]
    root: bytes
    parent: bytes | None = None
    stats: dict = field(default_factory=dict)
    id: bytes = b""

    def record(self) -> dict:
        return {"v": RECORD_VERSION, "set": self.set, "name": self.name, "time_ns": self.time_ns,
                "host": self.host, "paths": self.paths, "root": self.root, "parent": self.parent,
                "stats": self.stats}

    def encode(self) -> bytes:
        return msgpack.packb(printable(self.record()), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, sid: bytes | None = None) -> "Snapshot":
        try:
            r = msgpack.unpackb(data)
            return cls(str(r["set"]), str(r["name"]), int(r["time_ns"]), str(r["host"]), list(r["paths"]),
                       bytes(r["root"]), r.get("parent"), r.get("stats") or {},
                       sid if sid is not None else blob_id(data))
        except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException):
            label = sid.hex()[:12] if sid else "?"
            raise IntegrityError(f"snapshot record {label} is corrupt") from None

    @property
    def hex(self) -> str:
        return self.id.hex()

    @property
    def short(self) -> str:
        return self.id.hex()[:12]

    @property
    def time_iso(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time_ns // 1_000_000_000))

    def to_json(self) -> dict:
        return {"id": self.hex, "short_id": self.short, "set": self.set, "name": self.name,
                "time": self.time_iso, "time_ns": self.time_ns, "host": self.host, "paths": self.paths,
                "root": self.root.hex(), "parent": self.parent.hex() if self.parent else None,
                "stats": self.stats}


def list_snapshots(repo, txn: lmdb.Transaction, set_name: str | None = None) -> list[Snapshot]:
    """Snapshots in time order (per set when `set_name` is given)."""
    db_time, db_snap = repo.index.db["bytime"], repo.index.db["snapshots"]
    out = []
    with txn.cursor(db=db_time) as cur:
        prefix = set_name.encode() + b"\0" if set_name else b""
        ok = cur.set_range(prefix) if prefix else cur.first()
        while ok:
            key = cur.key()
            if prefix and not key.startswith(prefix):
                break
            sid = key[-32:]
            raw = txn.get(sid, db=db_snap)
            if raw is not None:  # a dangling catalogue key is reported by verify, not fatal here
                out.append(Snapshot.decode(raw, sid))
            ok = cur.next()
    if set_name is None:
        out.sort(key=lambda s: (s.time_ns, s.set))
    return out


def list_sets(repo, txn: lmdb.Transaction) -> list[str]:
    names = set()
    with txn.cursor(db=repo.index.db["bytime"]) as cur:
        for key in cur.iternext(keys=True, values=False):
            names.add(key.split(b"\0", 1)[0].decode())
    return sorted(names)


def get_snapshot(repo, txn: lmdb.Transaction, sid: bytes) -> Snapshot | None:
    raw = txn.get(sid, db=repo.index.db["snapshots"])
    return Snapshot.decode(raw, sid) if raw is not None else None


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
    """Commit a snapshot into the writer's transaction: pack frame, catalogue, root reference."""
    data = snap.encode()
    snap.id = blob_id(data)
    writer.put_record(P.SNAPSHOT, snap.id, data)
    db = writer.db
    writer.txn.put(snap.id, data, db=db["snapshots"])
    writer.txn.put(bytime_key(snap.set, snap.time_ns, snap.id), b"", db=db["bytime"])
    writer.incref(snap.root)
    from . import versions  # the previous-versions index, kept in O(changed paths)

    versions.record_snapshot(writer, snap)
    return snap
