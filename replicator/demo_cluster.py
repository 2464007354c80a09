"""`pit demo` (`make demo`): a whole protected shop on one machine, then a failover on request.

`pit demo` brings up a primary master, a secondary station and an archive
replica, each in its own network namespace when run as root (separate ports
on 127.0.0.1 otherwise), a one-member etcd, and the WebDAV view; it protects
a sample web root (real-time) and a SQLite sales database (with the sqlite
template: a consistent copy at each point), makes changes, shows them arriving
as versions and prints the WebDAV URL with its credentials.
`pit demo failover` kills the primary (its agent, and its cable) and shows
the secondary taking over with the image it chose and why. `pit demo status`
shows the cluster; `pit demo down` removes everything it made (processes,
namespaces, ./demo-data). Every step prints the `pit` command it runs.
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

from store.demo import DEMO_DIR, _make_site

from .waiting import WaitTimeout, poll_until

PREFIX = "pitdemo"
NET = "10.251.0"
NODES = {"primary": 1, "secondary": 2, "archive": 3}
ETCD_HOST = 9
PIT = os.path.join(os.path.dirname(sys.executable), "pit")
DEMO_USER, DEMO_PASSWORD = "demo", "pitstore-demo"


class Demo:
    def __init__(self, base: str) -> None:
        self.root = os.path.abspath(base)
        self.meta_path = os.path.join(self.root, "demo.json")
        try:
            with open(self.meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError):
            self.meta = {}

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
            click.secho(f"{where}$ pit " + " ".join(shlex.quote(a) for a in args), fg="cyan", bold=True)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if show and r.stdout.strip():
            click.echo(r.stdout.rstrip())
        if check and r.returncode != 0:
            raise click.ClickException(f"pit {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
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
        if os.path.exists(self.root):
            Demo(self.root).down(quiet=True)
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
            click.secho(f"[{n}] $ pit join --state {self.p(n, 'state')} <token> --node {n} --address {addr[n]}",
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
        click.echo("  pit demo status      # roles, fencing token, replicas")
        click.echo("  pit demo failover    # kill the primary: the secondary takes over")
        click.echo("  pit demo down        # remove everything the demo made")

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
        from .templates import build_set, render_set

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
            raise click.ClickException("no demo is running here: run `pit demo` first")
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
        web = f"http://{self.ip('secondary')}:{self.port('secondary', 8080)}/prices.html"
        body = self.wait("the web site on the secondary", lambda: subprocess.run(
            self.wrap("archive", ["curl", "-sf", web]), capture_output=True, text=True).stdout, 30)
        click.echo(f"  the shop's web site answers on the secondary at {web}: {body.strip()[:60]}")
        self.pit("failover", "status", "--config", self.p("secondary", "agent.toml"))
        click.echo("\n`pit demo down` removes everything.")

    # ------------------------------------------------------------------ status and down
    def show(self) -> None:
        if not self.meta:
            raise click.ClickException("no demo is running here: run `pit demo` first")
        for n in NODES:
            st = self.status(n)
            click.echo(f"{n:10} {st.get('phase', 'down'):9} leader {st.get('leader')} token {st.get('token')}")
        if self.meta.get("webdav"):
            click.echo(f"WebDAV: {self.meta['webdav']}  user {DEMO_USER}, password {DEMO_PASSWORD}")

    def down(self, quiet: bool = False) -> None:
        for name, pid in self.meta.get("pids", {}).items():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for f in os.listdir(self.p("hooks")) if os.path.isdir(self.p("hooks")) else []:
            if f.endswith(".pid"):
                try:
                    os.kill(int(open(self.p("hooks", f)).read()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        if self.netns:
            self.net_down()
        if os.path.exists(self.root):
            shutil.rmtree(self.root)
        if not quiet:
            click.echo(f"demo removed: processes stopped, namespaces deleted, {self.root} gone")


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
    """The single-repository demo (no cluster): snapshots, diff, restore."""
    from store.demo import run_demo

    run_demo(d.root)
