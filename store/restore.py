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

A big restore writes file contents from worker processes (store/workers.py):
this process walks the tree, creates each file (safely, as above), looks up
its chunks in its own consistent view of the index, and hands the open file
to a worker, which reopens it through /proc/PID/fd, reads, decompresses and
checks the chunks and writes them. Back here the file gets its metadata and
is renamed into place; a directory gets its own once its last file is in.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable

from . import errors
from .errors import BlobMissing, DiskFull, IntegrityError, StoreError, UnsafePath
from .index import BlobEntry
from .objects import ObjectReader, iter_file_chunks
from .repository import read_blob_at
from .trees import DIR, FILE, SYMLINK, Entry
from .workers import default_workers, process_pool

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
POOL_AFTER = 32 * 1024 * 1024  # bytes written here before worker processes start
TASK_BYTES = 8 * 1024 * 1024   # one worker task: small files up to this much, or one big file
TASK_FILES = 64


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    unchanged: int = 0  # sync: files already equal (size and mtime), not rewritten
    removed: int = 0    # sync: names the tree does not have, removed


@dataclass
class _Dir:
    """An open directory whose own metadata waits for its files to be in."""

    fd: int
    entry: Entry | None  # None: the restore target itself (its metadata is left alone)
    pending: int = 0
    listed: bool = False
    writing: set = field(default_factory=set)  # temporary names of files being written


@dataclass
class _Job:
    parent: _Dir
    fd: int
    tmp: bytes
    entry: Entry
    chunks: list[tuple[bytes, BlobEntry]]


class Restorer:
    def __init__(self, reader: ObjectReader, owners: bool | None = None,
                 progress: Callable[[RestoreStats], None] | None = None, sync: bool = False,
                 workers: int | None = None) -> None:
        self.reader = reader
        self.sync = sync
        self.owners = os.geteuid() == 0 if owners is None else owners
        self.stats = RestoreStats()
        self.progress = progress
        self.workers = workers or default_workers()
        self.pool = None
        self.pool_failed = False
        self.written_here = 0
        self.task: list[_Job] = []
        self.task_bytes = 0
        self.running: dict = {}  # future -> its jobs
        self.open_dirs: list[_Dir] = []

    def restore(self, entry: Entry, target: str) -> RestoreStats:
        """Restore `entry` into `target`: a directory's contents go into target
        itself when the entry is the snapshot root (name ''), else into target/name."""
        try:
            os.makedirs(target, exist_ok=True)
            tfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StoreError(f"cannot use restore target {target}: {exc.strerror}") from None
        top = _Dir(tfd, None)
        try:
            if entry.name == b"":
                self._fill_dir(top, entry.content)
            else:
                self._entry(top, entry)
            self._listed(top)
            self._drain()
        except OSError as exc:
            self._abandon()
            if exc.errno == errno.ENOSPC:
                raise DiskFull("no space left on device during restore") from None
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"restore refused to follow a symlink in the target: {exc.filename}") from None
            raise StoreError(f"restore failed: {exc}") from None
        except BaseException:
            self._abandon()
            raise
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None
            for d in self.open_dirs:
                os.close(d.fd)
            self.open_dirs.clear()
            os.close(tfd)
        return self.stats

    # ------------------------------------------------------------- workers
    def _queue(self, job: _Job) -> None:
        self.task.append(job)
        self.task_bytes += job.entry.size
        if self.task_bytes >= TASK_BYTES or len(self.task) >= TASK_FILES:
            self._submit()

    def _submit(self) -> None:
        task, self.task, self.task_bytes = self.task, [], 0
        if not task:
            return
        if self.pool is None and not self.pool_failed:
            try:
                self.pool = process_pool(self.workers, _worker_init, (self.reader.repo.backend,))
            except StoreError:
                self.pool_failed = True  # write them here: slower, the same bytes
        if self.pool is None:
            for job in task:
                self._write_here(job)
                self._done(job)
            return
        try:
            fut = self.pool.submit(_worker_write, os.getpid(), [(j.fd, j.chunks) for j in task])
        except BrokenProcessPool as exc:
            raise StoreError(f"a restore worker process died: {exc}") from exc
        except OSError as exc:  # the processes start here (EAGAIN, ENOMEM)
            if self.running:
                raise StoreError(f"cannot start more worker processes: {exc}") from exc
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pool_failed = None, True
            self.task = task
            self._submit()  # now written here
            return
        self.running[fut] = task
        while len(self.running) > self.workers + 1:
            self._gather(wait(self.running, return_when=FIRST_COMPLETED)[0])
        self._gather([f for f in self.running if f.done()])

    def _gather(self, done) -> None:
        for fut in list(done):
            task = self.running.pop(fut)
            try:
                results = fut.result()
            except BrokenProcessPool as exc:
                raise StoreError(f"a restore worker process died: {exc}") from exc
            for i, (job, (written, err)) in enumerate(zip(task, results)):
                if err is not None:
                    self.running[fut] = task[i:]  # not renamed into place: _abandon removes them
                    raise getattr(errors, err[0], StoreError)(err[1])
                self.stats.bytes += written
                self._done(job)
            if self.progress:
                self.progress(self.stats)

    def _drain(self) -> None:
        self._submit()
        while self.running:
            self._gather(wait(self.running, return_when=FIRST_COMPLETED)[0])

    def _abandon(self) -> None:
        """After an error: no half-written file stays behind."""
        jobs = self.task + [j for t in self.running.values() for j in t]
        self.task, self.running = [], {}
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for j in jobs:
            try:
                os.close(j.fd)
            except OSError:
                pass
            try:
                os.unlink(j.tmp, dir_fd=j.parent.fd)
            except OSError:
                pass

    def _fill_dir(self, d: _Dir, tree_id: bytes) -> None:
        entries = self.reader.tree(tree_id)
        for e in entries:
            self._entry(d, e)
        if self.sync:
            keep = {e.name for e in entries} | d.writing
            for name in os.listdir(d.fd):
                name = os.fsencode(name)
                if name not in keep:
                    self._remove(d.fd, name)

    def _listed(self, d: _Dir) -> None:
        d.listed = True
        if d.pending == 0:
            self._finish_dir(d)

    def _finish_dir(self, d: _Dir) -> None:
        if d.entry is None:
            return
        self._meta_fd(d.fd, d.entry)  # after the children, or their creation bumps mtime
        self.open_dirs.remove(d)
        os.close(d.fd)
        self.stats.dirs += 1

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

    def _entry(self, d: _Dir, e: Entry) -> None:
        if e.type == DIR:
            self._dir(d.fd, e)
        elif e.type == FILE:
            self._file(d, e)
        elif e.type == SYMLINK:
            self._symlink(d.fd, e)

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
        d = _Dir(sub, e)
        self.open_dirs.append(d)
        self._fill_dir(d, e.content)
        self._listed(d)

    def _file(self, d: _Dir, e: Entry) -> None:
        dfd = d.fd
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
        job = _Job(d, fd, tmp, e, [])
        d.pending += 1
        d.writing.add(tmp)
        if self.written_here < POOL_AFTER or self.pool_failed or e.size == 0:
            self.written_here += e.size
            try:
                self._write_here(job)
            except BaseException:
                os.close(fd)
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
                raise
            self._done(job)
            return
        try:
            job.chunks = self._locate(e)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
            raise
        self._queue(job)

    def _locate(self, e: Entry) -> list[tuple[bytes, BlobEntry]]:
        """The file's chunks and where they are, from this restore's view of the index."""
        repo, txn = self.reader.repo, self.reader.txn
        cl = self.reader.chunk_list(e)
        out = []
        for cid in cl.ids:
            be = repo.blob_entry(txn, cid)
            if be is None:
                raise BlobMissing(f"chunk {cid.hex()[:16]} of {e.name.decode(errors='replace')} is not in the index")
            out.append((cid, be))
        return out

    def _write_here(self, job: _Job) -> None:
        fd = job.fd
        for data in iter_file_chunks(self.reader, job.entry):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self.stats.bytes += len(data)
            if self.progress:
                self.progress(self.stats)

    def _done(self, job: _Job) -> None:
        """The file's bytes are written: its metadata, then its name."""
        d, e = job.parent, job.entry
        try:
            self._meta_fd(job.fd, e)
        finally:
            os.close(job.fd)
        self._replace(d.fd, job.tmp, e.name)
        d.writing.discard(job.tmp)
        self.stats.files += 1
        d.pending -= 1
        if d.listed and d.pending == 0:
            self._finish_dir(d)

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


# ------------------------------------------------------- in a worker process

_state: dict = {}


def _worker_init(backend) -> None:
    import zstandard

    _state["backend"] = backend
    _state["dctx"] = zstandard.ZstdDecompressor()


def _worker_write(parent: int, jobs: list[tuple[int, list[tuple[bytes, BlobEntry]]]]
                  ) -> list[tuple[int, tuple[str, str] | None]]:
    """Write each file's chunks into the file the parent opened (its fd there);
    (bytes written, None) or (0, (error class name, message)) per file."""
    out = []
    for fd, chunks in jobs:
        try:
            wfd = os.open(f"/proc/{parent}/fd/{fd}", os.O_WRONLY)
        except OSError as exc:
            out.append((0, ("StoreError", f"restore worker cannot open the file being restored: {exc.strerror}")))
            continue
        written = 0
        try:
            for cid, e in chunks:
                view = memoryview(read_blob_at(_state["backend"], _state["dctx"], cid, e))
                while view:
                    n = os.write(wfd, view)
                    written += n
                    view = view[n:]
            out.append((written, None))
        except (IntegrityError, BlobMissing) as exc:
            out.append((0, (type(exc).__name__, str(exc))))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                out.append((0, ("DiskFull", "no space left on device during restore")))
            else:
                out.append((0, ("StoreError", f"restore failed: {exc}")))
        finally:
            os.close(wfd)
    return out
