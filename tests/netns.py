"""Hosts made of Linux network namespaces, for multi-host replication tests.

    NetLab(n).up()  ->  <prefix>-h1 .. <prefix>-hN, each with eth0 = 10.X.Y.i/24,
                        the other end of each veth on bridge br0 in <prefix>-sw.

Nothing is added to the root namespace. The prefix is unique per test run
(`pt<pid><n>`), the subnet a private 10.x.y.0/24. Faults:

* `cut(h)` / `restore(h)`: the host's switch port down/up (a pulled cable);
* `partition(a, b)` / `heal(a, b)`: nftables drops everything between a and b;
* `loss(h, pct)` / `clear_loss(h)`: nftables drops pct % of the host's
  outgoing packets (`numgen random mod 100 < pct`); the kernel has no netem.
* `throttle(h, kbytes_per_s)` / `clear_throttle(h)`: nftables drops what the
  host sends over that rate, so TCP slows down to it (a slow link).

A dead peer never sends a reset here: only timeouts notice a fault.

`down()` kills every process still inside the lab's namespaces (by PID, from
`ip netns pids`) and deletes them; veths, bridge and nft tables go with
them. The `netlab` fixture always calls it, and skips the test when it cannot
run (not root, no `ip netns`, or nftables missing when asked for).
"""
from __future__ import annotations

import itertools
import re
import os
import shutil
import signal
import subprocess
import time

import pytest

_COUNTER = itertools.count(1)
TABLE = "pittest"


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def unavailable(nft: bool = False) -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if _run("ip", "netns", "list", check=False).returncode != 0:
        return "`ip netns` is not available"
    if nft and shutil.which("nft") is None:
        return "nftables (`nft`) is not installed (Debian package nftables)"
    return None


class NetLab:
    def __init__(self, hosts: int) -> None:
        self.n = hosts
        self.prefix = f"pt{os.getpid()}{next(_COUNTER)}"
        pid = os.getpid()
        self.net = f"10.{200 + pid % 50}.{(pid >> 6) % 250 + 1}"
        self.sw = f"{self.prefix}-sw"
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    # ----------------------------------------------------------------- names
    def ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def ip(self, i: int) -> str:
        return f"{self.net}.{i}"

    # ----------------------------------------------------------------- life
    def up(self) -> "NetLab":
        self._add_ns(self.sw)
        _run("ip", "-n", self.sw, "link", "set", "lo", "up")
        _run("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.sw, "link", "set", "br0", "up")
        for i in range(1, self.n + 1):
            h = self.ns(i)
            self._add_ns(h)
            _run("ip", "link", "add", "eth0", "netns", h, "type", "veth", "peer", "name", f"h{i}", "netns", self.sw)
            _run("ip", "-n", self.sw, "link", "set", f"h{i}", "master", "br0", "up")
            _run("ip", "-n", h, "link", "set", "lo", "up")
            _run("ip", "-n", h, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _run("ip", "-n", h, "link", "set", "eth0", "up")
        return self

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)

    def popen(self, i: int, cmd: list[str], **kw) -> subprocess.Popen:
        """Start a process inside host i (`ip netns exec` execs it: the PID is the command's)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *cmd], **kw)
        self.procs.append(p)
        return p

    def run(self, i: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(i), *cmd], **kw)

    def down(self) -> None:
        """Kill everything inside the lab, delete its namespaces. Safe to call twice."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for name in reversed(self.made):
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", name, check=False)
        self.made.clear()

    # ----------------------------------------------------------------- faults
    def cut(self, i: int) -> None:
        _run("ip", "-n", self.sw, "link", "set", f"h{i}", "down")

    def restore(self, i: int) -> None:
        _run("ip", "-n", self.sw, "link", "set", f"h{i}", "up")

    def _nft(self, i: int, script: str) -> None:
        _run("ip", "netns", "exec", self.ns(i), "nft", "-f", "-", input=script)

    def _table(self, i: int, name: str, rules_out: list[str], rules_in: list[str]) -> None:
        out = "".join(f"    {r}\n" for r in rules_out)
        inn = "".join(f"    {r}\n" for r in rules_in)
        self._nft(i, f"table inet {name} {{\n"
                     f"  chain out {{ type filter hook output priority 0; policy accept;\n{out}  }}\n"
                     f"  chain in {{ type filter hook input priority 0; policy accept;\n{inn}  }}\n}}\n")

    def _drop_table(self, i: int, name: str) -> None:
        _run("ip", "netns", "exec", self.ns(i), "nft", "delete", "table", "inet", name, check=False)

    def partition(self, a: int, b: int) -> None:
        """Drop every packet between hosts a and b (both ways, on both hosts)."""
        for x, y in ((a, b), (b, a)):
            self._table(x, f"{TABLE}_part{y}", [f"ip daddr {self.ip(y)} drop"], [f"ip saddr {self.ip(y)} drop"])

    def heal(self, a: int, b: int) -> None:
        for x, y in ((a, b), (b, a)):
            self._drop_table(x, f"{TABLE}_part{y}")

    def loss(self, i: int, pct: int) -> None:
        """Drop pct % of the packets host i sends."""
        self._drop_table(i, f"{TABLE}_loss")
        self._table(i, f"{TABLE}_loss", [f'oifname "eth0" numgen random mod 100 < {int(pct)} counter drop'], [])

    def clear_loss(self, i: int) -> None:
        self._drop_table(i, f"{TABLE}_loss")

    def throttle(self, i: int, kbytes_per_s: int) -> None:
        """Cap what host i sends at about `kbytes_per_s` (nftables `limit rate over ... drop`: TCP backs
        off to the rate), so that a big transfer is still under way when a test acts on it."""
        self._drop_table(i, f"{TABLE}_rate")
        self._table(i, f"{TABLE}_rate",
                    [f'oifname "eth0" limit rate over {int(kbytes_per_s)} kbytes/second burst 256 kbytes counter drop'],
                    [])

    def clear_throttle(self, i: int) -> None:
        self._drop_table(i, f"{TABLE}_rate")

    def dropped(self, i: int) -> int:
        """Packets the loss rule of host i has dropped so far."""
        r = _run("ip", "netns", "exec", self.ns(i), "nft", "list", "table", "inet", f"{TABLE}_loss", check=False)
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", r.stdout))

    def rules(self, i: int) -> str:
        return _run("ip", "netns", "exec", self.ns(i), "nft", "list", "ruleset").stdout


@pytest.fixture
def netlab(request):
    """netlab(n, nft=False) -> a NetLab of n hosts, torn down after the test whatever happens."""
    labs: list[NetLab] = []

    def make(hosts: int, nft: bool = False) -> NetLab:
        why = unavailable(nft)
        if why:
            pytest.skip(why)
        lab = NetLab(hosts)
        labs.append(lab)
        try:
            lab.up()
        except RuntimeError as exc:
            lab.down()
            pytest.skip(f"cannot build network namespaces here: {exc}")
        return lab

    yield make
    for lab in labs:
        lab.down()
