"""The restore-view commands of `pit`, added through the `pit.commands`
entry-point group: `pit serve`, `pit mount`, `pit versions`, `pit passwd`."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from store.errors import InvalidArgument, RepositoryLocked


def _repo(ctx, repo_arg: str | None = None):
    from store.repository import Repository

    path = repo_arg or (ctx.find_root().obj or {}).get("repo")
    if not path:
        raise InvalidArgument("no repository given: use --repo PATH or set PIT_REPO")
    from store.cli_support import key_source

    repo = Repository(path, keys=key_source(ctx))  # an encrypted repository: pit's --key-file, PIT_PASSWORD...
    ctx.call_on_close(repo.close)
    return repo


def refresh_versions_index(repo, echo=lambda m: None) -> None:
    """Rebuild the versions index of any set it does not cover exactly (a repo
    from before the index, a repair, a drop by an older pit). Needs the writer
    lock briefly; if a writer is busy, the next snapshot commit does it."""
    from store import versions
    from store.snapshots import list_sets

    with repo.reading() as txn:
        stale = [s for s in list_sets(repo, txn) if not versions.is_current(repo, txn, s)]
    if not stale:
        return
    try:
        with repo.writer(lock_wait=2.0) as w:
            for s in stale:
                n = versions.reindex_set(w, s)
                echo(f"rebuilt the versions index of set {s} ({n} events)")
    except RepositoryLocked:
        echo("a writer is busy: the versions index of " + ", ".join(stale) + " is rebuilt at its next snapshot")


@click.command()
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Server TOML: listen address, TLS, users and their scopes (see docs/restore.md).")
@click.option("--listen", default=None, help="Address to listen on (default 127.0.0.1, or the config's).")
@click.option("--port", "-p", default=None, type=int, help="Port (default 8080, or the config's).")
@click.option("--self-signed", is_flag=True,
              help="Serve HTTPS with a self-signed certificate kept in REPO/serve-tls/ (made on first use); "
                   "the same as `self_signed = true` in the config's [server].")
@click.option("--litmus-scratch", "scratch_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="DIAGNOSTIC ONLY, loopback only: also serve DIR writable at /litmus-scratch "
                   "for the litmus conformance suite (see docs/restore.md).")
@click.option("--verbose", "-v", count=True, help="Log requests (-v) or more (-vv).")
@click.pass_context
def serve(ctx, config_path, listen, port, self_signed, scratch_dir, verbose):
    """Serve the repository read-only over WebDAV (map it as a network drive)."""
    from .config import ServerConfig, load_config
    from .server import make_server, self_signed as make_cert, serve_forever

    repo = _repo(ctx)
    cfg = load_config(config_path) if config_path else ServerConfig()
    if listen:
        cfg.listen = listen
    if port is not None:
        cfg.port = port
    if not cfg.users and not cfg.anonymous:
        raise InvalidArgument("no users configured: give --config FILE with [users.NAME] entries "
                              "(make password hashes with `pit passwd`)")
    if (self_signed or cfg.self_signed) and not cfg.tls:
        from .server import certificate_names

        cfg.certificate, cfg.private_key = make_cert(os.path.join(repo.path, "serve-tls"), certificate_names(cfg))
        click.echo(f"self-signed certificate: {cfg.certificate}", err=True)
    if scratch_dir:
        import ipaddress
        try:
            loopback = ipaddress.ip_address(cfg.listen).is_loopback
        except ValueError:
            loopback = cfg.listen == "localhost"
        if not loopback:
            raise InvalidArgument("--litmus-scratch is a diagnostic for loopback only (listen on 127.0.0.1)")
        os.makedirs(scratch_dir, exist_ok=True)
        click.echo(f"DIAGNOSTIC: {os.path.abspath(scratch_dir)} is served WRITABLE at /litmus-scratch/", err=True)
    refresh_versions_index(repo, lambda m: click.echo(m, err=True))
    server = make_server(repo, cfg, verbose=1 + verbose * 2, scratch_dir=scratch_dir)
    from store.logsetup import setup_logging  # after make_server: it replaces wsgidav's own handler

    setup_logging("DEBUG" if verbose > 1 else "INFO")
    scheme = "https" if cfg.tls else "http"
    click.echo(f"serving {repo.path} read-only at {scheme}://{cfg.listen}:{cfg.port}/ "
               f"({len(cfg.users)} users{', anonymous allowed' if cfg.anonymous else ''})", err=True)
    serve_forever(server)


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="[REPO] MOUNTPOINT")
@click.option("--gmt", is_flag=True, help="Name snapshot folders @GMT-YYYY.MM.DD-HH.MM.SS (Samba shadow_copy2).")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount (needs user_allow_other).")
@click.option("--debug", is_flag=True)
@click.pass_context
def mount(ctx, args, gmt, allow_other, debug):
    """Mount the repository read-only with FUSE; unmount with `fusermount3 -u` or Ctrl-C."""
    from store.view import View

    from .fuse import mount as do_mount

    if len(args) > 2:
        raise InvalidArgument("give [REPO] MOUNTPOINT")
    repo = _repo(ctx, args[0] if len(args) == 2 else None)
    mp = args[-1]
    if not os.path.isdir(mp):
        raise InvalidArgument(f"mount point {mp} is not a directory")
    refresh_versions_index(repo, lambda m: click.echo(m, err=True))
    click.echo(f"mounting {repo.path} read-only at {os.path.abspath(mp)}", err=True)
    do_mount(View(repo, gmt_names=gmt), mp, allow_other=allow_other, debug=debug)


@click.command()
@click.argument("set_name", metavar="SET")
@click.argument("path", required=False, default="")
@click.option("--json", "as_json", is_flag=True)
@click.option("--reindex", is_flag=True, help="Rebuild the set's versions index first.")
@click.pass_context
def versions(ctx, set_name, path, as_json, reindex):
    """List the distinct versions of PATH in SET (or, for a folder, every name it ever held)."""
    from store import versions as V
    from store.view import version_name

    repo = _repo(ctx)
    if reindex:
        with repo.writer() as w:
            V.reindex_set(w, set_name)
    else:
        refresh_versions_index(repo, lambda m: click.echo(m, err=True))
    p = path.strip("/").encode("utf-8", "surrogateescape")
    with repo.reading() as txn:
        vs = V.list_versions(repo, txn, set_name, p) if p else []
        kids = V.list_children(repo, txn, set_name, p) if (not vs or vs[-1].state.type == 2) else []
    if as_json:
        click.echo(json.dumps({
            "set": set_name, "path": path,
            "versions": [{"first": v.snapshots[0].name, "time": v.snapshots[0].time_iso, "size": v.state.size,
                          "type": {1: "file", 2: "dir", 3: "symlink"}[v.state.type],
                          "id": (v.state.content or b"").hex(),
                          "mtime_ns": v.state.mtime_ns, "snapshots": [s.name for s in v.snapshots]} for v in vs],
            "children": [{"name": c.name.decode("utf-8", "surrogateescape"), "present": c.present,
                          "type": {1: "file", 2: "dir", 3: "symlink"}[c.state.type]} for c in kids],
        }, indent=2))
        return
    name = os.path.basename(path.rstrip("/"))
    for v in vs:
        if v.state.type != 1:
            continue
        first, last = v.snapshots[0], v.snapshots[-1]
        mt = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.state.mtime_ns // 10**9))
        click.echo(f"{version_name(name, first.name):50}  {v.state.size:>12}  modified {mt}  "
                   f"in {len(v.snapshots)} snapshot(s) {first.name} .. {last.name}")
    for c in kids:
        flag = "" if c.present else "  (deleted)"
        click.echo(c.name.decode("utf-8", "replace") + ("/" if c.state.type == 2 else "") + flag)
    if not vs and not kids:
        click.echo(f"{path or '/'}: no versions in set {set_name}{_did_you_mean(repo, set_name, p)}", err=True)
        sys.exit(1)


def _did_you_mean(repo, set_name: str, path: bytes) -> str:
    """`; did you mean src/report.txt?` for a bare name that the set holds elsewhere (a courtesy: never an
    error of its own)."""
    from store.find import suggest_paths

    try:
        found = suggest_paths(repo, set_name, path) if path else []
    except Exception:
        return ""
    if not found:
        return ""
    return "; did you mean " + " or ".join(f.decode("utf-8", "replace") for f in found[:5]) + "?"


@click.command()
@click.option("--user", "-u", default=None, help="Print a ready [users.NAME] TOML block for this user.")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="Read the password from standard input (also when it is not a terminal).")
def passwd(user, from_stdin):
    """Make a scrypt password hash for the `pit serve` config."""
    from .config import hash_password

    if from_stdin or not sys.stdin.isatty():  # piped: no prompt (getpass would warn and echo)
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = click.prompt("password", hide_input=True, confirmation_prompt=True)
    if not pw:
        raise InvalidArgument("empty password")
    h = hash_password(pw)
    if user:
        click.echo(f'[users.{user}]\npassword = "{h}"\nsets = ["*"]')
    else:
        click.echo(h)
