"""Logging for the long-running commands (`pit agent`, `pit serve`), in the journal's conventions.

One line per event, always: a message or a traceback with newlines in it
has its control characters escaped (`\\n`), so a journal entry or a line of
a log file is one whole event.

Under systemd with stderr connected to the journal (JOURNAL_STREAM names the
device and inode of stderr, systemd.exec(5)), each line starts with the
`<N>` syslog priority prefix of sd-daemon(3) and has no timestamp (the
journal keeps its own), so `journalctl -p warning` filters by level.
Elsewhere (a terminal, a file) lines keep the timestamped format.

Imports only the standard library (so davserver may use it through a move
to store/ without importing replicator).
"""
from __future__ import annotations

import logging
import os
import sys

PLAIN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"

# sd-daemon(3): SD_CRIT 2, SD_ERR 3, SD_WARNING 4, SD_NOTICE 5, SD_INFO 6, SD_DEBUG 7
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    for floor, prio in _PRIORITY:
        if levelno >= floor:
            return prio
    return 7


def one_line(text: str) -> str:
    """Control characters (newlines of a traceback or a file name) escaped: one line, always."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def journal_stream(stream=None) -> bool:
    """Is `stream` (stderr) the journal's? JOURNAL_STREAM is "DEV:INODE" of the stream systemd connected;
    a stream redirected since (a child's stderr sent to a file) is not the journal any more."""
    val = os.environ.get("JOURNAL_STREAM", "")
    if not val:
        return False
    try:
        dev, ino = (int(x) for x in val.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class OneLineFormatter(logging.Formatter):
    """A record, its exception and stack as one line; with `journal`, prefixed `<N>` and no timestamp."""

    def __init__(self, journal: bool) -> None:
        super().__init__(JOURNAL_FORMAT if journal else PLAIN_FORMAT)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = one_line(super().format(record))
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def setup_logging(level: str | int = "INFO", stream=None, take_over: tuple[str, ...] = ("wsgidav",)) -> bool:
    """Send every logger's records to stderr (or `stream`), one line per event; returns whether the
    journal convention is used. Loggers in `take_over` that set up handlers of their own (wsgidav's
    `init_logging`) lose them and propagate here instead. A bad level name raises ValueError."""
    if isinstance(level, str):
        name = level.strip().upper()
        lv = logging.getLevelName(name)
        if not isinstance(lv, int):
            raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR or CRITICAL)")
        level = lv
    stream = stream or sys.stderr
    journal = journal_stream(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(journal))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in take_over:
        lg = logging.getLogger(name)
        for h in lg.handlers[:]:
            lg.removeHandler(h)
        lg.propagate = True
    return journal
