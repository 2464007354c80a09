"""`pit demo` (`make demo`): a whole protected shop on one machine, then a failover on request.

`pit demo` brings up a primary master, a secondary station and an archive
replica, each in its own network namespace when run as root (separate ports
on 127.0.0.1 otherwise), a one-member etcd, and the WebDAV view; it protects
a sample web root (real-time) and a SQLite sales database (with the sqlite
template: a consistent copy at each point), makes changes, shows them arriving
as versions and prints the WebDAV URL with its credentials.
`pit demo failover` kills the primary (its agent, and its cable) and shows
the secondary taking over with the image it chose and why. `pit demo status`
shows the cluster; `pit demo store` runs the single-repository tour in
./demo-data/store (never over the cluster's state). `pit demo down` removes
everything any of them made: the processes the demo recorded and every
process that is one of the demo's by what it is (inside a demo namespace, or
etcd, a `pit` or a web server whose command line names the demo directory),
the namespaces by name, and the directory; it then checks they are gone and
says only what it did, or what survived (exit 1). Every step prints the `pit`
command it runs, as the user must type it (`.venv/bin/pit` when the `pit` on
the PATH is not this one).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import click

from store.demo import _OLD_STORE_TOUR, DEMO_DIR, STORE_MARK, _make_site, pit_command, run_demo

from ..waiting import WaitTimeout, poll_until

PREFIX = "pitdemo"
NET = "10.251.0"
NODES = {"primary": 1, "secondary": 2, "archive": 3}
ETCD_HOST = 9
PIT = os.path.join(os.path.dirname(sys.executable), "pit")
DEMO_USER, DEMO_PASSWORD = "demo", "pitstore-demo"
# what a demo directory may hold: `pit demo down` removes a directory with anything else in it only when
# it has the cluster demo's demo.json
DEMO_ENTRIES = {"demo.json", "logs", "primary", "secondary", "archive", "etcd", "hooks", "cluster.toml",
                "serve.toml", "restored", "store", STORE_MARK} | _OLD_STORE_TOUR
DOWN_TIMEOUT = 20.0   # seconds `pit demo down` keeps killing and looking before it names what survived
PIT_SUBCOMMANDS = ("agent", "serve", "etcd", "join", "demo", "mount", "point", "failover", "status")


# ---------------------------------------------------------------------- finding the demo's processes
def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent, process group, session) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[3])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"   # a zombie has stopped; its parent has not reaped it yet


def _ancestors() -> set[int]:
    """This process and its parents (`pit demo --dir X down` names X too: it is not a demo process)."""
    out, pid = set(), os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        st = _stat(pid)
        pid = st[1] if st else 0
    return out


def _ip(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def demo_namespaces() -> list[str]:
    """The demo's network namespaces on this machine, by name (pitdemo-*)."""
    r = _ip("netns", "list")
    if r is None or r.returncode != 0:
        return []
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith(PREFIX + "-")]


def _ns_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns)
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r is not None else []


def _mentions(args: list[str], roots: set[str]) -> bool:
    return any(a == r or r + "/" in a for a in args for r in roots)


def _demo_program(args: list[str]) -> bool:
    """etcd, a Python (`pit`, the web server), a shell (a hook) or `ip netns exec`: what the demo runs.
    Anything else naming the directory (an editor, `tail -f` on a log) is the user's."""
    if not args:
        return False
    prog = os.path.basename(args[0])
    return prog in ("etcd", "pit", "sh", "dash", "bash", "ip") or prog.startswith("python")


def _roots_in(args: list[str]) -> set[str]:
    """The demo directory a process in a demo namespace belongs to (its agent.toml, etcd's data)."""
    out = set()
    for i, a in enumerate(args):
        if a.endswith("/agent.toml") and os.path.isabs(a):
            out.add(os.path.dirname(os.path.dirname(a)))                  # ROOT/<node>/agent.toml
        if a == "--data-dir" and i + 1 < len(args) and args[i + 1].endswith("/etcd/etcd/data"):
            out.add(args[i + 1][:-len("/etcd/etcd/data")])                # ROOT/etcd/etcd/data
    return out


def _describe(args: list[str]) -> str:
    if not args:
        return "?"
    prog = os.path.basename(args[0])
    if prog == "etcd":
        return "etcd"
    if "http.server" in args:
        return "web server"
    for i, a in enumerate(args[:2]):
        if os.path.basename(a) == "pit":
            sub = next((x for x in args[i + 1:] if x in PIT_SUBCOMMANDS), None)
            return f"pit {sub}" if sub else "pit"
    return prog


class Demo:
    def __init__(self, base: str) -> None:
        self.root = os.path.abspath(base)
        self.meta_path = os.path.join(self.root, "demo.json")
        try:
            with open(self.meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError):
            self.meta = {}
        # the commands as the user types them
        self.cmd = pit_command()
        self.demo_cmd = f"{self.cmd} demo" + ("" if self.root == os.path.abspath(DEMO_DIR)
                                              else f" --dir {shlex.quote(self.root)}")

    # ------------------------------------------------------------------ places
    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def netns(self) -> bool:
        return bool(self.meta.get("netns"))

    def ip(self, node: str) -> str:
        return f"{NET}.{NODES[node]}" if self.netns else "127.0.0.1"

    def port(self, node: str, base: int) -> int:
        return base if self.netns else base + 10 * NODES[node]

    def ns(self, name: str) -> str:
        return f"{PREFIX}-{name}"

    def wrap(self, node: str | None, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *cmd] if (self.netns and node) else cmd

    def save(self) -> None:
        with open(self.meta_path, "w") as f:
            json.dump(self.meta, f, indent=2)

    # ------------------------------------------------------------------ running things
    def pit(self, *args: str, node: str | None = None, show: bool = True, check: bool = True) -> str:
        cmd = self.wrap(node, [PIT, *args])
        if show:
            where = f"[{node}] " if node else ""
            click.secho(f"{where}$ {self.cmd} " + " ".join(shlex.quote(a) for a in args), fg="cyan", bold=True)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if show and r.stdout.strip():
            click.echo(r.stdout.rstrip())
        if check and r.returncode != 0:
            raise click.ClickException(f"{self.cmd} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def daemon(self, name: str, node: str | None, cmd: list[str]) -> None:
        os.makedirs(self.p("logs"), exist_ok=True)
        log = open(self.p("logs", f"{name}.log"), "ab")
        proc = subprocess.Popen(self.wrap(node, cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.meta.setdefault("pids", {})[name] = proc.pid
        self.save()

    def wait(self, what: str, pred, timeout: float = 60.0):
        try:
            return poll_until(pred, timeout, what, 0.2)
        except WaitTimeout as exc:
            raise click.ClickException(f"{exc}; logs in {self.p('logs')}") from None

    def status(self, node: str) -> dict:
        r = subprocess.run([PIT, "failover", "status", "--json", "--config", self.p(node, "agent.toml")],
                           capture_output=True, text=True, timeout=30)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def agent_status(self, node: str) -> dict:
        r = subprocess.run([PIT, "status", "--local", "--config", self.p(node, "agent.toml")], capture_output=True, text=True,
                           timeout=30)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    # ------------------------------------------------------------------ network
    def net_up(self) -> bool:
        if os.geteuid() != 0 or not shutil.which("ip"):
            return False
        try:
            run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
            sw = self.ns("sw")
            run("ip", "netns", "add", sw)
            self.meta["namespaces"] = [sw]
            self.save()
            run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
            run("ip", "-n", sw, "link", "set", "br0", "up")
            for name, i in [*NODES.items(), ("etcd", ETCD_HOST)]:
                ns = self.ns(name)
                run("ip", "netns", "add", ns)
                self.meta["namespaces"].append(ns)
                self.save()
                run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", sw)
                run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
                run("ip", "-n", ns, "addr", "add", f"{NET}.{i}/24", "dev", "eth0")
                run("ip", "-n", ns, "link", "set", "eth0", "up")
            return True
        except (subprocess.CalledProcessError, OSError) as exc:
            click.echo(f"(network namespaces unavailable: {exc}; using ports on 127.0.0.1)")
            self.net_down()
            return False

    def net_down(self) -> None:
        for ns in reversed(self.meta.get("namespaces", [])):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.meta["namespaces"] = []

    # ------------------------------------------------------------------ up
    def up(self) -> None:
        others = self._survey()[2]
        if others:
            raise click.ClickException(
                f"a cluster demo from {', '.join(sorted(others))} runs on this machine (namespaces "
                f"{PREFIX}-*): `{self.cmd} demo --dir {shlex.quote(sorted(others)[0])} down` removes it")
        Demo(self.root).down(quiet=True)   # an earlier demo here, or what is left of one
        os.makedirs(self.root)
        self.meta = {}
        self.meta["netns"] = self.net_up()
        self.save()
        how = "network namespaces (primary 10.251.0.1, secondary .2, archive .3, etcd .9)" if self.netns \
            else "ports on 127.0.0.1"
        click.secho(f"pitstore cluster demo in {self.root}, on {how}\n", bold=True)

        # the shop: a web root and a SQLite sales database on the primary
        shop = self.p("primary")
        os.makedirs(shop)
        _make_site(shop)                     # primary/site, primary/db/sales.db
        os.rename(self.p("primary", "db"), self.p("primary", "live-db"))
        os.makedirs(self.p("primary", "db"))  # the sqlite template's side directory: a consistent copy
        etcd = f"http://{NET}.{ETCD_HOST}:2379" if self.netns else "http://127.0.0.1:23790"
        peer = f"http://{NET}.{ETCD_HOST}:2380" if self.netns else "http://127.0.0.1:23800"
        self.pit("etcd", "start", "--state", self.p("etcd"), "--name", "demo", "--client", etcd, "--peer", peer,
                 node="etcd" if self.netns else None)
        self.meta.setdefault("pids", {})["etcd"] = int(open(self.p("etcd", "etcd", "etcd.pid")).read())
        self.save()

        # membership: the primary makes the cluster, the others join with a token
        addr = {n: f"{self.ip(n)}:{self.port(n, 7400)}" for n in NODES}
        self.pit("cluster", "init", "--state", self.p("primary", "state"), "--node", "primary", "--address",
                 addr["primary"], "--join-address", f"{self.ip('primary')}:{self.port('primary', 7401)}")
        self._write_configs(etcd)
        self.daemon("agent-primary", "primary", [PIT, "agent", "--config", self.p("primary", "agent.toml")])
        for n in ("secondary", "archive"):
            token = self.pit("cluster", "token", "--state", self.p("primary", "state"), show=False).strip()
            self.wait("the primary's join listener", lambda: subprocess.run(
                self.wrap(n, [PIT, "join", "--state", self.p(n, "state"), token, "--node", n, "--address", addr[n]]),
                capture_output=True, timeout=60).returncode == 0, 30)
            click.secho(f"[{n}] $ {self.cmd} join --state {self.p(n, 'state')} <token> --node {n} --address {addr[n]}",
                        fg="cyan", bold=True)
            self.pit("--repo", self.p(n, "repo"), "init", show=False)
            self.daemon(f"agent-{n}", n, [PIT, "agent", "--config", self.p(n, "agent.toml")])
        self.wait("the primary to hold the leader key", lambda: self.status("primary").get("holding"), 60)
        self.wait("the first copies on the secondary and the archive", self._seeded, 120)
        click.echo("the secondary and the archive replica hold the shop's files\n")
        self.pit("point", "--set", "site", "--config", self.p("primary", "agent.toml"))
        self.pit("point", "--set", "db", "--config", self.p("primary", "agent.toml"))

        click.echo("\n(a working day passes: prices edited, a photo deleted, 50 sales recorded)\n")
        self._working_day()
        self.wait("the change to reach the archive", lambda: self._has(
            "archive", "site", "prices.html", b"Cake 12.00"), 60)
        self.pit("point", "--set", "site", "--config", self.p("primary", "agent.toml"))
        self.pit("point", "--set", "db", "--config", self.p("primary", "agent.toml"))
        archive = self.p("archive", "repo")
        self.pit("--repo", archive, "snapshots")
        self.pit("--repo", archive, "diff", "site@-1", "site@latest")
        self.pit("--repo", archive, "versions", "site", "site/prices.html")
        self.pit("--repo", archive, "restore", "site@-1:site/img/photo2.jpg", "--target", self.p("restored"))

        # the mapped network drive, over the archive replica's repository
        port = 8443
        hashed = subprocess.run([PIT, "passwd", "--stdin"], input=DEMO_PASSWORD, capture_output=True, text=True,
                                check=True).stdout.strip()
        with open(self.p("serve.toml"), "w") as f:
            f.write(f'[server]\nlisten = "127.0.0.1"\nport = {port}\n\n[users.{DEMO_USER}]\n'
                    f'password = "{hashed}"\nsets = ["*"]\n')
        self.daemon("serve", None, [PIT, "--repo", archive, "serve", "-c", self.p("serve.toml"), "--self-signed"])
        url = f"https://127.0.0.1:{port}/"
        self.wait("the WebDAV view", lambda: subprocess.run(
            ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"{DEMO_USER}:{DEMO_PASSWORD}", url],
            capture_output=True, text=True).stdout == "200", 30)
        web = f"http://{self.ip('primary')}:{self.port('primary', 8080)}/prices.html"
        self.meta.update(webdav=url, web=web)
        self.save()
        click.secho("\nThe shop is protected.", bold=True)
        click.echo(f"  WebDAV view (previous versions, read-only): {url}  user {DEMO_USER}, password {DEMO_PASSWORD}")
        click.echo(f"    e.g. curl -k -u {DEMO_USER}:{DEMO_PASSWORD} {url}site/")
        click.echo(f"  the shop's web site is served by the primary at {web}"
                   + (f" (from a namespace: ip netns exec {self.ns('archive')} curl {web})" if self.netns else ""))
        click.secho("What to type next:", bold=True)
        click.echo(f"  {self.demo_cmd} status      # roles, fencing token, replicas")
        click.echo(f"  {self.demo_cmd} failover    # kill the primary: the secondary takes over")
        click.echo(f"  {self.demo_cmd} down        # remove everything the demo made")

    def _working_day(self) -> None:
        site = self.p("primary", "site")
        with open(os.path.join(site, "prices.html"), "w") as f:
            f.write("<ul><li>Baguette 2.30</li><li>Croissant 1.50</li><li>Cake 12.00</li></ul>\n")
        os.unlink(os.path.join(site, "img", "photo2.jpg"))
        db = sqlite3.connect(self.p("primary", "live-db", "sales.db"))
        db.executemany("insert into sales (day, item, amount) values (?, ?, ?)", [("2026-11-25", "cake", 12.0)] * 50)
        db.commit()
        db.close()

    def _write_configs(self, etcd: str) -> None:
        from ..apps.templates import build_set, render_set

        hook = self.p("hooks", "web.sh")
        os.makedirs(self.p("hooks"))
        for n in NODES:
            os.makedirs(self.p(n), exist_ok=True)
        roots = {"primary": self.p("primary", "site"), "secondary": self.p("secondary", "live", "site")}
        with open(hook, "w") as f:
            f.write(f"""#!/bin/sh
# The demo's takeover/demote hook: start or stop the shop's web site on this node.
case "$PIT_NODE" in primary) root={roots['primary']}; ip={self.ip('primary')}; port={self.port('primary', 8080)};;
  *) root={roots['secondary']}; ip={self.ip('secondary')}; port={self.port('secondary', 8080)};; esac
pidf={self.root}/hooks/web-$PIT_NODE.pid
case "$1" in
start) [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null && exit 0
  setsid {sys.executable} -m http.server --bind "$ip" --directory "$root" "$port" >/dev/null 2>&1 </dev/null &
  echo $! > "$pidf";;
stop) [ -f "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null; rm -f "$pidf"; true;;
esac
""")
        os.chmod(hook, 0o755)
        db = build_set("sqlite", "db", [self.p("primary", "live-db", "sales.db")], ["secondary", "archive"],
                       "primary", {"side_dir": self.p("primary", "db")})
        with open(self.p("cluster.toml"), "w") as f:
            f.write(f'[sets.site]\nmaster = "primary"\nreplicas = ["secondary", "archive"]\n'
                    f'paths = ["{self.p("primary", "site")}"]\nmode = "mirror"\npoint_quiet = 0\n'
                    f'debounce = 0.2\n\n')
            f.write(render_set("db", db) + "\n")
            f.write(f'[failover]\nsecondary = "secondary"\netcd = ["{etcd}"]\nttl = 3\nheartbeat = 0.3\n'
                    f'takeover = ["{hook} start"]\ndemote = ["{hook} stop"]\n')
        with open(self.p("primary", "agent.toml"), "w") as f:
            f.write(f'state = "{self.p("primary", "state")}"\ncluster = "{self.p("cluster.toml")}"\n')
        for n in ("secondary", "archive"):
            with open(self.p(n, "agent.toml"), "w") as f:
                f.write(f'state = "{self.p(n, "state")}"\nrepo = "{self.p(n, "repo")}"\n')
        with open(self.p("secondary", "agent.toml"), "a") as f:
            f.write(f'live = {{site = ["{roots["secondary"]}"], db = ["{self.p("secondary", "live", "db")}"]}}\n')

    def _seeded(self) -> bool:
        st = self.agent_status("primary").get("sets", {})
        return bool(st.get("site")) and all(r.get("connected") and not r.get("queued") and not r.get("catchup")
                                            for r in st["site"].get("replicas", {}).values())

    def _has(self, node: str, set_name: str, rel: str, needle: bytes) -> bool:
        r = subprocess.run([PIT, "--repo", self.p(node, "repo"), "cat", f"{set_name}@latest:{set_name}/{rel}"],
                           capture_output=True)
        if r.returncode == 0 and needle in r.stdout:
            return True
        # not yet a snapshot: a point makes one of what arrived
        subprocess.run([PIT, "point", "--set", set_name, "--config", self.p("primary", "agent.toml")],
                       capture_output=True, timeout=60)
        return False

    # ------------------------------------------------------------------ failover
    def failover(self) -> None:
        if not self.meta:
            raise click.ClickException(f"no cluster demo is running in {self.root}: run `{self.demo_cmd}` first")
        db = sqlite3.connect(self.p("primary", "live-db", "sales.db"))
        sold = db.execute("select count(*) from sales").fetchone()[0] + 5
        db.executemany("insert into sales (day, item, amount) values (?, ?, ?)", [("2026-11-25", "bread", 2.3)] * 5)
        db.commit()
        db.close()
        click.echo("(5 more sales recorded after the last point: the sales database's log ships them at once)")
        time.sleep(1.0)
        click.secho("The primary dies: its agent is killed and its cable pulled.\n", bold=True)
        t0 = time.monotonic()
        pid = self.meta.get("pids", {}).get("agent-primary")
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["sh", self.p("hooks", "web.sh"), "stop"], env=dict(os.environ, PIT_NODE="primary"))
        if self.netns:
            subprocess.run(["ip", "-n", self.ns("sw"), "link", "set", f"p{NODES['primary']}", "down"], check=True)
        st = self.wait("the secondary to take over", lambda: (lambda s: s if s.get("phase") == "active" else None)(
            self.status("secondary")), 120)
        took = time.monotonic() - t0
        rep = st["last_promotion"]
        click.echo(f"secondary is the primary master now (fencing token {rep['token']}), "
                   f"{took:.1f} s after the primary died")
        click.echo(f"  why: {rep['reason']}")
        for name, s in sorted(rep["sets"].items()):
            if "error" in s:
                click.echo(f"  set {name}: NOT PROMOTED: {s['error']}")
                continue
            click.echo(f"  set {name}: image {s['snapshot']} (newest that verifies"
                       f"{' and passes its application check' if name == 'db' else ''}); "
                       f"{len(s['skipped'])} newer skipped; {s['materialised']['files_written']} files written")
            for sk in s["skipped"]:
                click.echo(f"    skipped {sk['snapshot']}: {sk['reason']}")
            wal = s.get("wal") or {}
            if wal.get("error") or wal.get("note"):  # the database log shipped after the image, applied onto it
                click.echo(f"    database log: {wal.get('error') or wal['note']}")
        copy = self.p("secondary", "live", "db", "sales.db")
        if os.path.exists(copy):
            con = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
            have = con.execute("select count(*) from sales").fetchone()[0]
            con.close()
            click.echo(f"  sales on the secondary: {have} of the {sold} recorded on the primary")
        web = f"http://{self.ip('secondary')}:{self.port('secondary', 8080)}/prices.html"
        body = self.wait("the web site on the secondary", lambda: subprocess.run(
            self.wrap("archive", ["curl", "-sf", web]), capture_output=True, text=True).stdout, 30)
        click.echo(f"  the shop's web site answers on the secondary at {web}: {body.strip()[:60]}")
        self.pit("failover", "status", "--config", self.p("secondary", "agent.toml"))
        click.echo(f"\n`{self.demo_cmd} down` removes everything.")

    # ------------------------------------------------------------------ status and down
    def show(self) -> None:
        if not self.meta:
            raise click.ClickException(f"no cluster demo is running in {self.root}: run `{self.demo_cmd}` first")
        for n in NODES:
            st = self.status(n)
            if not st:
                click.echo(f"{n:10} down      (its agent does not answer)")
                continue
            leader, token = st.get("leader"), st.get("token")
            click.echo(f"{n:10} {st.get('phase') or '?':9} leader {leader or 'none'}"
                       + (f", fencing token {token}" if token is not None else ""))
        if self.meta.get("webdav"):
            click.echo(f"WebDAV: {self.meta['webdav']}  user {DEMO_USER}, password {DEMO_PASSWORD}")

    def recorded(self) -> dict[str, int]:
        """The pids the demo wrote down: its daemons (demo.json) and the hooks' web servers (pid files)."""
        out = {name: pid for name, pid in self.meta.get("pids", {}).items() if isinstance(pid, int)}
        hooks = self.p("hooks")
        for f in sorted(os.listdir(hooks)) if os.path.isdir(hooks) else []:
            if f.startswith("web-") and f.endswith(".pid"):
                try:
                    with open(os.path.join(hooks, f)) as fh:
                        out[f"web server ({f[4:-4]})"] = int(fh.read().strip())
                except (OSError, ValueError):
                    pass
        return out

    def _survey(self) -> tuple[dict[int, list[str]], list[str], set[str], dict[int, str]]:
        """What of a demo runs on this machine now: {pid: command line} of its processes, its namespaces,
        other demo directories those namespaces serve, and recorded pids that are now something else."""
        roots = {self.root, os.path.realpath(self.root)}
        skip = _ancestors()
        namespaces = demo_namespaces()
        procs: dict[int, list[str]] = {}
        others: set[str] = set()
        for ns in namespaces:                       # everything inside a demo namespace is the demo's
            for pid in _ns_pids(ns):
                args = _cmdline(pid)
                if pid not in skip and args is not None:
                    procs[pid] = args
                    others |= {r for r in _roots_in(args) if r not in roots}
        roots |= others
        table: dict[int, tuple[list[str], tuple]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in skip:
                continue
            pid = int(d)
            args, st = _cmdline(pid), _stat(pid)
            if args is None or st is None or st[0] == "Z":
                continue
            table[pid] = (args, st)
            if _demo_program(args) and _mentions(args, roots):
                procs[pid] = args
        strangers = {}
        for name, pid in self.recorded().items():
            if pid in table and pid not in procs:
                if _mentions(table[pid][0], roots):
                    procs[pid] = table[pid][0]
                else:                               # the pid went to another program since
                    strangers[pid] = f"{name}'s pid {pid} is now {' '.join(table[pid][0])[:80]!r}: left alone"
        leaders = set(procs)                        # what they started: an agent's workers, a hook's children
        for pid, (args, st) in table.items():
            if pid not in procs and (st[2] in leaders or st[3] in leaders):
                procs[pid] = args
        return {p: a for p, a in procs.items() if _alive(p)}, namespaces, others, strangers

    def down(self, quiet: bool = False) -> None:
        """Remove everything a demo made, check it is gone, and say only that; what survives is an error."""
        names = {pid: name for name, pid in self.recorded().items()}
        stopped: dict[int, str] = {}
        others: set[str] = set()
        notes: list[str] = []
        alive: dict[int, list[str]] = {}
        deadline = time.monotonic() + DOWN_TIMEOUT
        while True:                                 # a dying agent may still have started a hook: look again
            procs, _, found, strangers = self._survey()
            others |= found
            notes += [n for n in strangers.values() if n not in notes]
            if not procs:
                alive = {}
                break
            for pid, args in procs.items():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:                     # gone already, or not ours to kill: the check below says
                    pass
                stopped.setdefault(pid, names.get(pid) or _describe(args))
            try:
                poll_until(lambda: not any(_alive(p) for p in procs), max(0.5, deadline - time.monotonic()),
                           "the demo's processes to stop", 0.05)
            except WaitTimeout:
                pass
            alive = {p: a for p, a in procs.items() if _alive(p)}
            if time.monotonic() >= deadline:
                break
        problems = [f"still running: pid {p} ({' '.join(a)[:120]})" for p, a in sorted(alive.items())]
        try:   # dead already; a moment for their new parent (init) to reap them, so that `pgrep` shows none
            poll_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in stopped if p not in alive), 5,
                       "the stopped processes to be reaped", 0.1)
        except WaitTimeout:
            pass

        deleted = []
        for ns in demo_namespaces():                # by name: whatever demo made them
            r = _ip("netns", "del", ns)
            if r is not None and r.returncode == 0:
                deleted.append(ns)
        left_ns = demo_namespaces()
        deleted = [ns for ns in deleted if ns not in left_ns]
        if left_ns:
            problems.append(f"namespaces still there: {', '.join(left_ns)}")

        removed = False
        if os.path.lexists(self.root):
            unknown = set(os.listdir(self.root)) - DEMO_ENTRIES if os.path.isdir(self.root) else {"?"}
            if unknown and not self.meta:
                problems.append(f"{self.root} left in place: it holds what no demo makes "
                                f"({', '.join(sorted(unknown)[:5])})")
            else:
                try:
                    if os.path.isdir(self.root) and not os.path.islink(self.root):
                        shutil.rmtree(self.root)
                    else:
                        os.unlink(self.root)
                    removed = not os.path.lexists(self.root)
                    if not removed:
                        problems.append(f"{self.root} is still there")
                except OSError as exc:
                    problems.append(f"{self.root} not removed: {exc}")

        if not quiet:
            if stopped:
                gone = [f"{name} {pid}" for pid, name in sorted(stopped.items(), key=lambda x: (x[1], x[0]))
                        if pid not in alive]
                if gone:
                    click.echo(f"stopped {len(gone)} process{'es' if len(gone) > 1 else ''} (checked gone): "
                               f"{', '.join(gone)}")
            else:
                click.echo("no demo processes were running")
            if others:
                click.echo(f"(they include the cluster demo of {', '.join(sorted(others))}, whose namespaces "
                           f"have the same names; its directory is left: `{self.cmd} demo --dir "
                           f"{shlex.quote(sorted(others)[0])} down` removes it)")
            if deleted:
                click.echo(f"deleted namespaces (checked gone): {', '.join(deleted)}")
            elif not left_ns:
                click.echo("no demo namespaces existed")
            if removed:
                click.echo(f"removed {self.root} (checked gone)")
            elif not os.path.lexists(self.root):
                click.echo(f"{self.root} did not exist")
            for n in notes:
                click.echo(n)
        if problems:
            raise click.ClickException("the demo is NOT completely removed: " + "; ".join(problems))
        if not quiet:
            click.echo("demo removed: nothing of it is left" if stopped or deleted or removed
                       else "there was no demo to remove")


@click.group("demo", invoke_without_command=True)
@click.option("--dir", "base", default=DEMO_DIR, show_default=True, help="Where the demo lives.")
@click.pass_context
def demo(ctx, base):
    """The whole cluster on one machine: `pit demo`, then `failover`, `status`, `down`."""
    ctx.obj = Demo(base)
    if ctx.invoked_subcommand is None:
        ctx.obj.up()


@demo.command("failover")
@click.pass_obj
def demo_failover(d: Demo):
    """Kill the primary; watch the secondary take over."""
    d.failover()


@demo.command("status")
@click.pass_obj
def demo_status(d: Demo):
    """Roles, leader and fencing token of each demo node."""
    d.show()


@demo.command("down")
@click.pass_obj
def demo_down(d: Demo):
    """Remove everything the demo made."""
    d.down()


@demo.command("store")
@click.pass_obj
def demo_store(d: Demo):
    """The single-repository demo (no cluster): snapshots, diff, restore, in DIR/store."""
    run_demo(d.p("store"), down_hint=f"{d.demo_cmd} down")
