"""Helpers shared by the restore-view tests (view model, versions, WebDAV, FUSE):
real repositories in temporary folders, snapshots of real files."""
from __future__ import annotations

import os
import socket
import subprocess
import time

from store.ingest import create_snapshot
from store.repository import Repository


def write(root, rel: str, data: bytes | str) -> None:
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def snap(repo: Repository, set_name: str, src: str):
    """A snapshot of `src`; its display name is unique per second, so wait a
    tick between snapshots to keep names readable in tests."""
    s = create_snapshot(repo, set_name, [src])
    return s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc=None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def stop(proc, timeout: float = 10.0) -> None:
    """Stop a server the test started: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_support_helpers_work(tmp_path):
    write(tmp_path, "a/b.txt", "x")
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"x"
