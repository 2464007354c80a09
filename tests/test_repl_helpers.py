"""Fixtures for the replicator tests: a real cluster of `pit agent` processes on 127.0.0.1.

Every node gets its own state directory, agent config and (for replicas) a
repository under the test's tmp_path. Agents are real subprocesses; the
replica's repository is read from the test process read-only (LMDB allows
readers in other processes), opened and closed per look.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from store.apply import head_root
from store.objects import ObjectReader, iter_file_chunks
from store.repository import Repository
from store.snapshots import list_snapshots
from store.trees import DIR, FILE, SYMLINK

from replicator.waiting import WaitTimeout, poll_until

PIT = os.path.join(os.path.dirname(sys.executable), "pit")


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port below the kernel's ephemeral range (outgoing connections never take it), not handed out before."""
    import random

    while True:
        port = random.randint(20000, 32000)
        if port in _GIVEN:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _GIVEN.add(port)
        return port


def pit(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([PIT, *args], capture_output=True, text=True, timeout=60, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"pit {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def wait_for(pred, timeout: float = 30.0, what: str = "condition", interval: float = 0.1):
    try:
        return poll_until(pred, timeout, what, interval)
    except WaitTimeout as exc:
        raise AssertionError(str(exc)) from None


def read_tree(path: str) -> dict:
    """{relative path: bytes | 'dir' | ('link', target)} of a directory on disk."""
    out = {}
    base = os.path.dirname(path.rstrip("/"))
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, base)
        out[rel] = "dir"
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, n)
            r = os.path.join(rel, n)
            if os.path.islink(p):
                out[r] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    out[r] = f.read()
    return out


def _walk(reader, tid, prefix, out):
    for e in reader.tree(tid):
        p = (prefix + "/" if prefix else "") + e.name.decode("utf-8", "surrogateescape")
        if e.type == DIR:
            out[p] = "dir"
            if e.content:
                _walk(reader, e.content, p, out)
        elif e.type == SYMLINK:
            out[p] = ("link", e.content.decode())
        elif e.type == FILE:
            out[p] = b"".join(iter_file_chunks(reader, e))


def replica_head(repo_path: str, set_name: str) -> dict:
    repo = Repository(repo_path, readonly=True)
    try:
        with repo.reading() as txn:
            root = head_root(repo, txn, set_name)
            out = {}
            if root is not None:
                _walk(ObjectReader(repo, txn), root, "", out)
            return out
    finally:
        repo.close()


def replica_snapshots(repo_path: str, set_name: str) -> list:
    repo = Repository(repo_path, readonly=True)
    try:
        with repo.reading() as txn:
            snaps = list_snapshots(repo, txn, set_name)
            res = []
            for s in snaps:
                out = {}
                _walk(ObjectReader(repo, txn), s.root, "", out)
                res.append((s, out))
            return res
    finally:
        repo.close()


def toml_value(v) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


class Node:
    def __init__(self, cluster, name: str, replica: bool) -> None:
        self.cluster = cluster
        self.name = name
        self.dir = os.path.join(cluster.tmp, name)
        self.state = os.path.join(self.dir, "state")
        self.repo = os.path.join(self.dir, "repo") if replica else None
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = os.path.join(self.dir, "agent.toml")
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(self.dir, "agent.log")

    def write_config(self, extra: str = "") -> None:
        lines = [f'state = "{self.state}"']
        if self.repo:
            lines.append(f'repo = "{self.repo}"')
        lines.append(extra)
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self) -> None:
        env = dict(os.environ, PIT_LOG=os.environ.get("PIT_TEST_LOG", "INFO"))
        self.proc = subprocess.Popen([PIT, "agent", "--config", self.config], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: os.path.exists(os.path.join(self.state, "agent.sock")) or self.proc.poll() is not None,
                 20, f"agent {self.name} to start")
        assert self.proc.poll() is None, self.logtext()

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        try:
            os.unlink(os.path.join(self.state, "agent.sock"))
        except OSError:
            pass

    def logtext(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def ctl(self, *args, check=True):
        return pit(*args, "--config", self.config, check=check)


class Cluster:
    """A primary (the master of the sets) and N replicas, all `pit agent` processes."""

    def __init__(self, tmp: str, replicas: int = 1, sets: dict | None = None, src: str | None = None) -> None:
        self.tmp = str(tmp)
        self.primary = Node(self, "primary", replica=False)
        self.replicas = [Node(self, f"r{i + 1}", replica=True) for i in range(replicas)]
        self.src = src or os.path.join(self.tmp, "src", "data")
        os.makedirs(self.src, exist_ok=True)
        self.sets = sets if sets is not None else {"web": {"paths": [self.src], "mode": "mirror"}}
        self.cluster_file = os.path.join(self.tmp, "cluster.toml")
        # replica -> its agent file's extra lines; such a replica's repository is left for its agent to make
        self.replica_config: dict[str, str] = {}

    def write_sets(self, extra: dict | None = None) -> None:
        lines = []
        for name, s in self.sets.items():
            s = {"master": "primary", "replicas": [r.name for r in self.replicas], "debounce": 0.1,
                 "settle": 0.05, "point_quiet": 0, "rescan": 5, **s, **(extra or {})}
            lines.append(f"[sets.{name}]")
            for k, v in s.items():
                lines.append(f"{k} = {toml_value(v)}")
        with open(self.cluster_file + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(self.cluster_file + ".tmp", self.cluster_file)

    def start(self) -> "Cluster":
        p = self.primary
        os.makedirs(p.dir, exist_ok=True)
        pit("cluster", "init", "--state", p.state, "--node", "primary", "--address", p.address,
            "--join-address", f"127.0.0.1:{free_port()}")
        p.write_config(f'cluster = "{self.cluster_file}"')
        self.write_sets()
        p.start()
        for r in self.replicas:
            self.add(r)
        return self

    def add(self, r: Node, start: bool = True) -> None:
        os.makedirs(r.dir, exist_ok=True)
        token = pit("cluster", "token", "--state", self.primary.state).stdout.strip()
        pit("join", "--state", r.state, token, "--node", r.name, "--address", r.address)
        if r.name in self.replica_config:
            r.write_config(self.replica_config[r.name])
        else:
            pit("--repo", r.repo, "init")
            r.write_config()
        if start:
            r.start()

    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def stop(self) -> None:
        for n in self.nodes():
            n.kill(signal.SIGTERM)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.logtext()}" for n in self.nodes())

    def converged(self, r: Node, set_name: str = "web", src: str | None = None) -> bool:
        src = src or self.src
        want = read_tree(src)
        got = replica_head(r.repo, set_name)
        return got == want


@pytest.fixture
def cluster(tmp_path):
    """`cluster(replicas=2, ...)` makes a Cluster in the test's tmp dir; all are stopped afterwards."""
    made = []

    def make(**kw):
        c = Cluster(str(tmp_path), **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def small_frames(cluster, monkeypatch):
    """Like `cluster`, with agents whose frames are at most 128 KiB (`PIT_MAX_FRAME`): a CHANGES frame
    then holds ~64 KiB of changes, so what needs several frames takes megabytes, not gigabytes."""
    monkeypatch.setenv("PIT_MAX_FRAME", str(128 * 1024))
    return cluster


def write(path, data, mode="wb"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(data)


def set_config(table: dict, name: str = "set"):
    """A set's typed configuration (replicator.settings.SetConfig) from a cluster-file table, as the agent
    has it after loading; a table's `name` names the set, and a test that gives only paths and an app table
    gets a master and a replica filled in."""
    from replicator.settings import SetConfig, build

    t = {"master": "m", "replicas": ["r1"], **{k: v for k, v in table.items() if k != "name"}}
    return build(SetConfig, t, ("sets", table.get("name", name)))
