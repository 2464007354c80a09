"""Run etcd members for the operator: `pit etcd start | stop | status`.

etcd is Debian's `etcd-server` (3.4). Three members on three nodes by
default; one member for a demo or a test on one machine. Every member runs
with `--pre-vote` (3.4 leaves it off, and a member rejoining without it forces
an election). A member's data, pid file and log live under the node's state
directory (`<state>/etcd/`), so `pit etcd stop` finds what `start` made.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse

from ..errors import ConfigError, EtcdError


def _dir(state: str) -> str:
    return os.path.join(state, "etcd")


def _pid(state: str) -> int | None:
    try:
        with open(os.path.join(_dir(state), "etcd.pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def health(endpoint: str, timeout: float = 1.0) -> tuple[bool, str]:
    u = urllib.parse.urlsplit(endpoint if "//" in endpoint else f"http://{endpoint}")
    conn = http.client.HTTPConnection(u.hostname, u.port or 2379, timeout=timeout)
    try:
        conn.request("GET", "/health")
        body = conn.getresponse().read()
        ok = json.loads(body or b"{}").get("health") in ("true", True)
        return ok, "healthy" if ok else body.decode(errors="replace")[:200]
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, str(exc) or type(exc).__name__
    finally:
        conn.close()


def member_argv(exe: str, state: str, name: str, client_url: str, peer_url: str,
                initial_cluster: str | None = None, token: str = "pit") -> list[str]:
    """The etcd command line of this node's member: `pit etcd start` runs it in the background,
    the pit-etcd unit in the foreground (replicator/ops/service.py)."""
    for u in (client_url, peer_url):
        p = urllib.parse.urlsplit(u)
        if p.scheme not in ("http", "https") or not p.hostname or not p.port:
            raise ConfigError(f"{u!r} is not a URL like http://10.0.0.1:2379")
    d = _dir(state)
    fresh = not os.path.isdir(os.path.join(d, "data", "member"))
    return [exe, "--name", name, "--data-dir", os.path.join(d, "data"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", initial_cluster or f"{name}={peer_url}", "--initial-cluster-token", token,
            "--initial-cluster-state", "new" if fresh else "existing",
            "--pre-vote", "--heartbeat-interval", "100", "--election-timeout", "1000"]


def start(state: str, name: str, client_url: str, peer_url: str, initial_cluster: str | None = None,
          token: str = "pit", wait: float = 20.0) -> dict:
    """Start one member in the background (idempotent: a running member is left alone)."""
    exe = shutil.which("etcd")
    if not exe:
        raise ConfigError("etcd is not installed (Debian: apt-get install etcd-server)")
    cmd = member_argv(exe, state, name, client_url, peer_url, initial_cluster, token)
    cluster = initial_cluster or f"{name}={peer_url}"
    d = _dir(state)
    pid = _pid(state)
    if pid:
        return {"name": name, "pid": pid, "client": client_url, "started": False}
    os.makedirs(d, mode=0o700, exist_ok=True)
    log = open(os.path.join(d, "etcd.log"), "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    with open(os.path.join(d, "etcd.pid"), "w") as f:
        f.write(str(proc.pid))
    multi = cluster.count("=") > 1  # healthy only once a quorum of members runs
    limit = time.monotonic() + (min(wait, 3.0) if multi else wait)
    while time.monotonic() < limit:
        if proc.poll() is not None:
            tail = open(os.path.join(d, "etcd.log"), errors="replace").read()[-600:]
            raise EtcdError(f"etcd exited ({proc.returncode}): {tail.strip().splitlines()[-1] if tail else ''}")
        if health(client_url)[0]:
            return {"name": name, "pid": proc.pid, "client": client_url, "started": True, "healthy": True}
        time.sleep(0.1)
    if multi:
        return {"name": name, "pid": proc.pid, "client": client_url, "started": True, "healthy": False}
    raise EtcdError(f"etcd member {name} did not become healthy within {wait:g} s (see {d}/etcd.log)")


def stop(state: str, timeout: float = 10.0) -> bool:
    pid = _pid(state)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)  # a whole cluster stopping at once can take long: leader transfers
    except ProcessLookupError:
        pass
    try:
        os.unlink(os.path.join(_dir(state), "etcd.pid"))
    except OSError:
        pass
    return True
