"""Where pack bytes live: a deliberately small interface.

Only the pack layer talks to a backend. A local directory (`LocalBackend`)
and an S3-compatible bucket (`s3backend.S3Backend`, which stages the open
pack locally and uploads it when sealed, since objects cannot be appended
to) implement the same few calls; `backends.open_backend` picks one from the
repository config.
"""
from __future__ import annotations

import errno
import os
from collections import OrderedDict
from typing import Iterator, Protocol

from .errors import BlobMissing, DiskFull


IOV_MAX = 1024  # buffers per pwritev (Linux's UIO_MAXIOV)


class AppendHandle(Protocol):
    def write(self, data: bytes) -> int: ...
    def write_parts(self, parts: list[bytes]) -> int: ...
    def copy_from(self, src_fd: int, src_off: int, n: int) -> int: ...
    def tell(self) -> int: ...
    def sync(self) -> None: ...
    def seal(self) -> None: ...  # the footer is written: make the pack durable where it will live
    def close(self) -> None: ...


class PackBackend(Protocol):
    def create(self, name: str) -> AppendHandle: ...
    def open_append(self, name: str, truncate_to: int) -> AppendHandle: ...
    def truncate(self, name: str, size: int) -> None: ...
    def read(self, name: str, offset: int, length: int) -> bytes: ...
    def will_need(self, name: str, offset: int, length: int) -> None: ...
    def size(self, name: str) -> int: ...
    def delete(self, name: str) -> None: ...
    def list(self) -> Iterator[str]: ...
    def list_uncommitted(self) -> Iterator[str]: ...  # packs a crashed session may have left
    def before_commit(self) -> None: ...  # what this session sealed is durable where it will live
    def after_commit(self) -> None: ...  # an index commit now names what was sealed
    def close(self) -> None: ...
    # True when the writer must seal its open pack before each commit (the
    # open pack would otherwise exist only on this machine).
    seal_on_commit: bool


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_os(exc: OSError, what: str) -> None:
    if exc.errno == errno.ENOSPC:
        raise DiskFull(f"no space left on device while {what}") from exc
    raise exc


class LocalAppend:
    def __init__(self, fd: int, pos: int) -> None:
        self.fd = fd
        self.pos = pos

    def write(self, data: bytes) -> int:
        """Append `data`; returns the offset it starts at."""
        return self.write_parts([data])

    def write_parts(self, parts: list[bytes], what: str = "writing a pack") -> int:
        """Append the parts in order, without joining them first (pwritev); returns their offset.
        `what` names the writing in a full disk's error."""
        off = self.pos
        try:
            for at in range(0, len(parts), IOV_MAX):
                batch = parts[at:at + IOV_MAX]
                want = sum(len(b) for b in batch)
                n = os.pwritev(self.fd, batch, self.pos)
                self.pos += n
                if n != want:  # short (a disk filling up on the way): the rest plainly, to get its error
                    rest = memoryview(b"".join(batch))[n:]
                    while rest:
                        k = os.pwrite(self.fd, rest, self.pos)
                        self.pos += k
                        rest = rest[k:]
        except OSError as exc:
            _raise_os(exc, what)
        return off

    def copy_from(self, src_fd: int, src_off: int, n: int) -> int:
        """Append `n` bytes of another file from `src_off` on, copied in the
        kernel (copy_file_range; a plain read and write where the kernel
        refuses, e.g. across file systems); returns the offset they start at."""
        off = self.pos
        try:
            while n:
                try:
                    k = os.copy_file_range(src_fd, self.fd, n, src_off, self.pos)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    k = os.pwrite(self.fd, os.pread(src_fd, min(n, 1 << 22), src_off), self.pos)
                if k == 0:
                    raise OSError(errno.EIO, "the spool file ended early")
                self.pos += k
                src_off += k
                n -= k
        except OSError as exc:
            _raise_os(exc, "writing a pack")
        return off

    def tell(self) -> int:
        return self.pos

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            _raise_os(exc, "syncing a pack")

    def seal(self) -> None:
        self.sync()

    def sync_fd(self) -> int:
        """A descriptor of its own for syncing the file later, on another thread (Writer._sync_later)."""
        return os.dup(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sync_and_close(fd: int) -> None:
    """fsync a pack on a background thread, then close that descriptor; a full disk is DiskFull."""
    try:
        os.fsync(fd)
    except OSError as exc:
        _raise_os(exc, "syncing a pack")
    finally:
        os.close(fd)


class LocalBackend:
    """Packs as files under `<root>/<last two hex digits>/<name>`."""

    seal_on_commit = False  # the open pack is as durable as a sealed one: it may stay open across sessions

    def __init__(self, root: str, max_open: int = 64) -> None:
        self.root = root
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._max_open = max_open

    def __getstate__(self) -> dict:
        """Sent to verify's worker processes: open descriptors stay here."""
        return {"root": self.root, "_fds": OrderedDict(), "_max_open": self._max_open}

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name.split(".")[0][-2:], name)

    def create(self, name: str) -> LocalAppend:
        d = os.path.dirname(self._path(name))
        try:
            if not os.path.isdir(d):
                os.makedirs(d, exist_ok=True)
                fsync_dir(self.root)
            fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            # The directory entry must be durable before an index commit names it.
            fsync_dir(d)
        except OSError as exc:
            _raise_os(exc, "creating a pack")
        return LocalAppend(fd, 0)

    def open_append(self, name: str, truncate_to: int) -> LocalAppend:
        """Reopen an unsealed pack, dropping bytes no committed index entry covers."""
        fd = os.open(self._path(name), os.O_WRONLY)
        try:
            if os.fstat(fd).st_size != truncate_to:
                os.ftruncate(fd, truncate_to)
                os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        return LocalAppend(fd, truncate_to)

    def truncate(self, name: str, size: int) -> None:
        """Cut an unsealed pack back to `size` (an aborted session's bytes). No fsync:
        the bytes past `size` were never committed, and the next writer truncates too."""
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        os.truncate(self._path(name), size)

    def _reader(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BlobMissing(f"pack {name} is missing") from exc
        self._fds[name] = fd
        if len(self._fds) > self._max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def read(self, name: str, offset: int, length: int) -> bytes:
        data = os.pread(self._reader(name), length, offset)
        if len(data) != length:
            raise BlobMissing(f"pack {name} is truncated: wanted {length} bytes at {offset}, got {len(data)}")
        return data

    def will_need(self, name: str, offset: int, length: int) -> None:
        """A hint that these bytes will be read soon: the kernel starts reading
        them now, so reads of scattered objects overlap instead of queueing."""
        try:
            os.posix_fadvise(self._reader(name), offset, length, os.POSIX_FADV_WILLNEED)
        except (BlobMissing, OSError):
            pass  # only a hint: the read that follows reports what is wrong

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError as exc:
            raise BlobMissing(f"pack {name} is missing") from exc

    def delete(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def list(self) -> Iterator[str]:
        if not os.path.isdir(self.root):
            return
        for sub in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, sub)
            if len(sub) == 2 and os.path.isdir(d):
                for name in sorted(os.listdir(d)):
                    if name.endswith(".pack"):
                        yield name

    def list_uncommitted(self) -> Iterator[str]:
        return self.list()

    def before_commit(self) -> None:
        """Nothing to wait for: sealing fsynced the pack where it stays."""

    def after_commit(self) -> None:
        """Nothing to do: a fsynced local pack is where it will stay."""

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
