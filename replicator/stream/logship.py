"""A database log mirrored from a set's master to its replicas over the agents' mTLS port (issue 16).

SQLite has no server to stream its WAL from, so the master's agent ships it
(apps/sqlitewal.py writes append-only files under `STATE/sqlitewal/SET/`) and
each replica's agent pulls that directory here, as `pg_receivewal` pulls
PostgreSQL's:

- the replica connects with HELLO kind `logship`, then says what it has
  (LOG_HAVE: relative path -> size);
- the master sends what each file has beyond that (LOG_DATA: path, offset,
  bytes; the `.wal` of a generation before its `.idx`, so a mark never
  names frames the replica does not hold), and then what is appended, as it
  is appended, looking every POLL seconds;
- the replica writes each piece at its offset (a piece that does not start at
  the end of its copy is refused: the files only grow), fsyncs, and
  acknowledges (LOG_ACK, its sizes); the master's view
  of those acknowledgements is the set's lag (`pit status`, metrics, the
  `wal_lag` alert), and it prunes nothing a replica has not acknowledged.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from ..apps import sqlitewal
from ..errors import ConnectionLost, ProtocolError, ReplError
from ..settings import SetConfig
from . import protocol

log = logging.getLogger("pit.logship")

POLL = 0.02
PIECE = 1 << 20
PRUNE_EVERY = 60.0


def _order(rel: str) -> tuple:
    """Lines, then generations, the log before its marks."""
    head, _, ext = rel.rpartition(".")
    return head, ext != "wal"


def listing(base: str) -> dict[str, int]:
    """Every file under `base` (relative path -> size)."""
    out: dict[str, int] = {}
    for d, dirs, files in os.walk(base):
        dirs.sort()
        for f in files:
            if f.endswith((".wal", ".idx")):
                p = os.path.join(d, f)
                try:
                    out[os.path.relpath(p, base)] = os.path.getsize(p)
                except FileNotFoundError:
                    pass
    return out


def sizes_of(files) -> dict[str, int]:
    """A peer's LOG_HAVE or LOG_ACK map, checked: paths under the set's directory, sizes that are sizes."""
    out = {}
    for rel, size in files.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(f"log size for {str(rel)[:80]!r} is not a size")
        out[safe_rel(rel)] = size
    return out


def safe_rel(rel) -> str:
    """A relative path under the set's directory (DB/LINE/FILE), refused otherwise."""
    if not isinstance(rel, str):
        raise ProtocolError("log path is not a string")
    parts = rel.split("/")
    if len(parts) != 3 or any(p in ("", ".", "..") or "\0" in p for p in parts) \
            or not parts[2].endswith((".wal", ".idx")):
        raise ProtocolError(f"log path {rel[:80]!r} is not DB/LINE/FILE")
    return rel


# ------------------------------------------------------------------ master side
class LogShipping:
    """On a set's master: a shipper per database, each replica's connection served, their lag, pruning."""

    def __init__(self, set_name: str, state_dir: str) -> None:
        self.set_name = set_name
        self.base = sqlitewal.ship_dir(state_dir, set_name)
        self.shippers: dict[str, sqlitewal.Shipper] = {}
        self.replicas: tuple[str, ...] = ()
        self.side_dir = ""
        self.acked: dict[str, dict[str, int]] = {}     # replica -> its acknowledged sizes
        self.ack_at: dict[str, float] = {}
        self.connected: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pruner: threading.Thread | None = None

    def update(self, s: SetConfig) -> None:
        app = s.app or {}
        self.replicas, self.side_dir = tuple(s.replicas), app.get("side_dir", "")
        want = {os.path.basename(db): db for db in app.get("databases", [])}
        for name in [n for n in self.shippers if n not in want]:
            self.shippers.pop(name).stop()
        for name, db in want.items():
            if name not in self.shippers:
                sh = self.shippers[name] = sqlitewal.Shipper(db, os.path.join(self.base, name))
                sh.start()
        if self._pruner is None:
            self._pruner = threading.Thread(target=self._prune_loop, daemon=True, name=f"pit-logprune-{self.set_name}")
            self._pruner.start()

    def stop(self) -> None:
        self._stop.set()
        for sh in self.shippers.values():
            sh.stop()

    def serve(self, conn: protocol.Conn, node: str) -> None:
        """One replica's connection, until it ends."""
        sent = sizes_of(conn.recv("log_have")["files"])
        with self._lock:
            self.acked[node] = dict(sent)
            self.ack_at[node] = time.time()
            self.connected[node] = self.connected.get(node, 0) + 1
        done = threading.Event()

        def acks() -> None:
            try:
                while not done.is_set():
                    msg = conn.recv("log_ack")
                    with self._lock:
                        self.acked[node] = sizes_of(msg["files"])
                        self.ack_at[node] = time.time()
            except (ReplError, OSError):
                pass
            finally:
                done.set()

        threading.Thread(target=acks, daemon=True, name=f"pit-logack-{node}").start()
        try:
            while not done.is_set() and not self._stop.is_set():
                moved = False
                for rel, size in sorted(listing(self.base).items(), key=lambda kv: _order(kv[0])):
                    off = sent.get(rel, 0)
                    if size <= off:
                        continue
                    with open(os.path.join(self.base, rel), "rb") as f:
                        f.seek(off)
                        while off < size:
                            data = f.read(min(PIECE, size - off))
                            if not data:
                                break
                            conn.send({"t": "log_data", "path": rel, "offset": off, "data": data})
                            off += len(data)
                    sent[rel] = off
                    moved = True
                if not moved:
                    done.wait(POLL)
        finally:
            done.set()
            with self._lock:
                self.connected[node] -= 1

    def _prune_loop(self) -> None:
        while not self._stop.wait(PRUNE_EVERY):
            try:
                self.prune()
            except OSError as exc:
                log.warning("set %s: shipped log not pruned: %s", self.set_name, exc)

    def prune(self) -> int:
        """Drop what the newest point's copies no longer need, once every replica has acknowledged it whole."""
        n = 0
        for name in self.shippers:
            started = sqlitewal.copy_started(os.path.join(self.side_dir, name))
            if started is None:
                continue
            db_dir = os.path.join(self.base, name)
            rels = sqlitewal.prunable(db_dir, started)
            sizes = listing(self.base)
            with self._lock:
                held = [rel for rel in rels for r in self.replicas
                        if self.acked.get(r, {}).get(f"{name}/{rel}", -1) < sizes.get(f"{name}/{rel}", 0)]
            if not held:
                n += sqlitewal.remove(db_dir, rels)
        return n

    def status(self) -> dict:
        now, mono = time.time(), time.monotonic()
        sizes = listing(self.base)
        newest = max((sh.last_ship_ns for sh in self.shippers.values()), default=0) / 1e9
        out: dict[str, dict] = {}
        with self._lock:
            for r in self.replicas:
                acked = self.acked.get(r)
                streaming = self.connected.get(r, 0) > 0
                if streaming:
                    self._since[r] = mono
                behind = None if acked is None else sum(max(0, sz - acked.get(rel, 0)) for rel, sz in sizes.items())
                if streaming and behind == 0:
                    lag = 0.0
                elif streaming:
                    lag = max(0.0, newest - self.ack_at.get(r, now)) if newest else 0.0
                else:
                    lag = mono - self._since.setdefault(r, mono)
                out[r] = {"streaming": streaming, "lag_bytes": behind, "lag_seconds": round(lag, 3)}
        errors = [f"{n}: {sh.error}" for n, sh in self.shippers.items() if sh.error]
        return {"replicas": out, "error": "; ".join(errors) or None,
                "shippers": {n: sh.status() for n, sh in self.shippers.items()}}


# ------------------------------------------------------------------ replica side
class LogReceiver:
    """On a replica: the set's shipped log pulled from its master into `STATE/sqlitewal/SET/`, reconnecting with
    a back-off; `connect(master)` returns a Conn on which the HELLO was answered."""

    BACKOFF = (1.0, 2.0, 5.0, 10.0)

    def __init__(self, set_name: str, state_dir: str, connect, archive=None, archive_every: float = 30.0) -> None:
        self.set_name = set_name
        self.dir = sqlitewal.ship_dir(state_dir, set_name)
        self.connect, self.archive, self.archive_every = connect, archive, archive_every
        self.master: str | None = None
        self.error = ""
        self.restarts = 0
        self.running = False
        self.received = 0
        self.last_write = 0.0
        self.archived: dict = {}
        self._conn: protocol.Conn | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, master: str | None) -> None:
        if master == self.master and self._thread is not None:
            return
        self.master = master
        self._changed.set()
        c = self._conn
        if c is not None:
            c.close()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name=f"pit-logrecv-{self.set_name}")
            self._thread.start()
            if self.archive is not None:
                threading.Thread(target=self._archive_loop, daemon=True,
                                 name=f"pit-logarch-{self.set_name}").start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        c = self._conn
        if c is not None:
            c.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _loop(self) -> None:
        failures, said = 0, ""
        while not self._stop.is_set():
            self._changed.clear()
            master = self.master
            if master is None:
                self._changed.wait(5)
                continue
            t0 = time.monotonic()
            try:
                self._receive(master)
            except (ReplError, OSError) as exc:
                self.error = str(exc)
                log.log(logging.WARNING if self.error != said else logging.DEBUG, "set %s: log receiver: %s",
                        self.set_name, exc)
                said = self.error
            finally:
                self.running = False
            if self._stop.is_set():
                return
            failures = 1 if time.monotonic() - t0 > 30 else failures + 1
            self.restarts += 1
            self._changed.wait(self.BACKOFF[min(failures, len(self.BACKOFF)) - 1])

    def _receive(self, master: str) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        conn = self._conn = self.connect(master)
        try:
            have = listing(self.dir)
            conn.send({"t": "log_have", "files": have})
            self.running, self.error = True, ""
            log.info("set %s: receiving the database log from %s into %s", self.set_name, master, self.dir)
            while not self._stop.is_set():
                try:
                    msg = conn.recv("log_data")
                except ConnectionLost:
                    if self._changed.is_set() or self._stop.is_set():
                        return
                    raise
                rel = safe_rel(msg["path"])
                p = os.path.join(self.dir, rel)
                size = have.get(rel, 0)
                if msg["offset"] != size:
                    raise ProtocolError(f"{rel}: a piece at {msg['offset']} where the copy ends at {size}")
                if size == 0:
                    os.makedirs(os.path.dirname(p), mode=0o700, exist_ok=True)
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    os.write(fd, msg["data"])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                have[rel] = size + len(msg["data"])
                self.received += len(msg["data"])
                self.last_write = time.time()
                conn.send({"t": "log_ack", "files": have})  # on disk: the master may count it as safe
        finally:
            conn.close()
            self._conn = None

    def _archive_loop(self) -> None:
        while not self._stop.wait(self.archive_every):
            try:
                self.archive_now()
            except Exception as exc:  # a full disk, a busy index: the next round tries again
                log.warning("set %s: database log not archived: %s", self.set_name, exc)

    def archive_now(self) -> bool:
        sig = tuple(sorted(listing(self.dir).items()))
        if not sig or sig == self.archived.get("signature"):
            return False
        self.archive(self.dir)
        self.archived = {"signature": sig, "at": time.time()}
        return True

    def status(self) -> dict:
        out = {"master": self.master, "running": self.running, "dir": self.dir, "restarts": self.restarts,
               "error": self.error or None, "received_bytes": self.received,
               "newest_segment": None}
        newest = max(listing(self.dir), default=None, key=lambda rel: _order(rel))
        out["newest_segment"] = newest
        if self.last_write:
            out["last_write_age"] = round(time.time() - self.last_write, 3)
        if self.archived:
            out["archived_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.archived["at"]))
        return out
