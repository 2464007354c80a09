"""The processes the application templates run, and PostgreSQL's own tools: how to find its binaries, run
them as its user, talk to a server with psql, start one privately on an image, and say in one line why a
command failed. Kept apart from templates.py so that the WAL streaming (pgwal.py) and the templates both use
them without importing each other.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess

from ..errors import CheckUnavailable, TemplateError


def pg_bindir(version: str | None = None) -> str | None:
    """The PostgreSQL binaries (Debian: /usr/lib/postgresql/N/bin), for `version` if given, else the newest."""
    if version:
        d = f"/usr/lib/postgresql/{version}/bin"
        return d if os.path.exists(os.path.join(d, "pg_ctl")) else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")])
    if found:
        return os.path.dirname(found[-1])
    w = shutil.which("pg_ctl")
    return os.path.dirname(w) if w else None


def as_user(argv: list[str], user: str | None) -> list[str]:
    """Run `argv` as `user` when we are root (PostgreSQL refuses to run as root)."""
    if not user or os.geteuid() != 0 or user == "root":
        return list(argv)
    runuser = shutil.which("runuser") or ("/usr/sbin/runuser" if os.path.exists("/usr/sbin/runuser") else None)
    if runuser:
        return [runuser, "-u", user, "--", *argv]
    setpriv = shutil.which("setpriv")
    if setpriv:
        pw = _pw(user)
        return [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", *argv]
    raise CheckUnavailable(f"cannot run commands as {user}: neither runuser nor setpriv is installed")


def _pw(user: str):
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise TemplateError(f"no such system user {user!r}") from None


def image_path(paths: list[str], image_dir: str, live: str) -> str:
    """Where live path `live` (under one of the set's source `paths`) is in an image
    materialised at `image_dir` (each source path is one entry named by its base name)."""
    live = os.path.normpath(live)
    for src in paths:
        src = os.path.normpath(src)
        if live == src or live.startswith(src.rstrip("/") + "/"):
            rel = os.path.relpath(live, src)
            base = os.path.join(image_dir, os.path.basename(src))
            return base if rel == "." else os.path.join(base, rel)
    raise TemplateError(f"{live} is not under any of the set's paths ({', '.join(paths)})")


def _run(argv: list[str], timeout: float, cwd: str | None = None, env: dict | None = None) -> tuple[int, str]:
    """Run a command, output (stdout+stderr) captured; killed with its process group on timeout."""
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=cwd, env=env, start_new_session=True)
    except OSError as exc:
        return 127, f"cannot run {argv[0]}: {exc.strerror}"
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(p)
        out, _ = p.communicate()
        return -9, (out or b"").decode(errors="replace") + f"\n(killed after {timeout:g} s)"
    return p.returncode, (out or b"").decode(errors="replace")


def _killpg(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _first_line(text: str, pattern: str | None = None) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if pattern:
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[0]
    return lines[-1] if lines else "(no output)"


def server_failure(text: str) -> str:
    """The line of a PostgreSQL server's log and pg_ctl's output that says why it failed: a PANIC or FATAL
    before any noise (a private configuration's empty external_pid_file is reported on stderr, harmlessly)."""
    return _first_line(text, r"PANIC|FATAL" if re.search(r"PANIC|FATAL", text) else r"could not|invalid|error")


def pg_client_argv(app: dict, sql: str | None = None) -> list[str]:
    """psql against the live server (as its OS user), one statement with `-c`, or a session without."""
    bindir = app.get("bindir") or pg_bindir() or "/usr/bin"
    argv = [os.path.join(bindir, "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(app["socket_dir"]),
            "-p", str(app["port"]), "-U", app["superuser"], "-d", app.get("dbname", "postgres")]
    if sql is not None:
        argv += ["-c", sql]
    return as_user(argv, app["os_user"]) if os.geteuid() == 0 else argv


def pg_private_config(work: str, extra: str = "") -> tuple[str, str]:
    """A server configuration of our own under `work` (-> socket directory, config file): no TCP, a private
    socket, trust for local connections only, no archiving, no preloaded libraries. A server started on an
    image with it reaches nothing and nobody reaches it (the image's own configuration may name addresses,
    ports and libraries of another machine)."""
    sock = os.path.join(work, "sock")
    os.mkdir(sock)
    conf = os.path.join(work, "pit-private.conf")
    with open(os.path.join(work, "pg_hba.conf"), "w") as f:
        f.write("local all all trust\n")
    open(os.path.join(work, "pg_ident.conf"), "w").close()
    with open(conf, "w") as f:
        f.write(f"listen_addresses = ''\nport = 5432\nunix_socket_directories = '{sock}'\n"
                f"hba_file = '{work}/pg_hba.conf'\nident_file = '{work}/pg_ident.conf'\n"
                "archive_mode = off\nshared_buffers = '32MB'\nlogging_collector = off\nssl = off\n"
                "max_wal_senders = 10\nshared_preload_libraries = ''\nexternal_pid_file = ''\n" + extra)
    return sock, conf
