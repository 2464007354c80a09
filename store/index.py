"""The LMDB index: where each blob lives, how many parents reference it, and
the catalogue (snapshots, sets, files cache).

Reference counts are not kept with the blob records (keyed by a random hash)
but in `refs`, keyed by a sequence number each blob gets when it is first
indexed, and each tree and filelist lists its children's numbers in `kids`.
Blobs written together get neighbouring numbers, so the decrements of
dropping an old chunk list (its ~64 chunks, written together) land on one or
two pages instead of on 64 pages scattered over the whole index, and no
pack is read to learn what a dropped object referenced.

It is derived data. Every fact in it either comes from the packs (blob
places, snapshot records, tombstones) or can be recomputed from them
(reference counts, pack usage), which is what `pit repair` does. The one
rule that keeps it honest after a crash: pack bytes are fsynced before the
transaction that points at them commits.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import lmdb
import msgpack

from .errors import IndexMissing, IntegrityError

MAP_SIZE = 1 << 40  # virtual; the file grows only as pages are written
DB_NAMES = (
    b"meta",       # key -> value: format, repo id, next pack number, open pack
    b"blobs",      # blob id (32) -> BlobEntry (where it lives, and its sequence number)
    b"refs",       # sequence number (u64 BE) -> reference count and blob id
    b"kids",       # sequence number of a tree or filelist (u64 BE) -> its children's sequence numbers
    b"packs",      # pack number (u64 BE) -> msgpack PackEntry
    b"snapshots",  # snapshot id (32) -> msgpack record
    b"bytime",     # set \0 time_ns (u64 BE) snapshot id -> b""
    b"snapmeta",   # snapshot id -> msgpack mutable facts (verification, pins)
    b"sets",       # set name -> msgpack settings
    b"filecache",  # set \0 abs path -> msgpack [size, mtime_ns, ctime_ns, ino, entry]
    b"verified",   # chunk id -> u64 BE unix time of its last good deep read
    b"quarantine", # blob id -> msgpack {pack, offset, reason, time}: found corrupt, kept out of use
)

BLOB = struct.Struct("<BBQQIIQ")  # kind, flags, pack, frame offset, stored_len, raw_len, seq
REF = struct.Struct("<I32s")      # reference count, blob id
U64 = struct.Struct(">Q")
SEQ_LE = struct.Struct("<Q")
SEQ_AT = BLOB.size - 8            # the sequence number ends a blob record


def pack_seqs(seqs: list[int]) -> bytes:
    """A `kids` value: u64 little-endian sequence numbers, in the parent's order."""
    return struct.pack(f"<{len(seqs)}Q", *seqs)


def unpack_seqs(raw: bytes) -> tuple[int, ...]:
    if len(raw) % 8:
        raise IntegrityError("corrupt children record in the index")
    return struct.unpack(f"<{len(raw) // 8}Q", raw)


@dataclass
class BlobEntry:
    kind: int
    flags: int
    pack: int
    offset: int
    stored_len: int
    raw_len: int
    seq: int  # key of its reference count in `refs` and of its children in `kids`

    def encode(self) -> bytes:
        return BLOB.pack(self.kind, self.flags, self.pack, self.offset, self.stored_len, self.raw_len, self.seq)

    @classmethod
    def decode(cls, b: bytes) -> "BlobEntry":
        try:
            return cls(*BLOB.unpack(b))
        except (struct.error, TypeError):
            raise IntegrityError("corrupt blob record in the index") from None


@dataclass
class PackEntry:
    size: int          # committed bytes (everything beyond is uncommitted garbage)
    sealed: bool
    live: int          # bytes of frames still referenced
    dead: int          # bytes of frames no longer referenced

    def encode(self) -> bytes:
        return msgpack.packb([self.size, self.sealed, self.live, self.dead])

    @classmethod
    def decode(cls, b: bytes) -> "PackEntry":
        try:
            s, sealed, live, dead = msgpack.unpackb(b)
            return cls(int(s), bool(sealed), int(live), int(dead))
        except (ValueError, TypeError, msgpack.UnpackException):
            raise IntegrityError("corrupt pack record in the index") from None


def bytime_key(set_name: str, time_ns: int, snap_id: bytes) -> bytes:
    return set_name.encode() + b"\0" + U64.pack(time_ns) + snap_id


def filecache_key(set_name: str, path: bytes) -> bytes:
    key = set_name.encode() + b"\0" + path
    if len(key) > 500:  # LMDB keys stop at 511 bytes: key long paths by their hash
        import blake3

        key = set_name.encode() + b"\1" + blake3.blake3(path).digest()
    return key


class Index:
    """One LMDB environment with a named database per record type."""

    def __init__(self, path: str, create: bool = False, readonly: bool = False) -> None:
        """A reader opens the environment read-only: then py-lmdb opens the
        named databases in a read transaction, and a reader never waits behind
        a writer's long transaction (a read-write environment would need a
        write transaction just to open the handles)."""
        self.readonly = readonly and not create
        try:
            self.env = lmdb.open(
                path, map_size=MAP_SIZE, max_dbs=len(DB_NAMES) + 8, max_readers=1024,
                subdir=True, create=create, readahead=False, readonly=self.readonly,
            )
        except lmdb.Error as exc:
            raise IndexMissing(f"cannot open the index at {path}: {exc}; run `pit repair`") from exc
        self.db = {}
        for name in DB_NAMES:
            try:
                self.db[name.decode()] = self.env.open_db(name, create=not self.readonly)
            except lmdb.NotFoundError:
                self.env.close()
                raise IndexMissing(f"the index at {path} lacks its {name.decode()} database (an older layout, "
                                   f"or damage): run `pit repair` to rebuild it from the packs") from None

    def close(self) -> None:
        self.env.close()

    def read(self) -> lmdb.Transaction:
        return self.env.begin(buffers=False)

    def write(self) -> lmdb.Transaction:
        return self.env.begin(write=True)


def ref_of(txn: lmdb.Transaction, db: dict, seq: int) -> tuple[int, bytes] | None:
    """(reference count, blob id) of sequence number `seq`, or None."""
    raw = txn.get(U64.pack(seq), db=db["refs"])
    if raw is None:
        return None
    if len(raw) != REF.size:
        raise IntegrityError(f"corrupt reference count record {seq} in the index")
    return REF.unpack(raw)


def next_seq_problem(txn: lmdb.Transaction, db: dict) -> str | None:
    """What is wrong with `meta/next_seq`, or None. It must be above every
    number in `refs`: a lower one (an index restored from an older copy, a bad
    page) would hand new blobs the numbers of live ones, and a later drop would
    unindex the wrong blobs."""
    raw = txn.get(b"next_seq", db=db["meta"])
    if raw is None:
        return "the index predates reference counts by sequence number (index layout 3)"
    if len(raw) != 8:
        return "the index's next sequence number is corrupt"
    with txn.cursor(db=db["refs"]) as cur:
        last = cur.key() if cur.last() else None
    if last is not None and (len(last) != 8 or U64.unpack(last)[0] >= U64.unpack(raw)[0]):
        return f"the index's next sequence number {U64.unpack(raw)[0]} is not above its highest one"
    return None
