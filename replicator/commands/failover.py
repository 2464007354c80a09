"""`pit failover ...` and `pit set ...` (registered through the `pit.commands` entry points).

    pit set templates
    pit set add NAME --template postgresql --path /var/lib/postgresql/15/main --replicas r1,r2 \\
        [--cluster /etc/pit/cluster.toml] [--master NODE] [-o point=checkpoint ...] [--dry-run]
    pit failover select --repo R --set S [--json] [--check/--no-check] [--cluster FILE | --state DIR]
        [--snapshot SNAP] [--max-images N] [--recheck-after SECONDS]

Errors are `ReplError`s: the `pit` group prints one line and exits with the
error's code.
"""
from __future__ import annotations

import json
import os
import tempfile
import tomllib

import click

from ..errors import ConfigError, NoGoodImage, PinnedImageBad, SetExists, TemplateError
from ..settings import SetConfig

DEFAULT_CLUSTER = "/etc/pit/cluster.toml"


# ------------------------------------------------------------ cluster file
def load_cluster_sets(path: str) -> dict[str, SetConfig]:
    """The cluster file's sets, typed (`replicator.config`), each `app` table validated by its template."""
    from ..apps.templates import validate_app
    from ..config import _load_toml, normalise_sets

    sets = normalise_sets(_load_toml(path), path)
    for name, s in sets.items():
        if s.app is not None:
            try:
                validate_app(s.app, list(s.paths), "app")
            except TemplateError as exc:
                raise TemplateError(f"{path}: set {name!r}: {exc}") from None
    return sets


def add_set(cluster_path: str, name: str, template: str, paths: list[str], replicas: list[str], master: str,
            options: dict | list | None = None, dry_run: bool = False) -> tuple[dict, str]:
    """Append `[sets.NAME]` (+ `[sets.NAME.app]`) built by `template` to the cluster file.

    Refuses an existing set name; the new file is validated by loading it back
    before it replaces the old one (atomically, same mode). Returns (the set's
    table, the TOML text appended)."""
    from store.snapshots import check_set_name

    from ..apps.templates import build_set, render_set

    try:
        check_set_name(name)
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    existing = ""
    if os.path.exists(cluster_path):
        with open(cluster_path, encoding="utf-8") as f:
            existing = f.read()
        try:
            have = tomllib.loads(existing).get("sets", {})
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cluster_path}: {exc}") from None
        if name in have:
            raise SetExists(f"set {name!r} is already in {cluster_path}")
    table = build_set(template, name, paths, replicas, master, options)
    text = render_set(name, table)
    if existing and not existing.endswith("\n"):
        existing += "\n"
    new = (existing + "\n" if existing.strip() else "# pit cluster file: replication sets (see `pit set add`)\n\n") + text
    d = os.path.dirname(os.path.abspath(cluster_path))
    fd, tmp = tempfile.mkstemp(prefix=".cluster-", suffix=".toml", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        sets = load_cluster_sets(tmp)  # what the agent will read
        if name not in sets:
            raise ConfigError(f"set {name!r} did not load back from the cluster file")
        if dry_run:
            return table, text
        try:
            os.chmod(tmp, os.stat(cluster_path).st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, 0o644)
        os.replace(tmp, cluster_path)
        tmp = None
    finally:
        if tmp:
            os.unlink(tmp)
    return table, text


def find_set_config(set_name: str, cluster: str | None = None, state: str | None = None) -> SetConfig | None:
    """The set's configuration: from the primary's cluster file, else from the
    configuration pushed to this node (state/cluster.json); None if neither has it."""
    if cluster:
        sets = load_cluster_sets(cluster)
        if set_name not in sets:
            raise ConfigError(f"{cluster}: no set {set_name!r}")
        return sets[set_name]
    if state:
        from ..config import load_pushed

        return load_pushed(state).sets.get(set_name)
    return None


# ------------------------------------------------------------ pit set
@click.group("set")
def set_group():
    """Replication sets in the primary's cluster file (application templates)."""


@set_group.command("templates")
def set_templates():
    """List the application templates."""
    from ..apps.templates import TEMPLATES

    for t in TEMPLATES.values():
        click.echo(f"{t.name:11} {t.summary}")
        click.echo(f"{'':11} options: {', '.join(sorted(t.options))}")


@set_group.command("add")
@click.argument("name")
@click.option("--template", "-t", "template", required=True, help="postgresql, sqlite, mysql or website.")
@click.option("--path", "paths", multiple=True, metavar="PATH",
              help="A path the template needs (data directory, database file, config, document root); repeatable.")
@click.option("--replicas", required=True, metavar="R1,R2", help="Replica node ids, comma-separated.")
@click.option("--master", default=None, metavar="NODE", help="The set's master (default: this node, from --state).")
@click.option("--cluster", "cluster", envvar="PIT_CLUSTER", default=DEFAULT_CLUSTER, show_default=True,
              type=click.Path(dir_okay=False), help="The primary's cluster file (or set PIT_CLUSTER).")
@click.option("--state", envvar="PIT_STATE", default=None, metavar="DIR", help="The node's state directory.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help="A template option; repeatable.")
@click.option("--dry-run", is_flag=True, help="Print what would be appended; change nothing.")
def set_add(name, template, paths, replicas, master, cluster, state, options, dry_run):
    """Add set NAME, filled in by an application template, to the cluster file."""
    if master is None:
        if not state:
            raise ConfigError("give --master NODE (or --state DIR of the primary)")
        from ..stream.membership import NodeState

        master = NodeState(state).node
    reps = [r.strip() for r in replicas.split(",") if r.strip()]
    if not reps:
        raise ConfigError("--replicas: give at least one node id")
    table, text = add_set(cluster, name, template, list(paths), reps, master, list(options), dry_run)
    if dry_run:
        click.echo(text, nl=False)
        return
    click.echo(f"set {name} ({template}) added to {cluster}: paths {', '.join(table['paths'])}; "
               f"replicas {', '.join(reps)}")
    click.echo("review its [sets." + name + ".app] table (hooks, check) before the next configuration push")


# ------------------------------------------------------------ pit failover
@click.group("failover")
def failover():
    """Failover: choose the image to promote."""


def _line(o) -> str:
    status = o.status + (f": {o.reason}" if o.reason else "")
    return f"{o.short:12}  {o.name:24}  {o.time:20}  {status}"


@failover.command("select")
@click.option("--repo", "-r", "repo_opt", envvar="PIT_REPO", default=None, metavar="PATH",
              help="The replica's repository (or set PIT_REPO).")
@click.option("--set", "set_name", required=True, help="The replication set.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the set's application check on each image (needs its app table from --cluster or --state).")
@click.option("--cluster", envvar="PIT_CLUSTER", default=None, type=click.Path(dir_okay=False),
              help="The primary's cluster file (for the set's template).")
@click.option("--state", envvar="PIT_STATE", default=None, metavar="DIR",
              help="This node's state directory (its pushed configuration gives the set's template).")
@click.option("--snapshot", "pin", default=None, metavar="SNAP", help="Operator-pinned image: verify and check only it.")
@click.option("--max-images", default=64, show_default=True, type=click.IntRange(1, 1000))
@click.option("--structural", is_flag=True, help="Structural verify only (no chunk reads).")
@click.option("--recheck-after", default=3600.0, show_default=True, type=float,
              help="Chunks read good this many seconds ago are not read again (0: read all).")
@click.pass_context
def failover_select(ctx, repo_opt, set_name, as_json, check, cluster, state, pin, max_images, structural,
                    recheck_after):
    """Choose the newest image of SET that deep-verifies and passes its application check."""
    from store.errors import InvalidArgument

    from ..failover.select import select_image

    repo = repo_opt or (ctx.obj or {}).get("repo")
    if not repo:
        raise InvalidArgument("no repository given: use --repo PATH or set PIT_REPO")
    cfg = find_set_config(set_name, cluster, state) if check else None
    chk = cfg if cfg and cfg.app else None
    note = None
    if check and chk is None:
        note = ("no application check: " + ("the set has no app table" if cfg else
                                            "no set configuration found (give --cluster or --state)"))
    try:
        sel = select_image(repo, set_name, chk, max_images=max_images, deep=not structural, pin=pin,
                           recheck_after=recheck_after)
        failed = None
    except (NoGoodImage, PinnedImageBad) as exc:
        sel, failed = exc.selection, exc
    if note and sel is not None:
        sel.notes = [n for n in sel.notes if not n.startswith("no application check")] + [note]
    if sel is not None:
        if as_json:
            click.echo(json.dumps(sel.to_json(), indent=2))
        else:
            click.echo(f"{'SNAPSHOT':12}  {'NAME':24}  {'TIME':20}  STATUS")
            for o in sel.images:
                click.echo(_line(o))
            for n in sel.notes:
                click.echo(f"note: {n}", err=True)
            if sel.chosen:
                click.echo(f"{'pinned' if sel.pinned else 'chosen'}: {set_name}@{sel.chosen.name} "
                           f"({sel.chosen.short})")
    if failed is not None:
        raise failed


def _shown(value, none: str = "-"):
    """A status value for people: never Python's `None` (a field not known yet, or not after a failover)."""
    return none if value is None else value


@failover.command("status")
@click.option("--config", "config", default=None, metavar="FILE", help="The agent's TOML file.")
@click.option("--state", envvar="PIT_STATE", default=None, metavar="DIR")
@click.option("--json", "as_json", is_flag=True)
def failover_status(config, state, as_json):
    """Who holds the leader key (and its fencing token), this node's role, checks, last promotion."""
    from ..agent import control_request

    st = control_request(state, config, "failover", {})
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    v = _shown
    lead = f"{st['leader']} (token {v(st.get('token'))})" if st.get("leader") else "nobody"
    click.echo(f"node {v(st.get('me'))}: {v(st.get('phase'))}; primary master: {lead}; "
               f"configured primary {v(st.get('primary'))}, secondary {v(st.get('secondary'))}")
    click.echo(f"etcd: {'ok' if st['etcd_ok'] else 'UNREACHABLE' if st['etcd_ok'] is False else '?'}")
    for c in st["checks"] + st["link"]:
        click.echo(f"  check {c['check']}: {'ok' if c['ok'] else 'failing'} {c['detail']} ({c['failures']} in a row)")
    if st["note"]:
        click.echo(f"note: {st['note']}")
    lp = st.get("last_promotion")
    if lp:
        took = f" in {lp['seconds']} s" if lp.get("seconds") is not None else ""
        click.echo(f"last promotion: {v(lp.get('node'))} token {v(lp.get('token'))}{took}: {v(lp.get('reason'))}"
                   + (f" (FAILED: {lp['error']})" if lp.get("error") else ""))
        for name, r in sorted((lp.get("sets") or {}).items()):
            if "error" in r:
                click.echo(f"  set {name}: not promoted: {r['error']}")
                continue
            skipped = r.get("skipped") or []
            click.echo(f"  set {name}: image {v(r.get('snapshot'))} ({v(r.get('time'))})"
                       + (f", {len(skipped)} newer skipped: " + "; ".join(f"{x['snapshot']}: {x['reason']}"
                                                                         for x in skipped) if skipped else ""))


@failover.command("promote")
@click.option("--config", "config", default=None, metavar="FILE", help="The agent's TOML file.")
@click.option("--state", envvar="PIT_STATE", default=None, metavar="DIR")
@click.option("--snapshot", "pins", multiple=True, metavar="SET@SNAP",
              help="Promote this image of its set instead of the newest good one (repeatable).")
@click.option("--at", "at", default=None, metavar="TIME",
              help="Every set as it was at TIME: the newest image taken by then, a database set's log replayed "
                   "to that second (2026-12-05T14:03:07, local time unless Z or an offset).")
@click.option("--force", is_flag=True, help="Revoke the current primary's lease first (it stops within a TTL).")
@click.option("--json", "as_json", is_flag=True)
def failover_promote(config, state, pins, at, force, as_json):
    """Make this node (the secondary station) the primary master now."""
    from store.cli import parse_time

    from ..agent import control_request
    from .cluster import _show_takeover

    if at and pins:
        raise click.UsageError("give --at or --snapshot, not both")
    if at:
        _show_takeover(control_request(state, config, "promote", {"force": force, "at": parse_time(at)}, 900),
                       as_json)
        return
    by_set = {}
    for p in pins:
        if "@" not in p:
            raise click.BadParameter(f"{p!r}: give SET@SNAPSHOT (e.g. web@2026-11-25T09.38.55Z or web@-2)",
                                     param_hint="--snapshot")
        by_set[p.split("@", 1)[0]] = p
    _show_takeover(control_request(state, config, "promote", {"force": force, "pins": by_set}, 900), as_json)
