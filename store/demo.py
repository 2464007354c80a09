"""`pit demo` / `make demo`: the main job on an embedded default, end to end.

It builds a small shop's data in its own directory (`pit demo store` uses
./demo-data/store, beside the cluster demo's state, which it never touches):
a web root and a SQLite sales database, snapshots it, changes it the way a
working day would, snapshots again from the change set (as the replicator
will), then shows the snapshot list, the diff, and takes back yesterday's
page. Every step is printed as the `pit` command a user would type (with the
path of this `pit` when the `pit` on the PATH is another one, or none), and
run exactly so.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import shlex
import shutil
import sqlite3
import sys
from importlib.metadata import entry_points

import click

from .cli_support import PitGroup

DEMO_DIR = "demo-data"
STORE_MARK = ".pit-demo-store"   # in a directory the store tour made (and may replace)
# what a store tour made before it had its marker (it then wrote straight into ./demo-data)
_OLD_STORE_TOUR = {"repo", "site", "db", "changes.txt", "restored"}
SERVE_PORT = 8444                # the cluster demo's WebDAV view is on 8443
DEMO_USER, DEMO_PASSWORD = "demo", "pitstore-demo"


def pit_command() -> str:
    """`pit` as the user must type it: plain `pit` when the `pit` on the PATH is this one, else the
    path of this one (relative to the working directory when it is below it, e.g. `.venv/bin/pit`)."""
    exe = os.path.join(os.path.dirname(sys.executable), "pit")
    on_path = shutil.which("pit")
    if on_path and os.path.realpath(on_path) == os.path.realpath(exe):
        return "pit"
    rel = os.path.relpath(exe)
    shown = exe if rel.startswith("..") else (rel if "/" in rel else "./" + rel)
    return shlex.quote(shown)


def _make_site(root: str) -> None:
    rng = random.Random(7)
    os.makedirs(os.path.join(root, "site", "img"), exist_ok=True)
    os.makedirs(os.path.join(root, "site", "css"), exist_ok=True)
    os.makedirs(os.path.join(root, "db"), exist_ok=True)
    with open(os.path.join(root, "site", "index.html"), "w") as f:
        f.write("<html><body><h1>Corner Bakery</h1><p>Fresh bread every morning.</p></body></html>\n")
    with open(os.path.join(root, "site", "prices.html"), "w") as f:
        f.write("<ul><li>Baguette 2.10</li><li>Croissant 1.40</li></ul>\n")
    with open(os.path.join(root, "site", "css", "style.css"), "w") as f:
        f.write("body { font-family: sans-serif; }\n" * 40)
    for i in range(3):
        with open(os.path.join(root, "site", "img", f"photo{i}.jpg"), "wb") as f:
            f.write(rng.randbytes(300_000))
    os.symlink("index.html", os.path.join(root, "site", "home.html"))
    db = sqlite3.connect(os.path.join(root, "db", "sales.db"))
    db.execute("create table sales (id integer primary key, day text, item text, amount real)")
    db.executemany("insert into sales (day, item, amount) values (?, ?, ?)",
                   [(f"2026-11-{1 + i % 24:02d}", rng.choice(["baguette", "croissant", "cake"]),
                     round(rng.uniform(1, 40), 2)) for i in range(20000)])
    db.commit()
    db.close()


def _change_day(root: str) -> list[str]:
    """A working day: a price page edit, new sales rows, a photo removed."""
    site = os.path.join(root, "site")
    with open(os.path.join(site, "prices.html"), "w") as f:
        f.write("<ul><li>Baguette 2.30</li><li>Croissant 1.50</li><li>Cake 12.00</li></ul>\n")
    os.unlink(os.path.join(site, "img", "photo2.jpg"))
    db = sqlite3.connect(os.path.join(root, "db", "sales.db"))
    db.executemany("insert into sales (day, item, amount) values (?, ?, ?)",
                   [("2026-11-25", "cake", 12.0)] * 50)
    db.commit()
    db.close()
    return [os.path.join(site, "prices.html"), os.path.join(site, "img", "photo2.jpg"),
            os.path.join(root, "db", "sales.db")]


def _pit() -> click.Group:
    """The `pit` group the tour runs its commands with: the one it runs under
    (`pit demo store`, `pit demo`), else (`python -m store.demo`, a direct
    call) the installed `pit` (`store.cli:main`). This module does not import
    cli.py: cli.py registers the demo."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root().command if ctx is not None else None
    if isinstance(root, PitGroup):
        return root
    for ep in entry_points(group="console_scripts", name="pit"):
        return ep.load()
    raise click.ClickException("the `pit` command is not installed (pip install -e .)")


def _run(args: list[str]) -> None:
    click.secho(f"$ {pit_command()} " + " ".join(shlex.quote(a) for a in args), fg="cyan", bold=True)
    try:
        _pit().main(args, prog_name="pit", standalone_mode=False)
    except SystemExit as exc:  # an error already printed its one line
        if exc.code:
            raise
    click.echo()


def _prepare(root: str) -> None:
    """An empty `root` for the tour. Only an earlier tour's directory is replaced: a cluster demo's
    state (its demo.json) or anything else is refused, never removed."""
    if os.path.lexists(root):
        if not os.path.isdir(root) or os.path.islink(root):
            raise click.ClickException(f"{root} exists and is not a directory: choose another --dir")
        entries = set(os.listdir(root))
        if "demo.json" in entries:
            raise click.ClickException(
                f"{root} holds a cluster demo (its demo.json): the store tour would overwrite the state "
                f"`{pit_command()} demo down` needs; `{pit_command()} demo store` builds the tour in {root}/store")
        if entries and STORE_MARK not in entries and not entries <= _OLD_STORE_TOUR:
            raise click.ClickException(f"{root} exists and is not a store tour's directory: "
                                       "remove it or choose another --dir")
        shutil.rmtree(root)
    os.makedirs(root)
    open(os.path.join(root, STORE_MARK), "w").close()


def _serve_config(root: str) -> str | None:
    """A `pit serve` config for the tour (user demo, HTTPS with a self-signed certificate), or None
    when the restore views are not installed."""
    grp = _pit()
    passwd = grp.get_command(click.Context(grp), "passwd")  # davserver's, through its entry point
    if passwd is None:
        return None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        old, sys.stdin = sys.stdin, io.StringIO(DEMO_PASSWORD + "\n")
        try:
            passwd.main(["--stdin", "--user", DEMO_USER], prog_name="pit passwd", standalone_mode=False)
        finally:
            sys.stdin = old
    path = os.path.join(root, "serve.toml")
    with open(path, "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1"\nport = {SERVE_PORT}\nself_signed = true\n\n{out.getvalue()}')
    return path


def run_demo(base: str = DEMO_DIR, down_hint: str | None = None) -> None:
    """The tour in `base` (replaced when it is an earlier tour's, refused otherwise). `down_hint`:
    the command that removes it, when one does (`pit demo down` for the tour in demo-data/store)."""
    root = os.path.abspath(base)
    _prepare(root)
    repo = os.path.join(root, "repo")
    os.environ["PIT_REPO"] = repo
    site, db = os.path.join(root, "site"), os.path.join(root, "db")
    click.secho(f"pitstore demo in {root}\n", bold=True)
    _make_site(root)
    _run(["init"])
    _run(["snapshot", "--set", "shop", site, db])
    changed = _change_day(root)
    changes_file = os.path.join(root, "changes.txt")
    with open(changes_file, "w") as f:
        f.write("\n".join(changed) + "\n")
    click.echo("(a working day passes: prices edited, a photo deleted, 50 sales recorded;\n"
               " the replicator would report exactly these paths, listed in changes.txt)\n")
    _run(["snapshot", "--set", "shop", "--changes", changes_file, site, db])
    _run(["snapshots"])
    _run(["diff", "shop@-1", "shop@latest"])
    _run(["cat", "shop@-1:site/prices.html"])
    _run(["restore", "shop@-1:site/img/photo2.jpg", "--target", os.path.join(root, "restored")])
    _run(["verify", "--deep"])
    pit_group = _pit()
    views = pit_group.get_command(click.Context(pit_group), "versions") is not None  # the restore views are installed
    if views:
        _run(["versions", "shop", "site/prices.html"])
    _run(["stats"])
    serve_toml = _serve_config(root) if views else None
    pit = pit_command()
    click.secho("What to type next:", bold=True)
    click.echo(f"  export PIT_REPO={shlex.quote(repo)}")
    click.echo(f"  {pit} snapshots --json              # the catalogue, machine-readable")
    click.echo(f"  {pit} ls shop@latest:site           # browse a snapshot")
    click.echo(f"  {pit} restore shop@-1 --target /tmp/yesterday   # take a whole day back")
    if serve_toml:
        click.echo(f"  {pit} serve -c {shlex.quote(serve_toml)}   # the mapped network drive: "
                   f"https://127.0.0.1:{SERVE_PORT}/ user {DEMO_USER}, password {DEMO_PASSWORD}")
        click.echo(f"  mkdir -p /tmp/pit-view && {pit} mount /tmp/pit-view   # the same views as a FUSE mount")
    click.echo(f"  {pit} snapshot --set shop " + " ".join(shlex.quote(p) for p in (site, db))
               + "   # another point in time")
    click.echo(f"Everything lives in {root}" + (f"; `{down_hint}` removes it." if down_hint else "."))


@click.command("demo")
@click.option("--dir", "base", default=DEMO_DIR, show_default=True, help="Where to build the demo.")
def demo_command(base: str) -> None:
    """Run the demo: a sample shop protected, changed, and restored."""
    run_demo(base, down_hint=f"rm -r {shlex.quote(os.path.abspath(base))}")


if __name__ == "__main__":   # python -m store.demo [DIR]
    demo_command.main(["--dir", sys.argv[1]] if len(sys.argv) > 1 else [], prog_name="python -m store.demo")
