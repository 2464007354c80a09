"""Replication-set templates for the applications a small business runs:
PostgreSQL, SQLite, MySQL/MariaDB and a web site (nginx or Apache).

A template fills in three things for a set:

* its **paths** (what the master replicates),
* a **consistent-point hook pair** (`pre` runs before the point is made,
  `post` after it; see `replicator/apps/hooks.py`), and
* an **application image check**: run on a materialised image (a snapshot
  restored into a scratch directory) by image selection
  (`replicator/failover/select.py`) to prove the application would start from it.

Everything a template decides is written into the cluster file under the
set's `[sets.NAME.app]` table, for the operator to read and adjust:

    [sets.sales-db]
    master = "primary"
    replicas = ["r1", "r2"]
    paths = ["/var/lib/postgresql/15/main"]

    [sets.sales-db.app]
    template = "postgresql"
    data = "/var/lib/postgresql/15/main"
    point = "backup"
    pre = ["builtin:postgresql.backup_start"]
    post = ["builtin:postgresql.backup_stop"]
    ...

A hook is a shell command (a string), an argv list (a list of strings), or
`"builtin:NAME"`: a hook implemented here because it must hold a database
session open from `pre` to `post` (`pg_backup_start`/`pg_backup_stop`,
`FLUSH TABLES WITH READ LOCK`/`UNLOCK TABLES`) or is better done in-process
(SQLite's online backup API, `VACUUM INTO`).
"""
from __future__ import annotations

import logging
import os
import re
import selectors
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import CheckUnavailable, FailoverError, HookFailed, TemplateError
from ..settings import SetConfig
from .sqlitewal import write_copy_meta
from .pgtools import (_first_line, _killpg, _pw, _run, as_user, image_path, pg_bindir, pg_client_argv,
                      pg_private_config, server_failure)

log = logging.getLogger("pit.templates")

DEFAULT_SIDE_ROOT = "/var/lib/pit/app"
HOOK_KEYS = ("pre", "post")


# ---------------------------------------------------------------- results
@dataclass
class CheckResult:
    """The outcome of an application image check."""

    ok: bool
    message: str
    template: str | None = None
    details: list[str] = field(default_factory=list)   # what was checked, one line each
    notes: list[str] = field(default_factory=list)     # parts skipped, and why
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------- helpers
# ----------------------------------------------------------- SQL sessions
class SqlSession:
    """One client process (psql or mysql) kept open between a pre and a post hook,
    so a backup or a lock lives on one server session. Statements are written to its
    standard input; a marker query after each tells us when they are done."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.argv, self.name, self.n = argv, name, 0
        try:
            self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        except OSError as exc:
            raise HookFailed(f"{name}: cannot run {argv[0]}: {exc.strerror}") from None
        os.set_blocking(self.p.stdout.fileno(), False)
        self.buf = b""

    def run(self, sql: str, timeout: float) -> str:
        """Run `sql`; return its output. Raises HookFailed if the client exits (an
        error stops psql with ON_ERROR_STOP and mysql in batch mode) or on timeout."""
        self.n += 1
        mark = f"pit-mark-{os.getpid()}-{self.n}"
        try:
            self.p.stdin.write(f"{sql.rstrip().rstrip(';')};\nSELECT '{mark}';\n".encode())
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the client is gone: read what it said
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        try:
            while True:
                lines = self.buf.decode(errors="replace").splitlines()
                if mark in (ln.strip() for ln in lines):
                    out = self.buf.decode(errors="replace")
                    self.buf = b""
                    return "\n".join(ln for ln in out.splitlines() if ln.strip() != mark)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise HookFailed(f"{self.name}: no answer within {timeout:g} s; session killed")
                if not sel.select(min(left, 0.5)):
                    continue
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    self.p.wait()
                    out = self.buf.decode(errors="replace")
                    raise HookFailed(f"{self.name}: {_first_line(out, r'ERROR|FATAL|error')} "
                                     f"(client exited {self.p.returncode})")
                self.buf += chunk
        finally:
            sel.close()

    def close(self, timeout: float = 10.0) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        _killpg(self.p)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------- PostgreSQL
PG_OPTIONS = {"port": int, "socket_dir": str, "os_user": str, "superuser": str, "dbname": str, "bindir": str,
              "point": str, "amcheck": bool, "hook_timeout": float, "check_timeout": float, "side_dir": str,
              "wal": str, "wal_host": str, "wal_port": int, "wal_user": str, "sync": bool}
PG_WAL = ("stream", "off")
PG_POINTS = ("backup", "checkpoint", "basebackup")


def _pg_build(name: str, paths: list[str], opts: dict) -> tuple[list[str], dict]:
    if not paths:
        raise TemplateError("postgresql: give the data directory with --path (e.g. /var/lib/postgresql/15/main)")
    data = os.path.normpath(paths[0])
    os_user = opts.get("os_user", "postgres")
    app = {"template": "postgresql", "data": data, "port": opts.get("port", 5432),
           "socket_dir": opts.get("socket_dir", "/var/run/postgresql"), "os_user": os_user,
           "superuser": opts.get("superuser", os_user), "dbname": opts.get("dbname", "postgres"),
           "point": opts.get("point", "backup"), "amcheck": opts.get("amcheck", False),
           "hook_timeout": opts.get("hook_timeout", 300.0), "check_timeout": opts.get("check_timeout", 600.0)}
    if opts.get("bindir"):
        app["bindir"] = opts["bindir"]
    # WAL streamed to each replica between points, replayed on promotion (apps/pgwal.py)
    app["wal"] = opts.get("wal", "stream")
    if app["wal"] not in PG_WAL:
        raise TemplateError(f"postgresql: wal must be one of {', '.join(PG_WAL)}")
    for k in ("wal_host", "wal_port", "wal_user", "sync"):
        if opts.get(k):
            app[k] = opts[k]
    if app.get("sync") and app["wal"] != "stream":
        raise TemplateError("postgresql: sync = true needs wal = stream")
    set_paths = list(paths)
    if app["point"] not in PG_POINTS:
        raise TemplateError(f"postgresql: point must be one of {', '.join(PG_POINTS)}")
    if app["point"] == "backup":
        app["pre"], app["post"] = ["builtin:postgresql.backup_start"], ["builtin:postgresql.backup_stop"]
    elif app["point"] == "checkpoint":
        app["pre"], app["post"] = [pg_client_argv(app, "CHECKPOINT")], []
    else:  # a full base backup into a side directory: the image is that copy, not the live data directory
        side = os.path.normpath(opts.get("side_dir", os.path.join(DEFAULT_SIDE_ROOT, name)))
        app["side_dir"] = side
        app["data"] = os.path.join(side, "base")
        app["pre"], app["post"] = [pg_basebackup_command(app)], []
        set_paths = [side] + list(paths[1:])
    return set_paths, app


# What pg_basebackup itself leaves out of a data directory (PostgreSQL's "Backup Manifest"/"Making a Base
# Backup Using the Low Level API": files and directory contents recreated at start-up or meaningless on
# another server). The directories are kept, empty: the server needs them.
PG_EXCLUDE = ("postmaster.pid", "postmaster.opts", "pg_stat_tmp/*", "pg_replslot/*", "pg_dynshmem/*",
              "pg_notify/*", "pg_serial/*", "pg_snapshots/*", "pg_subtrans/*")
MYSQL_EXCLUDE = ("*.pid", "*.sock", "*.sock.lock")


def template_excludes(template: str, app: dict) -> list[str]:
    """The set's default `exclude` patterns for a template, as absolute paths under its data directory."""
    if template == "postgresql":
        data = app["data"]
        return [f"{data}/{p}" for p in PG_EXCLUDE] + [f"{data}/base/pgsql_tmp*", f"{data}/base/*/pgsql_tmp*"]
    if template == "mysql":
        return [f"{app['data']}/{p}" for p in MYSQL_EXCLUDE]
    return []


def pg_basebackup_command(app: dict) -> str:
    bindir = app.get("bindir") or pg_bindir() or "/usr/bin"
    side = app["side_dir"]
    new, cur = shlex.quote(os.path.join(side, "base.new")), shlex.quote(os.path.join(side, "base"))
    bb = shlex.join([os.path.join(bindir, "pg_basebackup"), "-D", os.path.join(side, "base.new"), "-X", "fetch",
                     "-c", "fast", "--no-password", "-h", str(app["socket_dir"]), "-p", str(app["port"]),
                     "-U", app["superuser"]])
    # A promoted node that started its server on side_dir/base itself would lose its live data
    # directory to the next point: a running server's directory (postmaster.pid) is never replaced.
    guard = (f"if [ -e {shlex.quote(os.path.join(side, 'base', 'postmaster.pid'))} ]; then "
             f"echo {shlex.quote(f'{cur} holds a running server (postmaster.pid): not replacing it; start a promoted server from a copy')} >&2; "
             f"exit 1; fi; ")
    inner = f"{guard}rm -rf {new} && {bb} && rm -rf {cur} && mv {new} {cur}"
    if os.geteuid() == 0 and app["os_user"] != "root":
        return f"runuser -u {shlex.quote(app['os_user'])} -- sh -c {shlex.quote(inner)}"
    return inner


def _pg_backup_start(set_name: str, app: dict, env: dict, state: dict, timeout: float) -> str:
    if "pg_session" in state:
        raise HookFailed("postgresql.backup_start: a backup is already in progress for this point")
    s = SqlSession(pg_client_argv(app), "postgresql.backup_start")
    label = f"pit {set_name} point {env.get('PIT_POINT_ID', '?')}"[:1000].replace("'", "")
    try:
        out = s.run(f"SELECT pg_backup_start('{label}', true)", timeout)
    except BaseException:
        s.kill()
        raise
    state["pg_session"] = s
    return f"backup started at {out.strip()}"


def _pg_backup_stop(set_name: str, app: dict, env: dict, state: dict, timeout: float) -> str:
    s = state.pop("pg_session", None)
    if s is None:
        raise HookFailed("postgresql.backup_stop: no backup was started for this point")
    try:
        # false: the image holds pg_wal itself, so do not wait for WAL archiving
        out = s.run("SELECT lsn::text || ' ' || replace(labelfile, E'\\n', ' | ') FROM pg_backup_stop(false)", timeout)
    finally:
        s.close()
    return f"backup stopped at {out.strip()}"


def _pg_check(set_cfg: SetConfig, app: dict, image_dir: str, may_modify: bool, res: CheckResult) -> None:
    data = image_path(set_cfg.paths, image_dir, app["data"])
    if not os.path.isdir(data):
        return _fail(res, f"the data directory {app['data']} is not in the image")
    for need in ("PG_VERSION", "global/pg_control"):
        if not os.path.isfile(os.path.join(data, need)):
            return _fail(res, f"{need} is missing from the data directory")
    with open(os.path.join(data, "PG_VERSION")) as f:
        version = f.read().strip()
    bindir = app.get("bindir") or pg_bindir(version)
    if not bindir or not os.path.exists(os.path.join(bindir, "pg_controldata")):
        raise CheckUnavailable(f"postgresql check: PostgreSQL {version} binaries are not installed on this node")
    rc, out = _run([os.path.join(bindir, "pg_controldata"), "-D", data], 60)
    if rc != 0:
        return _fail(res, f"pg_controldata: {_first_line(out, r'error|could not|invalid')}")
    if re.search(r"CRC|checksum does not match|invalid", out, re.I):
        return _fail(res, f"pg_controldata: {_first_line(out, r'CRC|checksum|invalid')}")
    fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    cstate = fields.get("Database cluster state", "?").strip()
    res.details.append(f"pg_controldata: cluster state {cstate!r}, latest checkpoint "
                       f"{fields.get('Latest checkpoint location', '?').strip()}")
    _pg_throwaway(app, data, bindir, may_modify, res)


def _pg_throwaway(app: dict, data: str, bindir: str, may_modify: bool, res: CheckResult) -> None:
    """Start a throwaway instance on a copy of the image's data directory: private socket
    directory, no TCP, our own minimal configuration; SELECT 1, optionally pg_amcheck; stop."""
    user = app["os_user"] if os.geteuid() == 0 else None
    work = tempfile.mkdtemp(prefix="pit-pgcheck-", dir=app.get("check_dir"))
    started = False
    pgdata = os.path.join(work, "data")
    timeout = float(app.get("check_timeout", 600))
    try:
        if may_modify:
            try:
                os.rename(data, pgdata)
            except OSError:  # another file system
                shutil.copytree(data, pgdata, symlinks=True)
        else:
            shutil.copytree(data, pgdata, symlinks=True)
        for leftover in ("postmaster.pid", "postmaster.opts"):
            try:
                os.unlink(os.path.join(pgdata, leftover))
            except FileNotFoundError:
                pass
        sock, conf = pg_private_config(work)
        os.chmod(pgdata, 0o700)
        if user:
            pw = _pw(user)
            for dp, dns, fns in os.walk(work):
                os.lchown(dp, pw.pw_uid, pw.pw_gid)
                for n in dns + fns:
                    os.lchown(os.path.join(dp, n), pw.pw_uid, pw.pw_gid)
        if app.get("wal_received"):
            # the unit a promotion brings up: the image and the WAL received after it, replayed on the copy
            from .pgwal import replay

            try:
                r = replay(app, pgdata, app["wal_received"], timeout)
            except FailoverError as exc:
                return _fail(res, f"the image with the WAL received after it does not recover: {exc}")
            if r.get("segments"):
                res.details.append(f"WAL received after the image replayed: {r['segments']} segments from "
                                   f"{r['from']}, promoted at {r['promoted_at']} (timeline {r['timeline']})")
            else:
                res.notes.append(r["note"])
        logf = os.path.join(work, "server.log")
        pg_ctl = os.path.join(bindir, "pg_ctl")
        started = True  # from here on, always try to stop it
        rc, out = _run(as_user([pg_ctl, "start", "-w", "-t", str(int(timeout)), "-D", pgdata, "-l", logf,
                                "-o", f"-c config_file={conf}"], user), timeout + 30, cwd=work)
        if rc != 0:
            server = open(logf, errors="replace").read() if os.path.exists(logf) else ""
            return _fail(res, "throwaway instance did not start: "
                         + server_failure(server + "\n" + out))
        res.details.append("throwaway instance started (recovery done)")
        psql = [os.path.join(bindir, "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", sock, "-p", "5432",
                "-U", app["superuser"], "-d", "template1"]
        rc, out = _run(as_user(psql + ["-c", "SELECT 1", "-c", "SELECT count(*) FROM pg_database"], user), 120,
                       cwd=work)
        got = out.split()
        if rc != 0 or not got or got[0] != "1":
            return _fail(res, f"SELECT 1 failed: {_first_line(out)}")
        res.details.append(f"SELECT 1 answered; {got[1] if len(got) > 1 else '?'} databases")
        if app.get("amcheck"):
            rc, out = _run(as_user([os.path.join(bindir, "pg_amcheck"), "-h", sock, "-p", "5432",
                                    "-U", app["superuser"], "-d", "template1", "--all", "--install-missing"], user),
                           timeout, cwd=work)
            if rc != 0:
                return _fail(res, f"pg_amcheck found problems: {_first_line(out)}")
            res.details.append("pg_amcheck: no problems")
        else:
            res.notes.append("pg_amcheck not run (set amcheck = true in the set's app table)")
    finally:
        if started:
            _run(as_user([os.path.join(bindir, "pg_ctl"), "stop", "-m", "immediate", "-w", "-t", "60", "-D", pgdata],
                         user), 90, cwd=work)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ SQLite
SQLITE_OPTIONS = {"side_dir": str, "point": str, "hook_timeout": float, "wal": str}
SQLITE_POINTS = ("backup", "vacuum")


def _sqlite_build(name: str, paths: list[str], opts: dict) -> tuple[list[str], dict]:
    if not paths:
        raise TemplateError("sqlite: give the database files with --path")
    dbs = [os.path.normpath(p) for p in paths]
    names = [os.path.basename(p) for p in dbs]
    if len(set(names)) != len(names):
        raise TemplateError("sqlite: database files must have distinct base names (their copies share one directory)")
    side = os.path.normpath(opts.get("side_dir", os.path.join(DEFAULT_SIDE_ROOT, name)))
    point = opts.get("point", "backup")
    if point not in SQLITE_POINTS:
        raise TemplateError(f"sqlite: point must be one of {', '.join(SQLITE_POINTS)}")
    # the WAL shipped frame by frame between points (apps/sqlitewal.py); its frames are page images, so the
    # point must be a page-for-page copy (the backup API), not VACUUM INTO's rebuilt file
    wal = opts.get("wal", "stream" if point == "backup" else "off")
    if wal not in PG_WAL:
        raise TemplateError(f"sqlite: wal must be one of {', '.join(PG_WAL)}")
    if wal == "stream" and point != "backup":
        raise TemplateError("sqlite: wal = stream needs point = backup (a page-for-page copy)")
    app = {"template": "sqlite", "databases": dbs, "side_dir": side, "point": point, "wal": wal,
           "hook_timeout": opts.get("hook_timeout", 300.0),
           "pre": ["builtin:sqlite.backup" if point == "backup" else "builtin:sqlite.vacuum_into"], "post": []}
    return [side], app


def sqlite_copy_path(app: dict, db: str) -> str:
    """The consistent copy of database `db` the point hook keeps in the set's side directory."""
    return os.path.join(app["side_dir"], os.path.basename(db))


def _sqlite_point(set_name: str, app: dict, env: dict, state: dict, timeout: float, vacuum: bool) -> str:
    side = app["side_dir"]
    os.makedirs(side, mode=0o700, exist_ok=True)
    out = []
    for db in app["databases"]:
        if not os.path.isfile(db):
            raise HookFailed(f"sqlite: database {db} does not exist")
        final = sqlite_copy_path(app, db)
        tmp = os.path.join(side, f".{os.path.basename(db)}.pit-tmp")
        for p in (tmp, tmp + "-journal"):
            if os.path.exists(p):
                os.unlink(p)
        try:
            if vacuum:
                src = sqlite3.connect(db, timeout=timeout)
                try:
                    src.execute("VACUUM INTO ?", (tmp,))
                finally:
                    src.close()
            else:
                started = time.time_ns()  # at or before the copy's read transaction: what a replay starts from
                src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
                dst = sqlite3.connect(tmp)
                try:
                    src.backup(dst)  # all pages in one step: one read transaction, a consistent copy
                    dst.execute("PRAGMA journal_mode=DELETE")
                finally:
                    dst.close()
                    src.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if not vacuum:  # after the copy: a stale time is earlier than the copy, which replay tolerates
                write_copy_meta(final, started)
        except sqlite3.Error as exc:
            raise HookFailed(f"sqlite: {'VACUUM INTO' if vacuum else 'backup'} of {db} failed: {exc}") from None
        out.append(f"{db} -> {final} ({os.path.getsize(final)} bytes)")
    dfd = os.open(side, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return "; ".join(out)


def _sqlite_check(set_cfg: SetConfig, app: dict, image_dir: str, may_modify: bool, res: CheckResult) -> None:
    for db in app["databases"]:
        p = image_path(set_cfg.paths, image_dir, sqlite_copy_path(app, db))
        if not os.path.isfile(p):
            return _fail(res, f"the consistent copy of {db} is not in the image")
        try:
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                rows = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
            finally:
                con.close()
        except sqlite3.Error as exc:
            return _fail(res, f"{os.path.basename(db)}: {exc}")
        if rows != ["ok"]:
            return _fail(res, f"{os.path.basename(db)}: integrity_check: {'; '.join(map(str, rows[:3]))}")
        res.details.append(f"{os.path.basename(db)}: integrity_check ok")


# ----------------------------------------------------------- MySQL / MariaDB
MYSQL_OPTIONS = {"client": str, "hook_timeout": float, "binlog": str, "binlog_host": str, "binlog_port": int,
                 "binlog_user": str, "binlog_password_file": str, "binlog_defaults_file": str}
MYSQL_DEFAULT_CLIENT = "mysql --defaults-file=/etc/mysql/debian.cnf"
MYSQL_BINLOG = ("stream", "off")


def _mysql_build(name: str, paths: list[str], opts: dict) -> tuple[list[str], dict]:
    paths = paths or ["/var/lib/mysql"]
    app = {"template": "mysql", "data": os.path.normpath(paths[0]),
           "client": shlex.split(opts.get("client", MYSQL_DEFAULT_CLIENT)),
           "hook_timeout": opts.get("hook_timeout", 300.0),
           "pre": ["builtin:mysql.lock"], "post": ["builtin:mysql.unlock"]}
    # the binary log streamed to each replica between points, replayed on promotion (apps/mybinlog.py)
    app["binlog"] = opts.get("binlog", "stream")
    if app["binlog"] not in MYSQL_BINLOG:
        raise TemplateError(f"mysql: binlog must be one of {', '.join(MYSQL_BINLOG)}")
    for k in ("binlog_host", "binlog_port", "binlog_user", "binlog_password_file", "binlog_defaults_file"):
        if opts.get(k):
            app[k] = opts[k]
    if "binlog_port" in app and not 0 < app["binlog_port"] < 65536:
        raise TemplateError("mysql: binlog_port must be a TCP port (1-65535)")
    for k in ("binlog_password_file", "binlog_defaults_file"):
        if k in app and not os.path.isabs(app[k]):
            raise TemplateError(f"mysql: {k} must be an absolute path")
    return list(paths), app


def mysql_session(app: dict) -> dict:
    """What the MySQL hook pair runs: one client session (argv) holding the global read lock
    from `pre` (statements) to `post` (statements)."""
    # --unbuffered: the answer to each statement is flushed at once (a pipe is block-buffered otherwise)
    return {"argv": list(app["client"]) + ["--batch", "--skip-column-names", "--unbuffered"],
            "pre": ["FLUSH TABLES WITH READ LOCK"], "post": ["UNLOCK TABLES"]}


def _mysql_record_position(app: dict, s: SqlSession, timeout: float) -> str:
    """While the global read lock holds, no commit moves the binary log: its position then is where the image
    ends in the log, written into the data directory (apps/mybinlog.py replays from it). A server without a
    binary log leaves no position (a stale one would replay from the wrong place)."""
    from .mybinlog import POSITION_FILE, write_position

    rows = [ln.split("\t") for ln in s.run("SHOW MASTER STATUS", timeout).splitlines() if ln.strip()]
    path = os.path.join(app["data"], POSITION_FILE)
    if not rows or len(rows[0]) < 2 or not rows[0][1].strip().isdigit():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return "; no binary log on this server: the image alone, nothing to stream"
    try:
        write_position(app["data"], rows[0][0].strip(), int(rows[0][1]))
    except OSError as exc:
        raise HookFailed(f"mysql.lock: cannot write the binlog position into {path}: {exc}") from None
    return f"; binlog position {rows[0][0].strip()}:{rows[0][1].strip()}"


def _mysql_lock(set_name: str, app: dict, env: dict, state: dict, timeout: float) -> str:
    if "mysql_session" in state:
        raise HookFailed("mysql.lock: the lock is already held for this point")
    spec = mysql_session(app)
    s = SqlSession(spec["argv"], "mysql.lock")
    try:
        out = [s.run(sql, timeout) for sql in spec["pre"]]
        where = _mysql_record_position(app, s, timeout) if app.get("binlog", "stream") == "stream" else ""
    except BaseException:
        s.kill()
        raise
    state["mysql_session"] = s
    return "global read lock held" + ("".join(out) and ": " + " ".join(out)) + where


def _mysql_unlock(set_name: str, app: dict, env: dict, state: dict, timeout: float) -> str:
    s = state.pop("mysql_session", None)
    if s is None:
        raise HookFailed("mysql.unlock: no lock was taken for this point")
    try:
        for sql in mysql_session(app)["post"]:
            s.run(sql, timeout)
    finally:
        s.close()
    return "tables unlocked"


def _mysql_check(set_cfg: SetConfig, app: dict, image_dir: str, may_modify: bool, res: CheckResult) -> None:
    data = image_path(set_cfg.paths, image_dir, app["data"])
    if not os.path.isdir(data) or not os.listdir(data):
        return _fail(res, f"the data directory {app['data']} is missing or empty in the image")
    if not (os.path.isdir(os.path.join(data, "mysql")) or os.path.exists(os.path.join(data, "ibdata1"))):
        return _fail(res, "the data directory has neither the mysql system schema nor ibdata1")
    res.details.append("data directory holds the system schema")
    if app.get("binlog_received"):
        return _mysql_replay_check(app, data, may_modify, res)
    res.notes.append("no throwaway mysqld start: the MySQL check looks at the files only")


def _mysql_replay_check(app: dict, data: str, may_modify: bool, res: CheckResult) -> None:
    """The unit a promotion brings up: the image with the binlog received after it, replayed on a copy by a
    private server (which also proves the image starts: InnoDB's recovery runs first)."""
    from .mybinlog import replay

    work = tempfile.mkdtemp(prefix="pit-mycheck-", dir=app.get("check_dir"))
    copy = os.path.join(work, "data")
    try:
        shutil.copytree(data, copy, symlinks=True)
        st = os.stat(data)
        if os.geteuid() == 0:
            for dp, dns, fns in os.walk(copy):
                os.lchown(dp, st.st_uid, st.st_gid)
                for n in fns:
                    os.lchown(os.path.join(dp, n), st.st_uid, st.st_gid)
        try:
            r = replay(app, copy, app["binlog_received"], float(app.get("check_timeout", 600)))
        except FailoverError as exc:
            return _fail(res, f"the image with the binlog received after it does not recover: {exc}")
        if r.get("files"):
            res.details.append(f"binlog received after the image replayed: {r['files']} files from {r['from']} "
                               f"to {r['to']}")
        else:
            res.notes.append(r["note"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ web site
WEB_OPTIONS = {"server": str, "config": str, "docroot": str}


def _web_build(name: str, paths: list[str], opts: dict) -> tuple[list[str], dict]:
    paths = [os.path.normpath(p) for p in paths]
    if not paths:
        raise TemplateError("website: give the server configuration and the document root with --path")

    def is_conf(p: str) -> bool:
        return p.startswith("/etc/") or p.endswith(".conf") or os.path.basename(p) in ("nginx", "apache2", "httpd")

    conf_path = opts.get("config") or next((p for p in paths if is_conf(p)), None)
    docroot = opts.get("docroot") or next((p for p in paths if not is_conf(p)), None)
    if not conf_path or not docroot:
        raise TemplateError("website: cannot tell the configuration from the document root; "
                            "give -o config=FILE and -o docroot=DIR")
    server = opts.get("server") or ("nginx" if "nginx" in conf_path else
                                    "apache" if re.search("apache|httpd", conf_path) else None)
    if server not in ("nginx", "apache"):
        raise TemplateError("website: give -o server=nginx or -o server=apache")
    if not conf_path.endswith(".conf") and not os.path.isfile(conf_path):
        conf_path = os.path.join(conf_path, "nginx.conf" if server == "nginx" else "apache2.conf")
    set_paths = list(paths)
    for p in (conf_path, docroot):
        try:
            image_path(set_paths, "/", p)
        except TemplateError:
            set_paths.append(os.path.dirname(p) if p == conf_path else p)
    return set_paths, {"template": "website", "server": server, "config": conf_path, "docroot": docroot,
                       "pre": [], "post": []}


def web_config_test(app: dict, conf: str) -> list[str] | None:
    """The command that parses the server configuration `conf`, or None when the server is not installed."""
    if app["server"] == "nginx":
        exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        return [exe, "-t", "-q", "-c", conf] if exe else None
    for name in ("apache2ctl", "apachectl", "httpd"):
        exe = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
        if exe:
            return [exe, "-t", "-f", conf]
    return None


def _web_check(set_cfg: SetConfig, app: dict, image_dir: str, may_modify: bool, res: CheckResult) -> None:
    root = image_path(set_cfg.paths, image_dir, app["docroot"])
    if not os.path.isdir(root):
        return _fail(res, f"the document root {app['docroot']} is not in the image")
    nfiles = sum(len(fns) for _, _, fns in os.walk(root))
    if not nfiles:
        return _fail(res, f"the document root {app['docroot']} is empty")
    res.details.append(f"document root holds {nfiles} files")
    conf = image_path(set_cfg.paths, image_dir, app["config"])
    if not os.path.isfile(conf):
        return _fail(res, f"the server configuration {app['config']} is not in the image")
    argv = web_config_test(app, conf)
    if argv is None:
        res.notes.append(f"{app['server']} is not installed on this node: configuration not parsed")
        return
    rc, out = _run(argv, 60)
    if rc != 0:
        return _fail(res, f"{app['server']} configuration test failed: {_first_line(out, r'emerg|error|Syntax')}")
    res.details.append(f"{app['server']} configuration parses")


# ------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Template:
    name: str
    summary: str
    options: dict
    build: Callable
    check: Callable


TEMPLATES: dict[str, Template] = {
    "postgresql": Template("postgresql", "PostgreSQL data directory; pg_backup_start/stop around the point; "
                           "pg_controldata and a throwaway instance check", PG_OPTIONS, _pg_build, _pg_check),
    "sqlite": Template("sqlite", "SQLite databases copied consistently (backup API or VACUUM INTO) into a side "
                       "directory; PRAGMA integrity_check", SQLITE_OPTIONS, _sqlite_build, _sqlite_check),
    "mysql": Template("mysql", "MySQL/MariaDB data directory under FLUSH TABLES WITH READ LOCK; file check",
                      MYSQL_OPTIONS, _mysql_build, _mysql_check),
    "website": Template("website", "nginx or Apache configuration plus document root; config test, non-empty root",
                        WEB_OPTIONS, _web_build, _web_check),
}

BUILTIN_HOOKS: dict[str, Callable] = {
    "postgresql.backup_start": _pg_backup_start,
    "postgresql.backup_stop": _pg_backup_stop,
    "sqlite.backup": lambda s, a, e, st, t: _sqlite_point(s, a, e, st, t, vacuum=False),
    "sqlite.vacuum_into": lambda s, a, e, st, t: _sqlite_point(s, a, e, st, t, vacuum=True),
    "mysql.lock": _mysql_lock,
    "mysql.unlock": _mysql_unlock,
}

# Keys of the app table beyond the template options.
COMMON_KEYS = {"template": str, "pre": list, "post": list, "hook_timeout": float, "check": bool, "check_dir": str}
TEMPLATE_KEYS = {
    "postgresql": {"data": str},
    "sqlite": {"databases": list, "wal": str},
    "mysql": {"data": str, "client": list, "binlog_received": str},
    "website": {},
}


def get_template(name: str) -> Template:
    t = TEMPLATES.get(name)
    if t is None:
        raise TemplateError(f"unknown template {name!r} (known: {', '.join(sorted(TEMPLATES))})")
    return t


def parse_options(template: str, pairs: list[str] | dict) -> dict:
    """`key=value` strings (from `-o`) into the template's typed options."""
    t = get_template(template)
    items = pairs.items() if isinstance(pairs, dict) else [p.split("=", 1) if "=" in p else (p, None) for p in pairs]
    out = {}
    for k, v in items:
        if k not in t.options:
            raise TemplateError(f"{template}: unknown option {k!r} (known: {', '.join(sorted(t.options))})")
        if v is None:
            raise TemplateError(f"{template}: option {k!r} needs a value (-o {k}=VALUE)")
        typ = t.options[k]
        try:
            if typ is bool and isinstance(v, str):
                if v.lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError
                v = v.lower() in ("true", "yes", "1", "on")
            else:
                v = typ(v)
        except ValueError:
            raise TemplateError(f"{template}: option {k!r}: {v!r} is not a {typ.__name__}") from None
        out[k] = v
    return out


def build_set(template: str, name: str, paths: list[str], replicas: list[str], master: str,
              options: dict | list | None = None) -> dict:
    """The set's table for the cluster file: master, replicas, paths, and the `app` subtable."""
    t = get_template(template)
    opts = parse_options(template, options or {})
    for p in paths:
        if not os.path.isabs(p):
            raise TemplateError(f"{p}: paths must be absolute")
    set_paths, app = t.build(name, list(paths), opts)
    table = {"master": master, "replicas": list(replicas), "paths": set_paths}
    if template in ("postgresql", "mysql", "sqlite"):
        # Points with hooks are made on the master (a scheduled run ends with one, and `pit point`);
        # the replica's own point policies would make points without the hooks.
        table["point_quiet"] = 0
        table["point_every"] = 0
        table["schedule"] = {"every": "15m"}
    excludes = template_excludes(template, app)
    if excludes:  # written into the cluster file, for the operator to read and adjust
        table["exclude"] = excludes
    table["app"] = app
    validate_app(app, set_paths)
    return table


def validate_app(app, paths: list[str], where: str = "app") -> dict:
    """Check an `app` table; returns it. One-line TemplateError naming the key."""
    if not isinstance(app, dict):
        raise TemplateError(f"{where} must be a table")
    t = get_template(app.get("template", ""))
    known = {**COMMON_KEYS, **t.options, **TEMPLATE_KEYS[t.name]}
    for k, v in app.items():
        if k not in known:
            raise TemplateError(f"{where}: unknown key {k!r}")
        typ = known[k]
        if not _type_ok(v, typ):
            raise TemplateError(f"{where}: `{k}` must be a {typ.__name__}")
    for phase in HOOK_KEYS:
        for i, h in enumerate(app.get(phase, [])):
            check_hook(h, f"{where}.{phase}[{i}]")
    if "hook_timeout" in app and not app["hook_timeout"] > 0:
        raise TemplateError(f"{where}: `hook_timeout` must be positive")
    for k in ("data", "docroot", "config", "side_dir"):
        if k in app:
            image_path(paths, "/", app[k])
    for db in app.get("databases", []):
        if not isinstance(db, str) or not os.path.isabs(db):
            raise TemplateError(f"{where}: `databases` must be absolute paths")
    if t.name == "sqlite":
        image_path(paths, "/", app["side_dir"])
    return app


# What a node's own `app` settings (its agent file) may not change in a set's
# application table: what the set is (its template) and where its files are in
# the image (its paths). Connection details, clients and hooks may differ.
APP_SET_ONLY = ("template", "data", "databases", "docroot", "config", "side_dir")


def _type_ok(v, typ) -> bool:
    if typ is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if typ is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, typ)


def check_app_override(over, where: str) -> dict:
    """A node's settings over a set's `app` table: known keys of some
    template, of the right type, hooks well formed, nothing that is the
    set's own. One-line TemplateError naming the key."""
    if not isinstance(over, dict):
        raise TemplateError(f"{where} must be a table")
    known = {**COMMON_KEYS, **{k: v for t in TEMPLATES.values() for k, v in t.options.items()},
             **{k: v for keys in TEMPLATE_KEYS.values() for k, v in keys.items()}}
    for k, v in over.items():
        if k in APP_SET_ONLY:
            raise TemplateError(f"`{where}.{k}` is the set's own (its [sets.NAME.app] in the cluster file), "
                                f"not a node's")
        if k not in known:
            raise TemplateError(f"`{where}.{k}` is not an application setting")
        if not _type_ok(v, known[k]):
            raise TemplateError(f"`{where}.{k}` must be a {known[k].__name__}")
    for phase in HOOK_KEYS:
        for i, h in enumerate(over.get(phase, [])):
            check_hook(h, f"{where}.{phase}[{i}]")
    return over


def check_hook(h, where: str = "hook") -> None:
    if isinstance(h, str):
        if not h.strip():
            raise TemplateError(f"{where}: empty command")
        if h.startswith("builtin:") and h[8:] not in BUILTIN_HOOKS:
            raise TemplateError(f"{where}: unknown builtin hook {h[8:]!r} (known: {', '.join(sorted(BUILTIN_HOOKS))})")
    elif isinstance(h, list):
        if not h or not all(isinstance(x, str) for x in h):
            raise TemplateError(f"{where}: an argv hook must be a non-empty list of strings")
    else:
        raise TemplateError(f"{where}: a hook is a shell command (string), an argv list, or \"builtin:NAME\"")


def app_of(set_cfg: SetConfig) -> dict | None:
    return set_cfg.app or None


def check_image(set_cfg: SetConfig, image_dir: str, may_modify: bool = False) -> CheckResult:
    """Run the set's application check on an image materialised at `image_dir`.

    `may_modify`: the check may change or move files of the image (it is a scratch
    copy); otherwise a check that needs to write (PostgreSQL) works on a copy.
    Raises CheckUnavailable when a tool the check needs is missing on this node."""
    app = app_of(set_cfg)
    t0 = time.monotonic()
    if not app or app.get("check") is False:
        return CheckResult(True, "no application check configured", None, notes=["no application check"])
    t = get_template(app["template"])
    res = CheckResult(True, "", t.name)
    try:
        t.check(set_cfg, app, image_dir, may_modify, res)
    except (OSError, sqlite3.Error) as exc:
        _fail(res, f"check could not read the image: {exc}")
    if res.ok and not res.message:
        res.message = f"{t.name} check passed"
    res.seconds = round(time.monotonic() - t0, 3)
    return res


def _fail(res: CheckResult, msg: str) -> None:
    res.ok = False
    res.message = msg


# ------------------------------------------------------------------ TOML text
def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TemplateError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    import json

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def render_set(name: str, table: dict) -> str:
    """`[sets.NAME]` and `[sets.NAME.app]` as TOML text, ready to append to a cluster file."""
    import json

    key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
    lines = [f"[sets.{key}]"]
    for k, v in table.items():
        if k != "app":
            lines.append(f"{k} = {_toml_value(v)}")
    if "app" in table:
        lines += ["", f"[sets.{key}.app]"]
        for k, v in table["app"].items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
