"""Failure checks: is the primary's service answering, is its public link up.

Each check is one probe with a timeout and returns (ok, detail). A
`Confirmer` turns probes into a verdict only after N consecutive failures,
so one lost packet or a slow page never starts a failover.
"""
from __future__ import annotations

import http.client
import os
import shlex
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass, field

from ..names import parse_address
from ..settings import Check


def probe(check: Check) -> tuple[bool, str]:
    timeout = check.timeout
    try:
        if check.kind == "tcp":
            host, port = parse_address(check.target)
            with socket.create_connection((host, port), timeout=timeout):
                return True, "connected"
        if check.kind == "http":
            return _http(check, timeout)
        if check.kind == "command":
            argv = shlex.split(check.target)
            r = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
            if r.returncode == 0:
                return True, "exit 0"
            tail = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()[-1:] or [""]
            return False, f"exit {r.returncode} {tail[0][:120]}".strip()
        if check.kind == "nic":
            try:
                with open(f"/sys/class/net/{check.target}/operstate") as f:
                    state = f.read().strip()
            except OSError:
                return False, f"no interface {check.target}"
            return state in ("up", "unknown"), f"operstate {state}"
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g} s"
    except OSError as exc:
        return False, exc.strerror or str(exc) or type(exc).__name__
    raise ValueError(f"unknown check {check!r}")


def _http(check: Check, timeout: float) -> tuple[bool, str]:
    u = urllib.parse.urlsplit(check.target)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = cls(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""))
        resp = conn.getresponse()
        body = resp.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        return False, str(exc) or type(exc).__name__
    finally:
        conn.close()
    want = check.status if check.status is not None else 200
    if resp.status != want:
        return False, f"HTTP {resp.status} (want {want})"
    text = check.text
    if text and text.encode() not in body:
        return False, f"HTTP {resp.status} without {text!r}"
    return True, f"HTTP {resp.status}"


def describe(check: Check) -> str:
    return check.name or f"{check.kind} {check.target}"


@dataclass
class Confirmer:
    """Counts consecutive failures per check; `failed()` lists the checks failing `confirm` times in a row."""

    checks: list[Check]
    confirm: int = 3
    streak: dict[int, int] = field(default_factory=dict)
    last: dict[int, str] = field(default_factory=dict)
    generation: int = 0  # a reset during a probe discards that probe's results

    def run(self) -> list[str]:
        gen = self.generation
        results = [probe(c) for c in self.checks]
        if gen == self.generation:
            for i, (ok, detail) in enumerate(results):
                self.streak[i] = 0 if ok else self.streak.get(i, 0) + 1
                self.last[i] = detail
        return self.failed()

    def reset(self) -> None:
        """Forget what was counted: evidence belongs to one holder's term, and to probes that reached it."""
        self.generation += 1
        self.streak.clear()
        self.last.clear()

    def failed(self) -> list[str]:
        return [f"{describe(c)}: {self.last.get(i, '')} ({self.streak[i]}x)"
                for i, c in enumerate(self.checks) if self.streak.get(i, 0) >= self.confirm]

    def status(self) -> list[dict]:
        return [{"check": describe(c), "ok": self.streak.get(i, 0) == 0, "failures": self.streak.get(i, 0),
                 "detail": self.last.get(i, "")} for i, c in enumerate(self.checks)]


def env_with(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}
