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

And one refusal after wsgidav has checked the login (`PerUserLimit`, placed
in wsgidav's middleware stack right after its HTTPAuthenticator, the first
point where the user is known):

- a user who already has `max_requests_per_user` requests being answered:
  503 with `Retry-After: 1`. Each answer in progress holds a worker thread
  (a download until its last byte is sent), so without this one user's
  download manager, or a sync client opening 64 streams, held every worker
  and nobody else was answered at all. A request's slot is given back when
  cheroot closes its answer (`holding`, outside wsgidav: wsgidav's own
  generators do not pass a close on to the iterable inside them), so a
  client that stops reading keeps its slot only as long as it keeps the
  worker.

Not a refusal, but here for the same reason (it must happen before wsgidav's
HTTPAuthenticator): a search whose query holds the word "logout" has its
query hidden from the authenticator, which takes any query containing it for
a request to log out and answers 401 (`?find=logout.txt` could not be
searched); `RestoreQuery`, right after the authenticator, puts it back.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from typing import Callable, Iterable

from wsgidav.mw.base_mw import BaseMiddleware

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
        hide_search_query(environ)
        return app(environ, start_response)

    return wrapped


# ----------------------------------------------------------------------------- a search for "logout"
HIDDEN_QUERY = "pit.hidden_query"  # environ: the query string kept from wsgidav's authenticator


def hide_search_query(environ: dict) -> None:
    """A search (`find=` in the query) whose query holds "logout" (wsgidav's HTTPAuthenticator takes any
    such query for a logout and answers 401, whoever asks) goes past the authenticator without its query.
    Other queries with "logout" keep wsgidav's meaning (a browser's way to drop its Basic login)."""
    qs = environ.get("QUERY_STRING", "")
    if "logout" in qs and "find" in urllib.parse.parse_qs(qs, keep_blank_values=True):
        environ[HIDDEN_QUERY] = qs
        environ["QUERY_STRING"] = ""


class RestoreQuery(BaseMiddleware):
    """wsgidav middleware right after HTTPAuthenticator: gives back the query `hide_search_query` hid."""

    def __call__(self, environ, start_response):
        if HIDDEN_QUERY in environ:
            environ["QUERY_STRING"] = environ.pop(HIDDEN_QUERY)
        return self.next_app(environ, start_response)


# ----------------------------------------------------------------------------- requests per user
SLOT = "pit.user_slot"  # environ: the `Slot` of this request (made by `holding`, filled by `PerUserLimit`)
RETRY_AFTER = 1  # seconds: a busy user's requests are short or a download; either frees a slot soon


class UserSlots:
    """Requests being answered per user (a signed-in name, or `anonymous@ADDR`)."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, who: str) -> bool:
        """One more request of `who` is being answered: False (and nothing taken) if it has `per_user` already."""
        with self._lock:
            n = self._held.get(who, 0)
            if n >= self.per_user:
                return False
            self._held[who] = n + 1
            return True

    def give_back(self, who: str) -> None:
        with self._lock:
            n = self._held.get(who, 0) - 1
            if n > 0:
                self._held[who] = n
            else:
                self._held.pop(who, None)

    def held(self, who: str) -> int:
        with self._lock:
            return self._held.get(who, 0)


class Slot:
    """The per-user slot one request holds, if any: given back exactly once, however the answer ends."""

    def __init__(self) -> None:
        self._owner: tuple[UserSlots, str] | None = None

    def hold(self, slots: UserSlots, who: str) -> None:
        self._owner = (slots, who)

    def free(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner[0].give_back(owner[1])


class _Closing:
    """An answer's iterable that runs `on_close` once the server closes it (PEP 3333: the server
    always calls `close`, after the last byte or when the client went away)."""

    def __init__(self, result: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self.result, self.on_close = result, on_close

    def __iter__(self):
        return iter(self.result)

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.on_close()


def holding(app):
    """WSGI middleware outside wsgidav: gives back the slot `PerUserLimit` took for the request when the
    server closes the answer, or when the app fails. (The slot is taken inside wsgidav, where the user is
    known, but released here: wsgidav's ErrorPrinter and the app itself are generators that drop the
    inner iterable without closing it when the client goes away mid-download.)"""

    def wrapped(environ, start_response):
        slot = environ[SLOT] = Slot()
        try:
            result = app(environ, start_response)
        except BaseException:
            slot.free()
            raise
        return _Closing(result, slot.free)

    return wrapped


class PerUserLimit(BaseMiddleware):
    """wsgidav middleware right after HTTPAuthenticator: at most `UserSlots.per_user` requests of one user
    are answered at once; past that, 503 with Retry-After and one INFO line. Counted per signed-in
    name; anonymous requests (`anonymous = true`, or OPTIONS that wsgidav lets through unsigned) per
    client address, as `anonymous@ADDR`."""

    def __init__(self, wsgidav_app, next_app, config) -> None:
        super().__init__(wsgidav_app, next_app, config)
        self.slots: UserSlots = config["pit_user_slots"]

    def __call__(self, environ, start_response):
        addr = environ.get("REMOTE_ADDR", "")
        who = environ.get("wsgidav.auth.user_name") or f"anonymous@{addr}"
        if not self.slots.take(who):
            log.info("refused %s %s from %s: %s has %d requests in progress (max_requests_per_user)",
                     environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""), addr, who,
                     self.slots.per_user)
            return _refuse(start_response, "503 Service Unavailable",
                           f"{who} has {self.slots.per_user} requests in progress already: try again in a moment.",
                           [("Retry-After", str(RETRY_AFTER))])
        slot = environ.get(SLOT)
        if slot is not None:  # `holding` gives it back
            slot.hold(self.slots, who)
            return self.next_app(environ, start_response)
        slot = Slot()  # (not behind `holding`: give it back here, as well as a generator's close allows)
        slot.hold(self.slots, who)
        try:
            result = self.next_app(environ, start_response)
        except BaseException:
            slot.free()
            raise
        return _Closing(result, slot.free)
