"""A real etcd member for tests: on 127.0.0.1 (free ports) or inside a network namespace.

Always `--pre-vote` (etcd 3.4 defaults it off; without it a member that
rejoins forces an election). Stopped with SIGKILL, which also models a dead
host, and its data directory goes with the test's tmp dir.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from test_repl_helpers import free_port

ETCD = shutil.which("etcd")


class EtcdMember:
    def __init__(self, data_dir: str, host: str = "127.0.0.1", client_port: int | None = None,
                 peer_port: int | None = None, netns: str | None = None) -> None:
        self.dir = data_dir
        self.host = host
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://{host}:{self.client_port}"

    def start(self) -> "EtcdMember":
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [ETCD, "--name", "m", "--data-dir", self.dir, "--listen-client-urls", self.endpoint,
               "--advertise-client-urls", self.endpoint, "--listen-peer-urls", peer,
               "--initial-advertise-peer-urls", peer, "--initial-cluster", f"m={peer}", "--pre-vote",
               "--heartbeat-interval", "100", "--election-timeout", "1000"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(self.dir + ".log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {open(self.dir + '.log', errors='replace').read()[-2000:]}")
            try:
                if self.netns:
                    r = subprocess.run(["ip", "netns", "exec", self.netns, "python3", "-c",
                                        f"import urllib.request;urllib.request.urlopen('{self.endpoint}/health',timeout=1)"],
                                       capture_output=True)
                    if r.returncode == 0:
                        return self
                else:
                    urllib.request.urlopen(self.endpoint + "/health", timeout=1).read()
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy")

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def etcd(tmp_path):
    if not ETCD:
        pytest.skip("etcd is not installed (Debian: etcd-server; make deps installs it)")
    m = EtcdMember(str(tmp_path / "etcd")).start()
    try:
        yield m
    finally:
        m.stop()
