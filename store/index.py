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

import os
import struct
from dataclasses import dataclass

import lmdb
import msgpack

from .errors import IndexDamaged, IndexMissing, IntegrityError, PermissionDenied, ReadOnlyRepository, translate

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


@dataclass(slots=True)  # a snapshot's writer holds up to Writer.PENDING_MAX: ~100 bytes less each
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
        write transaction just to open the handles).

        An existing environment is checked before LMDB maps it: a data file
        shorter than its meta page says would be a SIGBUS at the first read
        of a page past its end, not an error."""
        self.readonly = readonly and not create
        if not create:
            check_access(path, self.readonly)
            check_data_file(path)
        try:
            self.env = lmdb.open(
                path, map_size=MAP_SIZE, max_dbs=len(DB_NAMES) + 8, max_readers=1024,
                subdir=True, create=create, readahead=False, readonly=self.readonly,
            )
        except lmdb.Error as exc:
            raise open_error(path, exc, self.readonly) from exc
        self.db = {}
        for name in DB_NAMES:
            try:
                self.db[name.decode()] = self.env.open_db(name, create=not self.readonly)
            except lmdb.NotFoundError:
                self.env.close()
                raise IndexMissing(f"the index at {path} lacks its {name.decode()} database (an older layout, "
                                   f"or damage): run `pit repair` to rebuild it from the packs") from None
            except lmdb.Error as exc:
                self.env.close()
                raise open_error(path, exc, self.readonly) from exc

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


# ---------------------------------------------------------------- checks
# An LMDB data file starts with two meta pages (the newer, by transaction id,
# is current). Each is a 16-byte page header, then MDB_meta: magic, version,
# address, map size, the free and main databases' MDB_db records (the free
# one's first field holds the page size), the last page used and the txn id.
# LMDB only ever writes whole pages and never shrinks the file.
_META_MAGIC = 0xBEEFC0DE
_META_BYTES = 152
_NO_PAGE = (1 << 64) - 1  # P_INVALID: the root of an empty database
# The last page counted used may be one a commit allocated and freed again
# without writing it (we saw one): a file may end that many pages early.
_UNWRITTEN_SLACK = 64


def _read_meta(buf: bytes) -> tuple[int, int, int, int, int] | None:
    """(page size, last page used, txn id, free db root, main db root) of one meta page, or None."""
    if len(buf) < _META_BYTES:
        return None
    magic, version = struct.unpack_from("<II", buf, 16)
    psize = struct.unpack_from("<I", buf, 40)[0]
    if magic != _META_MAGIC or version != 1 or psize < 512 or psize > 65536 or psize & (psize - 1):
        return None
    free_root = struct.unpack_from("<Q", buf, 40 + 40)[0]
    main_root = struct.unpack_from("<Q", buf, 88 + 40)[0]
    last, txnid = struct.unpack_from("<QQ", buf, 136)
    return psize, last, txnid, free_root, main_root


def _named_roots(page: bytes) -> list[int]:
    """Root pages of the named databases, from the main database's root when
    it is a leaf page (it is: a dozen records); [] otherwise."""
    if len(page) < 16:
        return []
    flags, lower = struct.unpack_from("<HH", page, 10)
    if not flags & 0x02:  # P_LEAF
        return []
    roots = []
    for i in range(max(0, (lower - 16) // 2)):
        off = struct.unpack_from("<H", page, 16 + 2 * i)[0]
        if off + 8 > len(page):
            return []
        lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, off)
        dsize = lo | hi << 16
        at = off + 8 + ksize
        if nflags & 0x02 and dsize == 48 and at + 48 <= len(page):  # F_SUBDATA: an MDB_db record
            roots.append(struct.unpack_from("<Q", page, at + 40)[0])
    return roots


def data_file_problem(path: str) -> str | None:
    """What is wrong with `<path>/data.mdb` as LMDB would map it, or None:
    not an LMDB file, or truncated (a file that ends before pages its meta
    page counts, or before a database's root: LMDB would die of SIGBUS
    reading past the end). The meta pages are read before the size: a
    writer writes its pages before the meta page that counts them."""
    data = os.path.join(path, "data.mdb")
    fd = os.open(data, os.O_RDONLY)
    try:
        problem = None
        for _attempt in range(3):  # a meta page read while a writer rewrites it may be torn: look again
            first = os.pread(fd, _META_BYTES, 0)
            metas = [_read_meta(first)]
            if metas[0] is not None:
                metas.append(_read_meta(os.pread(fd, _META_BYTES, metas[0][0])))
            good = [m for m in metas if m is not None]
            size = os.fstat(fd).st_size
            if size == 0:
                return None  # LMDB's own "new environment": the caller finds no format record
            if not good:
                problem = "it is not an LMDB data file (no valid meta page)"
                continue
            psize, last, _txnid, free_root, main_root = max(good, key=lambda m: m[2])
            pages = size // psize
            if size % psize or pages < 2:
                problem = f"it is truncated ({size} bytes, not a whole number of {psize}-byte pages)"
                continue
            if pages + _UNWRITTEN_SLACK < last + 1:
                problem = f"it is truncated ({pages} pages; its last commit counts {last + 1})"
                continue
            roots = [r for r in (free_root, main_root) if r != _NO_PAGE]
            if main_root != _NO_PAGE and main_root < pages:
                roots += _named_roots(os.pread(fd, psize, main_root * psize))
            beyond = [r for r in roots if r != _NO_PAGE and r >= pages]
            if beyond:
                problem = f"it is truncated ({pages} pages; a database's root is page {beyond[0]})"
                continue
            return None
        return problem
    finally:
        os.close(fd)


def check_data_file(path: str) -> None:
    try:
        problem = data_file_problem(path)
    except FileNotFoundError:
        return  # LMDB reports it (a missing index is the caller's to name)
    except OSError as exc:
        raise translate(exc, os.path.join(path, "data.mdb")) or IndexMissing(
            f"cannot read the index at {path}: {exc}; run `pit repair`") from exc
    if problem:
        raise IndexDamaged(f"the index is damaged: {os.path.join(path, 'data.mdb')}: {problem}; "
                           f"run `pit repair` to rebuild it from the packs")


def _unwritable(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def access_problem(path: str, readonly: bool) -> str | None:
    """The first index path this user may not use as needed, or None.
    (Root passes every check: permissions do not apply to it.)"""
    need = [(path, os.R_OK | os.X_OK, "read and search")]
    need.append((os.path.join(path, "data.mdb"), os.R_OK if readonly else os.R_OK | os.W_OK,
                 "read" if readonly else "read and write"))
    if not (readonly and _unwritable(path)):  # LMDB skips the lock file of a read-only file system
        need.append((os.path.join(path, "lock.mdb"), os.R_OK | os.W_OK, "read and write"))
    for p, mode, what in need:
        if os.path.lexists(p) and not os.access(p, mode):
            return f"this user may not {what} {p}"
    return None


def check_access(path: str, readonly: bool) -> None:
    if not readonly and _unwritable(path):
        raise ReadOnlyRepository(f"read-only file system: {path}: only reading commands (and `pit verify`, "
                                 f"which then records nothing) work there")
    problem = access_problem(path, readonly)
    if problem:
        raise PermissionDenied(f"permission denied on the index: {problem} (fix the owner or mode; "
                               f"this is not damage, `pit repair` would not help)")


def open_error(path: str, exc: lmdb.Error, readonly: bool) -> Exception:
    """The typed error for LMDB failing to open the index at `path`."""
    problem = access_problem(path, readonly)
    if problem:
        return PermissionDenied(f"permission denied on the index: {problem} (fix the owner or mode; "
                                f"this is not damage, `pit repair` would not help)")
    typed = translate(exc, path)
    if typed is not None:
        return typed
    return IndexMissing(f"cannot open the index at {path}: {exc}; run `pit repair`")
