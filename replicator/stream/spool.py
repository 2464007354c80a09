"""The replica's chunk spool: verified chunks waiting for the CHANGES that reference them.

A master sends a batch as OFFER/NEED/CHUNKS rounds, then one or more CHANGES
frames; the replica stores a chunk only together with a change that
references it (a refused peer leaves nothing in the repository). Until then
the chunk waits here, on disk rather than in memory, because a batch of big
files can be GBs.

**Persistent, per set.** The spool of set S is `tmp-replication/spool-S` in
the replica's repository, so a replica killed (or cut off) in the middle of
a batch keeps what it had received: on the next connection it reopens the
file, and the OFFER handler leaves out of NEED every id already here. The
file is a sequence of self-describing records (`REC` header, then the
payload as it travelled: zstd or raw):

    magic "PSP1" | id (32) | flags (1) | raw length (4) | payload length (4)
    | written, Unix seconds (4) | CRC-32 of the fields before it (4) | payload

**Nothing is trusted on reload.** Reopening walks the records from the
start. A header that is short, has another magic, fails its CRC or declares
a payload past the end of the file ends the walk, and the file is truncated
there (a torn tail: nothing after a bad header can be told apart from
garbage). Every payload is decompressed and hashed again (`verify_chunk`,
the check a chunk off the wire gets); one that fails is dropped, so a
damaged spool can cost a re-send but never put a wrong chunk into the
store. Records the repository already holds (stored just before the kill)
and records older than `MAX_AGE` are dropped too. The walk costs one
decompression and one BLAKE3 per byte kept, at most `CAP` bytes (a few
seconds for 4 GiB); the connection's heartbeat keeps the master waiting.

**No fsync.** A record lost is only a chunk asked for again, so writes stay
in the page cache. A killed process loses nothing that way (the page cache
is the kernel's). A power loss or kernel crash may leave the file shorter
than written, or of the right length with blocks that read back as zeros
or older bytes (delayed allocation, data=writeback): the first is a torn
tail, the second a bad header (the walk stops) or a payload whose BLAKE3
is not its id (the record is dropped). Either way the replica NEEDs those
chunks again. The spool never holds acknowledged state: a chunk leaves it
only after the repository commit (which the store makes durable) that
stored it, and the ACK follows that commit.

**Dropping, compaction, the cap.** A record is dropped (from the in-memory
map) once the repository has stored it. When no record is left the file is
truncated to 0. When dropped records take more than half of the file and at
least `COMPACT_MIN`, the kept records are moved down in place, in file
order (a write never passes the read position, so a kill in the middle
leaves records a reload verifies or a bad header it stops at) and the file
is truncated after them. A set's spool holds at most `cap` bytes: `CAP`
(4 GiB) or a quarter of the free space of its file system plus what the
file already holds, whichever is smaller, taken when the spool is opened.
Past the cap the spool still takes every chunk of the batch, in a private
anonymous file (as before this spool persisted): those are not kept across
a restart and travel again. Records not referenced by any change (a file
that changed on the master while it was sent, and went out in a later
batch with other chunks) stay until `MAX_AGE` or the cap pushes new
records into the private file.

**One connection at a time.** The file is held with `flock` for the whole
connection. A second connection for the same set (the master reconnected
while this side has not yet noticed the old one dead) closes the old one
(replica.py), then waits up to `LOCK_WAIT` for the lock; past that it uses
a private anonymous spool (`Spool.private`) and resumes nothing. So does every connection to an encrypted repository
(replica.py `_open_spool`): a record is a chunk in the clear.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict

import blake3
import zstandard

from store import packs as P
from store.repository import flock_within

from ..errors import ChunkRejected, ProtocolError
from . import protocol

log = logging.getLogger("pit.replica")

MAX_CHUNK = 16 * 1024 * 1024
MAX_PAYLOAD = MAX_CHUNK + 64 * 1024  # a zstd frame of an incompressible chunk is a little longer than it
REC = struct.Struct("<4s32sBIIII")
MAGIC = b"PSP1"
CAP = 4 << 30              # bytes a set's persistent spool may hold
CAP_FREE_FRACTION = 0.25   # ... and at most this part of the free space (plus what it already holds)
COMPACT_MIN = 64 << 20     # dropped bytes worth a compaction
RECENT_BYTES = 16 << 20    # payloads last added, kept in memory as well for the applier (Spool.get)
MAX_AGE = 7 * 86400        # seconds a record is kept across reopenings
LOCK_WAIT = protocol.DEAD_AFTER + 5.0


def verify_chunk(dctx, c) -> tuple[bytes, int, int, bytes]:
    """`[id, flags, raw length, payload]` -> the same as a tuple, once the payload decompresses (within its
    declared length) to bytes whose BLAKE3 is the id; ProtocolError / ChunkRejected otherwise."""
    if not (isinstance(c, list) and len(c) == 4):
        raise ProtocolError("a chunk must be [id, flags, raw length, payload]")
    cid, flags, raw_len, payload = c
    protocol.check_id(cid)
    if not isinstance(flags, int) or flags not in (0, P.ZSTD) or not isinstance(raw_len, int) \
            or isinstance(raw_len, bool) or not 0 < raw_len <= MAX_CHUNK or not isinstance(payload, bytes):
        raise ProtocolError("malformed chunk header")
    if flags & P.ZSTD:
        try:
            data = dctx.decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError:
            raise ChunkRejected(f"chunk {cid.hex()[:16]} does not decompress") from None
    else:
        data = payload
    if len(data) != raw_len or blake3.blake3(data).digest() != cid:
        raise ChunkRejected(f"chunk {cid.hex()[:16]} does not match its id")
    return cid, flags, raw_len, payload


def header(cid: bytes, flags: int, raw_len: int, n: int, written: int) -> bytes:
    head = REC.pack(MAGIC, cid, flags, raw_len, n, written, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def anonymous(directory: str) -> int:
    """A descriptor of a new file without a name in `directory` (gone when closed, or when the process dies)."""
    with tempfile.TemporaryFile(dir=directory, prefix="private-") as f:
        return os.dup(f.fileno())


class _File:
    """One file of records: where each kept record is, and how many bytes the kept ones take."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.end = 0
        self.live = 0
        self.recs: dict[bytes, tuple[int, int, int, int, int]] = {}  # id -> (offset, payload len, flags, raw len, written)

    def append(self, cid: bytes, flags: int, raw_len: int, payload: bytes, written: int) -> None:
        head = header(cid, flags, raw_len, len(payload), written)
        n = os.pwritev(self.fd, [head, payload], self.end)
        if n != len(head) + len(payload):
            os.ftruncate(self.fd, self.end)
            raise OSError(errno.ENOSPC, "short write to the replication spool")
        self.recs[cid] = (self.end, len(payload), flags, raw_len, written)
        self.end += n
        self.live += n

    def read(self, cid: bytes) -> tuple[int, bytes, int]:
        off, n, flags, raw_len, _ = self.recs[cid]
        data = os.pread(self.fd, REC.size + n, off)
        if len(data) != REC.size + n or data[4:36] != cid:
            raise OSError(errno.EIO, f"replication spool: record of {cid.hex()[:16]} is not where it was written")
        return flags, data[REC.size:], raw_len

    def drop(self, cid: bytes) -> None:
        rec = self.recs.pop(cid, None)
        if rec is not None:
            self.live -= REC.size + rec[1]

    def tidy(self) -> None:
        """Truncate to 0 when nothing is kept; compact when dropped records are most of the file."""
        if not self.recs:
            if self.end:
                os.ftruncate(self.fd, 0)
                self.end = 0
            return
        dead = self.end - self.live
        if dead >= COMPACT_MIN and dead > self.live:
            self.compact()

    def compact(self) -> None:
        """Move the kept records down, in file order, and cut the file after them."""
        to = 0
        moved = {}
        for cid, (off, n, flags, raw_len, written) in sorted(self.recs.items(), key=lambda kv: kv[1][0]):
            if off != to:
                data = os.pread(self.fd, REC.size + n, off)
                os.pwrite(self.fd, data, to)
            moved[cid] = (to, n, flags, raw_len, written)
            to += REC.size + n
        self.recs = moved
        os.ftruncate(self.fd, to)
        self.end = self.live = to


class Spool:
    """Verified chunks of one set waiting for the CHANGES that reference them (module docstring)."""

    def __init__(self, fd: int, path: str | None, cap: float) -> None:
        self.path = path  # None: a private anonymous spool, gone on close
        self.main = _File(fd)
        self.cap = cap
        self.over: _File | None = None  # chunks past the cap: a private anonymous file
        self.dir = os.path.dirname(path) if path else None
        # the connection's thread adds, its applier (replica.py) reads and drops: a compaction moves records
        self.lock = threading.RLock()
        # The payloads added last, still in memory: the applier usually asks for a chunk soon after it
        # came, and reading it back from the file was one more copy of every byte seeded. The file
        # holds them all the same (a restart resumes from it).
        self.recent: OrderedDict[bytes, tuple[int, bytes, int]] = OrderedDict()
        self.recent_bytes = 0

    # ------------------------------------------------------------- opening
    @classmethod
    def private(cls, directory: str) -> "Spool":
        """An anonymous spool for one connection (nothing survives it)."""
        os.makedirs(directory, exist_ok=True)
        spool = cls(anonymous(directory), None, float("inf"))
        spool.dir = directory
        return spool

    @classmethod
    def open(cls, directory: str, set_name: str, dctx, cap: float | None = None,
             wait: float = LOCK_WAIT) -> "Spool":
        """Set `set_name`'s spool, its records reloaded and verified; a private spool when another
        connection holds it for longer than `wait` seconds."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"spool-{set_name}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not flock_within(fd, wait):
            os.close(fd)
            log.info("set %s: the spool is held by another connection; this one uses a private spool", set_name)
            return cls.private(directory)
        try:
            size = os.fstat(fd).st_size
            if cap is None:
                cap = min(CAP, size + shutil.disk_usage(directory).free * CAP_FREE_FRACTION)
            spool = cls(fd, path, cap)
            spool._reload(dctx, size, set_name)
        except BaseException:
            os.close(fd)
            raise
        return spool

    def _reload(self, dctx, size: int, set_name: str) -> None:
        f = self.main
        off, bad, old = 0, 0, 0
        oldest = time.time() - MAX_AGE
        while off + REC.size <= size:
            head = os.pread(f.fd, REC.size, off)
            magic, cid, flags, raw_len, n, written, crc = REC.unpack(head)
            if magic != MAGIC or zlib.crc32(head[:-4]) != crc or n > MAX_PAYLOAD or off + REC.size + n > size \
                    or off + REC.size + n > self.cap:
                break
            payload = os.pread(f.fd, n, off + REC.size)
            try:
                verify_chunk(dctx, [cid, flags, raw_len, payload])
            except ProtocolError:
                bad += 1
            else:
                if written < oldest:
                    old += 1
                elif cid not in f.recs:
                    f.recs[cid] = (off, n, flags, raw_len, written)
                    f.live += REC.size + n
            off += REC.size + n
        f.end = off
        if off < size:
            os.ftruncate(f.fd, off)
        if f.recs or off < size or bad:
            log.info("set %s: spool reopened: %d chunk(s) kept (%d bytes), %d damaged dropped, %d expired, "
                     "%d bytes of torn or garbled tail cut", set_name, len(f.recs), f.live, bad, old, size - off)
        f.tidy()

    # ------------------------------------------------------------- use
    def __contains__(self, cid: bytes) -> bool:
        with self.lock:
            return cid in self.main.recs or (self.over is not None and cid in self.over.recs)

    def __len__(self) -> int:
        with self.lock:
            return len(self.main.recs) + (len(self.over.recs) if self.over else 0)

    def ids(self) -> list[bytes]:
        with self.lock:
            return list(self.main.recs) + (list(self.over.recs) if self.over else [])

    @property
    def persistent(self) -> bool:
        return self.path is not None

    def add(self, cid: bytes, flags: int, raw_len: int, payload: bytes) -> None:
        """Keep a verified chunk (past the cap: in the private overflow file)."""
        with self.lock:
            self._add(cid, flags, raw_len, payload)

    def _add(self, cid: bytes, flags: int, raw_len: int, payload: bytes) -> None:
        if cid in self:
            return
        f = self.main
        if f.end + REC.size + len(payload) > self.cap:
            if (f.end - f.live) * 4 >= f.end:  # a quarter or more is dropped records: worth a copy
                f.compact()
            if f.end + REC.size + len(payload) > self.cap:
                if self.over is None:
                    self.over = _File(anonymous(self.dir))
                    log.info("replication spool %s is at its cap (%d bytes): more chunks go to a private file",
                             self.path, int(self.cap))
                f = self.over
        f.append(cid, flags, raw_len, payload, int(time.time()))
        self.recent[cid] = (flags, payload, raw_len)
        self.recent_bytes += len(payload)
        while self.recent_bytes > RECENT_BYTES:
            _, (_, old, _) = self.recent.popitem(last=False)
            self.recent_bytes -= len(old)

    def _forget(self, cid: bytes) -> None:
        rec = self.recent.pop(cid, None)
        if rec is not None:
            self.recent_bytes -= len(rec[1])

    def get(self, cid: bytes) -> tuple[int, bytes, int]:
        """(flags, payload, raw length) of a chunk held here (KeyError when it is not)."""
        with self.lock:
            rec = self.recent.get(cid)
            if rec is not None:
                return rec
            if cid in self.main.recs:
                return self.main.read(cid)
            if self.over is not None and cid in self.over.recs:
                return self.over.read(cid)
        raise KeyError(cid)

    def discard(self, ids) -> None:
        """Drop chunks the repository now holds (a commit stored them); truncate or compact."""
        with self.lock:
            for cid in ids:
                self._forget(cid)
                self.main.drop(cid)
                if self.over is not None:
                    self.over.drop(cid)
            self.main.tidy()
            if self.over is not None:
                self.over.tidy()

    def size(self) -> int:
        """Bytes of the persistent file (0 for a private spool)."""
        return self.main.end if self.persistent else 0

    def close(self) -> None:
        os.close(self.main.fd)  # releases the flock
        if self.over is not None:
            os.close(self.over.fd)
            self.over = None
