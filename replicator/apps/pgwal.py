"""PostgreSQL's WAL streamed to the replicas between points, and replayed on promotion (issue 16).

A point is a base image; between two points a database set would lose every
transaction acknowledged since the last one (616 rows, 8.2 s of pgbench, with
points every 30 s). So each replica of a set with `wal = "stream"` in its
app table runs `pg_receivewal` against the set's master, as Barman and
pgBackRest do:

- a physical replication slot `pit_<node>` on the master keeps every WAL
  byte until this replica has it (the slot is made by the receiver on first
  contact, `--create-slot --if-not-exists`); it writes what the master
  sends as it arrives (milliseconds behind) and reports its position every
  second; with `sync = true` it runs `--synchronous` (each write flushed and
  confirmed) and the master's agent keeps `synchronous_standby_names`, so
  a commit waits until it is on a replica's disk;
- the WAL goes to `STATE/wal/SET/` on the replica, the open segment as
  `NAME.partial`; when the set's master changes, the previous directory is
  put aside (`STATE/wal/SET.prev`): its history belongs to the old term;
- promotion (`replay`) restores the chosen image as before, then starts a
  private server on it (no TCP, its own socket, `recovery.signal`, a
  `restore_command` that serves the received segments, the open one from
  its `.partial`), which replays every received byte after the image and
  promotes onto a new timeline at the end; the server is stopped cleanly
  and the takeover hooks start the real one on a data directory that
  already holds the newest acknowledged transactions. A replay that fails
  leaves the image alone in place, and the report says why.

Reading the WAL needs a replication connection from the replica to the
master (`host replication ...` in pg_hba.conf, `max_wal_senders`), which
docs/failover.md ("WAL streaming") sets out.
"""
from __future__ import annotations

import abc

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from ..errors import WalReplayFailed
from ..settings import SetConfig
from .pgtools import (_first_line, _pw, _run, as_user, pg_bindir, pg_client_argv, pg_private_config,
                      server_failure)

log = logging.getLogger("pit.pgwal")

WAL_MODES = ("off", "stream")
SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")
BACKOFF = (1.0, 2.0, 5.0, 10.0)
ARCHIVE_EVERY = 30.0  # seconds between archives of the received WAL into the repository (when it changed)


def streams_wal(s: SetConfig | None) -> bool:
    app = (s.app or {}) if s is not None else {}
    return app.get("template") == "postgresql" and app.get("wal", "off") == "stream"


def slot_name(node: str) -> str:
    """The master's replication slot for replica `node` (slot names: lower case, digits, underscores)."""
    return ("pit_" + re.sub(r"[^a-z0-9_]", "_", node.lower()))[:63]


def wal_dir(state_dir: str, set_name: str) -> str:
    return os.path.join(state_dir, "wal", set_name)


def host_of(address: str) -> str:
    """The host part of an agent address `HOST:PORT` (`[::1]:7000` -> `::1`)."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


@dataclass(frozen=True)
class Source:
    """Where a replica reads the set's WAL: the master node, its database host and port, the role."""

    master: str
    host: str
    port: int
    user: str
    bindir: str
    dbname: str = "postgres"
    sync: bool = False  # the set's `sync = true`: flush and confirm each write (commits wait for it)

    def argv(self, *extra: str) -> list[str]:
        return [os.path.join(self.bindir, "pg_receivewal"), "-h", self.host, "-p", str(self.port),
                "-U", self.user, "--no-password", *extra]

    def history(self) -> str:
        """Which history the master writes now: its system identifier and timeline. A promotion (of it or of
        another node it came back from) starts a new timeline, whose WAL must not follow the old one's.
        Asked over a replication connection (IDENTIFY_SYSTEM), so the `host replication ...` line of
        pg_hba.conf that lets pg_receivewal in is all a replica needs (a normal connection would need a
        second line for a database; the quickstart's operator had only the first)."""
        conninfo = (f"host='{self.host}' port={self.port} user='{self.user}' replication=true "
                    "connect_timeout=5")
        argv = [os.path.join(self.bindir, "psql"), "-X", "-At", "--no-password", conninfo, "-c", "IDENTIFY_SYSTEM"]
        rc, out = _run(argv, 30)
        fields = out.strip().split("|")
        if rc != 0 or len(fields) < 2 or not fields[0].isdigit() or not fields[1].isdigit():
            raise OSError(f"cannot read the timeline of {self.host}:{self.port}: "
                          + _first_line(out, r"error|FATAL|could not"))
        return f"{fields[0]} {int(fields[1]):08X}"


def source_of(s: SetConfig, roster: dict) -> Source | None:
    """The set's WAL source as this node sees it (None: its master is not in the roster yet)."""
    app = s.app or {}
    node = roster.get(s.master) or {}
    host = app.get("wal_host") or (host_of(node["address"]) if node.get("address") else None)
    if not host:
        return None
    return Source(s.master, host, int(app.get("wal_port") or app.get("port", 5432)),
                  str(app.get("wal_user") or app.get("superuser") or app.get("os_user", "postgres")),
                  app.get("bindir") or pg_bindir() or "/usr/bin", str(app.get("dbname", "postgres")),
                  bool(app.get("sync")))


# ------------------------------------------------------------------ the receiver on a replica
class WalReceiver:
    """`pg_receivewal` for one set on this replica, restarted with a back-off while the set streams WAL."""

    def __init__(self, set_name: str, node: str, state_dir: str, archive=None,
                 archive_every: float = ARCHIVE_EVERY) -> None:
        self.set_name, self.node = set_name, node
        self.dir = wal_dir(state_dir, set_name)
        # archive(directory, history): the received WAL into the repository, for restores to any second
        self.archive, self.archive_every = archive, archive_every
        self.archived: dict = {}
        self.slot = slot_name(node)
        self.source: Source | None = None
        self.error = ""
        self.restarts = 0
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
            self._thread = threading.Thread(target=self._loop, daemon=True, name=f"pit-wal-{self.set_name}")
            self._thread.start()
            if self.archive is not None:
                threading.Thread(target=self._archive_loop, daemon=True, name=f"pit-walarch-{self.set_name}").start()

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
        if not sig or history is None or sig == self.archived.get("signature"):
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
                log.warning("set %s: WAL not archived: %s", self.set_name, exc)

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
        """This history's directory (`master system-id timeline`): WAL of another master, or of the same
        master before a promotion gave it a new timeline, is put aside, never mixed in."""
        marker = os.path.join(self.dir, ".pit-history")
        try:
            with open(marker) as f:
                was = f.read().strip()
        except FileNotFoundError:
            was = None if not os.path.isdir(self.dir) or not os.listdir(self.dir) else "unknown"
        if was is not None and was != history:
            if self.archive is not None and was != "unknown":  # the old history's last WAL, kept whole
                try:
                    self.archive_now()
                except Exception as exc:
                    log.warning("set %s: the WAL of %s was not archived before it was put aside: %s",
                                self.set_name, was, exc)
            prev = self.dir + ".prev"
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(self.dir, prev)
            log.warning("set %s: WAL of %s put aside in %s (the set's master now writes %s)",
                        self.set_name, was, prev, history)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if was != history:
            with open(marker + ".new", "w") as f:
                f.write(history + "\n")
            os.replace(marker + ".new", marker)

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
                self._prepare_dir(f"{src.master} {src.history()}")
                rc, out = _run(src.argv("--create-slot", "--if-not-exists", "--slot", self.slot), 30,
                               env={**os.environ, "PGAPPNAME": self.slot, "PGCONNECT_TIMEOUT": "5"})
                if rc != 0:
                    raise OSError(f"cannot make replication slot {self.slot} on {src.host}:{src.port}: "
                                  + _first_line(out, r"error|FATAL|could not"))
                self._receive(src)
            except Exception as exc:  # never let the receiver's thread die: the next round tries again
                self.error = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
                # one warning per kind of failure; its repeats while the master is away are quieter
                log.log(logging.WARNING if self.error != said else logging.DEBUG, "set %s: WAL receiver: %s",
                        self.set_name, exc)
                said = self.error
            if self._stop.is_set():
                return
            failures = 1 if time.monotonic() - t0 > 30 else failures + 1  # a long run starts the back-off anew
            if "is active for PID" in self.error:  # the slot is freed as soon as its old client is gone
                failures = 1
            self.restarts += 1
            self._changed.wait(BACKOFF[min(failures, len(BACKOFF)) - 1])

    def _receive(self, src: Source) -> None:
        # `--synchronous` (fsync and report each write) only where commits wait for it (`sync = true`): on two
        # cores it costs the primary about a quarter of its pgbench throughput (docs/benchmarks.md), and
        # against the primary's death what was written here is enough (it is in this node's page cache);
        # otherwise the position is reported every second, for the lag view
        argv = src.argv("-D", self.dir, "--slot", self.slot,
                        *(["--synchronous"] if src.sync else ["--status-interval", "1"]), "--no-loop", "-v")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             start_new_session=True, preexec_fn=_die_with_parent,
                             env={**os.environ, "PGAPPNAME": self.slot, "PGCONNECT_TIMEOUT": "5"})
        with self._lock:
            self._proc = p
        self.error = ""
        log.info("set %s: receiving WAL from %s (%s:%d) into %s", self.set_name, src.master, src.host, src.port,
                 self.dir)
        last = ""
        for raw in p.stderr:  # the receiver's own log: kept for status, the last error reported
            line = raw.decode(errors="replace").strip()
            if line:
                last = line
                if re.search(r"error|FATAL|could not", line):
                    self.error = line
        p.wait()
        with self._lock:
            self._proc = None
        if not self._stop.is_set() and not self._changed.is_set():
            raise OSError(f"pg_receivewal ended ({p.returncode}): {self.error or last or 'no output'}")

    def status(self) -> dict:
        newest = newest_segment(self.dir)
        out = {"slot": self.slot, "dir": self.dir, "running": self._proc is not None and self._proc.poll() is None,
               "master": self.source.master if self.source else None, "restarts": self.restarts,
               "error": self.error or None, "newest_segment": newest}
        if self.archived:
            out["archived_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.archived["at"]))
        if newest:
            try:
                out["last_write_age"] = round(time.time() - os.stat(os.path.join(self.dir, newest)).st_mtime, 3)
            except FileNotFoundError:
                pass
        return out


def pg_time(ns: int) -> str:
    """Unix nanoseconds as a PostgreSQL timestamptz literal in UTC, to the microsecond."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9 // 1000:06d}+00"


def wal_set(set_name: str) -> str:
    """The set in a replica's repository that keeps set `set_name`'s received WAL (for restores to a second)."""
    return f"{set_name}.wal"


def _signature(directory: str) -> tuple | None:
    newest = newest_segment(directory)
    if newest is None:
        return None
    try:
        st = os.stat(os.path.join(directory, newest))
    except FileNotFoundError:
        return None
    return newest, st.st_mtime_ns, st.st_size


def _die_with_parent() -> None:
    """In the receiver's child: end with the agent (PR_SET_PDEATHSIG). A receiver left behind by a killed
    agent would hold the slot, and the next agent's receiver could not stream until it died."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def newest_segment(directory: str) -> str | None:
    """The newest WAL file received (`.partial` included), by name: names order by timeline and position."""
    try:
        names = [n for n in os.listdir(directory) if SEGMENT.match(n)]
    except FileNotFoundError:
        return None
    return max(names, key=lambda n: n.removesuffix(".partial")) if names else None


def archive_into(repo, lock, name: str, s: SetConfig | None, directory: str, history: str, host: str) -> None:
    """The set's received WAL as a snapshot of set NAME.wal in the replica's repository (restores to any
    second read it there: apps/pitr.py). Of each history only the newest such snapshot is kept: it holds every
    segment the older ones held but those older than the set's oldest image, which are pruned from the
    directory (no restore can use them)."""
    from store.ingest import create_snapshot
    from store.prune import drop_snapshot
    from store.snapmeta import get_meta, update_meta
    from store.snapshots import list_snapshots

    ws = wal_set(name)
    with lock:
        snap = create_snapshot(repo, ws, [directory], host=host, retention=False)
        with repo.writer() as w:
            update_meta(w, snap.id, wal_history=history)
            for old in list_snapshots(repo, w.txn, ws):
                if old.id != snap.id and get_meta(repo, w.txn, old.id).get("wal_history") == history:
                    drop_snapshot(w, old)
        redo = oldest_redo(repo, name, s) if s is not None and (s.app or {}).get("data") else None
    if redo:
        prune_before(directory, redo)


def data_in_image(s: SetConfig) -> str:
    """Where the set's data directory is inside its snapshots (each source path is an entry named by its base
    name): `main` for `/var/lib/postgresql/15/main`."""
    from .pgtools import image_path

    return image_path(list(s.paths), "", (s.app or {})["data"]).lstrip("/")


_redo_cache: dict[bytes, str | None] = {}


def oldest_redo(repo, set_name: str, s: SetConfig) -> str | None:
    """The redo WAL file of the set's oldest image in `repo` (what a restore from it replays from), read from
    the image's `global/pg_control` by pg_controldata. None when there is no image or it cannot be read."""
    from store.objects import ObjectReader
    from store.restore import Restorer
    from store.snapshots import list_snapshots

    with repo.reading() as txn:
        snaps = list_snapshots(repo, txn, set_name)
        if not snaps:
            return None
        oldest = snaps[0]
        if oldest.id in _redo_cache:
            return _redo_cache[oldest.id]
        bindir = (s.app or {}).get("bindir") or pg_bindir()
        work = tempfile.mkdtemp(prefix="pit-pgctl-")
        try:
            r = ObjectReader(repo, txn)
            e = r.lookup(oldest.root, data_in_image(s) + "/global/pg_control")
            os.mkdir(os.path.join(work, "global"))
            Restorer(r).restore(e, os.path.join(work, "global"))
            redo = _redo_segment(bindir, work) if bindir else None
        except Exception as exc:  # an image without its control file: nothing is pruned
            log.info("set %s: the oldest image's redo point is unknown: %s", set_name, exc)
            redo = None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _redo_cache[oldest.id] = redo
    return redo


def prune_before(directory: str, redo: str) -> int:
    """Remove the complete segments older than `redo` (no image needs them; they are archived) -> how many."""
    n = 0
    for name in os.listdir(directory):
        m = SEGMENT.match(name)
        if m and not m.group(4) and name < redo:
            os.unlink(os.path.join(directory, name))
            n += 1
    return n


# ------------------------------------------------------------------ replay on promotion
def _redo_segment(bindir: str, data: str) -> str | None:
    rc, out = _run([os.path.join(bindir, "pg_controldata"), "-D", data], 60)
    m = re.search(r"REDO WAL file:\s*([0-9A-F]{24})", out) if rc == 0 else None
    return m.group(1) if m else None


def _recover(bindir: str, data: str, conf: str, sock: str, logf: str, work: str, app: dict, user: str | None,
             timeout: float) -> tuple[str, str]:
    """Start the private server in archive recovery and wait until it has promoted -> (LSN, timeline)."""
    pg_ctl = os.path.join(bindir, "pg_ctl")
    # -w returns once the postmaster is up; with hot_standby off, connections wait for replay and promotion
    rc, out = _run(as_user([pg_ctl, "start", "-w", "-t", str(int(timeout)), "-D", data, "-l", logf,
                            "-o", f"-c config_file={conf}"], user), timeout + 30, cwd=work)
    if rc != 0:
        server = open(logf, errors="replace").read() if os.path.exists(logf) else ""
        raise WalReplayFailed("the server did not come up after replaying the WAL: "
                              + server_failure(server + "\n" + out))
    psql = [os.path.join(bindir, "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", sock, "-p", "5432",
            "-U", app.get("superuser", "postgres"), "-d", "template1", "-c",
            "SELECT pg_is_in_recovery(), pg_current_wal_lsn(), (SELECT timeline_id FROM pg_control_checkpoint())"]
    deadline = time.monotonic() + timeout
    while True:
        rc, out = _run(as_user(psql, user), 60, cwd=work)
        got = out.strip().split("|")
        if rc == 0 and len(got) == 3 and got[0] == "f":
            return got[1], got[2]
        if time.monotonic() > deadline or not re.search(r"starting up|Hot standby|in recovery|^t\|", out):
            server = open(logf, errors="replace").read() if os.path.exists(logf) else ""
            raise WalReplayFailed("the replayed server is not promoted: " + server_failure(out + "\n" + server))
        time.sleep(0.2)


def replay(app: dict, data: str, received: str, timeout: float = 600.0, target_time: str | None = None) -> dict:
    """Replay the WAL received in `received` onto the image at `data` and promote it; stop the server cleanly.

    Only the segments from the image's redo point on are handed over (a copy the server may read as its own
    user; the received directory stays as it is for the report). -> what was replayed. WalReplayFailed when
    the server did not come up promoted: the caller puts the image back."""
    t0 = time.monotonic()
    version = open(os.path.join(data, "PG_VERSION")).read().strip()
    bindir = app.get("bindir") or pg_bindir(version) or pg_bindir()
    if not bindir:
        raise WalReplayFailed(f"PostgreSQL {version} binaries are not installed on this node")
    redo = _redo_segment(bindir, data)
    if redo is None:
        raise WalReplayFailed("pg_controldata does not give the image's redo point")
    names = sorted(n for n in (os.listdir(received) if os.path.isdir(received) else []) if SEGMENT.match(n)
                   and n.removesuffix(".partial") >= redo and n[:8] == redo[:8])
    if not names:  # nothing received after the image (the receiver never reached this term's master)
        return {"segments": 0, "from": redo, "to": None, "note": "no WAL received after the image: the image alone",
                "seconds": round(time.monotonic() - t0, 3)}
    user = app.get("os_user", "postgres") if os.geteuid() == 0 else None
    work = tempfile.mkdtemp(prefix="pit-pgreplay-", dir=app.get("check_dir"))
    staged = os.path.join(work, "wal")
    os.mkdir(staged)
    for n in names:
        shutil.copyfile(os.path.join(received, n), os.path.join(staged, n))
        # Without backup_label the server reads its checkpoint record from pg_wal before it asks
        # restore_command for anything (PANIC: could not locate a valid checkpoint record, when the image
        # caught that segment before the record was in it, or a recycled file under its name). So a segment
        # the receiver has whole replaces the image's copy (it is what the primary wrote, the copy a prefix or
        # stale), and the open one goes there when the image has none. Not for a target time: what is in
        # pg_wal is replayed whole before the server counts itself consistent, past any target in it.
        full = os.path.join(data, "pg_wal", n.removesuffix(".partial"))
        if not target_time and os.path.isdir(os.path.dirname(full)) and (not n.endswith(".partial")
                                                                         or not os.path.exists(full)):
            shutil.copyfile(os.path.join(received, n), full)
    cp = (f'f="{staged}/%f"; if [ -f "$f" ]; then cp "$f" "%p"; elif [ -f "$f.partial" ]; '
          f'then cp "$f.partial" "%p"; else exit 1; fi')
    target = (f"recovery_target_time = '{target_time}'\nrecovery_target_action = 'promote'\n"
              if target_time else "")
    sock, conf = pg_private_config(work, f"restore_command = '{cp}'\nrecovery_target_timeline = 'latest'\n"
                                         f"hot_standby = off\n{target}")
    logf = os.path.join(work, "server.log")
    for leftover in ("postmaster.pid", "postmaster.opts"):
        try:
            os.unlink(os.path.join(data, leftover))
        except FileNotFoundError:
            pass
    open(os.path.join(data, "recovery.signal"), "w").close()
    if user:  # the server runs as its own user: the data directory (as restored) and our files are its
        pw = _pw(user)
        for top in (work, data):
            for dp, dns, fns in os.walk(top):
                os.lchown(dp, pw.pw_uid, pw.pw_gid)
                for n in fns:
                    os.lchown(os.path.join(dp, n), pw.pw_uid, pw.pw_gid)
    os.chmod(data, 0o700)
    pg_ctl = os.path.join(bindir, "pg_ctl")
    failed = True
    try:
        try:
            lsn, timeline = _recover(bindir, data, conf, sock, logf, work, app, user, timeout)
        except WalReplayFailed as exc:
            if not (target and "before configured recovery target" in str(exc)):
                raise
            # TIME is past the end of the log: replay all of it (PostgreSQL will not promote short of a target)
            with open(conf) as f:
                kept = [ln for ln in f if not ln.startswith(("recovery_target_time", "recovery_target_action"))]
            with open(conf, "w") as f:
                f.writelines(kept)
            lsn, timeline = _recover(bindir, data, conf, sock, logf, work, app, user, timeout)
        rc, out = _run(as_user([pg_ctl, "stop", "-m", "fast", "-w", "-t", "120", "-D", data], user), 150, cwd=work)
        if rc != 0:
            raise WalReplayFailed(f"the replayed server did not stop cleanly: {_first_line(out)}")
        failed = False
        server = open(logf, errors="replace").read() if os.path.exists(logf) else ""
        # where recovery stopped: at the target ("recovery stopping before commit of transaction N, time T")
        # or at the end of the log ("last completed transaction was at log time T")
        m = re.findall(r"recovery stopping (?:before|after) .*", server) or \
            re.findall(r"last completed transaction was at log time .*", server)
    finally:
        if failed:
            _run(as_user([pg_ctl, "stop", "-m", "immediate", "-w", "-t", "60", "-D", data], user), 90, cwd=work)
            try:
                os.unlink(os.path.join(data, "recovery.signal"))
            except FileNotFoundError:
                pass
        shutil.rmtree(work, ignore_errors=True)
    return {"segments": len(names), "from": redo, "to": names[-1] if names else None, "promoted_at": lsn,
            "timeline": int(timeline) if timeline.isdigit() else timeline, "seconds": round(time.monotonic() - t0, 3),
            "stopped": m[-1].strip() if m else None}


# ------------------------------------------------------------------ the master's view: lag per replica
LAG_SQL = ("SELECT s.slot_name, s.active, "
           "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(r.write_lsn, s.restart_lsn)), -1)::bigint, "
           "coalesce(extract(epoch FROM r.write_lag), 0) "
           "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.application_name = s.slot_name "
           "WHERE s.slot_name = ANY(ARRAY[%s]::name[])")


def release_senders(app: dict) -> int:
    """End the master's WAL sender connections to pit's receivers (-> how many); 0 when the server does not
    answer (it is down already)."""
    rc, out = _run(pg_client_argv(app, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication "
                                       "WHERE application_name LIKE 'pit\\_%'"), 10,
                   env={**os.environ, "PGCONNECT_TIMEOUT": "3"})
    return int(out.strip()) if rc == 0 and out.strip().isdigit() else 0


def sync_names(replicas) -> str:
    return "FIRST 1 (" + ", ".join(f'"{slot_name(r)}"' for r in replicas) + ")"


def is_ours(value: str) -> bool:
    """A synchronous_standby_names value this code wrote (only pit's slot names)."""
    m = re.fullmatch(r'FIRST 1 \((.*)\)', value.strip())
    return bool(m) and all(re.fullmatch(r'"pit_[a-z0-9_]+"', x.strip()) for x in m.group(1).split(","))


def clear_sync(data: str) -> bool:
    """Take our synchronous_standby_names out of a promoted image's postgresql.auto.conf: it names the old
    master's replicas (this node among them), and the new primary's commits would wait for nobody."""
    path = os.path.join(data, "postgresql.auto.conf")
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return False
    kept = [ln for ln in lines if not (ln.strip().startswith("synchronous_standby_names")
                                       and is_ours(ln.split("=", 1)[1].strip().strip("'").replace("''", "'")))]
    if kept == lines:
        return False
    st = os.stat(path)
    with open(path + ".pit-new", "w") as f:
        f.writelines(kept)
    os.chown(path + ".pit-new", st.st_uid, st.st_gid)
    os.chmod(path + ".pit-new", st.st_mode & 0o7777)
    os.replace(path + ".pit-new", path)
    return True


class LagMonitor(abc.ABC):
    """On a set's master: a thread that looks at each replica's copy of the database log every `every`
    seconds (`look`), keeping `lag` (replica -> what the status shows) and the last error. The engines say
    how they look: PostgreSQL from the server's own views, MariaDB from the replicas' receivers."""

    thread_name = "pit-lagmon"

    def __init__(self, set_name: str, every: float = 5.0) -> None:
        self.set_name, self.every = set_name, every
        self.app: dict = {}
        self.replicas: tuple[str, ...] = ()
        self.lag: dict[str, dict] = {}
        self.error = ""
        self._since: dict[str, float] = {}  # replica -> when it was last seen caught up/streaming (or first looked)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, app: dict, replicas: tuple[str, ...]) -> None:
        self.app, self.replicas = dict(app), tuple(replicas)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name=f"{self.thread_name}-{self.set_name}")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @abc.abstractmethod
    def look(self) -> None:
        """One look at every replica: fills `lag` (OSError: the last error)."""

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.look()
            except OSError as exc:
                self.error = str(exc)
            self._stop.wait(self.every)


class WalMonitor(LagMonitor):
    """On the set's master: how far each replica's WAL receiver is behind, from the server's own views
    (`pg_replication_slots`, `pg_stat_replication`), every `every` seconds. A replica whose slot is not
    streaming is behind by the WAL its slot holds back, for as long as it has been away."""

    thread_name = "pit-walmon"

    def __init__(self, set_name: str, every: float = 5.0) -> None:
        super().__init__(set_name, every)
        self.sync = ""

    def look(self) -> None:
        self.poll()
        self.keep_sync()

    def keep_sync(self) -> str | None:
        """`sync = true`: commits wait until the first streaming replica (in the set's order) has flushed their
        WAL (`synchronous_standby_names = 'FIRST 1 (...)'`), so a failover to it loses none. When no replica
        streams, the master does not wait for one (commits would hang until it came back): the setting is
        cleared until one streams again, and the `wal_lag` alert says they are away. -> the value set, if any."""
        want = sync_names(self.replicas) if self.app.get("sync") and \
            any(w.get("streaming") for w in self.lag.values()) else ""
        rc, out = _run(pg_client_argv(self.app, "SHOW synchronous_standby_names"), 30)
        if rc != 0:
            raise OSError(f"cannot read synchronous_standby_names: {_first_line(out, r'error|FATAL|could not')}")
        have = out.strip()
        if have == want:
            self.sync = want
            return None
        if not want and not is_ours(have):
            return None  # as wanted, or the operator's own setting (not ours to clear)
        q = "'" + want.replace("'", "''") + "'"
        rc, out = _run(pg_client_argv(self.app) + ["-c", f"ALTER SYSTEM SET synchronous_standby_names = {q}",
                                                   "-c", "SELECT pg_reload_conf()"], 30)
        if rc != 0:
            raise OSError(f"cannot set synchronous_standby_names: {_first_line(out, r'error|FATAL|could not')}")
        log.warning("set %s: commits %s", self.set_name, f"wait for a replica's WAL flush ({want})" if want
                    else "no longer wait for a replica (none streams)")
        self.sync = want
        return want

    def poll(self) -> dict[str, dict]:

        slots = {slot_name(r): r for r in self.replicas}
        if not slots:
            return {}
        sql = LAG_SQL % ", ".join(f"'{s}'" for s in slots)
        rc, out = _run(pg_client_argv(self.app, sql), 30)
        if rc != 0:
            raise OSError(f"cannot read the replication views: {_first_line(out, r'error|FATAL|could not')}")
        now = time.monotonic()
        seen: dict[str, dict] = {}
        for line in out.strip().splitlines():
            parts = line.split("|")
            if len(parts) != 4 or parts[0] not in slots:
                continue
            r, active = slots[parts[0]], parts[1] == "t"
            if active:
                self._since[r] = now
            away = now - self._since.setdefault(r, now)
            seen[r] = {"slot": parts[0], "streaming": active, "lag_bytes": max(0, int(parts[2])),
                       "lag_seconds": round(float(parts[3]) if active else away, 3)}
        for r in self.replicas:  # no slot yet: the receiver never reached this master
            if r not in seen:
                away = now - self._since.setdefault(r, now)
                seen[r] = {"slot": slot_name(r), "streaming": False, "lag_bytes": None, "lag_seconds": round(away, 3)}
        self.lag, self.error = seen, ""
        return seen

    def status(self) -> dict:
        out = {"replicas": dict(self.lag), "error": self.error or None}
        if self.app.get("sync"):
            out["sync"] = self.sync or None
        return out
