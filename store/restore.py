"""Restore a snapshot (or any subtree) into a directory.

Every file is written under a temporary name and renamed into place, so a
reader never sees half a file. All operations go through directory file
descriptors with O_NOFOLLOW: a symlink inside the target (restored, or
planted there beforehand) is never followed, so a restore cannot write
outside its target.

With `sync=True` the target is made equal to the tree, touching only what
differs: a file whose size and mtime already match is left alone (rsync's
quick check), and names the tree does not have are removed. That is how a
promoted secondary turns its live paths into the chosen image without
rewriting the data it already has.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from typing import Callable

from .errors import DiskFull, StoreError, UnsafePath
from .objects import ObjectReader, iter_file_chunks
from .trees import DIR, FILE, SYMLINK, Entry

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    unchanged: int = 0  # sync: files already equal (size and mtime), not rewritten
    removed: int = 0    # sync: names the tree does not have, removed


class Restorer:
    def __init__(self, reader: ObjectReader, owners: bool | None = None,
                 progress: Callable[[RestoreStats], None] | None = None, sync: bool = False) -> None:
        self.reader = reader
        self.sync = sync
        self.owners = os.geteuid() == 0 if owners is None else owners
        self.stats = RestoreStats()
        self.progress = progress

    def restore(self, entry: Entry, target: str) -> RestoreStats:
        """Restore `entry` into `target`: a directory's contents go into target
        itself when the entry is the snapshot root (name ''), else into target/name."""
        try:
            os.makedirs(target, exist_ok=True)
            tfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StoreError(f"cannot use restore target {target}: {exc.strerror}") from None
        try:
            if entry.name == b"":
                self._fill_dir(tfd, entry.content)
            else:
                self._entry(tfd, entry)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull("no space left on device during restore") from None
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"restore refused to follow a symlink in the target: {exc.filename}") from None
            raise StoreError(f"restore failed: {exc}") from None
        finally:
            os.close(tfd)
        return self.stats

    def _fill_dir(self, dfd: int, tree_id: bytes) -> None:
        entries = self.reader.tree(tree_id)
        for e in entries:
            self._entry(dfd, e)
        if self.sync:
            keep = {e.name for e in entries}
            for name in os.listdir(dfd):
                name = os.fsencode(name)
                if name not in keep:
                    self._remove(dfd, name)

    def _remove(self, dfd: int, name: bytes) -> None:
        """sync: remove `name` under dfd, a directory with its contents, never following a symlink."""
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

    def _entry(self, dfd: int, e: Entry) -> None:
        if e.type == DIR:
            self._dir(dfd, e)
        elif e.type == FILE:
            self._file(dfd, e)
        elif e.type == SYMLINK:
            self._symlink(dfd, e)

    def _dir(self, dfd: int, e: Entry) -> None:
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
                name = e.name.decode(errors="replace")
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafePath(f"restore refused to write through the symlink {name} in the target") from None
                raise StoreError(f"cannot restore directory {name}: a file is in the way") from None
            raise
        try:
            self._fill_dir(sub, e.content)
            self._meta_fd(sub, e)  # after the children, or their creation bumps mtime
        finally:
            os.close(sub)
        self.stats.dirs += 1

    def _file(self, dfd: int, e: Entry) -> None:
        if self.sync and not self._in_the_way(dfd, e.name, want_dir=False):
            try:
                st = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
                self.stats.unchanged += 1
                return
        tmp = b".pit-" + secrets.token_hex(6).encode() + b".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            try:
                for data in iter_file_chunks(self.reader, e):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    self.stats.bytes += len(data)
                    if self.progress:
                        self.progress(self.stats)
                self._meta_fd(fd, e)
            finally:
                os.close(fd)
            self._replace(dfd, tmp, e.name)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        self.stats.files += 1

    def _replace(self, dfd: int, tmp: bytes, name: bytes) -> None:
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except IsADirectoryError:
            raise StoreError(f"cannot restore file {name.decode(errors='replace')}: a directory is in the way") from None

    def _symlink(self, dfd: int, e: Entry) -> None:
        if self.sync:
            self._in_the_way(dfd, e.name, want_dir=False)
        tmp = b".pit-" + secrets.token_hex(6).encode() + b".lnk"
        os.symlink(e.content, tmp, dir_fd=dfd)
        if self.owners:
            try:
                os.chown(tmp, e.uid, e.gid, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                pass
        os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
        self._replace(dfd, tmp, e.name)
        self.stats.symlinks += 1

    def _meta_fd(self, fd: int, e: Entry) -> None:
        if self.owners:
            try:
                os.fchown(fd, e.uid, e.gid)
            except OSError:
                pass
        os.fchmod(fd, e.mode & 0o7777)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
