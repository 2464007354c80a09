"""SQLite's WAL shipped frame by frame to the replicas between points, applied on promotion (issue 16).

A point is a consistent copy of each database (the backup API); between two
points a set would lose every transaction acknowledged since the last one. A
set with `wal = "stream"` ships the database's write-ahead log as Litestream
does, in our own words:

- the master's agent runs a `Shipper` per database. Every POLL seconds it
  reads the WAL index header from the `-shm` file (both copies equal, as
  SQLite's own readers check): `mxFrame`, the number of frames of committed
  transactions, and the salt of the WAL's current generation. The frames up to
  `mxFrame` are complete and committed (SQLite raises `mxFrame` only after a
  commit's frames are written), so they are appended as they are to the
  shipper's copy of the generation, after their salts are checked and the
  index header is read again (unchanged: the frames read were not being
  overwritten);
- SQLite starts a new generation (restarts the WAL from its first frame) only
  at a write that began with every frame copied into the database, and only
  when no reader holds a read mark. The shipper always holds a read
  transaction (two connections taking turns, one always open), so the WAL
  cannot restart under frames it has not shipped; past RESTART_FRAMES it
  ships the last frames under the write lock, copies them all into the
  database and lets go (`Shipper._restart`), so that the application's next
  write restarts the WAL and it stays small. Should a restart still
  come before the end of a generation was read (SQLite lets a reader that
  began with the WAL wholly copied hold no mark), that end is still in the
  file past the new generation's first frames and is shipped from there (its
  salt and checksum chain prove it); only when the new generation already
  overwrote it does a new line begin: frames were missed, and replicas must
  not bridge the gap. SQLite adds one to the first salt at each restart: a
  jump means a whole generation came and went between two looks, and a new
  line begins too;
- what is shipped is a directory of append-only files: `LINE/SEQ.wal` (the
  generation's 32-byte WAL header, then its frames) and `LINE/SEQ.idx` (one
  line `FRAMES TIME_NS` each time committed frames were shipped, which a
  restore to a second cuts at). A line is one unbroken run of the shipper
  (`START_NS-RANDOM`); stream/logship.py mirrors the directory to each
  replica over the agents' mTLS connection.

Applying (`replay`): a page-for-page copy made after a line started, plus every
frame of the line from the generation that was current when the copy was
made, in order, is the database as of the last frame: each frame is a whole
page image, the last one of each page wins, and the commit frames carry the
database size. SQLite itself applies them: each generation is written beside
the copy as its `-wal` file and checkpointed (its checksums are checked by
SQLite's recovery, which stops at the first frame that does not match).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass

from store.backend import fsync_dir

from ..errors import WalReplayFailed
from ..settings import SetConfig

log = logging.getLogger("pit.sqlitewal")

WAL_HEADER = 32
FRAME_HEADER = 24
SHM_READ = 136            # both WAL index headers (48 bytes each) and the checkpoint information
POLL = 0.02               # seconds between looks at the WAL index
RESTART_FRAMES = 1000     # past this many frames the shipper lets the WAL restart (SQLite's autocheckpoint size)
LATE_RESTART_FRAMES = 2500  # past this many, it waits a moment for the write lock to restart it
LATE_RESTART_WAIT_MS = 50
COPY_META = ".pit-copy"   # beside each point's copy: when the copy's read transaction began (JSON)


def streams_sqlite(s: SetConfig | None) -> bool:
    app = (s.app or {}) if s is not None else {}
    return app.get("template") == "sqlite" and app.get("wal", "off") == "stream"


def ship_dir(state_dir: str, set_name: str) -> str:
    """Master: what its shippers wrote; replica: what it received. One subdirectory per database."""
    return os.path.join(state_dir, "sqlitewal", set_name)


@dataclass(frozen=True)
class IndexHeader:
    """The parts of SQLite's WAL index header (`-shm`, native byte order) the shipper needs."""

    max_frame: int
    salt: bytes
    page_size: int
    backfilled: int


def read_index(shm: int) -> IndexHeader | None:
    """The WAL index header from the `-shm` file open as `shm`, or None when it is not set up or is being
    written (both copies differ).

    The file is read through a descriptor kept open as long as the shipper's connections: SQLite's read locks
    are POSIX locks on this file, which the kernel drops, for the whole process, as soon as any descriptor of
    the file is closed (opening and closing it here would silently end the shipper's own protection)."""
    for _ in range(20):
        b = os.pread(shm, SHM_READ, 0)
        if len(b) < SHM_READ:
            return None
        if b[0:48] == b[48:96] and b[12] == 1:
            sz = struct.unpack_from("=H", b, 14)[0]
            return IndexHeader(max_frame=struct.unpack_from("=I", b, 16)[0], salt=b[32:40],
                               page_size=65536 if sz == 1 else sz, backfilled=struct.unpack_from("=I", b, 96)[0])
        time.sleep(0.001)
    return None


def wal_header(wal: int) -> bytes | None:
    h = os.pread(wal, WAL_HEADER, 0)
    return h if len(h) == WAL_HEADER and struct.unpack(">I", h[:4])[0] in (0x377F0682, 0x377F0683) else None


def wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum over `data` (a multiple of 8 bytes), continued from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    m = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & m
        s1 = (s1 + words[i + 1] + s0) & m
    return s0, s1


def _fsync_append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class Shipper:
    """The WAL of one database, appended to `out/LINE/` as it is committed (see the module's docstring)."""

    def __init__(self, db: str, out: str, poll: float = POLL) -> None:
        self.db, self.out, self.poll = db, out, poll
        self.line: str | None = None
        self.seq = 0
        self.salt: bytes | None = None
        self.shipped = 0          # frames of the current generation in our copy
        self.frame_size = 0
        self.big_endian = True
        self.cksum = (0, 0)       # the checksum of the last frame shipped (or of the header): the chain goes on
        self.frames_total = 0
        self.bytes_total = 0
        self.last_ship_ns = 0
        self.lines = 0
        self.error = ""
        self._readers: list[sqlite3.Connection] = []
        self._shm: int | None = None   # descriptors kept open while the connections are (see read_index)
        self._wal: int | None = None
        self._held: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"pit-sqlship-{os.path.basename(self.db)}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self._close()

    def _loop(self) -> None:
        said = ""
        while not self._stop.is_set():
            try:
                self.step()
                if self.error:
                    log.info("database %s: WAL shipping resumed", self.db)
                self.error = said = ""
            except (OSError, sqlite3.Error) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.log(logging.WARNING if self.error != said else logging.DEBUG, "database %s: WAL not shipped: %s",
                        self.db, self.error, exc_info=log.isEnabledFor(logging.DEBUG))
                said = self.error
                self._close()
                self.line = None  # whatever comes next cannot be proved continuous with what was shipped
                self._stop.wait(1.0)
            self._stop.wait(self.poll)

    def _close(self) -> None:
        for c in self._readers:
            try:
                c.close()
            except sqlite3.Error:
                pass
        self._readers, self._held = [], None
        for fd in (self._shm, self._wal):  # only now: closing them drops the process's locks on the files
            if fd is not None:
                os.close(fd)
        self._shm = self._wal = None

    # -------------------------------------------------------------- read protection
    def _open(self) -> None:
        if not os.path.isfile(self.db):
            raise FileNotFoundError(f"database {self.db} does not exist")
        first = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False, timeout=10)
        mode = first.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":  # as Litestream does: WAL mode is what makes shipping possible (it persists)
            mode = first.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                first.close()
                raise OSError(f"database {self.db} cannot be put in WAL mode (journal_mode {mode})")
            log.warning("database %s put in WAL mode for streaming", self.db)
        second = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False, timeout=10)
        self._readers = [first, second]
        self._protect()  # the read makes `-wal` and `-shm` exist
        self._shm = os.open(self.db + "-shm", os.O_RDONLY)
        self._wal = os.open(self.db + "-wal", os.O_RDONLY)

    def _protect(self) -> None:
        """Begin a read transaction on the idle connection, then end the held one: one is always open."""
        nxt = self._readers[0] if self._held is not self._readers[0] else self._readers[1]
        for attempt in range(50):
            nxt.execute("BEGIN")
            try:
                nxt.execute("SELECT count(*) FROM sqlite_master").fetchone()
                break
            except sqlite3.OperationalError as exc:  # SQLITE_PROTOCOL: a reader raced a restart; it is transient
                nxt.execute("ROLLBACK")
                if "locking protocol" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.001)
        if self._held is not None:
            self._held.execute("COMMIT")
        self._held = nxt

    def _release(self) -> None:
        if self._held is not None:
            self._held.execute("COMMIT")
            self._held = None

    # -------------------------------------------------------------- shipping
    def _new_line(self) -> None:
        self.line = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        os.makedirs(os.path.join(self.out, self.line), mode=0o700, exist_ok=True)
        fsync_dir(self.out)
        self.seq, self.salt, self.shipped = 0, None, 0
        self.lines += 1
        log.info("database %s: WAL line %s begins", self.db, self.line)

    def _path(self, ext: str) -> str:
        return os.path.join(self.out, self.line, f"{self.seq:08d}.{ext}")

    def step(self) -> int:
        """One look at the WAL: ship what was committed since the last (-> frames shipped)."""
        if not self._readers:
            self._open()
        if self.line is None:
            self._new_line()
        idx = read_index(self._shm)
        if idx is None or idx.max_frame == 0:
            return 0
        shipped = 0
        if idx.salt != self.salt:
            head = wal_header(self._wal)
            if head is None or head[16:24] != idx.salt:
                return 0  # the new generation's header is not written yet
            log.debug("database %s: generation %s (%d frames, %d copied) after %s (%d shipped)", self.db,
                      idx.salt.hex(), idx.max_frame, idx.backfilled, self.salt.hex() if self.salt else None,
                      self.shipped)
            if self.salt is not None:
                shipped = self._ship_tail()
            if self.salt is not None and struct.unpack(">I", idx.salt[:4])[0] != (struct.unpack(">I", self.salt[:4])[0]
                                                                              + 1) & 0xFFFFFFFF:
                log.error("database %s: a whole WAL generation came and went between two looks: a new line begins "
                          "(the next point is the base it needs)", self.db)
                self._new_line()
            self.seq += 1
            self.salt, self.shipped = idx.salt, 0
            self.frame_size = FRAME_HEADER + idx.page_size
            self.big_endian = struct.unpack(">I", head[:4])[0] & 1 == 1
            self.cksum = struct.unpack(">II", head[24:32])
            _fsync_append(self._path("wal"), head)
            fsync_dir(os.path.join(self.out, self.line))
        shipped += self._ship_committed(idx)
        if idx.max_frame >= RESTART_FRAMES and self.shipped >= idx.max_frame:
            self._restart(idx.max_frame)
        else:
            self._protect()
        return shipped

    def _ship_committed(self, idx: IndexHeader) -> int:
        """The frames committed since the last look (up to the index header's `mxFrame`), if the WAL did not
        move under the read."""
        n = idx.max_frame
        if n <= self.shipped:
            return 0
        fs = self.frame_size
        data = os.pread(self._wal, (n - self.shipped) * fs, WAL_HEADER + self.shipped * fs)
        again = read_index(self._shm)
        if len(data) != (n - self.shipped) * fs or again is None or again.salt != self.salt:
            return 0  # the WAL moved under the read: look again
        for off in range(0, len(data), fs):
            if data[off + 8:off + 16] != self.salt:
                return 0
        return self._append(data, n)

    def _restart(self, frames: int) -> None:
        """Let the WAL restart (past RESTART_FRAMES, everything shipped) with nothing unshipped in it: with the
        write lock held (BEGIN IMMEDIATE, only when it is free at once: waiting for it behind a busy writer
        would hold shipping up; the next look tries again; past LATE_RESTART_FRAMES it waits up to
        LATE_RESTART_WAIT_MS, so a writer that is never idle when we look still lets the WAL stay bounded,
        seen under CI load: 3,435 frames and no restart) the last frames are shipped, our reader ends, and a passive checkpoint on the other connection copies
        every frame into the database. The lock is then let go: the application's next write, beginning with
        the WAL wholly copied, restarts it (SQLite restarts the WAL at such a write). A writer whose snapshot
        is older appends to the old generation instead; those frames are shipped at the next look, or from
        past the new generation's start should the WAL restart before it (`_ship_tail`). When an application
        reader still needs old frames the checkpoint cannot finish, and the next look tries again."""
        w, c = self._readers
        if self._held is w:
            self._protect()  # our reader on the other connection
        # do not wait for the lock (a busy writer would hold shipping up for as long; the next look tries
        # again) unless the WAL has grown well past its size: then a short wait, not an unbounded WAL
        w.execute(f"PRAGMA busy_timeout = {LATE_RESTART_WAIT_MS if frames >= LATE_RESTART_FRAMES else 0}")
        try:
            w.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return
        finally:
            w.execute("PRAGMA busy_timeout = 10000")
        try:
            idx = read_index(self._shm)
            if idx is None or idx.salt != self.salt:
                return
            self._ship_committed(idx)
            if self.shipped < idx.max_frame:
                return
            self._release()
            c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            w.execute("ROLLBACK")
            if self._held is None:
                self._protect()  # holds no mark when the WAL is wholly copied: the restart is free to come

    def _append(self, data: bytes, upto: int) -> int:
        """Frames (whole, committed, checked) onto the generation's copy, and the mark a restore cuts at."""
        now = time.time_ns()
        _fsync_append(self._path("wal"), data)
        _fsync_append(self._path("idx"), f"{upto} {now}\n".encode())
        k = upto - self.shipped
        last = data[-self.frame_size:]
        self.cksum = struct.unpack(">II", last[16:24])
        self.frames_total += k
        self.bytes_total += len(data)
        self.shipped, self.last_ship_ns = upto, now
        return k

    def _ship_tail(self) -> int:
        """The WAL restarted: the frames the old generation committed after the last look are still in the file
        past the new generation's end (it overwrites from the start); those that carry the old salt and continue
        its checksum chain, up to the last commit frame, are shipped. A frame the new generation overwrote
        already breaks the line: whether the old one had more is unknowable."""
        fs = self.frame_size
        data = os.pread(self._wal, RESTART_FRAMES * 8 * fs, WAL_HEADER + self.shipped * fs)
        s0, s1 = self.cksum
        good, k = 0, 0
        while (k + 1) * fs <= len(data):
            fr = data[k * fs:(k + 1) * fs]
            if fr[8:16] != self.salt:
                break
            s0, s1 = wal_checksum(fr[:8] + fr[FRAME_HEADER:], self.big_endian, s0, s1)
            if (s0, s1) != struct.unpack(">II", fr[16:24]):
                break
            k += 1
            if struct.unpack(">I", fr[4:8])[0]:
                good = k  # a commit frame: everything up to here was committed
        if k == 0 and len(data) >= fs and data[8:16] != self.salt:
            idx = read_index(self._shm)
            if idx is not None and idx.max_frame > self.shipped:
                log.error("database %s: the new WAL generation (%d frames) overwrote the old one's end (past frame "
                          "%d) before it was read: a new line begins", self.db, idx.max_frame, self.shipped)
                self._new_line()
                return 0
        return self._append(data[:good * fs], self.shipped + good) if good else 0

    def status(self) -> dict:
        return {"db": self.db, "line": self.line, "generation": self.seq, "frames": self.frames_total,
                "bytes": self.bytes_total, "shipped_at_ns": self.last_ship_ns, "lines": self.lines,
                "error": self.error or None}


# ------------------------------------------------------------------ what was shipped or received
@dataclass(frozen=True)
class Generation:
    seq: int
    wal: str
    marks: tuple[tuple[int, int], ...]   # (frames, time_ns) in order

    @property
    def first_ns(self) -> int | None:
        return self.marks[0][1] if self.marks else None


def line_start(line: str) -> int:
    return int(line.split("-", 1)[0])


def read_marks(path: str) -> tuple[tuple[int, int], ...]:
    out = []
    try:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # the last line was being written when the copy was made
                a, b = raw.split()
                out.append((int(a), int(b)))
    except FileNotFoundError:
        pass
    return tuple(out)


def generations(line_dir: str) -> list[Generation]:
    out = []
    for name in sorted(os.listdir(line_dir)):
        if name.endswith(".wal"):
            seq = int(name[:-4])
            out.append(Generation(seq, os.path.join(line_dir, name),
                                  read_marks(os.path.join(line_dir, f"{seq:08d}.idx"))))
    return out


def lines(db_dir: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(db_dir) if os.path.isdir(os.path.join(db_dir, n)) and "-" in n)
    except FileNotFoundError:
        return []


def write_copy_meta(copy: str, started_ns: int) -> None:
    with open(copy + COPY_META + ".tmp", "w") as f:
        f.write(json.dumps({"read_started_ns": started_ns}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(copy + COPY_META + ".tmp", copy + COPY_META)


def copy_started(copy: str) -> int | None:
    try:
        with open(copy + COPY_META) as f:
            return int(json.load(f)["read_started_ns"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def plan(db_dir: str, started_ns: int, target_ns: int | None = None) -> tuple[str, list[tuple[Generation, int]]] | None:
    """The newest line that began before the copy's read transaction, and of it the generations to apply with
    how many frames of each: from the last generation first shipped before the copy began (earlier ones are in
    the copy already) to the end, or to the last commit at or before `target_ns`. None when no line covers the
    copy (it was made before the shipper ran, or in a gap)."""
    usable = [ln for ln in lines(db_dir) if line_start(ln) <= started_ns]
    if not usable:
        return None
    line = usable[-1]
    gens = [g for g in generations(os.path.join(db_dir, line)) if g.marks]
    start = 0
    for i, g in enumerate(gens):
        if g.first_ns is not None and g.first_ns <= started_ns:
            start = i
    out = []
    for g in gens[start:]:
        frames = [f for f, t in g.marks if target_ns is None or t <= target_ns]
        if not frames:
            break
        out.append((g, frames[-1]))
    return line, out


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def replay(copy: str, db_dir: str, started_ns: int | None = None, target_ns: int | None = None) -> dict:
    """Apply the frames received for the database whose point copy is `copy` (see the module's docstring) -> what
    was applied. The copy stays a rollback-journal database, as the point hook made it."""
    t0 = time.monotonic()
    started_ns = copy_started(copy) if started_ns is None else started_ns
    if started_ns is None:
        raise WalReplayFailed(f"{os.path.basename(copy)}: the copy does not say when it was made ({COPY_META})")
    p = plan(db_dir, started_ns, target_ns)
    if p is None:
        return {"frames": 0, "generations": 0, "seconds": 0.0,
                "note": f"{os.path.basename(copy)}: no WAL line began before this copy: the copy alone"}
    line, todo = p
    frames = 0
    for p_ in (copy + "-wal", copy + "-shm", copy + "-journal"):
        _remove(p_)
    try:
        con = sqlite3.connect(copy, isolation_level=None)
        try:
            if con.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise WalReplayFailed(f"{os.path.basename(copy)}: cannot be put in WAL mode")
        finally:
            con.close()
        for g, n in todo:
            with open(g.wal, "rb") as src:
                head = src.read(WAL_HEADER)
                page = struct.unpack(">I", head[8:12])[0]
                size = WAL_HEADER + n * (FRAME_HEADER + page)
                with open(copy + "-wal", "wb") as dst:
                    dst.write(head)
                    left = size - WAL_HEADER
                    while left > 0:
                        b = src.read(min(left, 1 << 20))
                        if not b:
                            raise WalReplayFailed(f"generation {g.seq} of line {line} ends before frame {n}")
                        dst.write(b)
                        left -= len(b)
            _remove(copy + "-shm")
            con = sqlite3.connect(copy, isolation_level=None)
            try:
                busy, logged, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if not busy and logged == done == n:
                    busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                con.close()
            if busy or logged != n or done != n:
                raise WalReplayFailed(f"generation {g.seq} of line {line}: SQLite recovered {logged} of {n} frames "
                                      "(a frame's checksum does not match)")
            frames += n
        con = sqlite3.connect(copy, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=DELETE").fetchone()
            rows = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
        finally:
            con.close()
        if rows != ["ok"]:
            raise WalReplayFailed(f"{os.path.basename(copy)} after the WAL: quick_check: {'; '.join(rows[:3])}")
    except sqlite3.Error as exc:
        raise WalReplayFailed(f"{os.path.basename(copy)}: {exc}") from None
    last = todo[-1][0].marks if todo else ()
    upto = max((t for f, t in last if f <= todo[-1][1]), default=None) if todo else None
    return {"line": line, "generations": len(todo), "frames": frames, "seconds": round(time.monotonic() - t0, 3),
            "to_ns": upto, "note": f"{os.path.basename(copy)}: {frames} frames of {len(todo)} generation(s) applied"}


def prunable(db_dir: str, keep_from_ns: int) -> list[str]:
    """The files no copy made at or after `keep_from_ns` needs (relative to `db_dir`): older lines, and the
    generations of the newest usable line before the one current then."""
    p = plan(db_dir, keep_from_ns)
    if p is None or not p[1]:
        return []
    line, todo = p
    out = []
    for other in lines(db_dir):
        if other < line:
            out += [os.path.join(other, n) for n in sorted(os.listdir(os.path.join(db_dir, other)))]
    first = todo[0][0].seq
    for g in generations(os.path.join(db_dir, line)):
        if g.seq < first:
            out += [os.path.join(line, f"{g.seq:08d}.wal"), os.path.join(line, f"{g.seq:08d}.idx")]
    return out


def remove(db_dir: str, rels: list[str]) -> int:
    for rel in rels:
        _remove(os.path.join(db_dir, rel))
    for line in lines(db_dir):
        d = os.path.join(db_dir, line)
        if not os.listdir(d):
            os.rmdir(d)
    return len(rels)


# ------------------------------------------------------------------ the replica's archive (restores to a second)
def wal_set(set_name: str) -> str:
    """The set in a replica's repository keeping set `set_name`'s received log (as apps/pgwal.py names it)."""
    return f"{set_name}.wal"


def oldest_copy_started(repo, s: SetConfig) -> int | None:
    """When the oldest image's copies were begun (the earliest of its databases), read from the image."""
    from store.objects import ObjectReader
    from store.snapshots import list_snapshots

    app = s.app or {}
    side = os.path.basename(app.get("side_dir", "").rstrip("/"))
    with repo.reading() as txn:
        snaps = list_snapshots(repo, txn, s.name)
        if not snaps or not side:
            return None
        r = ObjectReader(repo, txn)
        out = []
        for db in app.get("databases", []):
            try:
                e = r.lookup(snaps[0].root, f"{side}/{os.path.basename(db)}{COPY_META}")
                out.append(int(json.loads(r.open_file(e).read(0, e.size))["read_started_ns"]))
            except Exception:  # an image from before streaming: it says nothing, nothing is pruned for it
                return None
    return min(out) if out else None


def archive_into(repo, lock, name: str, s: SetConfig | None, directory: str, host: str) -> None:
    """The received log as the newest snapshot of set NAME.wal in the replica's repository (the older ones are
    dropped: the newest holds all they held that an image still needs); then what no image needs any more is
    pruned from the directory."""
    from store.ingest import create_snapshot
    from store.prune import drop_snapshot
    from store.snapshots import list_snapshots

    ws = wal_set(name)
    with lock:
        snap = create_snapshot(repo, ws, [directory], host=host, retention=False)
        with repo.writer() as w:
            for old in list_snapshots(repo, w.txn, ws):
                if old.id != snap.id:
                    drop_snapshot(w, old)
        keep = oldest_copy_started(repo, s) if s is not None else None
    if keep is not None:
        for db in os.listdir(directory):
            d = os.path.join(directory, db)
            if os.path.isdir(d):
                remove(d, prunable(d, keep))


# ------------------------------------------------------------------ restore to a second (`pit restore --at`)
def copies_in(top: str, depth: int = 4) -> list[str]:
    """The point copies under a restored tree (each has its COPY_META beside it)."""
    out = []
    for d, dirs, files in os.walk(top):
        if d[len(top):].count(os.sep) >= depth:
            dirs[:] = []
        out += [os.path.join(d, f[:-len(COPY_META)]) for f in files
                if f.endswith(COPY_META) and f[:-len(COPY_META)] in files]
    return sorted(out)


def roll_forward(repo, snap, target: str, at_ns: int, path: str) -> dict | None:
    """Bring the SQLite copies restored from `snap` into `target` forward to `at_ns` with the log archived in
    the replica's repository (set SET.wal). None when the snapshot holds no copies of ours."""
    import shutil
    import tempfile

    from store.errors import InvalidArgument
    from store.objects import ObjectReader
    from store.restore import Restorer
    from store.snapshots import list_snapshots

    copies = copies_in(target)
    if not copies:
        return None
    if path:
        raise InvalidArgument("a database is restored to a second whole: give the set, not SET:PATH, with --at")
    ws = wal_set(snap.set)
    with repo.reading() as txn:
        wsnaps = list_snapshots(repo, txn, ws)
    if not wsnaps:
        raise WalReplayFailed(f"no log of set {snap.set} is archived in this repository (set {ws}): only the "
                              f"copy of {snap.name} can be restored")
    work = tempfile.mkdtemp(prefix="pit-sqlpitr-")
    try:
        with repo.reading() as txn:
            r = ObjectReader(repo, txn)
            (top,) = r.tree(wsnaps[-1].root)  # the received directory, named by the set
            Restorer(r).restore(top, work)
        received = os.path.join(work, top.name.decode())
        done = {}
        for c in copies:
            done[os.path.relpath(c, target)] = replay(c, os.path.join(received, os.path.basename(c)), target_ns=at_ns)
            os.unlink(c + COPY_META)  # the copy is no longer the point's: its start time would mislead
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"databases": done, "wal": f"{ws}@{wsnaps[-1].name}", "target_ns": at_ns,
            "note": "; ".join(d["note"] for d in done.values())}
