"""What every `pit` command module shares: the group class that turns errors
into one line and an exit code, opening the repository, the progress line.

It imports no command module: `cli.py` composes the group from its own
commands, `cli_maintenance.py` and `demo.py`, and those import only this.
"""
from __future__ import annotations

import os
import sys
import time
from importlib.metadata import entry_points

import click

from .errors import InvalidArgument, StoreError

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


class PitGroup(click.Group):
    """Turns every anticipated error into one line and its own exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)
        except OSError as exc:
            from .errors import translate

            # ENOSPC (DiskFull), a permission problem, a read-only file system: each its own error and code
            typed = translate(exc)
            if typed is not None:
                fail(str(typed), typed.exit_code)
            fail(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", 1)
        except click.ClickException as exc:  # a usage error of a command: one line too, exit 2
            click_error(exc)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            from .errors import translate

            # LMDB's errors for a damaged index (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, ...),
            # wherever they surface, are index damage that `pit repair` rebuilds.
            typed = translate(exc)
            if typed is not None:
                fail(str(typed), typed.exit_code)
            if os.environ.get("PIT_DEBUG"):  # a bug, not a condition we anticipated: still one line
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (set PIT_DEBUG=1 for the traceback; please report it)",
                 EXIT_INTERNAL)

    def make_context(self, info_name, args, parent=None, **extra):
        # the group's own options (`pit --bogus`) are parsed here, before invoke
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            click_error(exc)

    def list_commands(self, ctx):
        self._load_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        # Only the package that provides the command is imported: a store
        # command does not pay for importing the replicator and the views.
        if not self._plugins_loaded:
            for ep in entry_points(group="pit.commands", name=name):
                self.add_command(ep.load(), ep.name)
        return super().get_command(ctx, name)

    _plugins_loaded = False

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group="pit.commands"):
            self.add_command(ep.load(), ep.name)


def click_error(exc: click.ClickException):
    """click's usage errors (unknown option, missing or bad argument) as pit's own: one line on stderr
    naming where help is, and click's exit code (2 for usage)."""
    msg = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError):
        where = ctx.command_path if ctx is not None else "pit"
        where = "pit" + where[len(ctx.find_root().info_name):] if ctx is not None and ctx.find_root().info_name \
            else where
        msg = f"usage: {msg} (see `{where} --help`)"
    fail(msg, exc.exit_code)


def one_line(msg: str) -> str:
    """Control characters (a file name with a newline) are escaped: one line, always."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in msg)


def fail(msg: str, code: int):
    click.echo(f"pit: error: {one_line(msg)}", err=True)
    sys.exit(code)


PROGRESS_MODES = ("auto", "text", "json", "none")


def progress_mode(json_lines: bool = False) -> str:
    """How a long command shows progress: "text" (a status line on stderr, when stdout and stderr are
    a terminal), "json" (one JSON object a line on stderr, for tools: with --json when stderr is not a
    terminal) or "none". PIT_PROGRESS=text|json|none overrides the choice."""
    mode = os.environ.get("PIT_PROGRESS", "auto").strip().lower()
    if mode in ("text", "json", "none"):
        return mode
    if sys.stderr.isatty() and sys.stdout.isatty():
        return "text"
    if json_lines and not sys.stderr.isatty():
        return "json"
    return "none"


def progress_enabled() -> bool:
    return progress_mode() == "text"


class StatusLine:
    """Progress of a long command: a one-line display on a terminal, JSON lines for tools (`--json`,
    stderr not a terminal: at most one a second, the first after a second), silent otherwise.

    `show(text, **fields)`: `text` for people, `fields` (counts, bytes) for the JSON line, which also
    carries `"progress": OP` and `"elapsed"` seconds. Text updates are drawn at most 5 times a second."""

    def __init__(self, op: str = "", json_lines: bool = False) -> None:
        self.mode = progress_mode(json_lines)
        self.on = self.mode == "text"
        self.op = op
        self.t0 = time.monotonic()
        self._last = 0.0
        self._shown = False

    def show(self, text: str, force: bool = False, **fields) -> None:
        if self.mode == "none":
            return
        now = time.monotonic()
        if self.mode == "text":
            if force or now - self._last >= 0.2:
                self._last = now
                self._shown = True
                click.echo("\r\033[K" + one_line(text), nl=False, err=True)
            return
        if now - self.t0 >= 1.0 and (force or now - self._last >= 1.0):
            import json

            self._last = now
            click.echo(json.dumps({"progress": self.op, "elapsed": round(now - self.t0, 1), **fields}), err=True)

    def done(self) -> None:
        if self.on and self._shown:
            click.echo("\r\033[K", nl=False, err=True)


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def key_source(ctx, confirm: bool = False):
    """Where an encrypted repository's key comes from: --key-file (PIT_KEY_FILE),
    PIT_PASSWORD or --password-file (PIT_PASSWORD_FILE), else a prompt when a
    person is at the terminal (`confirm`: asked twice, for a new passphrase)."""
    from .keys import KeySource, read_password_file

    obj = ctx.find_root().obj or {}
    pw = os.environ.get("PIT_PASSWORD")
    if pw is None and obj.get("password_file"):
        pw = read_password_file(obj["password_file"])
    prompt = None
    if sys.stdin.isatty():
        def prompt() -> str:
            return click.prompt("repository passphrase", hide_input=True, confirmation_prompt=confirm,
                                err=True)
    return KeySource(passphrase=pw, key_file=obj.get("key_file") or None, prompt=prompt)


def open_repo(ctx, readonly: bool = False, lock_wait: float = 10.0):
    from .repository import Repository

    repo_path = ctx.obj["repo"]
    if not repo_path:
        raise InvalidArgument("no repository given: use --repo PATH or set PIT_REPO")
    repo = Repository(repo_path, readonly=readonly, lock_wait=lock_wait, keys=key_source(ctx))
    ctx.call_on_close(repo.close)
    return repo
