"""The `pit` command line: a click group. The store contributes its commands
here; other packages add theirs through the `pit.commands` entry-point group,
so `store` never imports them.

This module composes the group: its own commands, the maintenance commands
(`cli_maintenance.py`) and the demo (`demo.py`). What they share (the group
class, opening the repository, the progress line) is in `cli_support.py`,
which imports none of them."""
from __future__ import annotations

import json
import os
import stat as statmod
import sys
import time

import click

from .cli_maintenance import COMMANDS
from .cli_support import PitGroup, StatusLine, fail, mib, one_line, open_repo
from .cli_keys import key_group
from .demo import demo_command
from .errors import InvalidArgument, SnapshotNotFound, StoreError

EXIT_CHANGED_WHILE_READ = 4  # the snapshot was saved, but some files changed while being read


def _split_spec(spec: str) -> tuple[str, str]:
    snap, _, path = spec.partition(":")
    return snap, path


@click.group(cls=PitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", "-r", envvar="PIT_REPO", metavar="PATH", help="Repository path (or set PIT_REPO).")
@click.option("--key-file", envvar="PIT_KEY_FILE", metavar="PATH",
              help="Key file of an encrypted repository (or set PIT_KEY_FILE).")
@click.option("--password-file", envvar="PIT_PASSWORD_FILE", metavar="PATH",
              help="File whose first line is an encrypted repository's passphrase (or set PIT_PASSWORD).")
@click.version_option(package_name="pitstore", prog_name="pit")
@click.pass_context
def main(ctx, repo, key_file, password_file):
    """pitstore: continuous data protection, versioned snapshots and restore."""
    ctx.ensure_object(dict)
    ctx.obj["repo"] = repo
    ctx.obj["key_file"] = key_file
    ctx.obj["password_file"] = password_file


@main.command()
@click.option("--avg-chunk-size", default=None, type=int, metavar="BYTES",
              help="Average FastCDC chunk size, a power of two (default 16384). Fixed for the repository's life.")
@click.option("--compression-level", default=3, show_default=True, type=int, help="zstd level (1-22).")
@click.option("--pack-size", default=32, show_default=True, type=int, help="Target pack size in MiB.")
@click.option("--encrypt/--no-encrypt", default=None,
              help="Encrypt packs at rest (docs/format.md, section 12). The key comes from --key-file "
                   "(created when missing) and/or a passphrase (PIT_PASSWORD, --password-file, or asked). "
                   "Local repositories default to --no-encrypt; one in a bucket must say which.")
@click.option("--cipher", type=click.Choice(["aes-256-gcm", "aes-256-gcm-siv", "chacha20-poly1305"]),
              default=None, help="The AEAD of an encrypted repository (default aes-256-gcm).")
@click.option("--backend", "backend_url", default=None, metavar="s3://BUCKET/PREFIX",
              help="Keep the packs in an S3-compatible bucket (the index, lock and a read cache stay in REPO). "
                   "Credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws.")
@click.option("--s3-endpoint", default=None, metavar="URL", help="The S3 endpoint (MinIO, Ceph, rclone ...).")
@click.option("--s3-region", default=None, help="The bucket's region.")
@click.option("--s3-profile", default=None, help="The AWS profile to take credentials from (stored by name only).")
@click.option("--cache-size", default=1024, show_default=True, type=int, metavar="MiB",
              help="Cap of the local cache of pack ranges read from the bucket (0: no cache).")
@click.option("--attach", is_flag=True,
              help="The bucket already holds a repository: fetch its config and key slots; then `pit repair` "
                   "builds the index.")
@click.pass_context
def init(ctx, avg_chunk_size, compression_level, pack_size, encrypt, cipher, backend_url, s3_endpoint, s3_region,
         s3_profile, cache_size, attach):
    """Create a new, empty repository (or attach to one in a bucket)."""
    from .chunker import DEFAULT_AVG
    from .cli_support import key_source
    from .repository import Repository

    path = ctx.obj["repo"]
    if not path:
        raise InvalidArgument("no repository given: use --repo PATH or set PIT_REPO")
    if not 1 <= pack_size <= 1024:
        raise InvalidArgument("--pack-size must be between 1 and 1024 MiB")
    if cipher and not encrypt:
        raise InvalidArgument("--cipher needs --encrypt")
    backend = None
    if backend_url is not None:
        from .s3backend import S3Location

        backend = S3Location.parse(backend_url, s3_endpoint, s3_region, s3_profile,
                                   cache_bytes=cache_size * 1024 * 1024).to_config()
        if encrypt is None and not attach:
            # off site, the bucket's owner reads what is not encrypted (issue 18): refusing must be said
            raise InvalidArgument("a repository in a bucket is encrypted: give --encrypt (with --key-file, "
                                  "--password-file or PIT_PASSWORD), or --no-encrypt to store it in the clear")
    elif attach or s3_endpoint or s3_region or s3_profile:
        raise InvalidArgument("--attach and the --s3-* options need --backend s3://BUCKET/PREFIX")
    if attach and encrypt is not None:
        raise InvalidArgument("--attach takes the bucket's repository as it is: no --encrypt/--no-encrypt")
    keys = None
    if encrypt:
        keys = key_source(ctx, confirm=True)
        if keys.passphrase is None and keys.key_file is None:
            if keys.prompt is None:
                raise InvalidArgument("--encrypt needs a key: --key-file PATH, --password-file PATH or PIT_PASSWORD")
            keys.passphrase = keys.prompt()
    repo = Repository.init(path, avg_chunk=avg_chunk_size or DEFAULT_AVG, level=compression_level,
                           pack_size=pack_size * 1024 * 1024, encrypt=bool(encrypt), keys=keys, aead=cipher,
                           backend=backend, attach=attach)
    if repo is None:
        click.echo(f"attached {os.path.abspath(path)} to {backend['url']}; run `pit --repo {path} repair` to build "
                   f"the index from the bucket")
        return
    p = repo.params
    enc = f", encrypted with {repo.codec.aead_name}" if repo.codec.sealed else ""
    click.echo(f"created repository {repo.id[:12]} at {repo.path} "
               f"(chunks {p.min_size}/{p.avg_size}/{p.max_size} bytes, zstd {repo.level}{enc})")
    repo.close()


def filter_options(f):
    """restic's exclude flags (store/filters.py; docs/store.md, "Excludes")."""
    opts = [
        click.option("--exclude", "-e", "exclude", multiple=True, metavar="PATTERN",
                     help="Leave out paths matching PATTERN (gitignore style; repeatable)."),
        click.option("--iexclude", multiple=True, metavar="PATTERN", help="The same, ignoring case."),
        click.option("--exclude-file", multiple=True, metavar="FILE", help="Read --exclude patterns from FILE."),
        click.option("--iexclude-file", multiple=True, metavar="FILE", help="Read --iexclude patterns from FILE."),
        click.option("--exclude-caches", is_flag=True,
                     help="Leave out directories holding a CACHEDIR.TAG with the standard signature."),
        click.option("--exclude-if-present", multiple=True, metavar="NAME[:HEADER]",
                     help="Leave out directories holding a file NAME (starting with HEADER)."),
        click.option("--one-file-system", "-x", is_flag=True,
                     help="Do not cross file systems: a mount point is kept as an empty directory."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


FILTER_FLAGS = ("exclude", "iexclude", "exclude_file", "iexclude_file", "exclude_caches", "exclude_if_present",
                "one_file_system")


def _filter_rules(flags: dict):
    from .filters import rules_from_options

    return rules_from_options(**{k: flags.pop(k) for k in FILTER_FLAGS})


@main.command()
@click.option("--set", "set_name", required=True, help="Replication set name.")
@click.option("--changes", type=click.File("r"), default=None, metavar="FILE",
              help="File listing changed/added/deleted paths, one per line ('-' for stdin); "
                   "only these are examined (the rest comes from the latest snapshot). A line "
                   "PATH<TAB>OFFSET<TAB>LENGTH gives a file's written bytes (docs/store.md, \"Change sets\").")
@click.option("--capture", type=click.Choice(["reflink"]), default=None,
              help="Find the written ranges of big files by comparing reflink clones (XFS, btrfs); "
                   "other file systems read them whole.")
@click.option("--clone-dir", default=None, metavar="DIR",
              help="Where --capture keeps its clones, on the sources' file system "
                   "[default: .pit-clones/SET in the first source directory, left out of the snapshot].")
@click.option("--capture-min-size", default=64 * 1024 * 1024, show_default=True, type=click.IntRange(min=0),
              help="--capture handles files of at least this many bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
@click.option("--lock-wait", default=10.0, show_default=True, help="Seconds to wait for another writer.")
@filter_options
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.pass_context
def snapshot(ctx, set_name, changes, capture, clone_dir, capture_min_size, as_json, lock_wait, paths, **flags):
    """Take a snapshot of PATHS as replication set SET."""
    from .changeset import parse_changes
    from .ingest import create_snapshot

    rules = _filter_rules(flags)
    rules.compile([os.path.abspath(p) for p in paths])  # a bad pattern: one line, before anything is opened
    changed = parse_changes(changes) if changes is not None else None  # a bad line: one line, nothing done
    repo = open_repo(ctx, lock_wait=lock_wait)
    cap = None
    if capture == "reflink":
        from .capture import ReflinkCapture, default_clone_dir

        cap = ReflinkCapture.open(clone_dir or default_clone_dir(paths[0], set_name), capture_min_size)
    status = StatusLine("snapshot", json_lines=as_json)

    def progress(st):
        status.show(f"{st['files']} files, {mib(st['bytes'])} examined, {mib(st['bytes_read'])} read",
                    files=st["files"], bytes=st["bytes"], bytes_read=st["bytes_read"])

    status.show(f"snapshot of set {set_name}: 0 files examined", files=0, bytes=0, bytes_read=0)

    try:
        snap = create_snapshot(repo, set_name, list(paths), changed, progress=progress, lock_wait=lock_wait,
                               filters=rules, capture=cap)
    except BaseException:
        if cap is not None:
            cap.abort()
        raise
    if cap is not None:
        cap.commit()  # the clones the snapshot read become the next baselines
    status.done()
    s = snap.stats
    if as_json:
        click.echo(json.dumps(snap.to_json(), indent=2))
        _exit_if_changed_while_read(s)
        return
    click.echo(f"snapshot {snap.short} saved as {snap.set}@{snap.name}")
    click.echo(f"  {s['files']} files, {s['dirs']} dirs, {mib(s['bytes'])}; examined {s['examined_files']} files "
               f"({'change set' if s['mode'] == 'changes' else 'full scan'}), read {s['files_read']}")
    if "range_files" in s or "capture" in s:
        click.echo(f"  ranges: {s.get('range_files', 0)} files from written ranges "
                   f"({mib(s.get('range_bytes_read', 0))} read), {s.get('range_fallbacks', 0)} read whole"
                   + (f"; capture {s['capture']['mechanism']} (files >= {mib(s['capture']['min_size'])})"
                      if "capture" in s else ""))
        for o in s.get("range_log", [])[:20]:
            click.echo(f"    {o['path']}: {o['mode']}" + (f" ({o['reason']})" if o.get("reason") else
                                                         f", {mib(o['bytes_read'])} of {mib(o['size'])} read"))
    if s.get("excluded"):
        click.echo(f"  excluded: {s['excluded']} paths (filter: {json.dumps(s.get('filter', {}))})")
    click.echo(f"  new: {s['new_chunks']} blobs, {mib(s['new_bytes'])} raw, {mib(s['new_stored'])} stored, "
               f"in {s['duration']:.2f} s")
    if s.get("healed"):
        click.echo(f"  healed: {s['healed']} blobs that `pit repair` had found lost are stored again "
                   f"(the snapshots they broke restore again)")
    for w in s.get("warnings", [])[:20]:
        click.echo(f"  warning: {one_line(w)}", err=True)
    _exit_if_changed_while_read(s)


def _exit_if_changed_while_read(stats: dict) -> None:
    """A snapshot holding files that were written to while read is saved
    (the rest of it is good) but is not a copy of one moment: never exit 0."""
    n = stats.get("changed_while_read_count", 0)
    if n:
        click.echo(f"pit: warning: {n} file(s) changed while being read and were stored as read "
                   f"(see docs/store.md, \"Live files\")", err=True)
        sys.exit(EXIT_CHANGED_WHILE_READ)


@main.command()
@click.option("--set", "set_name", default=None, help="Only this set.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshots(ctx, set_name, as_json):
    """List snapshots, oldest first."""
    from .snapshots import list_snapshots

    repo = open_repo(ctx, readonly=True)
    with repo.reading() as txn:
        snaps = list_snapshots(repo, txn, set_name)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in snaps], indent=2))
        return
    if not snaps:
        click.echo("no snapshots")
        return
    click.echo(f"{'ID':12}  {'SET':12}  {'NAME':22}  {'HOST':12}  {'FILES':>7}  {'NEW':>10}  PATHS")
    for s in snaps:
        st = s.stats
        mark = f"  [{st['changed_while_read_count']} changed while read]" if st.get("changed_while_read_count") else ""
        click.echo(f"{s.short:12}  {s.set:12}  {s.name:22}  {s.host[:12]:12}  {st.get('files', 0):>7}  "
                   f"{mib(st.get('new_stored', 0)):>10}  {' '.join(s.paths)}{mark}")


def parse_time(text: str) -> int:
    """`2026-12-05T14:03:07` (local time), `...Z` or `...+01:00` -> Unix nanoseconds."""
    import datetime

    try:
        t = datetime.datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise InvalidArgument(f"--at {text!r} is not a time (2026-12-05T14:03:07, optionally with Z or an "
                              "offset)") from None
    if t.tzinfo is None:
        t = t.astimezone()  # the local time zone
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


def _at_or_before(repo, txn, spec: str, at_ns: int):
    """The newest snapshot of set `spec` taken at or before `at_ns`."""
    from .snapshots import list_snapshots

    if "@" in spec:
        raise InvalidArgument("--at chooses the snapshot: give the set alone (SET or SET:PATH), not SET@SNAPSHOT")
    snaps = list_snapshots(repo, txn, spec)
    if not snaps:
        raise SnapshotNotFound(f"set {spec!r} has no snapshots")
    before = [s for s in snaps if s.time_ns <= at_ns]
    if not before:
        raise SnapshotNotFound(f"set {spec!r} has no snapshot at or before that time (its oldest is "
                               f"{snaps[0].time_iso})")
    return before[-1]


def _roll_forward(repo, snap, target: str, at_ns: int, path: str) -> dict | None:
    """The `pit.restore_at` entry points (a database set's log replayed up to the second); the first that
    knows the set answers."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="pit.restore_at"):
        out = ep.load()(repo, snap, target, at_ns, path)
        if out is not None:
            return out
    return None


def _lookup(repo, reader, snap, path: str):
    """The entry at `path` in `snap`; when it is not there, the error names the paths of the snapshot
    with the same base name (`report.txt` -> `office/src/report.txt`), found in the versions index."""
    from .errors import PathNotFound

    try:
        return reader.lookup(snap.root, path)
    except PathNotFound as exc:
        from .find import suggest_paths

        try:
            found = suggest_paths(repo, snap.set, path.strip("/").encode("utf-8", "surrogateescape"))
        except Exception:  # a suggestion is a courtesy: never an error of its own
            found = []
        here = []
        for p in found:
            try:
                reader.lookup(snap.root, p)
                here.append(p.decode("utf-8", "replace"))
            except PathNotFound:
                continue
        if not here:
            raise
        tail = "/" + path.strip("/")
        here = [p for p in here if p.endswith(tail)] or here  # `sub/report.txt`: the ones under a `sub`
        raise PathNotFound(f"{exc}; did you mean {' or '.join(here[:5])}"
                           f"{f' (and {len(here) - 5} more)' if len(here) > 5 else ''}?") from None


def _entry_json(path: bytes, e) -> dict:
    from .trees import TYPE_NAMES

    d = {"path": path.decode(errors="surrogateescape"), "name": e.name.decode(errors="surrogateescape"),
         "type": TYPE_NAMES[e.type], "mode": oct(e.mode), "uid": e.uid, "gid": e.gid,
         "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.mtime_ns // 10**9)), "mtime_ns": e.mtime_ns,
         "size": e.size}
    if e.type == 3:
        d["target"] = e.content.decode(errors="surrogateescape")
    return d


def _ls_line(path: bytes, e) -> str:
    mode = statmod.filemode(e.st_mode)
    mt = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 10**9))
    name = path.decode(errors="replace") + ("/" if e.type == 2 else "")
    if e.type == 3:
        name += " -> " + e.content.decode(errors="replace")
    return f"{mode} {e.uid:>5} {e.gid:>5} {e.size:>12} {mt} {name}"


@main.command()
@click.argument("spec", metavar="SNAP[:PATH]")
@click.option("--recursive", "-R", is_flag=True, help="List the whole subtree.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls(ctx, spec, recursive, as_json):
    """List a directory of a snapshot."""
    from .objects import ObjectReader
    from .snapshots import resolve

    repo = open_repo(ctx, readonly=True)
    snap_spec, path = _split_spec(spec)
    with repo.reading() as txn:
        snap = resolve(repo, txn, snap_spec)
        r = ObjectReader(repo, txn)
        e = _lookup(repo, r, snap, path)
        base = path.strip("/").encode("utf-8", "surrogateescape")
        if e.type != 2:
            rows = [(base, e)]
        elif recursive:
            rows = list(r.walk(e.content, base))
        else:
            rows = [((base + b"/" + c.name) if base else c.name, c) for c in r.tree(e.content)]
    if as_json:
        click.echo(json.dumps([{**_entry_json(p, c), **_ls_meta_json(c)} for p, c in rows], indent=2))
    else:
        for p, c in rows:
            click.echo(_ls_line(p, c))


def _ls_meta_json(e) -> dict:
    """What `ls --json` adds for metadata beside the bytes (docs/format.md 6.1):
    extended attribute names, a sparse file's data bytes and extents, the
    inode key of a hard-linked file."""
    d = {}
    if e.xattrs:
        d["xattrs"] = [n.decode(errors="surrogateescape") for n, _ in e.xattrs]
    if e.type == 1 and e.extents is not None:
        d["sparse"] = {"data_bytes": e.data_size, "extents": [list(x) for x in e.extents]}
    if e.inode_key is not None:
        d["inode"] = list(e.inode_key)
    return d


@main.command()
@click.argument("spec", metavar="SNAP:PATH")
@click.pass_context
def cat(ctx, spec):
    """Write one file of a snapshot to standard output.

    Before the first byte, every chunk of the file is looked up in the index
    (no reads): a file with a missing chunk writes nothing. A chunk found
    corrupt while reading is an error naming its offset in the file."""
    from .errors import IntegrityError, PathNotFound
    from .objects import ObjectReader
    from .restore import check_file_present, file_pieces
    from .snapshots import resolve

    repo = open_repo(ctx, readonly=True)
    snap_spec, path = _split_spec(spec)
    with repo.reading() as txn:
        snap = resolve(repo, txn, snap_spec)
        r = ObjectReader(repo, txn)
        e = _lookup(repo, r, snap, path)
        if e.type != 1:
            raise PathNotFound(f"{path or '/'} is not a file")
        name = path.strip("/")
        try:
            cl = r.chunk_list(e)
        except IntegrityError as exc:
            raise type(exc)(f"{name}: its chunk list cannot be read: {exc} (nothing written)") from None
        check_file_present(r, e, cl, name)
        out = sys.stdout.buffer
        pos = 0
        zeros = bytes(1 << 20)
        try:
            for off, data in file_pieces(r, e, cl):
                while pos < off:  # a sparse file's hole
                    pos += out.write(zeros[:min(len(zeros), off - pos)])
                out.write(data)
                pos = off + len(data)
        except IntegrityError as exc:
            out.flush()
            raise type(exc)(f"{name}: {exc} ({pos} bytes written)") from None
        while pos < e.size:
            pos += out.write(zeros[:min(len(zeros), e.size - pos)])
        out.flush()


@main.command()
@click.argument("old")
@click.argument("new")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def diff(ctx, old, new, as_json):
    """Show what changed between two snapshots (+ added, - removed, M modified, m metadata, T type).

    A metadata change names what changed: mode, owner, mtime, xattrs
    (extended attributes and ACLs), hardlinks; --json lists them as
    `metadata`."""
    from .diff import diff_trees
    from .objects import ObjectReader
    from .snapshots import resolve

    repo = open_repo(ctx, readonly=True)
    with repo.reading() as txn:
        a, b = resolve(repo, txn, old), resolve(repo, txn, new)
        r = ObjectReader(repo, txn)
        changes = list(diff_trees(r, a.root, r, b.root))
    if as_json:
        click.echo(json.dumps({"old": a.hex, "new": b.hex, "changes": [c.to_json() for c in changes]}, indent=2))
        return
    for c in changes:
        extra = ""
        if c.status == "M":
            delta = c.new.size - c.old.size
            extra = f"  ({c.old.size} -> {c.new.size} bytes, {delta:+d})"
        elif c.status == "m":
            extra = f"  ({', '.join(c.metadata)})"
        click.echo(f"{c.status} {c.path.decode(errors='replace')}{'/' if (c.new or c.old).type == 2 else ''}{extra}")
    counts = {s: sum(1 for c in changes if c.status == s) for s in "+-MmT"}
    click.echo(f"{counts['+']} added, {counts['-']} removed, {counts['M']} modified, "
               f"{counts['m']} metadata only, {counts['T']} type changed", err=True)


@main.command()
@click.argument("spec", metavar="SNAP[:PATH]")
@click.option("--target", "-t", required=True, type=click.Path(file_okay=False), help="Directory to restore into.")
@click.option("--fail-fast", is_flag=True,
              help="Stop at the first file that cannot be restored because of damage (default: restore every "
                   "other file, then name the damaged ones and exit 3).")
@click.option("--include", "-i", "include", multiple=True, metavar="PATTERN",
              help="Restore only paths matching PATTERN (and what is under a matching directory); repeatable.")
@click.option("--iinclude", multiple=True, metavar="PATTERN", help="The same, ignoring case.")
@click.option("--exclude", "-e", "exclude", multiple=True, metavar="PATTERN",
              help="Leave out paths matching PATTERN (gitignore style, as `pit snapshot --exclude`).")
@click.option("--iexclude", multiple=True, metavar="PATTERN", help="The same, ignoring case.")
@click.option("--include-file", multiple=True, metavar="FILE", help="Read --include patterns from FILE.")
@click.option("--iinclude-file", multiple=True, metavar="FILE", help="Read --iinclude patterns from FILE.")
@click.option("--exclude-file", multiple=True, metavar="FILE", help="Read --exclude patterns from FILE.")
@click.option("--iexclude-file", multiple=True, metavar="FILE", help="Read --iexclude patterns from FILE.")
@click.option("--overwrite", type=click.Choice(["always", "if-changed", "if-newer", "never"]), default="if-newer",
              show_default=True,
              help="A file already in TARGET that differs from the snapshot's: always replace it; replace it if its "
                   "content differs; only if the snapshot's copy is newer (a file changed in TARGET since is "
                   "kept); never.")
@click.option("--delete", is_flag=True, help="Remove what TARGET holds that the (selected) snapshot does not.")
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be written, overwritten, kept and deleted.")
@click.option("--verify", is_flag=True, help="Read every restored file back and compare it with the snapshot.")
@click.option("--at", "at", metavar="TIME",
              help="SET as it was at TIME (2026-12-05T14:03:07, local time unless it ends in Z or an offset): "
                   "the newest snapshot taken by then; a database set streamed with its log is rolled forward "
                   "to that second.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def restore(ctx, spec, target, fail_fast, include, iinclude, exclude, iexclude, include_file, iinclude_file,
            exclude_file, iexclude_file, overwrite, delete, dry_run, verify, at, as_json):
    """Restore a snapshot, or one file or directory of it, into TARGET.

    A file already in TARGET is replaced only as --overwrite says (default
    if-newer: what you changed there since the snapshot is kept, and named).
    A file whose data is damaged in the repository is not restored (nothing
    of it is left in TARGET); every other file is. Each damaged file (or
    subtree whose listing is unreadable) is named on stderr and the exit
    code is 3."""
    from .errors import DamageFound
    from .filters import read_pattern_file
    from .objects import ObjectReader
    from .restore import Restorer, Selection, count_failures
    from .snapshots import resolve

    def with_files(pats, files):
        return [*pats, *(p for f in files for p in read_pattern_file(f))]

    include, iinclude = with_files(include, include_file), with_files(iinclude, iinclude_file)
    exclude, iexclude = with_files(exclude, exclude_file), with_files(iexclude, iexclude_file)
    repo = open_repo(ctx, readonly=True)
    snap_spec, path = _split_spec(spec)
    at_ns = parse_time(at) if at else None
    status = StatusLine("restore", json_lines=as_json)
    t0 = time.monotonic()
    with repo.reading() as txn:
        snap = resolve(repo, txn, snap_spec) if at_ns is None else _at_or_before(repo, txn, snap_spec, at_ns)
        selection = Selection(include, iinclude, exclude, iexclude, sources=snap.paths)
        r = ObjectReader(repo, txn)
        e = _lookup(repo, r, snap, path)

        def progress(st):
            status.show(f"restored {st.files} files, {mib(st.bytes)}", files=st.files, bytes=st.bytes)

        rs = Restorer(r, progress=progress, fail_fast=fail_fast, overwrite=overwrite, delete=delete,
                      dry_run=dry_run, verify=verify, selection=selection)
        try:
            st = rs.restore(e, target, path=path)
        except DamageFound as exc:
            if getattr(exc, "failures", None) is None:
                raise
            st = exc.stats
        except StoreError:
            status.done()
            _restore_failures(rs.failures)  # what was found before the error that stopped it
            raise
    status.done()
    if dry_run:
        _restore_plan(snap, path, target, rs, st, as_json)
        return
    rolled = _roll_forward(repo, snap, target, at_ns, path) if at_ns is not None and not rs.failures else None
    dt = time.monotonic() - t0
    if as_json:
        click.echo(json.dumps({"snapshot": snap.hex, "target": os.path.abspath(target), "files": st.files,
                               **({"at": at, "rolled_forward": rolled} if at_ns is not None else {}),
                               "dirs": st.dirs, "symlinks": st.symlinks, "bytes": st.bytes, "links": st.links,
                               "xattrs": st.xattrs, "xattrs_not_set": st.xattr_failed, "warnings": st.warnings,
                               "overwritten": st.overwritten, "unchanged": st.unchanged, "deleted": st.removed,
                               "kept": [p for a, p in rs.actions if a == "kept"], "verified": st.verified,
                               "failed": [f.to_json() for f in rs.failures], "seconds": round(dt, 3)}))
    else:
        extra = f", {st.links} hard links" if st.links else ""
        click.echo(f"restored {snap.set}@{snap.name}{':' + path if path else ''} to {target}: "
                   f"{st.files} files, {st.dirs} dirs, {st.symlinks} symlinks{extra}, {mib(st.bytes)} in {dt:.2f} s"
                   + (f"; {st.failed} not restored (damaged)" if st.failed else ""))
        if rolled and "segments" in rolled:  # PostgreSQL: WAL segments replayed
            click.echo(f"  rolled {rolled['database']} forward to {at} with {rolled['wal']} "
                       f"({rolled['segments']} WAL segments from {rolled['from']}): "
                       f"{rolled.get('stopped') or rolled.get('note') or 'end of the log'}")
        elif rolled:  # another engine's entry point: what it says it did
            click.echo(f"  rolled forward to {at} with {rolled.get('wal', 'the archived log')}: "
                       f"{rolled.get('note') or 'end of the log'}")
        elif at_ns is not None:
            click.echo(f"  as of {at}: the snapshot taken at {snap.time_iso} (no database log is kept for "
                       f"set {snap.set})")
        extra = [f"{n} {what}" for n, what in ((st.overwritten, "overwritten"), (st.unchanged, "already equal"),
                                                (st.removed, "deleted (--delete)"),
                                                (st.verified, "read back and verified")) if n]
        if extra:
            click.echo("  " + ", ".join(extra))
        kept = [p for a, p in rs.actions if a == "kept"]
        for p in kept[:20]:
            click.echo(f"pit: warning: kept {one_line(p)}: it differs from the snapshot's and --overwrite is "
                       f"{overwrite}", err=True)
        if len(kept) > 20:
            click.echo(f"pit: warning: ... and {len(kept) - 20} more kept", err=True)
        if kept:
            click.echo(f"pit: warning: {len(kept)} file(s) in the target were kept (changed there since the "
                       f"snapshot?); `--overwrite always` replaces them, `--dry-run` lists them", err=True)
        for w in st.warnings[:20]:
            click.echo(f"pit: warning: {one_line(w)}", err=True)
        if st.xattr_failed > min(len(st.warnings), 20):
            click.echo(f"pit: warning: {st.xattr_failed} extended attributes could not be set in all "
                       f"(--json lists the first {len(st.warnings)} warnings)", err=True)
    if rs.failures:
        if not as_json:
            _restore_failures(rs.failures)
        fail(f"{count_failures(rs.failures)} not restored: the repository's data for them is damaged "
             f"(`pit verify --deep` names it); everything else was restored", DamageFound.exit_code)


def _restore_plan(snap, path, target, rs, st, as_json) -> None:
    """`pit restore --dry-run`: every decision, nothing written."""
    if as_json:
        click.echo(json.dumps({"snapshot": snap.hex, "target": os.path.abspath(target), "dry_run": True,
                               "actions": [{"action": a.split(" ", 1)[0], "path": p} for a, p in rs.actions],
                               "more_actions": rs.actions_dropped,
                               "write": st.files, "bytes": st.bytes, "overwrite": st.overwritten,
                               "unchanged": st.unchanged, "keep": st.kept, "delete": st.removed}, indent=2))
        return
    for a, p in rs.actions:
        if a != "unchanged":
            click.echo(one_line(f"would {a:9} {p}" if not a.startswith(("keep", "refuse")) else f"would {a}: {p}"))
    if rs.actions_dropped:
        click.echo(f"... and {rs.actions_dropped} more")
    click.echo(f"dry run of {snap.set}@{snap.name}{':' + path if path else ''} into {target}: would write "
               f"{st.files - st.overwritten} new and overwrite {st.overwritten} files ({mib(st.bytes)}), keep "
               f"{st.kept}, delete {st.removed}; {st.unchanged} already equal; nothing was written")


MAX_FAILED_LINES = 50  # `pit restore` names at most this many damaged files, then counts the rest


def _restore_failures(failures) -> None:
    for f in failures[:MAX_FAILED_LINES]:
        click.echo(f"pit: error: not restored: {one_line(f.line())}", err=True)
    if len(failures) > MAX_FAILED_LINES:
        click.echo(f"pit: error: ... and {len(failures) - MAX_FAILED_LINES} more not restored "
                   f"(--json lists them all)", err=True)


@main.command()
@click.argument("pattern")
@click.option("--set", "set_name", default=None, help="Only this set.")
@click.option("--ignore-case", "-i", is_flag=True, help="Match regardless of case.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: every hit with its snapshots.")
@click.pass_context
def find(ctx, pattern, set_name, ignore_case, as_json):
    """Find every path matching PATTERN in every snapshot, newest first.

    PATTERN is a gitignore-style line, as for --exclude, matched at any
    depth unless it starts with a slash: `report.txt`, `*.xlsx`,
    `sales/*.xlsx`, `/office/sales/` (from the snapshot's root). Each line is
    one version of a path: its size, modification time, the newest snapshot
    holding it (SET@NAME:PATH, ready for `pit restore`) and the snapshots
    holding that version."""
    from .find import find as run
    from .snapshots import list_sets
    from .versions import is_current

    repo = open_repo(ctx, readonly=True)
    with repo.reading() as txn:
        sets = [set_name] if set_name else list_sets(repo, txn)
        if set_name and set_name not in list_sets(repo, txn):
            from .errors import SnapshotNotFound

            raise SnapshotNotFound(f"no snapshots in set {set_name}")
        for s in sets:
            if not is_current(repo, txn, s):
                click.echo(f"pit: warning: the versions index of set {s} does not cover all its snapshots "
                           f"(run `pit versions --reindex {s}`, or take a snapshot): some may be missing", err=True)
    status = StatusLine("find", json_lines=as_json)

    def progress(seen, found):
        status.show(f"find: {seen} paths looked at, {found} found", paths=seen, found=found)

    hits = run(repo, pattern, set_name, ignore_case, progress=progress)
    status.done()
    if as_json:
        click.echo(json.dumps({"pattern": pattern, "hits": [h.to_json() for h in hits]}, indent=2))
        return
    if not hits:
        click.echo(f"no path matches {pattern!r}" + (f" in set {set_name}" if set_name else ""), err=True)
        sys.exit(1)
    for h in hits:
        st = h.state
        mt = time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.mtime_ns // 10**9))
        path = h.path.decode(errors="replace") + ("/" if st.type == 2 else "")
        n = len(h.snapshots)
        span = f"{h.snapshots[0].name} .. {h.newest.name}" if n > 1 else h.newest.name
        click.echo(one_line(f"{st.size:>12}  {mt}  {h.set}@{h.newest.name}:{path}  "
                            f"({n} snapshot{'s' if n > 1 else ''}: {span})"))


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stats(ctx, as_json):
    """Repository totals: snapshots, blobs, stored and logical sizes, dedup ratio."""
    from .repository_stats import repository_stats

    repo = open_repo(ctx, readonly=True)
    st = repository_stats(repo)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"repository {st['id'][:12]} at {st['path']}")
    click.echo(f"  snapshots: {st['snapshots']} in {len(st['sets'])} sets ({', '.join(st['sets']) or '-'})")
    for kind, d in st["blobs"].items():
        click.echo(f"  {kind:9}: {d['count']:>9} blobs, {mib(d['raw']):>12} raw, {mib(d['stored']):>12} stored")
    click.echo(f"  packs: {st['packs']} ({st['packs_sealed']} sealed), {mib(st['pack_bytes'])} on disk, "
               f"{mib(st['garbage_bytes'])} garbage")
    click.echo(f"  index: {mib(st['index_bytes'])} on disk ({mib(st['index_used_bytes'])} in use)"
               + ("; larger than the packs: `pit repair` rebuilds it compact" if st["index_bytes"] > st["pack_bytes"]
                  and st["index_bytes"] > 64 * 1048576 else ""))
    click.echo(f"  compression ratio {st['compression_ratio']:.2f}")


def _add_commands() -> None:
    for cmd in (*COMMANDS, key_group, demo_command):
        main.add_command(cmd)


_add_commands()
