"""`pit demo` / `make demo`: the main job on an embedded default, end to end.

It builds a small shop's data under ./demo-data (a web root and a SQLite
sales database), snapshots it, changes it the way a working day would,
snapshots again from the change set (as the replicator will), then shows
the snapshot list, the diff, and takes back yesterday's page. Every step is
printed as the `pit` command a user would type, and run exactly so.
"""
from __future__ import annotations

import os
import random
import shlex
import shutil
import sqlite3
import sys

import click

DEMO_DIR = "demo-data"


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


def _run(args: list[str]) -> None:
    from .cli import main

    click.secho("$ pit " + " ".join(shlex.quote(a) for a in args), fg="cyan", bold=True)
    try:
        main.main(args, prog_name="pit", standalone_mode=False)
    except SystemExit as exc:  # an error already printed its one line
        if exc.code:
            raise
    click.echo()


def run_demo(base: str = DEMO_DIR) -> None:
    root = os.path.abspath(base)
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
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
    from .cli import main

    if main.get_command(click.Context(main), "versions") is not None:  # the restore views are installed
        _run(["versions", "shop", "site/prices.html"])
    _run(["stats"])
    click.secho("What to type next:", bold=True)
    click.echo(f"  export PIT_REPO={repo}")
    click.echo("  pit snapshots --json              # the catalogue, machine-readable")
    click.echo("  pit ls shop@latest:site           # browse a snapshot")
    click.echo("  pit restore shop@-1 --target /tmp/yesterday   # take a whole day back")
    click.echo("  pit serve --self-signed           # the mapped network drive (users: docs/restore.md)")
    click.echo("  pit mount /mnt/pit                # the same views as a FUSE mount")
    click.echo("  pit snapshot --set shop " + " ".join(shlex.quote(p) for p in (site, db)) + "   # another point in time")
    click.echo(f"Everything lives in {root}; `make clean-demo` removes it.")


@click.command("demo")
@click.option("--dir", "base", default=DEMO_DIR, show_default=True, help="Where to build the demo.")
def demo_command(base: str) -> None:
    """Run the demo: a sample shop protected, changed, and restored."""
    run_demo(base)


if __name__ == "__main__":
    run_demo(sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR)
