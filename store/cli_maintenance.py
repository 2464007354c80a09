"""`pit` commands that keep a repository healthy: retention, prune, compact,
verify, repair, pins. Registered on the main group by cli.py; what they
share with the other commands comes from cli_support.py."""
from __future__ import annotations

import json
import sys

import click

from .cli_support import key_source, StatusLine, mib, open_repo
from .errors import DamageFound, InvalidArgument, PermissionDenied, ReadOnlyRepository


POLICY_FLAGS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly")


def policy_options(f):
    for name in reversed(POLICY_FLAGS):
        f = click.option("--" + name.replace("_", "-"), name, type=int, default=None,
                         help=f"Keep the newest snapshot of each of the N most recent {name[5:]} periods"
                         if name != "keep_last" else "Keep the N newest snapshots.")(f)
    return click.option("--max", "cap", type=int, default=None, help="Hard cap on snapshots in the set (default 64).")(f)


def _policy_from(repo, txn, set_name, cap, flags):
    from .retention import get_policy

    pol = get_policy(repo, txn, set_name)
    if cap is not None:
        pol.max = cap
    if any(v is not None for v in flags.values()):
        for k in POLICY_FLAGS:
            setattr(pol, k, flags.get(k) or 0)
    return pol.check()


@click.command()
@click.option("--set", "set_name", required=True)
@policy_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy(ctx, set_name, cap, as_json, **flags):
    """Show or set a set's retention policy (stored in the repository)."""
    from dataclasses import asdict

    from .retention import set_policy
    from .snapshots import check_set_name

    check_set_name(set_name)
    repo = open_repo(ctx)
    with repo.writer() as w:
        pol = _policy_from(repo, w.txn, set_name, cap, flags)
        if cap is not None or any(v is not None for v in flags.values()):
            set_policy(w, set_name, pol)
    if as_json:
        click.echo(json.dumps({"set": set_name, **asdict(pol)}))
    else:
        rules = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in asdict(pol).items() if k != "max" and v) or "none"
        click.echo(f"set {set_name}: at most {pol.max} snapshots; keep rules: {rules}")


@click.command()
@click.option("--set", "set_name", default=None, help="The set (without it, --dry-run shows every set).")
@policy_options
@click.option("--dry-run", "-n", is_flag=True, help="Say what would go, change nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.argument("snapshots", nargs=-1)
@click.pass_context
def forget(ctx, set_name, cap, dry_run, as_json, snapshots, **flags):
    """Drop snapshots of SET by policy (flags, else the stored policy), or the SNAPSHOTS named.

    `pit forget --dry-run` without --set shows what every set's stored policy would drop."""
    from .prune import DropStats, drop_snapshot
    from .retention import Decision, apply_retention
    from .snapmeta import is_pinned
    from .snapshots import list_sets, resolve

    if set_name is None and not snapshots:
        if not dry_run:
            raise InvalidArgument("give --set SET (or name the snapshots); `pit forget --dry-run` alone shows "
                                  "what every set's policy would drop")
        if cap is not None or any(v is not None for v in flags.values()):
            raise InvalidArgument("policy flags need --set SET; without it --dry-run shows every set's stored policy")
    repo = open_repo(ctx)
    with repo.writer() as w:
        if set_name is None and not snapshots:
            decisions, stats = [], DropStats()
            for s in list_sets(repo, w.txn):
                d, st = apply_retention(w, s, dry_run=True)
                decisions += d
                stats.snapshots += st.snapshots
        elif snapshots:
            decisions, stats = [], DropStats()
            for spec in snapshots:
                s = resolve(repo, w.txn, spec)
                if set_name is not None and s.set != set_name:
                    raise InvalidArgument(f"{spec} belongs to set {s.set}, not {set_name}")
                if is_pinned(repo, w.txn, s.id):
                    raise InvalidArgument(f"{s.set}@{s.name} is pinned; unpin it first")
                decisions.append(Decision(s, False, ["named"]))
                if not dry_run:
                    drop_snapshot(w, s, stats)
        else:
            pol = _policy_from(repo, w.txn, set_name, cap, flags)
            decisions, stats = apply_retention(w, set_name, pol, dry_run=dry_run)
        if dry_run:
            w.abort()
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "decisions": [d.to_json() for d in decisions],
                               "dropped": stats.to_json()}, indent=2))
        return
    for d in decisions:
        mark = "keep" if d.keep else ("would drop" if dry_run else "drop")
        click.echo(f"{mark:10} {d.snapshot.short}  {d.snapshot.set}@{d.snapshot.name}  ({', '.join(d.reasons)})")
    if not dry_run:
        click.echo(f"dropped {stats.snapshots} snapshots; {stats.blobs_freed} blobs ({mib(stats.bytes_freed)}) "
                   f"are now garbage; `pit compact` reclaims the space")


def _pin(ctx, spec, on):
    from .retention import pin as do_pin
    from .snapshots import resolve

    repo = open_repo(ctx)
    with repo.writer() as w:
        s = resolve(repo, w.txn, spec)
        do_pin(w, s, on)
    click.echo(f"{'pinned' if on else 'unpinned'} {s.set}@{s.name} ({s.short})")


@click.command()
@click.argument("spec", metavar="SNAP")
@click.pass_context
def pin(ctx, spec):
    """Keep SNAP whatever the retention policy says (it counts against the cap)."""
    _pin(ctx, spec, True)


@click.command()
@click.argument("spec", metavar="SNAP")
@click.pass_context
def unpin(ctx, spec):
    """Let retention drop SNAP again."""
    _pin(ctx, spec, False)


def _compact_report(st, as_json):
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=2))
        return
    click.echo(f"compacted {st.packs_compacted} packs: copied {mib(st.bytes_copied)}, reclaimed "
               f"{mib(st.bytes_reclaimed)}; deleted {st.packs_deleted} packs, {st.packs_waiting} waiting for "
               f"older readers; {st.seconds:.2f} s")
    if st.backend is not None:
        click.echo(backend_cost_line(st.backend))
    for d in st.damaged:
        click.echo(f"warning: not compacted: {d}", err=True)


def backend_cost_line(cost: dict) -> str:
    """What an object-store backend was asked: requests by kind, bytes each way."""
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(cost["requests"].items())) or "none"
    return (f"object store: {cost['requests_total']} requests ({kinds}); {mib(cost['bytes_up'])} up, "
            f"{mib(cost['bytes_down'])} down")


@click.command()
@click.option("--threshold", default=0.25, show_default=True, help="Garbage ratio from which a pack is rewritten.")
@click.option("--max-seconds", type=float, default=None, help="Stop starting new packs after this long.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def compact(ctx, threshold, max_seconds, as_json):
    """Rewrite packs whose garbage passes the threshold and delete the old ones (in a bucket: also merge
    small packs)."""
    from .compact import compact as run

    repo = open_repo(ctx)
    status = StatusLine("compact", json_lines=as_json)
    st = run(repo, threshold, max_seconds, progress=_compact_progress(status))
    status.done()
    _compact_report(st, as_json)


def _compact_progress(status):
    def progress(d):
        status.show(f"compact: {d['packs_done']} packs rewritten, {d['packs_left']} to go, "
                    f"{mib(d['bytes_copied'])} copied", **d)
    return progress


@click.command()
@click.option("--threshold", default=0.25, show_default=True)
@click.option("--max-seconds", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def prune(ctx, threshold, max_seconds, as_json):
    """Apply every set's stored retention policy, then compact."""
    from .compact import compact as run
    from .retention import apply_retention
    from .snapshots import list_sets

    repo = open_repo(ctx)
    dropped = 0
    counters = getattr(repo.backend, "stats", None)
    before = counters.copy() if counters is not None else None
    status = StatusLine("prune", json_lines=as_json)
    with repo.writer() as w:
        for s in list_sets(repo, w.txn):
            status.show(f"prune: applying the retention policy of set {s} ({dropped} snapshots dropped so far)",
                        phase="retention", set=s, dropped=dropped)
            _, st = apply_retention(w, s)
            dropped += st.snapshots
    cst = run(repo, threshold, max_seconds, progress=_compact_progress(status))
    status.done()
    cost = counters.since(before) if counters is not None else None  # retention's commits and the compaction
    if as_json:
        click.echo(json.dumps({"snapshots_dropped": dropped, "compact": cst.to_json(), "backend": cost}, indent=2))
        return
    click.echo(f"retention dropped {dropped} snapshots")
    _compact_report(cst, False)
    if cost is not None:
        click.echo("prune in all: " + backend_cost_line(cost))


@click.command()
@click.option("--set", "set_name", default=None, help="Only this set's snapshots.")
@click.option("--snapshot", "specs", multiple=True, metavar="SNAP", help="Only these snapshots (repeatable).")
@click.option("--deep", is_flag=True, help="Read, decompress and hash every chunk.")
@click.option("--sample", type=click.FloatRange(0.01, 100), default=None, metavar="PERCENT",
              help="Deep-check a deterministic PERCENT of the chunks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which sample (change it to cover others).")
@click.option("--recheck-after", type=float, default=0, metavar="SECONDS",
              help="Skip chunks read good less than SECONDS ago (0: read all).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def verify(ctx, set_name, specs, deep, sample, seed, recheck_after, as_json):
    """Check the repository. Exit 0: clean; 3: damage found; other: could not run."""
    from .snapshots import resolve
    from .verify import verify as run

    if deep and sample is not None:
        raise InvalidArgument("use --deep or --sample, not both")
    try:
        repo = open_repo(ctx)
    except (ReadOnlyRepository, PermissionDenied):
        # Checking needs only reading: on a read-only file system (or without
        # write permission) verify runs all the same and records nothing.
        repo = open_repo(ctx, readonly=True)
    snaps = None
    if specs:
        with repo.reading() as txn:
            snaps = [resolve(repo, txn, s) for s in specs]
    depth = "deep" if deep else "sample" if sample is not None else "structural"
    status = StatusLine("verify", json_lines=as_json)

    def progress(d):
        if d["phase"] == "walk":
            status.show(f"verify: walking trees: {d['trees']} trees, {d['files']} files, {d['chunks']} chunks", **d)
        else:
            pct = 100.0 * d["bytes_read"] / d["bytes_total"] if d["bytes_total"] else 100.0
            status.show(f"verify: reading chunks: {pct:5.1f} % of {mib(d['bytes_total'])}, "
                        f"{d['chunks_read']} chunks checked", **d)

    rep = run(repo, snaps, set_name, depth, sample or 100.0, seed, recheck_after, progress=progress)
    status.done()
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        click.echo(f"verified {len(rep.snapshots)} snapshots ({rep.depth}): {rep.trees} trees, {rep.files} files, "
                   f"{rep.chunks} chunks; read {rep.chunks_read} chunks ({mib(rep.bytes_read)}), "
                   f"{rep.chunks_skipped_recent} skipped as recently verified; {rep.seconds:.2f} s")
        for p in rep.problems:
            click.echo(f"problem: {p}")
        for n in rep.notes:
            click.echo(f"note: {n}")
        for d in rep.damage:
            click.echo(f"damaged {d.kind} {d.blob[:16]} at {d.where}: {d.reason}")
            for p in d.paths[:20]:
                click.echo(f"    breaks {p}")
            if len(d.paths) > 20:
                click.echo(f"    ... and {len(d.paths) - 20} more paths")
        click.echo("result: " + ("clean" if rep.clean else "DAMAGE FOUND"))
    if not rep.clean:
        ctx.exit(DamageFound.exit_code)


LINES_PER_PACK = 5
QUARANTINED_LINES = 20


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def repair(ctx, as_json):
    """Rebuild the index from the packs alone; quarantine what is corrupt, mark what it breaks."""
    from .repair import rebuild_index

    path = ctx.obj["repo"]
    if not path:
        raise InvalidArgument("no repository given: use --repo PATH or set PIT_REPO")
    status = StatusLine("repair", json_lines=as_json)

    def progress(d):
        if d["phase"] == "scan":
            status.show(f"repair: reading pack {d['packs'] + 1} of {d['packs_total']}", **d)
        else:
            status.show("repair: writing the new index", force=True, **d)

    rep = rebuild_index(path, progress=progress, keys=key_source(ctx))
    status.done()
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
        if rep.damaged_snapshots or rep.quarantined:
            sys.exit(DamageFound.exit_code)
        return
    click.echo(f"rebuilt the index from {rep.packs} packs ({rep.frames} frames): {rep.snapshots} snapshots, "
               f"{rep.blobs_indexed} blobs, {rep.garbage_frames} garbage frames; {rep.seconds:.2f} s")
    per_pack: dict[str, int] = {}
    for p in dict.fromkeys(rep.packs_damaged):
        pack = p.split(" ", 1)[0].rstrip(":")
        per_pack[pack] = per_pack.get(pack, 0) + 1
        if per_pack[pack] <= LINES_PER_PACK:
            click.echo(f"damaged: {p}")
    for pack, n in per_pack.items():
        if n > LINES_PER_PACK:
            click.echo(f"damaged: {pack}: ... and {n - LINES_PER_PACK} more damaged stretches")
    quarantined = list({q["blob"]: q for q in rep.quarantined}.values())
    for q in quarantined[:QUARANTINED_LINES]:
        if q.get("intact_copy"):
            click.echo(f"damaged copy of {q.get('kind', '?')} {q['blob'][:16]}: {q['reason']} "
                       f"(an intact copy is kept: nothing lost)")
        else:
            click.echo(f"quarantined {q.get('kind', '?')} {q['blob'][:16]}: {q['reason']}")
    if len(quarantined) > QUARANTINED_LINES:
        click.echo(f"quarantined ... and {len(quarantined) - QUARANTINED_LINES} more blobs (`--json` lists them all)")
    for label, paths in rep.damaged_snapshots.items():
        paths = list(dict.fromkeys(paths))
        click.echo(f"snapshot {label} is DAMAGED; lost: {', '.join(paths[:10])}"
                   f"{f' ... and {len(paths) - 10} more' if len(paths) > 10 else ''}")
    if rep.blobs_quarantined:
        click.echo(f"{rep.blobs_quarantined} lost blobs keep their place in the index: the next snapshot of "
                   f"intact data that holds them heals the damaged snapshots (`pit verify` confirms)")
    if rep.damaged_snapshots or rep.quarantined:
        sys.exit(DamageFound.exit_code)


COMMANDS = [policy, forget, pin, unpin, compact, prune, verify, repair]
