"""What is refused before wsgidav sees a request, each with a short text
body and one log line (never a traceback, never ERROR: a refusal is the
server working, issue 15):

- a path whose bytes are not UTF-8 (`%ff`): 400 (wsgidav 4.4 raised
  UnicodeDecodeError and cheroot dropped the connection with a traceback);
- a path whose `..` climbs above the root: 400 (wsgidav sent a 400 whose
  Content-Length promised a body it never sent, so clients hung);
- a write verb on the read-only view: 405 with `Allow` (wsgidav logged each
  at ERROR and sent no `Allow`, which RFC 9110 15.5.6 requires);
- a client address that failed to log in `MAX_FAILURES` times within
  `WINDOW` seconds: 429 with `Retry-After` for `LOCK_SECONDS`, without
  running scrypt (so guessing costs the guesser time, and the server no CPU).
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("pit.serve")

READ_METHODS = ("OPTIONS", "HEAD", "GET", "PROPFIND")
ALLOW = ", ".join(READ_METHODS)
MAX_FAILURES = 10
WINDOW = 300.0
LOCK_SECONDS = 60


class Lockout:
    """Failed logins per client address; an address with too many is locked for a while."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = WINDOW,
                 lock_seconds: int = LOCK_SECONDS) -> None:
        self.max_failures, self.window, self.lock_seconds = max_failures, window, lock_seconds
        self._failures: dict[str, list[float]] = {}
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()

    def locked(self, addr: str) -> float:
        """Seconds until `addr` may try again (0: it may)."""
        now = time.monotonic()
        with self._lock:
            until = self._locked.get(addr, 0.0)
            if until and until <= now:
                del self._locked[addr]
                return 0.0
            return max(0.0, until - now)

    def failed(self, addr: str, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(addr, []) if now - t < self.window]
            recent.append(now)
            if len(recent) >= self.max_failures:
                self._failures.pop(addr, None)
                self._locked[addr] = now + self.lock_seconds
                locked = True
            else:
                self._failures[addr] = recent
                locked = False
        if locked:
            log.warning("%s failed to log in %d times (last as %r): refused for %d s", addr, self.max_failures,
                        user, self.lock_seconds)
        else:
            log.info("login failed from %s as %r", addr, user)

    def succeeded(self, addr: str) -> None:
        with self._lock:
            self._failures.pop(addr, None)


def _refuse(start_response, status: str, text: str, extra=()):
    body = (text + "\n").encode("utf-8")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            *extra])
    return [body]


def climbs_above_root(path: str) -> bool:
    depth = 0
    for seg in path.split("/"):
        if seg == "..":
            depth -= 1
            if depth < 0:
                return True
        elif seg not in ("", "."):
            depth += 1
    return False


def guard(app, lockout: Lockout, writable: tuple[str, ...] = ()):
    """WSGI middleware in front of wsgidav; `writable` are path prefixes of shares that take writes (the
    diagnostic scratch share)."""

    def wrapped(environ, start_response):
        addr = environ.get("REMOTE_ADDR", "")
        method = environ.get("REQUEST_METHOD", "")
        raw = environ.get("PATH_INFO", "")
        try:
            path = raw.encode("latin-1").decode("utf-8")
        except UnicodeError:
            log.info("refused %s from %s: the path is not UTF-8", method, addr)
            return _refuse(start_response, "400 Bad Request", "The path is not valid UTF-8.")
        if climbs_above_root(path):
            log.info("refused %s %s from %s: the path climbs above the root", method, path, addr)
            return _refuse(start_response, "400 Bad Request", "The path climbs above the root.")
        wait = lockout.locked(addr)
        if wait:
            return _refuse(start_response, "429 Too Many Requests",
                           f"Too many failed logins from {addr}: try again in {int(wait) + 1} s.",
                           [("Retry-After", str(int(wait) + 1))])
        if method not in READ_METHODS and not any(path == w or path.startswith(w + "/") for w in writable):
            log.info("refused %s %s from %s: the view is read-only", method, path, addr)
            return _refuse(start_response, "405 Method Not Allowed", "This share is read-only.",
                           [("Allow", ALLOW)])
        return app(environ, start_response)

    return wrapped
