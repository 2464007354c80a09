"""The snapshot record and reading the catalogue.

A snapshot record is msgpack, stored twice: as a SNAPSHOT frame in a pack
(so repair can find it) and in the LMDB `snapshots` database (so listing is
fast). Its id is the BLAKE3 of the record bytes. The `bytime` database keys
each set's snapshots in time order.

This is the bottom of the snapshots floor: the previous-versions index
(`history.py`) reads the catalogue through it, and `snapshots.py`, which
commits a snapshot and keeps that index, is above both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import lmdb
import msgpack

from .errors import IntegrityError
from .repository import blob_id

RECORD_VERSION = 1


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
