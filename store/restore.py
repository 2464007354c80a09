"""Restore a snapshot (or any subtree) into a directory.

Every file is written under a temporary name and renamed into place, so a
reader never sees half a file. All operations go through directory file
descriptors with O_NOFOLLOW: a symlink inside the target (restored, or
planted there beforehand) is never followed, so a restore cannot write
outside its target.

Damage: a file whose chunk is missing or corrupt (or whose chunk list cannot
be read), and a directory whose tree cannot be read, are *not restored* and
collected in `Restorer.failures` with the reason; everything else is
restored, and `restore` then raises a `DamageFound` (exit code 3) carrying
the stats and the failures (`restore_incomplete`). A damaged file leaves
nothing behind (its temporary file is removed), a damaged subtree is named
once as a whole. With `fail_fast=True` the first damage error is raised as
it is (the old behaviour). Errors that are not damage (disk full, a symlink
or a file in the way in the target) stop the restore at once.

Metadata: owner (as root), mode, mtime, extended attributes (every
namespace the snapshot holds; one that cannot be set, e.g. `security.*`
without privilege or a file system without xattrs, is a warning counted in
the stats), holes of sparse files (each data extent is written at its
offset and the file is truncated to its size, so the holes stay
unallocated), and hard links (names of one inode in the snapshot become
links to the first one restored).

With `sync=True` the target is made equal to the tree, touching only what
differs: a file whose size and mtime already match is left alone (rsync's
quick check; its owner, mode and extended attributes are still brought in
line), and names the tree does not have are removed. That is how a
promoted secondary turns its live paths into the chosen image without
rewriting the data it already has.

`pit restore`'s options (docs/store.md, "Restore"): a `Selection`
(`--include`/`--exclude` patterns, store/filters.py) restores only part of
the tree; `overwrite` says what happens to a file already in the target
(`always`, `if-changed`, `if-newer`, `never`; a file left alone by the
policy is *kept* and named); `delete` removes names the selected tree does
not have; `dry_run` decides everything the same way and writes nothing
(`actions` lists what would be written, overwritten, kept and deleted);
`verify` re-reads every file written and compares each chunk's BLAKE3 with
its id. A sync restore given a selection leaves what it excludes alone (a
set's excluded paths on a promoted secondary, say: rsync's `--delete`
without `--delete-excluded`).
"""
from __future__ import annotations

import errno
import os
import secrets

import blake3
import shutil
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import packs as P
from .errors import (BlobMissing, DamageFound, DiskFull, IntegrityError, InvalidArgument, RestoreVerifyFailed,
                     StoreError, UnsafePath)
from .files import ChunkList, data_places
from .filters import Filter, FilterRules, PathMatcher
from .objects import ObjectReader
from .trees import DIR, FILE, SYMLINK, Entry

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
MAX_WARNINGS = 100
# I/O errors reading the repository that mean its medium is damaged (EIO, and
# a checksumming file system's EBADMSG/EUCLEAN), not that the restore cannot go on
READ_DAMAGE_ERRNOS = {errno.EIO, errno.EBADMSG, getattr(errno, "EUCLEAN", errno.EIO)}
# Extended-attribute namespaces a sync restore removes from a directory or an
# unchanged file when the snapshot does not have them (never security.*: a
# label the target's own policy gives is not ours to take away)
SYNC_XATTR_PREFIXES = (b"user.", b"trusted.", b"system.posix_acl_")

MISSING_CHUNK = "missing chunk"
CORRUPT_CHUNK = "corrupt chunk"
MISSING_LIST = "missing chunk list"
CORRUPT_LIST = "corrupt chunk list"
BAD_TREE = "unreadable tree"

OVERWRITE = ("always", "if-changed", "if-newer", "never")
MAX_ACTIONS = 100_000  # a dry run lists at most this many actions (then counts)


@dataclass
class Failure:
    """One file (or, for an unreadable tree, a whole subtree) not restored."""

    path: str     # its path in the snapshot ('/'-separated)
    type: str     # 'file' or 'dir'
    reason: str   # MISSING_CHUNK, CORRUPT_CHUNK, MISSING_LIST, CORRUPT_LIST or BAD_TREE
    detail: str   # the error, one line

    def line(self) -> str:
        if self.type != "dir":
            what = self.path
        elif self.path == "/":
            what = "/ (everything: the top tree)"
        else:
            what = f"{self.path}/ (the whole directory)"
        return f"{what}: {self.reason}: {self.detail}"

    def to_json(self) -> dict:
        return {"path": self.path, "type": self.type, "reason": self.reason, "detail": self.detail}


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    unchanged: int = 0  # sync: files already equal (size and mtime), not rewritten
    removed: int = 0    # sync: names the tree does not have, removed
    links: int = 0      # names restored as hard links to a file restored before them
    xattrs: int = 0     # extended attributes set
    xattr_failed: int = 0  # extended attributes that could not be set (warnings)
    failed: int = 0     # files and subtrees not restored because of damage
    overwritten: int = 0  # files that were in the target and were replaced
    kept: int = 0       # files in the target the overwrite policy left alone (they differ from the snapshot)
    verified: int = 0   # files read back and found equal (--verify)
    warnings: list[str] = field(default_factory=list)  # the first MAX_WARNINGS


def restore_incomplete(stats: RestoreStats, failures: list["Failure"]) -> DamageFound:
    """What `Restorer.restore` raises when some files could not be restored
    because of damage (after restoring everything else): a DamageFound (exit
    code 3) carrying `.stats` and `.failures`. Not a class of its own: every
    StoreError class has an exit code of its own, and this is damage."""
    first = failures[0].line() if failures else ""
    exc = DamageFound(f"{count_failures(failures)} could not be restored (damaged data in the repository), "
                      f"first: {first}")
    exc.stats = stats
    exc.failures = failures
    return exc


def damage_reason(exc: Exception, chunk: bool = True) -> str:
    missing = isinstance(exc, BlobMissing)
    if chunk:
        return MISSING_CHUNK if missing else CORRUPT_CHUNK
    return MISSING_LIST if missing else CORRUPT_LIST


def count_failures(failures: list["Failure"]) -> str:
    """'3 files', '1 directory', '2 files and 1 directory'."""
    nf = sum(1 for f in failures if f.type != "dir")
    nd = len(failures) - nf
    parts = ([f"{nf} file{'s' if nf != 1 else ''}"] if nf else []) + \
        ([f"{nd} director{'ies' if nd != 1 else 'y'}"] if nd else [])
    return " and ".join(parts) or "nothing"


class Selection:
    """What part of a snapshot a restore takes: `--include` patterns (a file is restored when it or a
    directory above it matches; the directories leading to it are made), `--exclude` rules (a matching
    path is left out with everything under it). Patterns match the path in the snapshot, as `pit ls`
    shows it; absolute ones are rewritten against the snapshot's source paths (store/filters.py)."""

    def __init__(self, include=(), iinclude=(), exclude=(), iexclude=(), sources=()) -> None:
        self.include = PathMatcher(include, what="--include pattern", sources=sources) if include else None
        self.iinclude = PathMatcher(iinclude, True, what="--iinclude pattern", sources=sources) \
            if iinclude else None
        self.exclude: Filter | None = FilterRules(exclude=tuple(exclude), iexclude=tuple(iexclude)).compile(
            sources) if (exclude or iexclude) else None

    @property
    def includes(self) -> bool:
        return self.include is not None or self.iinclude is not None

    def excluded(self, path: bytes, is_dir: bool) -> bool:
        return self.exclude is not None and self.exclude.match(path, is_dir)

    def included(self, path: bytes, is_dir: bool) -> bool:
        return any(m is not None and m.match(path, is_dir) for m in (self.include, self.iinclude))


def target_matches(fd: int, e: Entry, cl: ChunkList) -> bool:
    """Does the open file hold exactly the entry's data? Its size, then each chunk's bytes read back
    from their places and hashed (BLAKE3, the chunk's id): the repository is not read again."""
    if os.fstat(fd).st_size != e.size:
        return False
    places = data_places(e.extents, e.size)
    off = left = 0
    for cid, n in zip(cl.ids, cl.lengths):
        h = blake3.blake3()
        need = n
        while need:
            if not left:
                off, left = next(places)
            k = min(left, need, 1 << 22)
            data = os.pread(fd, k, off)
            if len(data) != k:
                return False
            h.update(data)
            off, left, need = off + k, left - k, need - k
        if h.digest() != cid:
            return False
    return True


def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def read_chunk(reader: ObjectReader, cid: bytes, length: int) -> bytes:
    """One chunk, checked, without filling the shared chunk cache (a restore
    reads each chunk once; caching it would only evict useful ones). An I/O
    error of the repository's medium is reported as damage."""
    repo, txn = reader.repo, reader.txn
    e = repo.blob_entry(txn, cid)
    if e is None:
        raise BlobMissing("not in the index")
    try:
        data = repo.read_entry(cid, e)
    except OSError as exc:
        if exc.errno in READ_DAMAGE_ERRNOS:
            raise IntegrityError(f"pack {P.pack_name(e.pack)} offset {e.offset}: {exc.strerror}") from None
        raise
    if len(data) != length:
        raise IntegrityError("its length differs from the file's chunk list")
    return data


def file_offset(entry: Entry, data_offset: int) -> int:
    """Where byte `data_offset` of a file's chunk data lies in the file."""
    ext = entry.extents
    if ext is None:
        return data_offset
    for off, n in ext:
        if data_offset < n:
            return off + data_offset
        data_offset -= n
    return entry.size


def file_pieces(reader: ObjectReader, entry: Entry, cl: ChunkList | None = None) -> Iterator[tuple[int, memoryview]]:
    """(file offset, bytes) of a file's stored data, in order: each chunk
    placed at its offset (a sparse file's holes lie between the pieces). A
    damaged chunk raises its error (IntegrityError, BlobMissing) naming the
    chunk and the file offset it was for."""
    cl = reader.chunk_list(entry) if cl is None else cl
    places = data_places(entry.extents, entry.size)
    off = left = 0
    for cid, n in zip(cl.ids, cl.lengths):
        if not left:
            off, left = next(places)
        try:
            data = read_chunk(reader, cid, n)
        except IntegrityError as exc:  # BlobMissing included
            raise type(exc)(f"chunk {cid.hex()[:16]} at offset {off}: {exc}") from None
        view = memoryview(data)
        while view:
            if not left:
                off, left = next(places)
            k = min(left, len(view))
            yield off, view[:k]
            off, left, view = off + k, left - k, view[k:]


def check_file_present(reader: ObjectReader, entry: Entry, cl: ChunkList, name: str) -> None:
    """Index lookups only, no reads: every chunk of the file is in the index,
    and every pack holding one is there and long enough. Raises BlobMissing
    naming the first chunk that is not (with its offset in the file)."""
    repo, txn = reader.repo, reader.txn
    ends: dict[int, int] = {}
    for i, cid in enumerate(cl.ids):
        e = repo.blob_entry(txn, cid)
        if e is None:
            raise BlobMissing(f"{name}: chunk {cid.hex()[:16]} at offset {file_offset(entry, cl.starts[i])} "
                              f"is not in the index (nothing written)")
        ends[e.pack] = max(ends.get(e.pack, 0), e.offset + P.FRAME_HEADER.size + e.stored_len)
    for num, end in sorted(ends.items()):
        pack = P.pack_name(num)
        try:
            size = repo.backend.size(pack)
        except BlobMissing as exc:
            raise BlobMissing(f"{name}: {exc} (nothing written)") from None
        if size < end:
            raise BlobMissing(f"{name}: pack {pack} is truncated ({size} bytes, a chunk of the file ends at "
                              f"{end}) (nothing written)")


@dataclass
class _LinkSource:
    parts: tuple[bytes, ...]  # its path below the target
    ino: int
    sig: tuple


def _link_sig(e: Entry) -> tuple:
    return (e.content, e.nchunks, e.size, e.extra.get("s"))


class Restorer:
    def __init__(self, reader: ObjectReader, owners: bool | None = None,
                 progress: Callable[[RestoreStats], None] | None = None, sync: bool = False,
                 fail_fast: bool = False, overwrite: str = "always", delete: bool = False,
                 dry_run: bool = False, verify: bool = False, selection: Selection | None = None) -> None:
        if overwrite not in OVERWRITE:
            raise InvalidArgument(f"--overwrite must be one of {', '.join(OVERWRITE)}, not {overwrite!r}")
        self.reader = reader
        self.sync = sync
        self.overwrite = "always" if sync else overwrite
        self.delete = delete or sync
        self.dry_run = dry_run
        self.verify = verify
        self.selection = selection if selection is not None and (selection.includes or selection.exclude) else None
        self.actions: list[tuple[str, str]] = []  # (action, path): every decision of a dry run; kept files
        self.actions_dropped = 0
        self._written: list[tuple[tuple[bytes, ...], Entry]] = []  # for --verify
        self._needed: set[bytes] | None = None  # with --include: directories holding something included
        self.fail_fast = fail_fast
        self.owners = os.geteuid() == 0 if owners is None else owners
        self.stats = RestoreStats()
        self.progress = progress
        self.failures: list[Failure] = []
        self._links: dict[tuple[int, int], _LinkSource] = {}
        self._prefix = b""
        self._tfd = -1

    def restore(self, entry: Entry, target: str, path: str | bytes | None = None,
                own_meta: bool = False) -> RestoreStats:
        """Restore `entry` into `target`: a directory's contents go into target
        itself when the entry is the snapshot root (name ''), else into target/name.
        With `own_meta`, a directory entry renamed '' gives `target` its owner,
        mode and times too (a failover's live copy: mariadbd and postgres refuse
        a data directory that is not their own).

        `path`, the entry's path in the snapshot, only names what could not be
        restored (default: names relative to the target). When some files
        could not be restored because of damage, raises DamageFound (with
        `.stats` and `.failures`) after restoring everything else."""
        p = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else (path or b"")
        p = p.strip(b"/")
        self._prefix = p if entry.name == b"" else p.rpartition(b"/")[0]
        if self.selection is not None and self.selection.includes:
            self._needed = self._included_dirs(entry)
        try:
            if self.dry_run:
                tfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY) if os.path.isdir(target) else None
            else:
                os.makedirs(target, exist_ok=True)
                tfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StoreError(f"cannot use restore target {target}: {exc.strerror}") from None
        self._tfd = -1 if tfd is None else tfd
        try:
            if entry.name == b"":
                entries = self._tree(entry.content, ())
                if entries is not None:
                    self._fill_dir(tfd, entries, ())
                if own_meta and entry.type == DIR and not self.dry_run:
                    self._meta_fd(tfd, entry, (), prune_xattrs=self.sync)  # after the children (their mtime)
            elif self._selected(entry, (entry.name,)):
                self._entry(tfd, entry, (entry.name,))
            if self.verify and not self.dry_run:
                self._verify_written()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull("no space left on device during restore") from None
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"restore refused to follow a symlink in the target: {exc.filename}") from None
            raise StoreError(f"restore failed: {exc}") from None
        finally:
            self._tfd = -1
            if tfd is not None:
                os.close(tfd)
        if self.failures:
            raise restore_incomplete(self.stats, self.failures)  # a DamageFound
        return self.stats

    # ------------------------------------------------------------- selection, actions
    def _spath(self, parts: tuple[bytes, ...]) -> bytes:
        """The path in the snapshot (what patterns match)."""
        return b"/".join((self._prefix, *parts) if self._prefix else parts)

    def _included_dirs(self, entry: Entry) -> set[bytes]:
        """With --include: every directory (snapshot path) that holds something included, found by one
        walk of the trees before anything is written, so no empty directory is made for nothing."""
        sel = self.selection
        needed: set[bytes] = set()
        base = self._prefix if entry.name == b"" else self._spath((entry.name,))
        items = [(base, entry)] if entry.name != b"" else []
        if entry.type == DIR:
            try:
                items += list(self.reader.walk(entry.content, base))
            except IntegrityError:
                pass  # the restore names the unreadable tree
        inside: list[bytes] = []
        skip = None
        for path, e in items:
            if skip is not None and path.startswith(skip + b"/"):
                continue
            skip = None
            while inside and not path.startswith(inside[-1] + b"/"):
                inside.pop()
            if sel.excluded(path, e.type == DIR):
                skip = path
                continue
            if inside or sel.included(path, e.type == DIR):
                if e.type == DIR and not inside:
                    inside.append(path)
                parent = path
                while b"/" in parent:
                    parent = parent.rpartition(b"/")[0]
                    needed.add(parent)
                needed.add(path)
        return needed

    def _selected(self, e: Entry, parts: tuple[bytes, ...]) -> bool:
        sel = self.selection
        if sel is None:
            return True
        path = self._spath(parts)
        if sel.exclude is not None and sel.excluded(path, e.type == DIR):
            return False
        return self._needed is None or path in self._needed

    def _act(self, action: str, parts: tuple[bytes, ...]) -> None:
        if len(self.actions) < MAX_ACTIONS:
            self.actions.append((action, self._name(parts)))
        else:
            self.actions_dropped += 1

    def _verify_written(self) -> None:
        """Read back every file written and compare it, chunk by chunk, with the snapshot's ids."""
        bad = []
        for parts, e in self._written:
            pfd = self._open_parent(parts)
            ok = False
            if pfd is not None:
                try:
                    fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=pfd)
                    try:
                        ok = target_matches(fd, e, self.reader.chunk_list(e))
                    finally:
                        os.close(fd)
                except OSError:
                    ok = False
                finally:
                    os.close(pfd)
            if ok:
                self.stats.verified += 1
            else:
                bad.append(self._name(parts))
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise RestoreVerifyFailed(f"{len(bad)} restored file(s) read back differently from the snapshot: "
                                      f"{', '.join(bad[:5])}{more} (the target's storage? try again)")

    def _decide(self, st: os.stat_result | None, e: Entry, dfd: int | None) -> str:
        """What to do with a file the snapshot has and the target may have (`st`, not followed):
        "new", "unchanged" (same size and mtime, or same content), "overwrite" or "keep"."""
        if st is None:
            return "new"
        if not stat.S_ISREG(st.st_mode):
            return "keep" if self.overwrite == "never" else "overwrite"
        pol = self.overwrite
        if pol == "always":
            return "overwrite"
        if st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
            return "unchanged"
        if pol == "never":
            return "keep"
        if pol == "if-newer":
            return "overwrite" if e.mtime_ns > st.st_mtime_ns else "keep"
        # if-changed: a file of the same size is read back and compared before it is rewritten
        if st.st_size == e.size and dfd is not None and self._same_content(dfd, e):
            return "unchanged"
        return "overwrite"

    def _same_content(self, dfd: int, e: Entry) -> bool:
        try:
            fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        except OSError:
            return False
        try:
            return target_matches(fd, e, self.reader.chunk_list(e))
        except (OSError, IntegrityError):
            return False
        finally:
            os.close(fd)

    # ------------------------------------------------------------- damage
    def _name(self, parts: tuple[bytes, ...]) -> str:
        return _text(b"/".join((self._prefix, *parts) if self._prefix else parts) or b"/")

    def _damaged(self, parts: tuple[bytes, ...], typ: str, reason: str, exc: IntegrityError) -> None:
        """Record a file or subtree not restored; with fail_fast, stop here."""
        if self.fail_fast:
            raise exc
        self.failures.append(Failure(self._name(parts), typ, reason, str(exc)))
        self.stats.failed += 1

    def _warn(self, parts: tuple[bytes, ...], msg: str) -> None:
        if len(self.stats.warnings) < MAX_WARNINGS:
            self.stats.warnings.append(f"{self._name(parts)}: {msg}")

    def _tree(self, tree_id: bytes, parts: tuple[bytes, ...]) -> list[Entry] | None:
        try:
            return self.reader.tree(tree_id)
        except IntegrityError as exc:  # BlobMissing included
            self._damaged(parts, "dir", BAD_TREE, exc)
            return None

    # -------------------------------------------------------------- walk
    def _fill_dir(self, dfd: int | None, entries: list[Entry], parts: tuple[bytes, ...]) -> None:
        keep = set()
        for e in entries:
            if self._selected(e, parts + (e.name,)):
                keep.add(e.name)
                self._entry(dfd, e, parts + (e.name,))
        if self.delete and dfd is not None:
            for name in os.listdir(dfd):
                name = os.fsencode(name)
                if name in keep:
                    continue
                if self.selection is not None and not self._deletable(dfd, name, parts):
                    continue  # outside what the filter selects (sync too): not ours to delete
                self._remove(dfd, name, parts + (name,))

    def _deletable(self, dfd: int, name: bytes, parts: tuple[bytes, ...]) -> bool:
        """--delete with --include/--exclude acts only on what the filter selects."""
        try:
            is_dir = stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
        except OSError:
            return False
        path = self._spath(parts + (name,))
        sel = self.selection
        if sel.excluded(path, is_dir):
            return False
        if not sel.includes:
            return True
        p = path
        while True:  # it, or a directory above it, is included
            if sel.included(p, is_dir if p == path else True):
                return True
            if b"/" not in p:
                return False
            p = p.rpartition(b"/")[0]

    def _remove(self, dfd: int, name: bytes, parts: tuple[bytes, ...] | None = None) -> None:
        """sync, --delete: remove `name` under dfd, a directory with its contents, never following a symlink."""
        if self.dry_run:
            self._act("delete", parts if parts is not None else (name,))
            self.stats.removed += 1
            return
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
        self.stats.removed += 1

    def _in_the_way(self, dfd: int, name: bytes, want_dir: bool) -> bool:
        """sync: clear a name of the wrong type; True if something was removed."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode) == want_dir and not stat.S_ISLNK(st.st_mode):
            return False
        self._remove(dfd, name)
        return True

    def _dry_dir(self, dfd: int | None, e: Entry, parts: tuple[bytes, ...], entries: list[Entry]) -> None:
        """A dry run's directory: what is there is looked at (never through a symlink), nothing made."""
        sub = None
        if dfd is not None:
            try:
                sub = os.open(e.name, DIR_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                sub = None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    self._act("refuse (not a directory in the target)", parts)
                    return
                raise
        if sub is None:
            self._act("create", parts)
        try:
            self._fill_dir(sub, entries, parts)
        finally:
            if sub is not None:
                os.close(sub)
        self.stats.dirs += 1

    def _entry(self, dfd: int, e: Entry, parts: tuple[bytes, ...]) -> None:
        if e.type == DIR:
            self._dir(dfd, e, parts)
        elif e.type == FILE:
            self._file(dfd, e, parts)
        elif e.type == SYMLINK:
            self._symlink(dfd, e, parts)

    def _dir(self, dfd: int, e: Entry, parts: tuple[bytes, ...]) -> None:
        entries = self._tree(e.content, parts)
        if entries is None:
            return  # named as a whole; nothing made for it (sync: what is there stays)
        if self.dry_run:
            return self._dry_dir(dfd, e, parts, entries)
        if self.sync:
            self._in_the_way(dfd, e.name, want_dir=True)
        try:
            os.mkdir(e.name, 0o700, dir_fd=dfd)
        except FileExistsError:
            pass
        try:
            sub = os.open(e.name, DIR_FLAGS, dir_fd=dfd)  # O_NOFOLLOW: never through a symlink
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                st = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
                name = _text(e.name)
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafePath(f"restore refused to write through the symlink {name} in the target") from None
                raise StoreError(f"cannot restore directory {name}: a file is in the way") from None
            raise
        try:
            self._fill_dir(sub, entries, parts)
            self._meta_fd(sub, e, parts, prune_xattrs=self.sync)  # after the children, or their creation bumps mtime
        finally:
            os.close(sub)
        self.stats.dirs += 1

    # ------------------------------------------------------------- files
    def _file(self, dfd: int, e: Entry, parts: tuple[bytes, ...]) -> None:
        key = e.inode_key
        src = self._links.get(key) if key is not None else None
        if src is not None and src.sig != _link_sig(e):
            src = None  # same inode key, other content: not one file (a snapshot made across devices?)
        st = None
        if not self.sync:
            try:
                here = os.stat(e.name, dir_fd=dfd, follow_symlinks=False) if dfd is not None else None
            except FileNotFoundError:
                here = None
            if here is not None and stat.S_ISDIR(here.st_mode):
                if self.dry_run:
                    self._act("refuse (a directory is in the way)", parts)
                    return
                raise StoreError(f"cannot restore file {_text(e.name)}: a directory is in the way")
            decision = self._decide(here, e, dfd)
            if self.dry_run:
                self._act({"new": "write", "unchanged": "unchanged", "overwrite": "overwrite",
                           "keep": "keep (differs, --overwrite " + self.overwrite + ")"}[decision], parts)
                if decision == "new" or decision == "overwrite":
                    self.stats.files += 1
                    self.stats.bytes += e.size
                    self.stats.overwritten += decision == "overwrite"
                elif decision == "keep":
                    self.stats.kept += 1
                else:
                    self.stats.unchanged += 1
                return
            if decision == "keep":
                self.stats.kept += 1
                self._act("kept", parts)
                return
            if decision == "unchanged":
                if (here.st_mtime_ns == e.mtime_ns and not self._meta_differs(dfd, e, here)) or \
                        self._fix_meta(dfd, e, parts):
                    self.stats.unchanged += 1
                    if key is not None and key not in self._links:
                        self._links[key] = _LinkSource(parts, here.st_ino, _link_sig(e))
                    return
            if decision in ("overwrite", "unchanged"):
                self.stats.overwritten += 1
        if self.sync and not self._in_the_way(dfd, e.name, want_dir=False):
            try:
                st = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                st = None
        if src is not None:
            if st is not None and st.st_ino == src.ino:
                self.stats.unchanged += 1  # sync: already that link
                return
            if self._link(dfd, e, src):
                return
        if st is not None and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
            if not self._meta_differs(dfd, e, st) or self._meta_in_place(dfd, e, parts):
                self.stats.unchanged += 1
                if key is not None and key not in self._links:
                    self._links[key] = _LinkSource(parts, st.st_ino, _link_sig(e))
                return
        try:
            cl = self.reader.chunk_list(e)
        except IntegrityError as exc:
            self._damaged(parts, "file", damage_reason(exc, chunk=False), exc)
            return
        tmp = b".pit-" + secrets.token_hex(6).encode() + b".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            try:
                self._write(fd, e, cl)
                self._meta_fd(fd, e, parts)
                ino = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            self._replace(dfd, tmp, e.name)
        except IntegrityError as exc:  # a damaged chunk: nothing of the file is left
            self._unlink_quietly(dfd, tmp)
            self._damaged(parts, "file", damage_reason(exc), exc)
            return
        except BaseException:
            self._unlink_quietly(dfd, tmp)
            raise
        if key is not None and key not in self._links:
            self._links[key] = _LinkSource(parts, ino, _link_sig(e))
        if self.verify:
            self._written.append((parts, e))
        self.stats.files += 1

    def _write(self, fd: int, e: Entry, cl: ChunkList) -> None:
        """Each piece of data at its offset; a sparse file's holes are never
        written, only the final size set, so they stay unallocated."""
        for off, view in file_pieces(self.reader, e, cl):
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
                self.stats.bytes += n
            if self.progress:
                self.progress(self.stats)
        if e.extents is not None:
            os.ftruncate(fd, e.size)

    @staticmethod
    def _unlink_quietly(dfd: int, name: bytes) -> None:
        try:
            os.unlink(name, dir_fd=dfd)
        except OSError:
            pass

    def _link(self, dfd: int, e: Entry, src: _LinkSource) -> bool:
        """Make `e` a hard link to the file restored first for its inode;
        False (restore it as a file of its own) when that cannot be done."""
        pfd = self._open_parent(src.parts)
        if pfd is None:
            return False
        tmp = b".pit-" + secrets.token_hex(6).encode() + b".lnk"
        try:
            try:
                st = os.stat(src.parts[-1], dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_ino != src.ino:
                    return False  # not the file we restored any more
                os.link(src.parts[-1], tmp, src_dir_fd=pfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise
                return False  # EMLINK, EXDEV, a file system without links: a copy will do
        finally:
            os.close(pfd)
        try:
            self._replace(dfd, tmp, e.name)
        except BaseException:
            self._unlink_quietly(dfd, tmp)
            raise
        self.stats.links += 1
        return True

    def _open_parent(self, parts: tuple[bytes, ...]) -> int | None:
        """The directory holding target/parts, opened component by component
        with O_NOFOLLOW from the target (never through a symlink)."""
        fd = os.dup(self._tfd)
        try:
            for name in parts[:-1]:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError:
            os.close(fd)
            return None
        return fd

    def _replace(self, dfd: int, tmp: bytes, name: bytes) -> None:
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except IsADirectoryError:
            raise StoreError(f"cannot restore file {_text(name)}: a directory is in the way") from None

    def _symlink(self, dfd: int, e: Entry, parts: tuple[bytes, ...]) -> None:
        if not self.sync and (self.overwrite != "always" or self.dry_run):
            try:
                here = os.stat(e.name, dir_fd=dfd, follow_symlinks=False) if dfd is not None else None
            except FileNotFoundError:
                here = None
            if here is not None and stat.S_ISLNK(here.st_mode) and os.readlink(e.name, dir_fd=dfd) == e.content:
                decision = "unchanged"
            elif here is None:
                decision = "new"
            elif self.overwrite == "never" or (self.overwrite == "if-newer" and here.st_mtime_ns >= e.mtime_ns):
                decision = "keep"
            else:
                decision = "overwrite"
            if self.dry_run:
                self._act({"new": "write", "unchanged": "unchanged", "overwrite": "overwrite",
                           "keep": "keep (differs, --overwrite " + self.overwrite + ")"}[decision], parts)
                self.stats.symlinks += decision in ("new", "overwrite")
                return
            if decision in ("unchanged", "keep"):
                if decision == "keep":
                    self.stats.kept += 1
                    self._act("kept", parts)
                return
        if self.sync:
            self._in_the_way(dfd, e.name, want_dir=False)
        tmp = b".pit-" + secrets.token_hex(6).encode() + b".lnk"
        os.symlink(e.content, tmp, dir_fd=dfd)
        try:
            if self.owners:
                try:
                    os.chown(tmp, e.uid, e.gid, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    pass
            if e.xattrs:
                # the link's own attributes (never its target's): the path
                # runs through our directory descriptor, the last part unfollowed
                self._set_xattrs(b"/proc/self/fd/%d/%s" % (dfd, tmp), e, parts, follow=False)
            os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            self._replace(dfd, tmp, e.name)
        except BaseException:
            self._unlink_quietly(dfd, tmp)
            raise
        self.stats.symlinks += 1

    # ---------------------------------------------------------- metadata
    def _meta_fd(self, fd: int, e: Entry, parts: tuple[bytes, ...], prune_xattrs: bool = False) -> None:
        # owner first (a chown clears file capabilities), then the extended
        # attributes (ACLs included), then the mode (which keeps an ACL's
        # mask in line with the group bits), then the times
        if self.owners:
            try:
                os.fchown(fd, e.uid, e.gid)
            except OSError:
                pass
        if prune_xattrs:
            self._prune_xattrs(fd, e, parts)
        if e.xattrs:
            self._set_xattrs(fd, e, parts)
        os.fchmod(fd, e.mode & 0o7777)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _meta_differs(self, dfd: int, e: Entry, st: os.stat_result) -> bool:
        """sync: does an unchanged file's owner, mode or set of extended
        attributes differ from the entry's? From its stat and, for the
        attributes, a listxattr by name (no open): two system calls for a
        file that is already right."""
        if (self.owners and (st.st_uid, st.st_gid) != (e.uid, e.gid)) or stat.S_IMODE(st.st_mode) != e.mode & 0o7777:
            return True
        return self._xattrs_differ(b"/proc/self/fd/%d/%s" % (dfd, e.name), e)

    def _meta_in_place(self, dfd: int, e: Entry, parts: tuple[bytes, ...]) -> bool:
        """sync: bring owner, mode and extended attributes of a file whose data
        is already right (size and mtime match) in line; False when it cannot
        be opened as the regular file it was (then it is rewritten)."""
        try:
            fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dfd)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
                return False
            self._meta_fd(fd, e, parts, prune_xattrs=True)
        finally:
            os.close(fd)
        return True

    def _fix_meta(self, dfd: int, e: Entry, parts: tuple[bytes, ...]) -> bool:
        """A file whose content is already the snapshot's: owner, mode, attributes and times put right
        (attributes the snapshot lacks are left alone outside sync); False when it is not a regular file."""
        try:
            fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dfd)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            self._meta_fd(fd, e, parts)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _xattrs_differ(path: bytes, e: Entry) -> bool:
        """The attributes at `path` (never following a symlink there) that we
        manage differ from the entry's."""
        try:
            have = {os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)}
        except OSError:
            return bool(e.xattrs)
        want = dict(e.xattrs)
        if {n for n in have if n.startswith(SYNC_XATTR_PREFIXES)} - set(want):
            return True
        for name, value in want.items():
            try:
                if os.getxattr(path, name, follow_symlinks=False) != value:
                    return True
            except OSError:
                return True
        return False

    def _set_xattrs(self, target, e: Entry, parts: tuple[bytes, ...], follow: bool = True) -> None:
        for name, value in e.xattrs:
            try:
                os.setxattr(target, name, value, follow_symlinks=follow)
                self.stats.xattrs += 1
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise
                self.stats.xattr_failed += 1
                self._warn(parts, f"extended attribute {_text(name)} not set: {exc.strerror}")

    def _prune_xattrs(self, fd: int, e: Entry, parts: tuple[bytes, ...]) -> None:
        """sync: remove the attributes (ours to manage) the snapshot does not have."""
        try:
            have = [os.fsencode(n) for n in os.listxattr(fd)]
        except OSError:
            return
        want = {n for n, _ in e.xattrs}
        for name in have:
            if name not in want and name.startswith(SYNC_XATTR_PREFIXES):
                try:
                    os.removexattr(fd, name)
                except OSError as exc:
                    self._warn(parts, f"extended attribute {_text(name)} not removed: {exc.strerror}")
