"""MariaDB's binary log streamed to the replicas between points, and replayed on promotion (issue 16).

A point of a `mysql` set is the data directory copied under FLUSH TABLES WITH READ LOCK; between two points
the set would lose every transaction acknowledged since the last one. So each replica of a set with
`binlog = "stream"` (the default) keeps a copy of the master's binary log as it is written, the way
`pg_receivewal` keeps PostgreSQL's WAL (apps/pgwal.py):

- `mariadb-binlog --read-from-remote-server --raw --stop-never` connects to the master as a replication
  client (its own `--connection-server-id`, derived from the node and set, so two replicas never evict each
  other) and writes each binlog file as the master sends it into `STATE/binlog/SET/`; it resumes from the
  newest file it already has (re-reading it whole: raw mode rewrites a file from its start) and, on first
  contact, from the oldest binlog the master still has. A changed master puts the directory aside
  (`SET.prev`): its files belong to the old term and the new master's files may carry the same names;
- the lock hook (templates.py, `mysql.lock`) writes the binlog position of the image (SHOW MASTER STATUS,
  taken while the global read lock holds) into `pit-binlog-position` inside the data directory, so the image
  says where in the log it ends;
- promotion (`replay`) starts a private server on the restored image (no networking, its own socket, no
  binary log of its own: what it applies is the old master's history, not new writes), lets InnoDB's crash
  recovery run, pipes every event after the image's position through `mariadb-binlog | mariadb`, and stops it
  cleanly; the takeover hooks then start the real server on a data directory that holds the newest
  transactions the replica received;
- the received files are archived into the replica's repository (set `SET.binlog`), which `pit restore SET
  --at TIME` rolls an image forward with (`roll_forward`).

Binlog event times are whole seconds (each event's header carries the second its statement began), so a
restore to TIME applies the events stamped before TIME's second: exact for a whole-second TIME.
"""
from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass

from ..errors import WalReplayFailed
from ..settings import SetConfig
from .pgtools import _first_line, _run
from .pgwal import LagMonitor, _die_with_parent, host_of

log = logging.getLogger("pit.mybinlog")

BINLOG_MODES = ("stream", "off")
POSITION_FILE = "pit-binlog-position"
BINLOG_NAME = re.compile(r"^(.+)\.(\d{6,})$")
BACKOFF = (1.0, 2.0, 5.0, 10.0)
ARCHIVE_EVERY = 30.0  # seconds between archives of the received binlog into the repository (when it changed)
LAG_EVERY = 5.0       # seconds between looks at the master's own position (for lag_bytes)
DEFAULT_PORT = 3306
DEFAULT_USER = "pit_repl"


def streams_binlog(s: SetConfig | None) -> bool:
    app = (s.app or {}) if s is not None else {}
    return app.get("template") == "mysql" and app.get("binlog", "stream") == "stream"


def binlog_dir(state_dir: str, set_name: str) -> str:
    return os.path.join(state_dir, "binlog", set_name)


def binlog_set(set_name: str) -> str:
    """The set in a replica's repository that keeps set `set_name`'s received binlog (restores to a second)."""
    return f"{set_name}.binlog"


def tool(*names: str) -> str | None:
    """The first of `names` on PATH or in /usr/sbin (MariaDB's names first, MySQL's as the fallback)."""
    for n in names:
        found = shutil.which(n) or (f"/usr/sbin/{n}" if os.path.exists(f"/usr/sbin/{n}") else None)
        if found:
            return found
    return None


def binlog_key(name: str) -> tuple[str, int]:
    """Binlog files order by their numeric suffix (`mysql-bin.000010` after `mysql-bin.000009`)."""
    m = BINLOG_NAME.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, -1)


def binlog_files(directory: str) -> list[str]:
    """The binlog files in `directory`, oldest first (the index file and our own files left out)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if BINLOG_NAME.match(n)), key=binlog_key)


def connection_server_id(node: str, set_name: str) -> int:
    """A server id for this replica's binlog connection: the master drops an older connection that uses the
    same id, so each (node, set) gets its own, away from the small ids servers are usually given."""
    return 1_000_000 + zlib.crc32(f"{node}/{set_name}".encode()) % 3_000_000_000


_id_options: dict[str, str] = {}


def server_id_option(exe: str) -> str:
    """How this mariadb-binlog/mysqlbinlog names the replica's server id: MariaDB's
    `--stop-never-slave-server-id`, MySQL's `--connection-server-id` (asked once, from its --help)."""
    if exe not in _id_options:
        _, out = _run([exe, "--no-defaults", "--help"], 30)
        _id_options[exe] = ("--stop-never-slave-server-id" if "stop-never-slave-server-id" in out
                            else "--connection-server-id")
    return _id_options[exe]


@dataclass(frozen=True)
class Position:
    """Where an image ends in the master's binary log."""

    file: str
    pos: int

    def __str__(self) -> str:
        return f"{self.file}:{self.pos}"


def read_position(data: str) -> Position | None:
    """The position the lock hook recorded in the image's data directory (None: no binlog then, or an image
    made before binlog streaming)."""
    try:
        with open(os.path.join(data, POSITION_FILE)) as f:
            parts = f.read().split()
    except FileNotFoundError:
        return None
    if len(parts) < 2 or not parts[1].isdigit():
        raise WalReplayFailed(f"{POSITION_FILE} in {data} is not `FILE POSITION`: {' '.join(parts)[:80]!r}")
    return Position(parts[0], int(parts[1]))


def write_position(data: str, file: str, pos: int) -> str:
    """Record the image's binlog position in its data directory (written whole, then renamed into place)."""
    path = os.path.join(data, POSITION_FILE)
    with open(path + ".new", "w") as f:
        f.write(f"{file} {pos}\n")
        f.flush()
        os.fsync(f.fileno())
    st = os.stat(data)
    try:
        os.chown(path + ".new", st.st_uid, st.st_gid)
    except PermissionError:
        pass
    os.replace(path + ".new", path)
    return path


@dataclass(frozen=True)
class Source:
    """Where a replica reads the set's binary log: the master node, its database host and port, the account."""

    master: str
    host: str
    port: int = DEFAULT_PORT
    user: str = DEFAULT_USER
    password_file: str | None = None
    defaults_file: str | None = None

    def defaults(self, work: str) -> str | None:
        """A client option file that carries the password (never on a command line, where `ps` shows it):
        the operator's `binlog_defaults_file`, else one written from `binlog_password_file` into `work`."""
        if self.defaults_file:
            return self.defaults_file
        if not self.password_file:
            return None
        with open(self.password_file) as f:
            password = f.read().strip()
        path = os.path.join(work, ".pit-client.cnf")
        fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("[client]\npassword=" + password.replace("\\", "\\\\").replace("\n", "") + "\n")
        os.replace(path + ".new", path)
        return path

    def client_args(self, work: str) -> list[str]:
        """Options for any MariaDB client: the option file first (the clients insist), then the connection."""
        cnf = self.defaults(work)
        return ([f"--defaults-extra-file={cnf}"] if cnf else []) + [
            f"--host={self.host}", f"--port={self.port}", f"--user={self.user}", "--protocol=TCP"]

    def query(self, work: str, sql: str, timeout: float = 30) -> list[list[str]]:
        client = tool("mariadb", "mysql")
        if client is None:
            raise OSError("the MariaDB client (mariadb) is not installed on this node")
        rc, out = _run([client, *self.client_args(work), "--connect-timeout=5", "--batch", "--skip-column-names",
                        "-e", sql], timeout)
        if rc != 0:
            raise OSError(f"{sql} on {self.host}:{self.port}: {_first_line(out, r'ERROR|error|denied|Can.t')}")
        return [ln.split("\t") for ln in out.splitlines() if ln.strip()]


def source_of(s: SetConfig, roster: dict) -> Source | None:
    """The set's binlog source as this node sees it (None: its master is not in the roster yet)."""
    app = s.app or {}
    node = roster.get(s.master) or {}
    host = app.get("binlog_host") or (host_of(node["address"]) if node.get("address") else None)
    if not host:
        return None
    return Source(s.master, host, int(app.get("binlog_port") or DEFAULT_PORT),
                  str(app.get("binlog_user") or DEFAULT_USER), app.get("binlog_password_file") or None,
                  app.get("binlog_defaults_file") or None)


# ------------------------------------------------------------------ the receiver on a replica
class BinlogReceiver:
    """`mariadb-binlog --raw --stop-never` for one set on this replica, restarted with a back-off."""

    def __init__(self, set_name: str, node: str, state_dir: str, archive=None,
                 archive_every: float = ARCHIVE_EVERY) -> None:
        self.set_name, self.node = set_name, node
        self.dir = binlog_dir(state_dir, set_name)
        self.work = os.path.join(state_dir, "binlog")  # our option file lives beside the directories, not in one
        # archive(directory, history): the received binlog into the repository, for restores to any second
        self.archive, self.archive_every = archive, archive_every
        self.archived: dict = {}
        self.server_id = connection_server_id(node, set_name)
        self.source: Source | None = None
        self.error = ""
        self.restarts = 0
        self.master_at: tuple[str, int] | None = None  # the master's own position at the last look
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None
        self._archive_lock = threading.Lock()

    def update(self, source: Source | None) -> None:
        """Follow the set's current master (a changed source restarts the receiver on a fresh directory)."""
        with self._lock:
            if source == self.source:
                return
            self.source = source
        self._changed.set()
        self._kill()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name=f"pit-binlog-{self.set_name}")
            self._thread.start()
            threading.Thread(target=self._lag_loop, daemon=True, name=f"pit-binlag-{self.set_name}").start()
            if self.archive is not None:
                threading.Thread(target=self._archive_loop, daemon=True,
                                 name=f"pit-binarch-{self.set_name}").start()

    def stop(self) -> None:
        """Stop receiving (before a promotion replays what was received, or when the set stops streaming)."""
        self._stop.set()
        self._changed.set()
        self._kill()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _history(self) -> str | None:
        try:
            with open(os.path.join(self.dir, ".pit-history")) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def archive_now(self) -> bool:
        """Archive the directory if it changed since the last time (-> whether it did)."""
        sig = _signature(self.dir)
        history = self._history()
        if self.archive is None or not sig or history is None or sig == self.archived.get("signature"):
            return False
        with self._archive_lock:
            self.archive(self.dir, history)
        self.archived = {"signature": sig, "at": time.time(), "newest": sig[0]}
        return True

    def _archive_loop(self) -> None:
        while not self._stop.wait(self.archive_every):
            try:
                self.archive_now()
            except Exception as exc:  # a full disk, a busy index: the next round tries again
                log.warning("set %s: binlog not archived: %s", self.set_name, exc)

    def _lag_loop(self) -> None:
        """The master's own position every few seconds: how far behind the received copy is (lag_bytes)."""
        while not self._stop.wait(LAG_EVERY):
            src = self.source
            if src is None or self._proc is None:
                continue
            try:
                rows = src.query(self.work, "SHOW MASTER STATUS", 10)
                self.master_at = (rows[0][0], int(rows[0][1])) if rows and len(rows[0]) > 1 else None
            except (OSError, ValueError):
                self.master_at = None

    def _kill(self) -> None:
        with self._lock:
            p = self._proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(5)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _prepare_dir(self, history: str) -> None:
        """This master's directory: the files of another master are put aside (`SET.prev`), never mixed in
        (a new master's binlog may reuse the old one's file names)."""
        marker = os.path.join(self.dir, ".pit-history")
        was = self._history()
        if was is None and os.path.isdir(self.dir) and binlog_files(self.dir):
            was = "unknown"
        if was is not None and was != history:
            if self.archive is not None and was != "unknown":  # the old master's last files, kept whole
                try:
                    self.archive_now()
                except Exception as exc:
                    log.warning("set %s: the binlog of %s was not archived before it was put aside: %s",
                                self.set_name, was, exc)
            prev = self.dir + ".prev"
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(self.dir, prev)
            log.warning("set %s: binlog of %s put aside in %s (the set's master is now %s)",
                        self.set_name, was, prev, history)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if was != history:
            with open(marker + ".new", "w") as f:
                f.write(history + "\n")
            os.replace(marker + ".new", marker)

    def first_file(self, src: Source) -> str:
        """Where to (re)start: the newest file already here (raw mode rewrites it from its start), else the
        oldest binlog the master still has (every image's position is at or after it)."""
        have = binlog_files(self.dir)
        if have:
            return have[-1]
        rows = src.query(self.work, "SHOW BINARY LOGS")
        if not rows:
            raise OSError(f"{src.host}:{src.port} keeps no binary log (start it with --log-bin)")
        return rows[0][0]

    def _loop(self) -> None:
        failures, said = 0, ""
        while not self._stop.is_set():
            self._changed.clear()
            with self._lock:
                src = self.source
            if src is None:
                self._changed.wait(5)
                continue
            t0 = time.monotonic()
            try:
                os.makedirs(self.work, mode=0o700, exist_ok=True)
                self._prepare_dir(f"{src.master} {src.host}:{src.port}")
                self._receive(src, self.first_file(src))
            except Exception as exc:  # never let the receiver's thread die: the next round tries again
                self.error = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
                log.log(logging.WARNING if self.error != said else logging.DEBUG, "set %s: binlog receiver: %s",
                        self.set_name, exc)
                said = self.error
            if self._stop.is_set():
                return
            failures = 1 if time.monotonic() - t0 > 30 else failures + 1  # a long run starts the back-off anew
            self.restarts += 1
            self._changed.wait(BACKOFF[min(failures, len(BACKOFF)) - 1])

    def _receive(self, src: Source, first: str) -> None:
        exe = tool("mariadb-binlog", "mysqlbinlog")
        if exe is None:
            raise OSError("mariadb-binlog is not installed on this node")
        argv = [exe, *src.client_args(self.work), "--read-from-remote-server", "--raw", "--stop-never",
                f"{server_id_option(exe)}={self.server_id}", f"--result-file={self.dir}/", first]
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             start_new_session=True, preexec_fn=_die_with_parent)
        with self._lock:
            self._proc = p
        self.error = ""
        log.info("set %s: receiving the binlog of %s (%s:%d) from %s into %s", self.set_name, src.master,
                 src.host, src.port, first, self.dir)
        last = ""
        for raw in p.stderr:  # the receiver's own messages: the last error is kept for status
            line = raw.decode(errors="replace").strip()
            if line:
                last = line
                if re.search(r"ERROR|error|Got|Could not|denied", line):
                    self.error = line
        p.wait()
        with self._lock:
            self._proc = None
        if not self._stop.is_set() and not self._changed.is_set():
            raise OSError(f"mariadb-binlog ended ({p.returncode}): {self.error or last or 'no output'}")

    def status(self) -> dict:
        files = binlog_files(self.dir)
        newest = files[-1] if files else None
        size = os.path.getsize(os.path.join(self.dir, newest)) if newest else 0
        src = self.source
        out = {"source": f"{src.master} ({src.host}:{src.port})" if src else None, "dir": self.dir,
               "streaming": self._proc is not None and self._proc.poll() is None, "file": newest, "bytes": size,
               "files": len(files), "server_id": self.server_id, "restarts": self.restarts,
               "error": self.error or None}
        if newest and self.master_at is not None:
            mf, mpos = self.master_at
            if mf == newest:
                out["lag_bytes"] = max(0, mpos - size)
        if self.archived:
            out["archived_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.archived["at"]))
        if newest:
            try:
                out["last_write_age"] = round(time.time() - os.stat(os.path.join(self.dir, newest)).st_mtime, 3)
            except FileNotFoundError:
                pass
        return out


def _signature(directory: str) -> tuple | None:
    files = binlog_files(directory)
    if not files:
        return None
    try:
        st = os.stat(os.path.join(directory, files[-1]))
    except FileNotFoundError:
        return None
    return files[-1], st.st_mtime_ns, st.st_size


# ------------------------------------------------------------------ the master's view of each replica
def log_offset(sizes: list[tuple[str, int]], file: str | None, pos: int) -> int | None:
    """A (file, position) of the master's binary log as one byte offset into the whole log (`sizes`: SHOW
    BINARY LOGS, oldest first); None for a file the master no longer has."""
    total = 0
    for name, size in sizes:
        if name == file:
            return total + pos
        total += size
    return None


class BinlogMonitor(LagMonitor):
    """On the set's master: how far each replica's copy of the binary log is behind. A binlog dump thread does
    not say which replica it serves (mariadb-binlog does not register as a replica), so the replica's own
    receiver is asked (`ask(node)` -> that node's `pit status`, over the agents' mTLS link) and its newest file
    and length are set against the master's `SHOW BINARY LOGS`. Same shape as PostgreSQL's WalMonitor: a replica
    behind, or not streaming, is behind for as long as it was last seen caught up."""

    thread_name = "pit-binmon"

    def __init__(self, set_name: str, ask, every: float = 2.0) -> None:
        super().__init__(set_name, every)
        self.ask = ask

    def look(self) -> None:
        self.poll()

    def master_log(self) -> list[tuple[str, int]]:
        argv = list(self.app.get("client") or []) + ["--batch", "--skip-column-names", "-e", "SHOW BINARY LOGS"]
        rc, out = _run(argv, 30)
        if rc != 0:
            raise OSError(f"cannot read the binary logs: {_first_line(out, r'ERROR|error')}")
        rows = [ln.split("\t") for ln in out.splitlines() if ln.strip()]
        return [(r[0], int(r[1])) for r in rows if len(r) >= 2 and r[1].strip().isdigit()]

    def poll(self) -> dict[str, dict]:
        sizes = self.master_log()
        end = sum(n for _, n in sizes)
        now = time.monotonic()
        seen: dict[str, dict] = {}
        for r in self.replicas:
            st = self.ask(r)
            w = ((st.get("sets") or {}).get(self.set_name) or {}).get("wal") or {}
            streaming = bool(w.get("streaming", w.get("running")))
            at = log_offset(sizes, w.get("file"), int(w.get("bytes") or 0)) if w.get("file") else None
            lag = None if at is None else max(0, end - at)
            if lag == 0:
                self._since[r] = now
            away = now - self._since.setdefault(r, now)
            seen[r] = {"streaming": streaming, "lag_bytes": lag, "lag_seconds": round(away, 3),
                       **({"error": w["error"]} if w.get("error") else {}),
                       **({"error": st["error"]} if st.get("error") else {})}
        self.lag, self.error = seen, ""
        return seen

    def status(self) -> dict:
        return {"replicas": dict(self.lag), "error": self.error or None}


# ------------------------------------------------------------------ replay on promotion
@dataclass
class PrivateServer:
    """A mariadbd on a restored data directory that nothing else can reach: no networking, its socket in a
    private directory, no binary log of its own, grant tables loaded by the first statement we send (so the
    replayed events may create users)."""

    data: str
    work: str
    user: str
    log_bin: str | None = None  # the image's own binlog base name: only to finish its crash recovery

    @property
    def socket(self) -> str:
        return os.path.join(self.work, "mysqld.sock")

    @property
    def errlog(self) -> str:
        return os.path.join(self.work, "error.log")

    def argv(self, exe: str) -> list[str]:
        binlog = [f"--log-bin={self.log_bin}", f"--log-bin-index={self.log_bin}.index", "--server-id=1"] \
            if self.log_bin else ["--skip-log-bin"]
        return [exe, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}", "--skip-networking",
                *binlog, "--skip-grant-tables", "--skip-slave-start", f"--user={self.user}",
                f"--pid-file={os.path.join(self.work, 'mysqld.pid')}", f"--log-error={self.errlog}",
                "--innodb-buffer-pool-size=128M", "--max-allowed-packet=1G",
                # no flush per replayed commit: the clean shutdown at the end writes everything, and a replay
                # that fails is thrown away (the image goes back alone)
                "--innodb-flush-log-at-trx-commit=0", "--sync-binlog=0"]

    def client(self, name: str, *extra: str) -> list[str]:
        exe = tool(*{"mariadb": ("mariadb", "mysql"), "admin": ("mariadb-admin", "mysqladmin")}[name])
        if exe is None:
            raise WalReplayFailed(f"the MariaDB client ({name}) is not installed on this node")
        return [exe, "--no-defaults", f"--socket={self.socket}", "--user=root", *extra]

    def failure(self) -> str:
        try:
            with open(self.errlog, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return "no error log"
        return _first_line(text, r"\[ERROR\]|Fatal|Aborting") or "see the server's error log"

    def start(self, timeout: float) -> subprocess.Popen:
        exe = tool("mariadbd", "mysqld")
        if exe is None:
            raise WalReplayFailed("the MariaDB server (mariadbd) is not installed on this node")
        p = subprocess.Popen(self.argv(exe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            rc, _ = _run(self.client("admin", "--connect-timeout=2", "ping"), 10)
            if rc == 0:
                return p
            if p.poll() is not None:
                raise WalReplayFailed(f"the private server did not start on the image: {self.failure()}")
            if time.monotonic() > deadline:
                _stop_proc(p)
                raise WalReplayFailed(f"the private server did not answer within {timeout:g} s: {self.failure()}")
            time.sleep(0.1)

    def shutdown(self, p: subprocess.Popen) -> None:
        rc, out = _run(self.client("admin", "shutdown"), 300)
        try:
            p.wait(300)
        except subprocess.TimeoutExpired:
            _stop_proc(p)
            raise WalReplayFailed("the replayed server did not stop within 300 s") from None
        if rc != 0 or p.returncode != 0:
            raise WalReplayFailed(f"the replayed server did not stop cleanly: {_first_line(out) or self.failure()}")


def _stop_proc(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        pass


def _owner(data: str) -> str:
    """The account the private server runs as: the data directory's owner (root only when we are not)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        return pwd.getpwuid(os.stat(data).st_uid).pw_name
    except KeyError:
        return "mysql"


def files_after(received: str, pos: Position) -> list[str]:
    """The received files from the image's own file on, oldest first (another base name is another log)."""
    base, n = binlog_key(pos.file)
    return [f for f in binlog_files(received) if binlog_key(f)[0] == base and binlog_key(f)[1] >= n]


@dataclass
class Applied:
    """What one file's events did: the position reached and why reading stopped early (a torn tail)."""

    end: int
    torn: str = ""


def _apply_file(srv: PrivateServer, path: str, start: int | None, target_time: str | None,
                timeout: float, last: bool) -> Applied:
    """`mariadb-binlog FILE | mariadb` into the private server. A read error is allowed only in the last file:
    its tail may be a torn event (the master died while sending it); the transaction it belonged to has no
    commit and the client rolls it back when its input ends."""
    exe = tool("mariadb-binlog", "mysqlbinlog")
    if exe is None:
        raise WalReplayFailed("mariadb-binlog is not installed on this node")
    argv = [exe, "--no-defaults", "--verify-binlog-checksum", *([f"--start-position={start}"] if start else []),
            *([f"--stop-datetime={target_time}"] if target_time else []), path]
    env = {**os.environ, "TZ": "UTC"}  # --stop-datetime is read in the local zone: ours is UTC
    reader = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env=env, start_new_session=True)
    client = subprocess.Popen(srv.client("mariadb", "--binary-mode", "--batch"), stdin=reader.stdout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    reader.stdout.close()
    try:
        cout, _ = client.communicate(timeout=timeout)
        rerr = reader.stderr.read().decode(errors="replace")
        reader.wait(30)
    except subprocess.TimeoutExpired:
        for p in (reader, client):
            _stop_proc(p)
        raise WalReplayFailed(f"replaying {os.path.basename(path)} took more than {timeout:g} s") from None
    if client.returncode != 0:
        raise WalReplayFailed(f"{os.path.basename(path)}: the server refused an event: "
                              f"{_first_line(cout.decode(errors='replace'), r'ERROR')}")
    torn = ""
    if reader.returncode != 0:
        if not last:
            raise WalReplayFailed(f"{os.path.basename(path)} cannot be read: {_first_line(rerr, r'ERROR|error')}")
        torn = _first_line(rerr, r"ERROR|error")
    return Applied(_end_of(path, torn), torn)


def _end_of(path: str, torn: str) -> int:
    """Where reading stopped: the offset of the torn event, else the end of the file."""
    m = re.search(r"offset[: ]+(\d+)", torn) or re.search(r"at (\d+)", torn)
    return int(m.group(1)) if m else os.path.getsize(path)


def _init_statement(srv: PrivateServer) -> None:
    """Load the grant tables (the server started without them), so events such as CREATE USER apply."""
    rc, out = _run(srv.client("mariadb", "--batch", "-e", "FLUSH PRIVILEGES"), 60)
    if rc != 0:
        raise WalReplayFailed(f"the private server refused FLUSH PRIVILEGES: {_first_line(out, r'ERROR')}")


def _start_recovered(srv: PrivateServer, pos: Position, timeout: float) -> subprocess.Popen:
    """Start the private server without a binary log of its own. An image copied while commits were in
    flight may hold transactions InnoDB had prepared whose commit was only in the binlog (with a binlog,
    InnoDB does not flush its commit record: the binlog decides). Only the server's binlog recovery can
    settle those (commit what the image's binlog holds, roll back the rest), so it is run once on the image's
    own binlog, the server stopped cleanly, and started again without it."""
    try:
        return srv.start(timeout)
    except WalReplayFailed as exc:
        if "prepared transaction" not in str(exc):
            raise
    log.info("the image holds prepared transactions: recovering them with its own binlog (%s)", pos.file)
    rec = PrivateServer(srv.data, srv.work, srv.user, binlog_key(pos.file)[0])
    rec.shutdown(rec.start(timeout))
    return srv.start(timeout)


def replay(app: dict, data: str, received: str, timeout: float = 600.0, target_time: str | None = None) -> dict:
    """Apply the binlog received in `received` after the image's position onto the data directory `data`.

    `target_time` ("YYYY-MM-DD HH:MM:SS", UTC) stops before the first event stamped at or after it. -> what was
    replayed. WalReplayFailed (one line) when the server would not start, refused an event, or did not stop
    cleanly: the caller puts the image back alone."""
    t0 = time.monotonic()
    pos = read_position(data)
    if pos is None:
        raise WalReplayFailed(f"the image has no {POSITION_FILE}: it was made without binlog streaming, "
                              "so where it ends in the log is unknown")
    files = files_after(received, pos)
    if not files:
        return {"from": str(pos), "to": str(pos), "files": 0, "seconds": round(time.monotonic() - t0, 3),
                "note": "no binlog received after the image: the image alone"}
    if files[0] != pos.file:
        raise WalReplayFailed(f"the received binlog starts at {files[0]}, after the image's {pos.file}: the events "
                              "between them were not received here")
    user = app.get("os_user") or _owner(data)
    work = tempfile.mkdtemp(prefix="pit-myreplay-", dir=app.get("check_dir"))
    os.chmod(work, 0o755)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        os.chown(work, pw.pw_uid, pw.pw_gid)
    for leftover in ("mysqld.pid", "mariadbd.pid"):  # a pid file copied with the image would mislead nobody
        try:
            os.unlink(os.path.join(data, leftover))
        except FileNotFoundError:
            pass
    srv = PrivateServer(data, work, user)
    proc = None
    try:
        proc = _start_recovered(srv, pos, timeout)
        _init_statement(srv)
        done, torn = None, ""
        for i, f in enumerate(files):
            done = _apply_file(srv, os.path.join(received, f), pos.pos if i == 0 else None, target_time, timeout,
                               last=i == len(files) - 1)
            torn = done.torn
        srv.shutdown(proc)
        proc = None
    finally:
        if proc is not None:
            _stop_proc(proc)
        shutil.rmtree(work, ignore_errors=True)
    note = f"the last event was torn ({torn}); its transaction is not applied" if torn else \
        "every received event applied" if not target_time else f"applied up to {target_time} UTC"
    return {"from": str(pos), "to": f"{files[-1]}:{done.end}", "files": len(files),
            "seconds": round(time.monotonic() - t0, 3), "note": note}


# ------------------------------------------------------------------ archive and restore to a second
def archive_into(repo, lock, name: str, s: SetConfig | None, directory: str, history: str, host: str) -> None:
    """The set's received binlog as a snapshot of set NAME.binlog in the replica's repository (`pit restore
    --at` reads it there). Of each history only the newest snapshot is kept (it holds what the older ones
    held); files older than the oldest image's position are then removed here (no restore starts before it)."""
    from store.ingest import create_snapshot
    from store.prune import drop_snapshot
    from store.snapmeta import get_meta, update_meta
    from store.snapshots import list_snapshots

    bs = binlog_set(name)
    with lock:
        snap = create_snapshot(repo, bs, [directory], host=host, retention=False)
        with repo.writer() as w:
            update_meta(w, snap.id, binlog_history=history)
            for old in list_snapshots(repo, w.txn, bs):
                if old.id != snap.id and get_meta(repo, w.txn, old.id).get("binlog_history") == history:
                    drop_snapshot(w, old)
        oldest = oldest_position(repo, name, s) if s is not None and (s.app or {}).get("data") else None
    if oldest is not None:
        prune_before(directory, oldest.file)


def oldest_position(repo, set_name: str, s: SetConfig) -> Position | None:
    """The binlog position of the set's oldest image in `repo` (None: no image, or one without the file)."""
    from store.objects import ObjectReader
    from store.snapshots import list_snapshots

    from .pgwal import data_in_image

    with repo.reading() as txn:
        snaps = list_snapshots(repo, txn, set_name)
        if not snaps:
            return None
        r = ObjectReader(repo, txn)
        try:
            e = r.lookup(snaps[0].root, data_in_image(s) + "/" + POSITION_FILE)
        except Exception as exc:  # an image without the file: nothing is pruned
            log.info("set %s: the oldest image's binlog position is unknown: %s", set_name, exc)
            return None
        return _position_via_restore(r, e)


def _position_via_restore(reader, entry) -> Position | None:
    """Read the position file by restoring that one entry into a scratch directory."""
    from store.restore import Restorer

    work = tempfile.mkdtemp(prefix="pit-mypos-")
    try:
        Restorer(reader).restore(entry, work)
        return read_position(work)
    except (OSError, WalReplayFailed):
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prune_before(directory: str, first: str) -> int:
    """Remove the received files older than `first` (no image needs them; they are archived) -> how many.
    The newest file is never removed: the receiver resumes from it."""
    files = binlog_files(directory)
    base, n = binlog_key(first)
    gone = 0
    for f in files[:-1]:
        b, k = binlog_key(f)
        if b == base and k < n:
            os.unlink(os.path.join(directory, f))
            gone += 1
    return gone


def find_data_dir(top: str, depth: int = 4) -> str | None:
    """The MariaDB data directory under `top` (the one holding our position file), nearest first."""
    level = [top]
    for _ in range(depth + 1):
        nxt = []
        for d in sorted(level):
            if os.path.isfile(os.path.join(d, POSITION_FILE)):
                return d
            try:
                nxt += [os.path.join(d, n) for n in os.listdir(d)
                        if os.path.isdir(os.path.join(d, n)) and not os.path.islink(os.path.join(d, n))]
            except OSError:
                continue
        level = nxt
    return None


def utc_second(ns: int) -> str:
    """Unix nanoseconds as mariadb-binlog's --stop-datetime, in UTC, the second holding `ns`: the events stamped
    before that second are applied, those stamped in it or later are not. Event stamps are whole seconds, so
    for a whole-second TIME (what an operator types) this is exact: every commit before TIME, none after it;
    for a fraction, commits in TIME's second before the fraction are left out too (never one after TIME)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 10**9))


def roll_forward(repo, snap, target: str, at_ns: int, path: str) -> dict | None:
    """Bring the MariaDB data directory restored from `snap` into `target` forward to `at_ns` with the binlog
    archived in the replica's repository (set SET.binlog). None when the set has no archived binlog."""
    from store.errors import InvalidArgument
    from store.objects import ObjectReader
    from store.restore import Restorer
    from store.snapshots import list_snapshots

    bs = binlog_set(snap.set)
    with repo.reading() as txn:
        bsnaps = list_snapshots(repo, txn, bs)
    if not bsnaps:
        return None
    if path:
        raise InvalidArgument("a database is restored to a second whole: give the set, not SET:PATH, with --at")
    data = find_data_dir(target)
    if data is None:
        raise InvalidArgument(f"the snapshot {snap.set}@{snap.name} restored into {target} holds no MariaDB data "
                              f"directory with {POSITION_FILE} to roll forward")
    pos = read_position(data)
    work = tempfile.mkdtemp(prefix="pit-mypitr-")
    try:
        with repo.reading() as txn:
            r = ObjectReader(repo, txn)
            chosen = top = None
            for cand in reversed(bsnaps):
                (top,) = r.tree(cand.root)  # the received directory, named by the set
                if pos.file in {e.name.decode("utf-8", "replace") for e in r.tree(top.content)}:
                    chosen = cand
                    break
            if chosen is None:
                raise WalReplayFailed(f"no archived binlog of set {snap.set} holds {pos.file}, where "
                                      f"{snap.set}@{snap.name} ends: the log after that image was not received here")
            Restorer(r).restore(top, work)
        received = os.path.join(work, top.name.decode())
        at = utc_second(at_ns)
        res = replay({}, data, received, target_time=at)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # `wal`: the name `pit restore` prints for any engine's archived log
    return {"database": data, "binlog": f"{bs}@{chosen.name}", "wal": f"{bs}@{chosen.name}", "target_time": at,
            **res}
