"""The quickstart (docs/quickstart.md) run as written, on three network namespaces (issue 8).

The fenced blocks under the page's "### A", "### B" and "### C" headings are
taken from the markdown and run, whole, with `bash -e -o pipefail`, each on
its own node; so the page and this script cannot drift. The only edits are
substitutions printed at the start: the page's addresses 10.0.0.x become the
lab's 10.252.0.x, TOKEN-FROM-A becomes the token A's block printed, and (only
when PostgreSQL is not installed) the `postgresql` template line becomes the
`sqlite` one.

The lab (root only; nothing outside what it creates is touched):

* network: one namespace per node (A 10.252.0.1, B .2, C .3) plus an office
  PC (.10) for the mapped-drive check, each with a veth to a bridge in a
  switch namespace, as tests/netns.py builds them. Nothing is added to the
  root namespace, so the subnet cannot clash with anything.
* files: each node has one private mount namespace (kept by a `sleep`
  holder; every command of the node enters it with nsenter) where /etc and
  /var are overlays over the machine's own, whose changes go to the lab's
  directory. So `/etc/pit`, `/var/lib/pit`, `/var/www/shop` and the
  PostgreSQL data directory are the paths the page names, one copy per node,
  and the page's commands run unchanged. /opt/pitstore is this checkout
  (read-only), /run/postgresql and /run/systemd are per node.
* `make -C /opt/pitstore install` (the "every node" block) is NOT run: its
  work (venv, Debian packages, /usr/local/bin/pit) is what this checkout's
  venv already is; the nodes get that venv's `pit` on their PATH instead.
* systemd: there is none here. `pit install-service` runs for real: it
  writes its units into the node's /etc/systemd/system and, because the
  node's /run/systemd/system exists, calls `systemctl daemon-reload` and
  `systemctl enable --now ...`. The `systemctl` on the node's PATH is the
  stand-in at the end of this file: it reads the unit file install-service
  wrote and starts its ExecStart (with its Environment= and User=) in the
  background (a Type=forking unit: waits for ExecStart, then follows its
  PIDFile), without the unit's sandboxing and without Restart=. So the
  agents and `pit serve` that run are the real processes the units name; a
  unit that does not exist fails as systemctl would.
* the machines before the quickstart: A runs the shop (a web site in
  /var/www/shop served on port 80 by a `python -m http.server` standing in
  for nginx, and PostgreSQL: Debian's cluster 15/main, or one made with
  initdb, started by `pg_ctl start -w` as pg_ctlcluster does, with a small
  sales table; both as `nginx`/`postgresql` units of the stand-in); B has the same two units
  installed but stopped (the takeover hook starts them). This is set up
  before the clock starts.

Timed: from A's first command to "protected": `pit status` (asked on A) shows
the three nodes, A's links to B and C up, a snapshot of every set on B and on
C, and B's failover standing by (A holds the leader key). B and C run their blocks at the same
time (three machines, three terminals); the lab waits for A's join port
before starting them. Then the page's "Check it" block runs (each line on
the node its comment names), the WebDAV view on C is read from the office
PC with curl, alice's password and the certificate C made, and (unless
--no-failover) A dies (every process in it killed, its cable pulled): B
must take over, start PostgreSQL on the promoted image and answer with the
sales table, and serve the shop. Then issue 14's scenario, as
docs/operators.md's runbooks say, while a client inserts ids into the
database of whichever node serves it: A is powered on again (cable back,
its disks as they were, what `systemctl enable` linked started as at boot,
its etcd member by the page's own command), comes back fenced and catches
up; `pit failback` on A; a partition between A and B, healed (no failover
may follow); `auto = false` and back pushed from A (no new term). Every
acknowledged id must be in A's database at the end.

    .venv/bin/python bench/quickstart.py [--no-failover] [--keep] [--json FILE]   # as root
    .venv/bin/python bench/quickstart.py count     # lines and commands per node, from the page
    .venv/bin/python bench/quickstart.py down      # remove labs left by --keep or a killed run

Everything the lab made (processes, namespaces, mount namespaces, the lab
directory) is removed at the end, also on failure, Ctrl-C or SIGTERM; a lab
whose process was SIGKILLed is removed by the next run (or `down`). Figures:
docs/benchmarks.md, "Quickstart on namespaces (issue 8)".
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "quickstart.md")
NET = "10.252.0"
HOSTS = {"a": 1, "b": 2, "c": 3, "pc": 10}
NODES = ("a", "b", "c")
PREFIX = "pitqs"
DIR_PREFIX = "pit-quickstart-"
MAX_COMMANDS = 6  # issue 8: shell commands per node after the install


# =============================================================================== the page
def doc_blocks(text: str) -> dict[str, str]:
    """The first fenced block under each `### ` heading, keyed "install" (On every node), "A", "B", "C"
    (the heading starts with the node's letter and a comma) and "check" (Check it); A's second block, the
    database's replication access, as "A.db"."""
    out: dict[str, str] = {}
    heading = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("### "):
            heading = ln[4:].strip()
        elif ln.startswith("```") and heading is not None:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if j == len(lines):
                raise ValueError(f"unclosed code block under '### {heading}'")
            m = re.match(r"([A-Z]),", heading)
            key = m.group(1) if m else "install" if heading.lower().startswith("on every node") else \
                "check" if heading.lower().startswith("check") else None
            if key and key not in out:
                out[key] = "\n".join(lines[i + 1:j]) + "\n"
            elif key == "A" and "A.db" not in out:
                # A's second block: its PostgreSQL lets B and C in for replication (the WAL they stream)
                out["A.db"] = "\n".join(lines[i + 1:j]) + "\n"
            if key != "A":
                heading = None
            i = j
        i += 1
    missing = {"install", "A", "B", "C", "check"} - set(out)
    if missing:
        raise ValueError(f"{DOC}: no code block for {sorted(missing)} (headings '### A, ...', '### On every node', "
                         "'### Check it')")
    return out


_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


def entries(block: str) -> list[str]:
    """What an operator types, one entry per command line: a line continued with a backslash and a
    here-document's body belong to the line that starts them; blank lines and comments are not entries."""
    out: list[str] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not ln.strip() or ln.lstrip().startswith("#"):
            i += 1
            continue
        cur = [ln]
        while cur[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            cur.append(lines[i])
        for m in _HEREDOC.finditer(" ".join(cur)):
            end = m.group(2)
            while i + 1 < len(lines):
                i += 1
                cur.append(lines[i])
                if lines[i].strip() == end:
                    break
            else:
                raise ValueError(f"here-document {end} not closed in: {cur[0]}")
        out.append("\n".join(cur))
        i += 1
    return out


def commands_in(entry: str) -> int:
    """Shell commands in one entry: the entry's command line (not its here-document body) split on
    `&&`, `||` and `;` outside quotes and comments. A pipeline counts as one."""
    first: list[str] = []
    for ln in entry.splitlines():
        first.append(ln.rstrip().rstrip("\\"))
        if not ln.rstrip().endswith("\\"):
            break
    lex = shlex.shlex(" ".join(first), posix=True, punctuation_chars=True)
    lex.commenters = "#"
    lex.whitespace_split = True
    return 1 + sum(1 for tok in lex if tok in ("&&", "||", ";"))


def count(blocks: dict[str, str]) -> dict[str, dict]:
    """{node: {"entries": n, "commands": m}} for the install, A, B and C blocks."""
    out = {}
    for k in ("install", "A", "B", "C"):
        es = entries(blocks[k])
        out[k] = {"entries": len(es), "commands": sum(commands_in(e) for e in es)}
    return out


def adapt(block: str, token: str | None = None, sqlite: bool = False) -> tuple[str, list[str]]:
    """The block with the lab's substitutions, and what was substituted."""
    subs = []
    new = re.sub(r"\b10\.0\.0\.(\d+)\b", lambda m: f"{NET}.{m.group(1)}", block)
    if new != block:
        subs.append(f"10.0.0.x -> {NET}.x")
    if "TOKEN-FROM-A" in new:
        if not token:
            raise ValueError("this block needs A's token")
        new = new.replace("TOKEN-FROM-A", token)
        subs.append("TOKEN-FROM-A -> the token A printed")
    if sqlite:
        pg = "--template postgresql --path /var/lib/postgresql/15/main"
        if pg in new:
            new = new.replace(pg, "--template sqlite --path /var/lib/shop/sales.db")
            subs.append("PostgreSQL is not installed: the sales set uses the sqlite template on /var/lib/shop/sales.db")
    return new, subs


# =============================================================================== the lab
def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip() or r.returncode}")
    return r


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")])
    return os.path.dirname(found[-1]) if found else None


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the namespace lab needs root"
    for tool in ("ip", "nsenter", "unshare", "curl", "etcd", "mount"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    if _run("ip", "netns", "list", check=False).returncode != 0:
        return "`ip netns` is not available"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlay file system"
    for d in ("/etc", "/var", "/opt", "/run/postgresql", "/run/systemd"):
        if not os.path.isdir(d) or os.path.islink(d):
            return f"{d} is not a directory here (the lab mounts over it inside its namespaces)"
    return None


HOLDER = r"""
set -e
lab=$1 node=$2 src=$3
for d in etc var; do
  mkdir -p "$lab/$node/up/$d" "$lab/$node/work/$d"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$lab/$node/up/$d,workdir=$lab/$node/work/$d" "/$d"
done
mount -t tmpfs -o mode=0755 lab-systemd /run/systemd
mkdir -p /run/systemd/system /run/systemd/lab
mkdir -p "$lab/$node/run-postgresql"
chown postgres:postgres "$lab/$node/run-postgresql" 2>/dev/null || true
chmod 2775 "$lab/$node/run-postgresql"
mount --bind "$lab/$node/run-postgresql" /run/postgresql
mount -t tmpfs -o mode=0755 lab-opt /opt
mkdir /opt/pitstore
mount --bind "$src" /opt/pitstore
mount -o remount,bind,ro /opt/pitstore
hostname "$node"
touch "$lab/$node/ready"
exec sleep infinity
"""


class Lab:
    def __init__(self, keep: bool = False, log=print) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir="/tmp")
        os.chmod(self.dir, 0o755)  # postgres (a node's database) reaches its socket directory through it
        self.made: list[str] = []
        self.holders: dict[str, subprocess.Popen] = {}
        self.keep = keep
        self.log = log
        self.bin = os.path.join(self.dir, "bin")
        venv_bin = os.path.dirname(sys.executable)
        self.path = ":".join([self.bin, venv_bin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                              "/sbin", "/bin"])

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def ip(self, host: str) -> str:
        return f"{NET}.{HOSTS[host]}"

    # ------------------------------------------------------------------ up
    def up(self) -> None:
        os.makedirs(self.bin)
        with open(os.path.join(self.bin, "systemctl"), "w") as f:
            f.write(f"#!/bin/sh\n# the lab's stand-in for systemctl (bench/quickstart.py)\n"
                    f"exec {shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} systemctl \"$@\"\n")
        os.chmod(os.path.join(self.bin, "systemctl"), 0o755)
        sw = self.ns("sw")
        self._add_ns(sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for host in HOSTS:
            ns = self.ns(host)
            self._add_ns(ns)
            _run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p-{host}", "netns", sw)
            _run("ip", "-n", sw, "link", "set", f"p-{host}", "master", "br0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
        for node in NODES:
            os.makedirs(os.path.join(self.dir, node))
            self._hold(node)
        for node in NODES:
            self._held(node)

    def _hold(self, node: str) -> None:
        """The node's mount namespace (its /etc and /var overlays, kept in the lab directory across a power
        loss, and a fresh /run)."""
        try:
            os.unlink(os.path.join(self.dir, node, "ready"))
        except FileNotFoundError:
            pass
        err = open(os.path.join(self.dir, node, "holder.err"), "w")
        self.holders[node] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(node), "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", HOLDER, "holder", self.dir, node, ROOT],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        err.close()

    def _held(self, node: str) -> None:
        deadline = time.monotonic() + 20
        p = self.holders[node]
        while not os.path.exists(os.path.join(self.dir, node, "ready")):
            if p.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.dir, node, "holder.err")) as f:
                    raise RuntimeError(f"node {node}'s mount namespace: {f.read().strip() or 'timed out'}")
            time.sleep(0.02)

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)

    # ------------------------------------------------------------------ running things
    def env(self) -> list[str]:
        env = [f"PATH={self.path}", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb"]
        if os.environ.get("PYTHONPATH"):  # a pinned source tree (see docs/benchmarks.md, "How to run")
            env.append(f"PYTHONPATH={os.environ['PYTHONPATH']}")
        return env

    def argv(self, node: str, script: str) -> list[str]:
        """bash -e running `script` on a node: its network, its mount namespace, its host name, no terminal."""
        if node in self.holders:
            enter = ["nsenter", "-t", str(self.holders[node].pid), "-m", "-u", "-n", "--wd=/root", "--"]
        else:
            enter = ["ip", "netns", "exec", self.ns(node)]
        return [*enter, "env", "-i", *self.env(), "bash", "-e", "-o", "pipefail", "-c", script]

    def run(self, node: str, script: str, input: str | None = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(node, script), input=input if input is not None else "", capture_output=True,
                           text=True, timeout=timeout, start_new_session=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"on {node.upper()} (exit {r.returncode}):\n{script.strip()}\n--- stdout\n"
                               f"{r.stdout.strip()}\n--- stderr\n{r.stderr.strip()}")
        return r

    def upper(self, node: str, path: str) -> str:
        """Where a file a node wrote under /etc or /var is kept (its overlay's upper directory)."""
        return os.path.join(self.dir, node, "up", path.lstrip("/"))

    def wait(self, what: str, pred, timeout: float, interval: float = 0.25):
        from replicator.waiting import WaitTimeout, poll_until

        try:
            return poll_until(pred, timeout, what, interval)
        except WaitTimeout as exc:
            raise RuntimeError(str(exc)) from None

    def kill_host(self, host: str) -> None:
        """Every process in the host's network namespace, at once (the machine loses power)."""
        for _ in range(50):
            pids = _run("ip", "netns", "pids", self.ns(host), check=False).stdout.split()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.1)

    def cut(self, host: str) -> None:
        _run("ip", "-n", self.ns("sw"), "link", "set", f"p-{host}", "down")

    def power_on(self, node: str) -> None:
        """The machine after `kill_host` and `cut`: its cable back, its disks as they were (the overlays), a
        fresh /run, and what systemd starts at boot (the units `enable` linked)."""
        _run("ip", "-n", self.ns("sw"), "link", "set", f"p-{node}", "up")
        self._hold(node)
        self._held(node)
        self.run(node, "systemctl lab-boot")

    def partition(self, a: str, b: str) -> None:
        """nftables in both hosts drops everything between them."""
        for x, y in ((a, b), (b, a)):
            _run("ip", "netns", "exec", self.ns(x), "nft", "-f", "-", input=(
                f"table inet lab_part {{\n"
                f"  chain out {{ type filter hook output priority 0; policy accept; ip daddr {self.ip(y)} drop; }}\n"
                f"  chain in {{ type filter hook input priority 0; policy accept; ip saddr {self.ip(y)} drop; }}\n"
                f"}}\n"))

    def heal(self, a: str, b: str) -> None:
        for x in (a, b):
            _run("ip", "netns", "exec", self.ns(x), "nft", "delete", "table", "inet", "lab_part", check=False)

    # ------------------------------------------------------------------ down
    def down(self) -> None:
        if self.keep:
            self.log(f"kept: namespaces {', '.join(self.made)}; {self.dir} (remove with `{sys.argv[0]} down`)")
            return
        for name in reversed(self.made):
            self.kill_host(name[len(self.prefix) + 1:])
        for p in self.holders.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.made):
            _run("ip", "netns", "del", name, check=False)
        self.made.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def down_stale(log=print) -> int:
    """Remove the labs whose process is gone (a --keep run, or a killed one): what runs in their
    namespaces, the namespaces, their directories. Only names this script makes; a running lab is left alone."""
    gone = 0
    names = _run("ip", "netns", "list", check=False).stdout.split("\n")
    labs: dict[int, list[str]] = {}
    for ln in names:
        m = re.match(rf"^({PREFIX}(\d+)-(?:sw|a|b|c|pc))\b", ln.strip())
        if m:
            labs.setdefault(int(m.group(2)), []).append(m.group(1))
    for d in glob.glob(f"/tmp/{DIR_PREFIX}*-*"):
        m = re.match(rf"^{DIR_PREFIX}(\d+)-", os.path.basename(d))
        if m:
            labs.setdefault(int(m.group(1)), [])
    for pid, nss in labs.items():
        if pid != os.getpid() and os.path.exists(f"/proc/{pid}"):
            continue
        for ns in nss:
            for _ in range(50):
                pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
                if not pids:
                    break
                for p in pids:
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.1)
        for ns in nss:
            _run("ip", "netns", "del", ns, check=False)
        for d in glob.glob(f"/tmp/{DIR_PREFIX}{pid}-*"):
            shutil.rmtree(d, ignore_errors=True)
        gone += 1
        log(f"removed lab {pid}: {len(nss)} namespaces")
    return gone


# =============================================================================== the machines before the quickstart
SHOP_FILES = {"index.html": "<h1>The Bakery</h1><p>Welcome</p>\n",
              "prices.html": "<ul><li>Baguette 2.30</li><li>Croissant 1.50</li></ul>\n",
              "img/logo.svg": "<svg xmlns='http://www.w3.org/2000/svg'><circle r='4'/></svg>\n"}

NGINX_UNIT = """[Unit]
Description=the shop's web site (the lab's stand-in for nginx: python -m http.server on port 80)
[Service]
Type=simple
ExecStart={py} -m http.server 80 --directory /var/www/shop
[Install]
WantedBy=multi-user.target
"""

PG_UNIT = """[Unit]
Description=PostgreSQL {ver} main (the lab's unit: pg_ctl start -w, as pg_ctlcluster does for Debian's unit)
[Service]
Type=forking
User=postgres
PIDFile=/var/lib/postgresql/15/main/postmaster.pid
ExecStart={bin}/pg_ctl start -w -t 120 -s -D /var/lib/postgresql/15/main -l /var/log/postgresql/lab-15-main.log -o "{conf}"
[Install]
WantedBy=multi-user.target
"""

DEBIAN_CLUSTER = "/etc/postgresql/15/main/postgresql.conf"


def prepare(lab: Lab, pg: str | None) -> dict:
    """A runs the shop (web site, database); B has the same services installed, stopped."""
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    units = "mkdir -p /etc/systemd/system\n" \
            f"cat > /etc/systemd/system/nginx.service <<'EOT'\n{NGINX_UNIT.format(py=py)}EOT\n"
    # Debian's postgresql package makes the cluster 15/main (data in /var/lib/postgresql/15/main, settings in
    # /etc/postgresql/15/main): each node sees its own copy through its overlays. Without it, initdb makes one.
    debian = bool(pg) and os.path.exists(DEBIAN_CLUSTER) and os.path.exists("/var/lib/postgresql/15/main/PG_VERSION")
    if pg:
        ver = os.path.basename(os.path.dirname(pg))
        conf = f"-c config_file={DEBIAN_CLUSTER}" if debian else \
            "-c listen_addresses=localhost -k /var/run/postgresql -p 5432"
        units += "mkdir -p /var/log/postgresql && chown postgres:postgres /var/log/postgresql\n"
        unit = PG_UNIT.format(bin=pg, ver=ver, conf=conf)
        units += f"cat > /etc/systemd/system/postgresql.service <<'EOT'\n{unit}EOT\n"
    lab.run("b", units)
    site = "".join(f"mkdir -p $(dirname /var/www/shop/{p}) && printf '%s' {shlex.quote(t)} > /var/www/shop/{p}\n"
                   for p, t in SHOP_FILES.items())
    if pg:
        initdb = "" if debian else f"""
mkdir -p /var/lib/postgresql/15/main
chown -R postgres:postgres /var/lib/postgresql/15
chmod 700 /var/lib/postgresql/15/main
runuser -u postgres -- {pg}/initdb -D /var/lib/postgresql/15/main -U postgres --auth-local=peer \\
    --auth-host=scram-sha-256 --no-sync >/dev/null
"""
        db = f"""
cd /   # postgres cannot read root's home
{initdb}
systemctl start postgresql
for i in $(seq 100); do {pg}/pg_isready -q -h /var/run/postgresql -p 5432 && break; sleep 0.1; done
runuser -u postgres -- {pg}/psql -X -q -h /var/run/postgresql -v ON_ERROR_STOP=1 -c \\
  "create table sales (day date, item text, amount numeric);
   insert into sales select date '2026-11-01' + (i % 25), 'bread', 2.30 from generate_series(1, 500) i;"
"""
    else:
        db = """
mkdir -p /var/lib/shop
python3 -c "import sqlite3; d = sqlite3.connect('/var/lib/shop/sales.db'); \\
d.execute('create table sales (day text, item text, amount real)'); \\
d.executemany('insert into sales values (?, ?, ?)', [('2026-11-01', 'bread', 2.3)] * 500); d.commit()"
"""
    lab.run("a", units + site + "systemctl start nginx\n" + db)
    lab.wait("the shop's web site on A", lambda: lab.run(
        "pc", f"curl -sf -o /dev/null http://{lab.ip('a')}/", check=False).returncode == 0, 20, 0.1)
    return {"database": ("PostgreSQL (Debian's cluster 15/main)" if debian else "PostgreSQL (initdb)") if pg
            else "sqlite"}


# =============================================================================== the run
def status(lab: Lab, node: str = "a") -> dict:
    r = lab.run(node, "pit status --json --config /etc/pit/agent.toml", check=False, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def protected(st: dict, sets: list[str]) -> bool | str:
    """True once every node answers, A's links to B and C are up (a scheduled set: its first run made), B and C
    hold a snapshot of every set, B stands by and A holds the leader key."""
    nodes = st.get("nodes") or {}
    if set(nodes) != set(NODES) or any("error" in n for n in nodes.values()):
        return False
    for r in ("b", "c"):
        for s in sets:
            if (nodes[r].get("sets", {}).get(s) or {}).get("snapshots", 0) < 1:
                return False
    for name, s in (nodes["a"].get("sets") or {}).items():  # every link up (a scheduled set: its first run done)
        for rs in (s.get("replicas") or {}).values():
            if rs.get("last_error") or not (rs.get("runs", 0) >= 1 if s.get("schedule") else rs.get("connected")):
                return False
    fa, fb = nodes["a"].get("failover") or {}, nodes["b"].get("failover") or {}
    return st.get("leader") == "a" and fa.get("phase") == "active" and fb.get("phase") == "standby"


def check_lines(block: str) -> list[tuple[list[str], str]]:
    """The "Check it" block: (nodes, command) per entry; the comment says where ("# on B", "# on any node",
    "# on every node"; no comment: A)."""
    out = []
    for e in entries(block):
        cmd, _, comment = e.partition("#")
        m = re.search(r"\bon (any node|every node|[ABC])\b", comment)
        where = (list(NODES) if m.group(1) in ("any node", "every node") else [m.group(1).lower()]) if m else ["a"]
        out.append((where, cmd.strip()))
    return out


def show(node: str, script: str, out: str) -> None:
    """A block as it ran (after the substitutions) and what it printed."""
    print(f"--- on {node.upper()}:")
    for ln in script.rstrip().splitlines():
        print(f"  {node.upper()}$ {ln}")
    for ln in out.rstrip().splitlines():
        print(f"    {ln}")


def main_run(args) -> dict:
    log = print
    with open(DOC) as f:
        blocks = doc_blocks(f.read())
    counted = count(blocks)
    pg = pg_bin()
    lab = Lab(keep=args.keep, log=log)
    report: dict = {"doc": os.path.relpath(DOC, ROOT), "commands": counted, "net": f"{NET}.0/24",
                    "database": "postgresql" if pg else "sqlite", "steps": {}}
    t_all = time.monotonic()
    try:
        lab.up()
        report["steps"]["lab up"] = round(time.monotonic() - t_all, 2)
        t = time.monotonic()
        report["database"] = prepare(lab, pg)["database"]
        report["steps"]["the shop on A (before the quickstart)"] = round(time.monotonic() - t, 2)
        log(f"lab {lab.prefix}: A {lab.ip('a')}, B {lab.ip('b')}, C {lab.ip('c')}, office PC {lab.ip('pc')}; "
            f"{lab.dir}; database {report['database']}")
        log(f"skipped: the 'On every node' block ({blocks['install'].strip()}): this checkout's venv is on the nodes' "
            "PATH instead")

        # ---------------------------------------------------------- the clock starts
        t0 = time.monotonic()
        a_script, subs = adapt(blocks["A"], sqlite=not pg)
        log("substitutions: " + "; ".join(subs))
        ra = lab.run("a", a_script)
        show("a", a_script, ra.stdout)
        tokens = re.findall(r"PIT1\.[A-Za-z0-9_-]+", ra.stdout)
        if not tokens:
            raise RuntimeError(f"A's block printed no join token:\n{ra.stdout}")
        token = tokens[-1]
        report["steps"]["A's block"] = round(time.monotonic() - t0, 2)
        if pg and "A.db" in blocks:  # the page's pg_hba.conf block: B's and C's WAL receivers get in
            t = time.monotonic()
            db_script, _ = adapt(blocks["A.db"])
            rd = lab.run("a", db_script)
            show("a", db_script, rd.stdout)
            report["steps"]["A's database block (replication access)"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        # A's join listener (seen from inside A, so that no probe shows up in its log as a refused join)
        lab.wait("A's join port", lambda: lab.run(
            "a", "ss -Hltn 'sport = :7401' | grep -q .", check=False, timeout=10).returncode == 0, 60, 0.1)
        report["steps"]["A's agent listening"] = round(time.monotonic() - t, 2)

        password = secrets.token_urlsafe(12)
        results: dict[str, object] = {}
        outputs: dict[str, tuple[str, str]] = {}

        def node_block(node: str) -> None:
            t1 = time.monotonic()
            try:
                script, _ = adapt(blocks[node.upper()], token=token, sqlite=not pg)
                # C's block asks for alice's password twice (pit passwd), read here from standard input
                r = lab.run(node, script, input=f"{password}\n{password}\n" if node == "c" else "")
                results[node] = round(time.monotonic() - t1, 2)
                outputs[node] = (script, r.stdout)
            except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
                results[node] = exc

        t = time.monotonic()
        threads = [threading.Thread(target=node_block, args=(n,)) for n in ("b", "c")]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for n in ("b", "c"):
            if isinstance(results[n], BaseException):
                raise RuntimeError(f"{n.upper()}'s block failed: {results[n]}")
            report["steps"][f"{n.upper()}'s block (B and C at once)"] = results[n]
            show(n, *outputs[n])
        t = time.monotonic()
        cluster = open(lab.upper("a", "/etc/pit/cluster.toml")).read()
        sets = re.findall(r"^\[sets\.([A-Za-z0-9_.-]+)\]", cluster, re.M)
        sets = sorted({s.split(".")[0] for s in sets})
        st = lab.wait("protected: 3 nodes, a snapshot of every set on B and C, failover armed",
                      lambda: (lambda s: s if protected(s, sets) else None)(status(lab)), args.timeout)
        report["steps"]["until protected"] = round(time.monotonic() - t, 2)
        report["protected_seconds"] = round(time.monotonic() - t0, 2)
        report["sets"] = sets
        report["snapshots"] = {r: {s: st["nodes"][r]["sets"][s]["snapshots"] for s in sets} for r in ("b", "c")}
        log(f"PROTECTED {report['protected_seconds']:.1f} s after A's first command "
            f"(sets {', '.join(sets)}; snapshots on B and C: {report['snapshots']})")
        # ---------------------------------------------------------- the clock stops
        if pg:  # between points, B streams the database's WAL (what the page's database block let in)
            lab.wait("B's WAL receiver streaming from A", lambda: (
                ((((status(lab).get("nodes") or {}).get("b") or {}).get("sets") or {}).get("sales") or {}).get("wal") or {}
            ).get("running"),
                60)
            log("B streams the sales database's WAL from A")

        checks = []
        for where, cmd in check_lines(blocks["check"]):
            for node in where:
                r = lab.run(node, adapt(cmd)[0])
                checks.append({"node": node, "command": cmd, "output": r.stdout.strip()})
                log(f"[{node.upper()}]$ {cmd}\n{r.stdout.rstrip()}")
        out = {(c["node"], c["command"].split()[1]): c["output"] for c in checks}
        must = [(("b", "failover"), "standby"), (("b", "failover"), "primary master: a"),
                (("a", "status"), "primary master: a"), (("a", "config"), ": ok: ")]
        for key, needle in must:
            if key in out and needle not in out[key]:
                raise RuntimeError(f"`pit {key[1]}` on {key[0].upper()} does not say {needle!r}:\n{out[key]}")
        report["checks"] = len(checks)

        # the mapped drive on C, from the office PC: TLS with the certificate C made, alice's password
        cert = lab.upper("c", "/var/lib/pit/repo/serve-tls/cert.pem")
        url = f"https://{lab.ip('c')}:8443"
        lab.wait("the WebDAV view on C", lambda: lab.run(
            "pc", f"curl -sf --cacert {cert} -u alice:{password} -o /dev/null {url}/", check=False).returncode == 0,
            30)
        listing = lab.run("pc", f"curl -sf --cacert {cert} -u alice:{password} -X PROPFIND -H 'Depth: 1' "
                                f"{url}/www/").stdout
        page = lab.run("pc", f"curl -sf --cacert {cert} -u alice:{password} {url}/www/latest/shop/index.html").stdout
        if "latest" not in listing or page != SHOP_FILES["index.html"]:
            raise RuntimeError(f"the WebDAV view on C: listing {listing[:300]!r}, index.html {page[:200]!r}")
        refused = lab.run("pc", f"curl -s -o /dev/null -w '%{{http_code}}' --cacert {cert} -u alice:wrong {url}/",
                          check=False).stdout
        if refused != "401":
            raise RuntimeError(f"the WebDAV view on C let a wrong password in ({refused})")
        report["webdav"] = f"{url}/ (TLS, self-signed certificate checked; www/latest/shop/index.html read)"
        log(f"WebDAV on C: {report['webdav']}")

        if not args.no_failover:
            report["failover"] = failover(lab, pg, log)
            report["back_home"] = back_home(lab, pg, blocks, log)
    finally:
        report["total_seconds"] = round(time.monotonic() - t_all, 2)
        lab.down()
    return report


def failover(lab: Lab, pg: str | None, log) -> dict:
    """A dies (every process in it killed, its cable pulled); B takes over: its takeover hook starts the
    shop's services on the promoted image."""
    before = status(lab, "b")
    token = (before.get("nodes", {}).get("b", {}).get("failover") or {}).get("token")
    t, wall = time.monotonic(), time.time()
    lab.kill_host("a")
    lab.cut("a")

    def active():
        r = lab.run("b", "pit failover status --json --config /etc/pit/agent.toml", check=False, timeout=30)
        s = json.loads(r.stdout) if r.returncode == 0 else {}
        return s if s.get("phase") == "active" else None

    fo = lab.wait("B to take over", active, 120)
    took = round(time.monotonic() - t, 2)
    lp = fo.get("last_promotion") or {}
    out = {"takeover_seconds": took, "token": lp.get("token"), "previous_token": token, "reason": lp.get("reason"),
           "images": {s: v.get("snapshot") or v.get("error") for s, v in (lp.get("sets") or {}).items()},
           # the agent's own split (failover.last_promotion), from the moment A died
           "split": {"detection": round(lp.get("started", wall) - wall, 2), "key": lp.get("detect_to_key"),
                     "selection_and_materialise": lp.get("selection_and_materialise"),
                     "hooks": lp.get("hooks_seconds"),
                     "promoted": round(lp.get("started", wall) + lp.get("seconds", 0) - wall, 2)}}
    log(f"A died; B took over {took:.1f} s later (token {lp.get('token')}): {lp.get('reason')}; images {out['images']}")
    lab.wait("the shop's web site on B", lambda: lab.run(
        "pc", f"curl -sf http://{lab.ip('b')}/index.html", check=False).stdout == SHOP_FILES["index.html"], 30)
    out["web_on_b_seconds"] = round(time.monotonic() - t, 2)
    if pg:
        rows = lab.wait("PostgreSQL on B (started by the takeover hook) to answer", lambda: lab.run(
            "b", f"cd / && runuser -u postgres -- {pg}/psql -X -At -h /var/run/postgresql "
                 "-c 'select count(*) from sales'",
            check=False).stdout.strip(), 60)
        if rows != "500":
            raise RuntimeError(f"PostgreSQL on B answers with {rows!r} sales rows, not 500")
        out["database_on_b_seconds"] = round(time.monotonic() - t, 2)
        out["database_on_b"] = "PostgreSQL started on the promoted image: 500 sales rows"
    else:
        out["database_on_b"] = "sqlite copy promoted (not opened)"
    log(f"B serves the shop: web site on {lab.ip('b')}:80; {out['database_on_b']}")
    return out


def back_home(lab: Lab, pg: str | None, blocks: dict[str, str], log) -> dict:
    """Issue 14's scenario after the failover, done as docs/operators.md's runbooks say, while a client keeps
    inserting ids into the database of whichever node serves it (an id counts once its INSERT committed):
    A is powered on again (its cable back, its disks as they were, its agent started at boot, its etcd
    member by the command that started it), comes back fenced and catches up; `pit failback` on A; then a
    partition between A and B, healed (no failover may follow), and `[failover]` changes pushed from A
    (`auto = false`, then back: no new term). Every acknowledged id must be in A's database at the end."""
    if not pg:
        return {"skipped": "PostgreSQL is not installed: no database to write to"}
    out: dict = {}

    def sql(node: str, q: str, **kw) -> subprocess.CompletedProcess:
        return lab.run(node, f"cd / && runuser -u postgres -- {pg}/psql -X -q -At -h /var/run/postgresql "
                             f"-v ON_ERROR_STOP=1 -c {shlex.quote(q)}", **kw)

    def fo(node: str) -> dict:
        r = lab.run(node, "pit failover status --json", check=False, timeout=30)
        try:
            return json.loads(r.stdout) if r.returncode == 0 else {}
        except ValueError:
            return {}

    sql("b", "create table acks (id int primary key, node text)")
    acked: list[tuple[int, str]] = []
    stop = threading.Event()
    serving = ["b"]

    def client() -> None:
        i = 0
        while not stop.is_set():
            for node in (serving[0], "a" if serving[0] == "b" else "b"):
                r = sql(node, f"insert into acks values ({i}, '{node}')", check=False, timeout=30)
                i += 1  # a failed INSERT's id is never reused (it may have committed before the error)
                if r.returncode == 0:
                    acked.append((i - 1, node))
                    serving[0] = node
                    break
            else:
                stop.wait(0.2)

    writer = threading.Thread(target=client, daemon=True)
    writer.start()
    try:
        lab.wait("the client's first acknowledged insert on B", lambda: acked, 30)
        t = time.monotonic()
        lab.power_on("a")
        etcd_cmd = next(e for e in entries(blocks["A"]) if e.startswith("pit etcd start"))
        lab.run("a", adapt(etcd_cmd)[0])
        lab.wait("A back, fenced", lambda: fo("a").get("phase") == "fenced", 90)
        out["fenced_seconds"] = round(time.monotonic() - t, 2)

        def caught_up() -> bool:  # the runbook: `pit status` shows the old primary connected, nothing queued
            st = status(lab, "b")
            for s in ((st.get("nodes") or {}).get("b", {}).get("sets") or {}).values():
                rs = (s.get("replicas") or {}).get("a")
                if rs is None or rs.get("last_error"):
                    return False
                if s.get("schedule"):  # a scheduled set reconciles at each run: one run since A came back
                    if not rs.get("runs"):
                        return False
                elif rs.get("queued") or rs.get("catchup") or not rs.get("connected"):
                    return False
            return True

        lab.wait("A caught up (connected, nothing queued)", caught_up, 120)
        out["caught_up_seconds"] = round(time.monotonic() - t, 2)
        before = len(acked)
        t = time.monotonic()
        r = lab.run("a", "pit failback --json", timeout=300)
        rep = json.loads(r.stdout)
        out["failback"] = {"seconds": round(time.monotonic() - t, 2), "token": rep.get("token"),
                           "freeze_seconds": rep.get("freeze_seconds"), "switch_seconds": rep.get("switch_seconds")}
        lab.wait("A primary again, B following", lambda: fo("a").get("phase") == "active"
                 and fo("b").get("leader") == "a", 60)
        lab.wait("inserts acknowledged by A", lambda: any(n == "a" for _, n in acked[before:]), 60)
        log(f"failback: A primary again (token {rep.get('token')}) in {out['failback']['seconds']:.1f} s, "
            f"B frozen {rep.get('freeze_seconds')} s")

        token = fo("a").get("token")
        ttl = 5  # [failover] ttl as the quickstart leaves it (the default)
        lab.partition("a", "b")
        time.sleep(3 * ttl)
        lab.heal("a", "b")
        time.sleep(3 * ttl)
        fa, fb = fo("a"), fo("b")
        if not (fa.get("holding") and fa.get("token") == token and fb.get("phase") == "standby"):
            raise RuntimeError(f"a partition between A and B, healed, changed the primary: A {fa}, B {fb}")
        out["partition"] = f"A and B cut apart for {3 * ttl} s, then healed: A kept token {token}, B standing by"
        log(out["partition"])

        path = "/etc/pit/cluster.toml"
        for auto in ("false", "true"):
            v0 = json.loads(lab.run("b", "pit status --local").stdout).get("config_version")
            lab.run("a", f"python3 - <<'EOT'\nimport re\np = {path!r}\ns = open(p).read()\n"
                         f"s = re.sub(r'(?m)^auto = .*\\n', '', s)\n"
                         f"s = s.replace('[failover]\\n', '[failover]\\nauto = {auto}\\n', 1)\n"
                         f"open(p, 'w').write(s)\nEOT")
            lab.wait(f"auto = {auto} pushed to B", lambda: (json.loads(lab.run(
                "b", "pit status --local").stdout).get("config_version") or 0) > (v0 or 0), 60)
            time.sleep(3 * ttl)
            fa, fb = fo("a"), fo("b")
            if not (fa.get("holding") and fa.get("token") == token and fb.get("phase") == "standby"):
                raise RuntimeError(f"pushing auto = {auto} changed the primary: A {fa}, B {fb}")
        out["config_push"] = f"auto = false, then true, pushed from A: A kept token {token}, B standing by"
        log(out["config_push"])
    finally:
        stop.set()
        writer.join(60)
    present = {int(x) for x in sql("a", "select id from acks").stdout.split()}
    lost = [i for i, _ in acked if i not in present]
    out["acknowledged"] = {"on B": sum(n == "b" for _, n in acked), "on A": sum(n == "a" for _, n in acked),
                           "lost": len(lost)}
    log(f"client: {len(acked)} inserts acknowledged ({out['acknowledged']}), {len(lost)} missing on A")
    if lost:
        raise RuntimeError(f"{len(lost)} acknowledged ids are missing from A's database: {lost[:20]}")
    return out


# =============================================================================== the systemctl stand-in
UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = "/etc/systemd/system/lab-boot.target.wants"  # what `enable` links (the host's own links are not the lab's)
RUN_DIR = "/run/systemd/lab"
LOG_DIR = "/var/log/pit-lab"


def _unit(name: str) -> str:
    return name if "." in name else name + ".service"


def _parse_unit(path: str) -> dict:
    out: dict = {"Environment": []}
    section = None
    with open(path) as f:
        for ln in f:
            ln = ln.strip()
            if not ln or ln.startswith(("#", ";")):
                continue
            if ln.startswith("["):
                section = ln.strip("[]")
                continue
            k, _, v = ln.partition("=")
            if section == "Service" and k == "Environment":
                out["Environment"] += shlex.split(v)
            elif section == "Service":
                out[k] = v
    return out


def _pid(unit: str) -> int | None:
    try:
        with open(os.path.join(RUN_DIR, unit + ".pid")) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _start(unit: str) -> int:
    path = os.path.join(UNIT_DIR, unit)
    if unit.endswith(".timer"):
        if not os.path.exists(path):
            print(f"Failed to enable unit: Unit file {unit} does not exist.", file=sys.stderr)
            return 1
        # a timer only schedules its service (pit-scrub: weekly); the lab runs nothing for it now
        open(os.path.join(RUN_DIR, unit + ".enabled"), "w").close()
        return 0
    if not os.path.exists(path):
        print(f"Failed to start {unit}: Unit {unit} not found.", file=sys.stderr)
        return 5
    if _pid(unit):
        return 0
    u = _parse_unit(path)
    kind = u.get("Type", "simple")
    if kind not in ("simple", "exec", "forking") or (kind == "forking" and not u.get("PIDFile")):
        print(f"Failed to start {unit}: the lab's systemctl runs Type=simple units, and forking ones with a "
              "PIDFile", file=sys.stderr)
        return 1
    argv = shlex.split(u["ExecStart"])
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(kv.split("=", 1) for kv in u["Environment"] if "=" in kv)
    kw = {}
    if u.get("User"):
        import pwd

        pw = pwd.getpwnam(u["User"])
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env["HOME"] = pw.pw_dir
    os.makedirs(LOG_DIR, exist_ok=True)
    with open(os.path.join(LOG_DIR, unit + ".log"), "ab") as log:
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             cwd="/", start_new_session=True, **kw)
        pid = p.pid
        if kind == "forking":  # like systemd: the start job ends when ExecStart does, the daemon is PIDFile's
            rc = p.wait()
            try:
                with open(u["PIDFile"]) as f:
                    pid = int(f.readline())
            except (OSError, ValueError):
                rc = rc or 1
            if rc != 0:
                print(f"Job for {unit} failed (ExecStart exited {rc}); see {LOG_DIR}/{unit}.log", file=sys.stderr)
                return 1
    with open(os.path.join(RUN_DIR, unit + ".pid"), "w") as f:
        f.write(str(pid))
    return 0


def _stop(unit: str) -> int:
    pid = _pid(unit)
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _pid(unit):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    return 0


def systemctl(argv: list[str]) -> int:
    """`systemctl daemon-reload | enable [--now] [--no-block] U... | start U... | stop U... | is-active [--quiet] U`
    for the lab's nodes: units from /etc/systemd/system, started in the background (see the module's doc)."""
    flags = {a for a in argv if a.startswith("-")}
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        print("systemctl (lab stand-in): no command", file=sys.stderr)
        return 1
    cmd, units = words[0], [_unit(u) for u in words[1:]]
    os.makedirs(RUN_DIR, exist_ok=True)
    if cmd == "daemon-reload":
        return 0
    if cmd == "lab-boot":  # the lab's power-on: what systemd would start (bench/quickstart.py, Lab.power_on)
        wants = sorted(os.listdir(WANTS_DIR)) if os.path.isdir(WANTS_DIR) else []
        return max([_start(u) for u in wants], default=0)
    if cmd in ("enable", "start", "restart"):
        if cmd == "enable":
            os.makedirs(WANTS_DIR, exist_ok=True)
            for u in units:
                link = os.path.join(WANTS_DIR, u)
                if os.path.exists(os.path.join(UNIT_DIR, u)) and not os.path.lexists(link):
                    os.symlink(os.path.join(UNIT_DIR, u), link)
        if cmd == "enable" and "--now" not in flags:
            return 0
        rc = 0
        for u in units:
            if cmd == "restart":
                _stop(u)
            rc = rc or _start(u)
        return rc
    if cmd in ("stop", "disable"):
        for u in units:
            if cmd == "stop" or "--now" in flags:
                _stop(u)
        return 0
    if cmd == "is-active":
        ok = all(_pid(u) for u in units)
        if "--quiet" not in flags and "-q" not in flags:
            print("active" if ok else "inactive")
        return 0 if ok else 3
    print(f"systemctl (lab stand-in): {cmd} is not supported", file=sys.stderr)
    return 1


# =============================================================================== main
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "systemctl":
        return systemctl(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="run", choices=["run", "count", "down"],
                    help="run the lab (default); count: the page's entries and commands per node; "
                         "down: remove every lab this script left (--keep, or a killed run)")
    ap.add_argument("--no-failover", action="store_true", help="Stop after the WebDAV check (A does not die).")
    ap.add_argument("--keep", action="store_true", help="Leave the lab up at the end (remove it with `down`).")
    ap.add_argument("--timeout", type=float, default=180, help="Seconds to wait for 'protected'.")
    ap.add_argument("--json", default=None, metavar="FILE", help="Also write the report here.")
    args = ap.parse_args()
    if args.what == "count":
        with open(DOC) as f:
            print(json.dumps(count(doc_blocks(f.read())), indent=2))
        return 0
    if args.what == "down":
        down_stale()
        return 0
    why = unavailable()
    if why:
        print(f"bench/quickstart.py: {why}", file=sys.stderr)
        return 2
    down_stale()

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)
    report = main_run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
