"""The replication protocol: framed, typed msgpack messages over mTLS.

A frame is a 4-byte big-endian length and one msgpack map, never longer
than `MAX_FRAME`. Every map has a type `t` and exactly the fields its
schema names, with the types it names; anything else (a short read, an
oversized length, bad msgpack, an unknown type, a field of the wrong type,
a path with '..', a leading '/' or NUL) raises a `ProtocolError` and the
caller closes the connection *before writing anything*.

A connection starts with HELLO (protocol version, node id, purpose, set)
answered by WELCOME or ERROR. While open, each side sends PING when it has
sent nothing for `HEARTBEAT` seconds, so a silent peer is a dead peer: a
receive that sees nothing for `DEAD_AFTER` seconds raises `ConnectionLost`.
TCP keepalive and TCP_USER_TIMEOUT catch the same at the kernel level
(a dead peer usually looks like silence, not a reset).
"""
from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time

import msgpack

from ..errors import (
    ConnectionLost, FrameTooLarge, ProtocolError, UnsafeWirePath, VersionMismatch,
)

VERSION = 1


def _max_frame() -> int:
    """16 MiB; `PIT_MAX_FRAME` (bytes, at least 128 KiB) lowers it, for tests of the splitting code
    only: both ends of a connection must agree, and every sender sizes its frames from it."""
    v = os.environ.get("PIT_MAX_FRAME")
    return max(128 * 1024, min(int(v), 1 << 30)) if v else 16 * 1024 * 1024


MAX_FRAME = _max_frame()
MAX_PATH = 4096
HEADER = struct.Struct(">I")
HEARTBEAT = 2.0
DEAD_AFTER = 10.0
USER_TIMEOUT_MS = 15_000

NONE = type(None)
ID = "id"  # a 32-byte blob id
# type -> {field: allowed type(s)}
SCHEMA: dict[str, dict[str, object]] = {
    "hello": {"v": int, "node": str, "kind": str, "set": (str, NONE), "token": int},
    # failback (failover/handover.py): the current primary froze and made a final point on the asker;
    # the asker materialised it and sends a lease; the holder moves the key onto it in one fenced txn
    "frozen": {"points": dict, "freeze_seconds": (int, float), "demote_hooks": list},
    "take": {"lease": int},
    "abort": {"error": str},
    "handed": {"token": int},
    "welcome": {"v": int, "node": str},
    "error": {"code": str, "msg": str},
    "ping": {},
    # Merkle catch-up: directories whose listing the master wants, and the answers.
    "list": {"paths": list},
    "listing": {"dirs": list, "end": bool},
    # chunks: the master offers ids, the replica names those it lacks.
    "offer": {"ids": list},
    "need": {"ids": list},
    "chunks": {"chunks": list},
    # the leading part of one file's chunk-list ops, when they do not fit one frame with the
    # rest; the change for the same path in the next CHANGES continues them (one commit)
    "ops": {"p": bytes, "ops": list},
    "changes": {"seq": int, "changes": list},
    "ack": {"seq": int, "applied": int, "held": int, "retry": list},
    "point": {"id": int},
    "pointed": {"id": int, "snapshot": (str, NONE)},
    # a point's hook outcome, recorded on the replica's snapshot (image selection skips failed ones)
    "mark": {"snapshot": str, "ok": bool, "error": str},
    "marked": {},
    # `pit status`: one node asks another for its own status (mTLS, any cluster member)
    "status_reply": {"status": dict},
    # cluster configuration pushed by the primary
    "config": {"cfg": dict},
    "config_ack": {"version": int},
    # joining (the only exchange allowed without a client certificate)
    "ca_request": {},
    "ca": {"ca": bytes},
    "join": {"token": str, "secret": bytes, "csr": bytes, "node": str, "address": str},
    "joined": {"cert": bytes, "ca": bytes, "primary": str},
    # a database log shipped by the master's agent (stream/logship.py): what the replica has, pieces, acks
    "log_have": {"files": dict},
    "log_data": {"path": str, "offset": int, "data": bytes},
    "log_ack": {"files": dict},
    # the local control socket
    "ctl": {"cmd": str, "args": dict},
    "ctl_reply": {"ok": bool, "result": (dict, list, str, NONE), "code": int},
}
KINDS = ("repl", "config", "join", "ctl", "ping", "failback", "status", "logship")


def _no_ext(code, data):
    raise ProtocolError("msgpack extension types are not allowed")


def encode(msg: dict) -> bytes:
    head, body = encode_parts(msg)
    return head + body


def encode_parts(msg: dict) -> tuple[bytes, bytes]:
    """A frame's header and body apart: a CHUNKS frame is megabytes, and joining them was one more
    copy of every byte seeded."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"refusing to send a {len(body)}-byte frame (limit {MAX_FRAME})")
    return HEADER.pack(len(body)), body


def decode(body: bytes | bytearray) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext,
                              max_bin_len=MAX_FRAME, max_str_len=MAX_FRAME)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many kinds: all mean "malformed"
        raise ProtocolError(f"malformed frame: {type(exc).__name__}") from None
    validate(msg)
    return msg


def validate(msg) -> None:
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError("a frame must be a map with a type")
    schema = SCHEMA.get(msg["t"])
    if schema is None:
        raise ProtocolError(f"unknown message type {msg['t'][:40]!r}")
    if set(msg) - {"t"} != set(schema):
        raise ProtocolError(f"{msg['t']}: fields {sorted(set(msg) - {'t'})} do not match the schema")
    for k, typ in schema.items():
        v = msg[k]
        if isinstance(v, bool) and typ is int:
            raise ProtocolError(f"{msg['t']}.{k} has the wrong type")
        if not isinstance(v, typ):  # type: ignore[arg-type]
            raise ProtocolError(f"{msg['t']}.{k} has the wrong type")


def check_path(p) -> bytes:
    """A set-relative path as it travels: bytes, relative, no '.', '..', empty part or NUL."""
    if not isinstance(p, bytes) or not p or len(p) > MAX_PATH:
        raise UnsafeWirePath("a path on the wire must be non-empty bytes")
    if p.startswith(b"/"):
        raise UnsafeWirePath(f"absolute path {p[:80]!r} refused")
    if b"\0" in p:
        raise UnsafeWirePath("path with NUL refused")
    for part in p.split(b"/"):
        if part in (b"", b".", b".."):
            raise UnsafeWirePath(f"path {p[:80]!r} refused (empty, '.' or '..' part)")
    return p


def check_dir_path(p) -> bytes:
    """Like check_path, but b'' (the set's root) is allowed."""
    return p if p == b"" else check_path(p)


def check_id(i) -> bytes:
    if not isinstance(i, bytes) or len(i) != 32:
        raise ProtocolError("a blob id must be 32 bytes")
    return i


def tune_socket(sock: socket.socket) -> None:
    """Keepalive and TCP_USER_TIMEOUT: a vanished peer is noticed in seconds, not hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3),
                     ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS), ("TCP_NODELAY", 1)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


class Conn:
    """One framed connection. `send` is thread-safe; `recv` is for one reader thread.

    With `heartbeat`, a thread sends PING whenever nothing was sent for
    HEARTBEAT seconds, and `recv` swallows incoming PINGs."""

    def __init__(self, sock: socket.socket, peer: str = "?", heartbeat: bool = True,
                 dead_after: float = DEAD_AFTER) -> None:
        self.sock = sock
        self.peer = peer
        self.dead_after = dead_after
        self._send_lock = threading.Lock()
        self._last_send = time.monotonic()
        self.closed = False
        self.bytes_sent = 0
        self.bytes_received = 0
        sock.settimeout(dead_after)
        if heartbeat:
            threading.Thread(target=self._beat, daemon=True, name=f"pit-hb-{peer}").start()

    def _beat(self) -> None:
        while not self.closed:
            time.sleep(HEARTBEAT / 4)
            if time.monotonic() - self._last_send >= HEARTBEAT:
                try:
                    self.send({"t": "ping"})
                except Exception as exc:
                    import logging
                    logging.getLogger("pit.protocol").info("%s: heartbeat failed: %r", self.peer, exc)
                    self.close()
                    return

    def send(self, msg: dict) -> None:
        head, body = encode_parts(msg)
        with self._send_lock:
            if self.closed:
                raise ConnectionLost(f"connection to {self.peer} is closed")
            try:
                if len(body) < 65536:
                    self.sock.sendall(head + body)  # one TLS record for the small ones
                else:
                    self.sock.sendall(head)
                    self.sock.sendall(body)
            except (OSError, ssl.SSLError) as exc:
                self.close()
                raise ConnectionLost(f"{self.peer}: {exc}") from None
            self.bytes_sent += len(head) + len(body)
            self._last_send = time.monotonic()

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (tests use this to send malformed frames)."""
        with self._send_lock:
            self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytearray:
        """`n` bytes as received (not copied again into a bytes: msgpack reads a bytearray)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except socket.timeout:
                self.close()
                raise ConnectionLost(f"{self.peer} was silent for {self.dead_after:.0f} s") from None
            except (OSError, ssl.SSLError) as exc:
                self.close()
                raise ConnectionLost(f"{self.peer}: {exc}") from None
            if k == 0:
                self.close()
                raise ConnectionLost(f"{self.peer} closed the connection")
            got += k
        self.bytes_received += n
        return buf

    def recv(self, expect: str | tuple[str, ...] | None = None) -> dict:
        while True:
            (n,) = HEADER.unpack(self._read_exact(HEADER.size))
            if n > MAX_FRAME:
                self.close()
                raise FrameTooLarge(f"{self.peer} sent a {n}-byte frame (limit {MAX_FRAME})")
            try:
                msg = decode(self._read_exact(n))
            except ProtocolError:
                self.close()
                raise
            if msg["t"] == "ping":
                continue
            if msg["t"] == "error" and expect != "error" and (expect is None or "error" not in expect):
                self.close()
                raise ProtocolError(f"{self.peer}: {msg['code']}: {msg['msg']}")
            if expect is not None and msg["t"] != expect and msg["t"] not in (expect if isinstance(expect, tuple) else ()):
                self.close()
                raise ProtocolError(f"{self.peer} sent {msg['t']!r} where {expect!r} was expected")
            return msg

    def fail(self, code: str, msg: str) -> None:
        """Tell the peer why, then close (best effort)."""
        try:
            self.send({"t": "error", "code": code, "msg": msg[:500]})
        except Exception:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def hello(conn: Conn, node: str, kind: str, set_name: str | None = None, token: int = 0) -> dict:
    """`token`: the fencing token of a master acting after a failover (0: the configured master)."""
    conn.send({"t": "hello", "v": VERSION, "node": node, "kind": kind, "set": set_name, "token": int(token)})
    return conn.recv("welcome")


def accept_hello(conn: Conn, node: str) -> dict:
    """Server side of the handshake: read HELLO, refuse another version."""
    msg = conn.recv("hello")
    if msg["v"] != VERSION:
        conn.fail("version", f"protocol version {msg['v']} is not supported (this node speaks {VERSION})")
        raise VersionMismatch(f"{conn.peer} speaks protocol version {msg['v']}")
    if msg["kind"] not in KINDS:
        conn.fail("kind", "unknown connection purpose")
        raise ProtocolError(f"{conn.peer}: unknown connection purpose {msg['kind'][:40]!r}")
    return msg


def welcome(conn: Conn, node: str) -> None:
    conn.send({"t": "welcome", "v": VERSION, "node": node})
