"""The HTTP(S) listener under wsgidav: cheroot, made safe against peers that
stall and clients that crowd.

Stock cheroot does the TLS handshake on its accept path with the socket's
10 s timeout, so one TCP peer that never sends a ClientHello stops every
other client from being accepted for 10 s (issue 15: with 40 such peers a
normal request timed out). It also hands a new connection to a worker at
once, and a worker reads a request's head with a per-recv timeout only, so a
peer trickling a byte every few seconds holds a worker for ever. Here:

- the accept path only accepts: a new connection waits in cheroot's selector
  (costing no worker) until it sends something, and is dropped after
  `IDLE_SECONDS` if it never does;
- the handshake runs in the worker, bounded by `request_timeout` as a
  whole (CPython's `do_handshake` keeps one deadline across its waits);
- reading a request (head and body) is bounded by `request_timeout` as a
  whole (each recv waits only until the deadline), and a client that does
  not finish in time gets 408;
- connections per client address are limited (`max_connections_per_client`),
  and so is the total (`max_connections`): over the limit a connection is
  closed at accept, before any TLS work;
- the listen backlog is deep enough for a burst of clients (cheroot's default
  of 5 drops SYNs, and each drop costs the client a 1 s retransmit);
- client disconnects (EOF in TLS, resets, broken pipes, timeouts) are one
  DEBUG line, not a traceback.
"""
from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time

from cheroot import errors as cheroot_errors
from cheroot import wsgi
from cheroot.makefile import StreamWriter
from cheroot.server import HTTPConnection
from cheroot.ssl.builtin import BuiltinSSLAdapter

log = logging.getLogger("pit.serve")

REQUEST_SECONDS = 20.0  # the default of `request_timeout`: a handshake, or reading one request
IDLE_SECONDS = 10.0  # cheroot's socket timeout: an idle keep-alive connection, one send or recv
BACKLOG = 1024
LIMIT_LOG_SECONDS = 60.0  # one warning per client address and minute when it hits a limit

# What a client that went away looks like from the server side.
DISCONNECTS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError, socket.timeout)

_current = threading.local()  # the connection a worker thread is serving (the app reads it)


class DeferredTLSAdapter(BuiltinSSLAdapter):
    """Wraps at accept without handshaking; `PitConnection` handshakes in the worker."""

    def wrap(self, sock):
        s = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return s, {"wsgi.url_scheme": "https", "HTTPS": "on"}


class _DeadlineSocket:
    """A connection's socket whose reads end at a deadline (`due`, monotonic
    seconds) when one is set: each recv waits at most until then and then
    raises the socket timeout cheroot answers with 408. (A timeout leaves the
    TLS session usable, so the 408 still reaches the client; cutting the fd
    from another thread would not.)"""

    def __init__(self, sock, idle: float) -> None:
        self._s, self.idle, self.due = sock, idle, None
        self.send, self.sendall, self.fileno = sock.send, sock.sendall, sock.fileno

    def __getattr__(self, name):
        return getattr(self._s, name)

    def settimeout(self, t) -> None:
        self.idle = t
        self._s.settimeout(t)

    def _read(self, fn, args):
        if self.due is None:
            return fn(*args)
        left = self.due - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self._s.settimeout(min(left, self.idle))
        try:
            return fn(*args)
        finally:
            self._s.settimeout(self.idle)

    def recv_into(self, *args):
        return self._read(self._s.recv_into, args)

    def recv(self, *args):
        return self._read(self._s.recv, args)


class DirectWriter(StreamWriter):
    """cheroot's socket writer without its buffer for what is written whole.

    cheroot's `BufferedWriter.write` copies every block three times (into a
    bytearray, out of it as bytes, and the rest of the bytearray forward after
    each partial send) and writes in 16 KiB pieces: for a 1 GiB GET over TLS
    that was a quarter of the worker's time. Here a write goes to the socket
    as it is (`sendall`: TLS makes its own 16 KiB records), unless something
    is already buffered (never, as cheroot uses it: every write flushes)."""

    def write(self, b, *args, **kwargs):
        if isinstance(b, str):
            raise TypeError("can't write str to binary stream")
        self._checkClosed()
        with self._write_lock:
            if self._write_buf:
                self._flush_unlocked()
            self.raw._sock.sendall(b)
        n = len(b)
        self.bytes_written += n
        return n


class Limits:
    """Open connections per client address and in total."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client, self.total = per_client, total
        self._open: dict[str, int] = {}
        self._n = 0
        self._warned: dict[str, float] = {}
        self._lock = threading.Lock()

    def admit(self, addr: str) -> str | None:
        """None if a new connection from `addr` may stay, else why not."""
        with self._lock:
            if self._n >= self.total:
                why = f"the server holds {self._n} connections (max_connections)"
            elif self._open.get(addr, 0) >= self.per_client:
                why = f"{addr} holds {self._open[addr]} connections (max_connections_per_client)"
            else:
                self._open[addr] = self._open.get(addr, 0) + 1
                self._n += 1
                return None
            now = time.monotonic()
            if now - self._warned.get(addr, -LIMIT_LOG_SECONDS) < LIMIT_LOG_SECONDS:
                return why
            self._warned[addr] = now
        log.warning("refused a connection from %s: %s", addr, why)
        return why

    def release(self, addr: str) -> None:
        with self._lock:
            left = self._open.get(addr, 0) - 1
            if left > 0:
                self._open[addr] = left
            else:
                self._open.pop(addr, None)
            self._n -= 1


class PitConnection(HTTPConnection):
    """One client connection: TLS handshake and request reading under deadlines."""

    def __init__(self, server, sock, makefile) -> None:
        self.tls = isinstance(sock, ssl.SSLSocket)
        def files(s, mode="r", bufsize=-1):
            return DirectWriter(s, mode, bufsize) if "w" in mode else makefile(s, mode, bufsize)

        super().__init__(server, _DeadlineSocket(sock, server.timeout), files)
        self.admitted = False  # counted in the server's Limits (released once, on close)
        self.seen = False  # has been in the selector once (a new connection waits there first)
        self.handshaken = not self.tls
        self.timed_out = False
        self._closed = False

    def communicate(self):
        _current.conn = self
        self.timed_out = False
        try:
            if not self.handshaken and not self._handshake():
                return False
            self.socket.due = time.monotonic() + self.server.request_timeout
            return super().communicate()
        finally:
            self.socket.due = None
            _current.conn = None

    def _handshake(self) -> bool:
        raw = self.socket._s
        raw.settimeout(self.server.request_timeout)
        try:
            raw.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.remote_addr, exc)
            return False
        finally:
            try:
                raw.settimeout(self.server.timeout)
            except OSError:
                pass
        self.handshaken = True
        env = dict(self.server.ssl_adapter.get_environ(raw))
        env.update(self.ssl_env or {})
        self.ssl_env = env
        return True

    def request_read(self) -> None:
        """The request is in: what follows (the answer) may take as long as it takes."""
        self.socket.due = None

    def _conditional_error(self, req, response):
        if response.startswith("408"):
            self.timed_out = True
            log.info("request from %s not read within %s s: answered 408", self.remote_addr,
                     self.server.request_timeout)
        try:
            super()._conditional_error(req, response)
        except OSError:
            pass  # the client is gone: nothing to tell it

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            super().close()
        except OSError:
            pass
        finally:
            if self.admitted:
                self.server.limits.release(self.remote_addr or "")


def is_disconnect(exc: BaseException | None) -> bool:
    if isinstance(exc, DISCONNECTS):
        return True
    if isinstance(exc, ssl.SSLError):
        return "EOF" in str(exc) or "shutdown" in str(exc)
    if isinstance(exc, OSError):
        return exc.args[:1] and exc.args[0] in cheroot_errors.socket_errors_to_ignore
    return False


class PitServer(wsgi.Server):
    """cheroot's WSGI server with the accept path, deadlines and limits above."""

    ConnectionClass = PitConnection

    def __init__(self, bind_addr, app, *, threads: int, max_connections_per_client: int,
                 max_connections: int, request_timeout: float = REQUEST_SECONDS,
                 server_name: str = "pitstore") -> None:
        super().__init__(bind_addr, app, numthreads=threads, server_name=server_name,
                         request_queue_size=BACKLOG, timeout=IDLE_SECONDS)
        # cheroot stops offering keep-alive once this many connections are open (silent peers count)
        self.keep_alive_conn_limit = max_connections
        self.request_timeout = request_timeout
        self.limits = Limits(max_connections_per_client, max_connections)

    def process_conn(self, conn):
        if isinstance(conn, PitConnection) and not conn.seen:
            conn.seen = True
            if self.limits.admit(conn.remote_addr or "") is not None:
                conn.close()
                return
            conn.admitted = True
            # A new connection waits in the selector (no worker) until it sends something.
            self.put_conn(conn)
            return
        super().process_conn(conn)

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        exc = sys.exc_info()[1]
        if is_disconnect(exc) or getattr(getattr(_current, "conn", None), "timed_out", False):
            log.debug("client gone: %s (%s)", msg, exc)
            return
        if traceback and exc is not None:
            log.log(level, "%s", msg, exc_info=True)
        else:
            log.log(level, "%s", msg)


def request_reading(app):
    """WSGI middleware: tells the connection when its request has been read
    (no body, the body read to its end, or the answer begun), which ends the
    request-reading deadline."""

    def wrapped(environ, start_response):
        conn = getattr(_current, "conn", None)
        if conn is None:
            return app(environ, start_response)
        length = environ.get("CONTENT_LENGTH") or "0"
        if not length.isdigit():
            length = "0"
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if length in ("", "0") and not chunked:
            conn.request_read()
        else:
            environ["wsgi.input"] = _WatchedInput(environ["wsgi.input"], conn, None if chunked else int(length))

        def answer(status, headers, exc_info=None):
            conn.request_read()
            return start_response(status, headers, exc_info)

        return app(environ, answer)

    return wrapped


class _WatchedInput:
    """wsgi.input that ends the reading deadline once the body is in (wsgidav
    reads exactly Content-Length bytes and never asks for the EOF after)."""

    def __init__(self, raw, conn: PitConnection, length: int | None) -> None:
        self.raw, self.conn, self.left = raw, conn, length

    def _seen(self, data):
        if self.left is not None:
            self.left -= len(data)
        if not data or (self.left is not None and self.left <= 0):
            self.conn.request_read()
        return data

    def read(self, *args):
        return self._seen(self.raw.read(*args))

    def readline(self, *args):
        return self._seen(self.raw.readline(*args))

    def readlines(self, *args):
        lines = self.raw.readlines(*args)
        self.conn.request_read()
        return lines

    def __iter__(self):
        return iter(self.readline, b"")
