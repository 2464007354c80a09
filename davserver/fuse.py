"""`pit mount`: the view model as a read-only FUSE file system (mfusepy, libfuse3).

Same layout as the WebDAV share (see `store.view`). Mounted `ro`, and every
write operation answers EROFS. Reads go through the chunk offset table, so
reading byte N of a big file reads one chunk; a sparse file's holes read as
zeros and take no blocks. `getxattr`/`listxattr` show the extended
attributes the snapshot recorded.

Nodes are cached by path: those below a named snapshot folder never change
(snapshots are immutable) and stay in a bounded LRU; those that can change
(the root, a set's folder, `latest`, `.versions`) are kept for one second,
so a snapshot added while mounted appears on the next listing.
"""
from __future__ import annotations

import errno
import itertools
import os
import signal
import stat
import threading
import time

import mfusepy as fuse

from store.cache import LRU
from store.errors import PathNotFound, StoreError
from store.view import LATEST, VERSIONS, Node, View

MUTABLE_TTL = 1.0


class ViewFS(fuse.Operations):
    use_ns = True

    def __init__(self, view: View) -> None:
        self.view = view
        self.nodes: LRU = LRU(200_000)
        self.files: dict[int, object] = {}
        self._fh = itertools.count(1)
        self._lock = threading.Lock()
        self.uid, self.gid = os.getuid(), os.getgid()

    # ----------------------------------------------------------- nodes
    @staticmethod
    def _immutable(parts: list[str]) -> bool:
        return len(parts) >= 2 and parts[1] not in (LATEST, VERSIONS)

    def _node(self, path: str) -> Node:
        parts = [p for p in path.split("/") if p]
        hit = self.nodes.get(path)
        if hit is not None:
            node, t = hit
            if t is None or time.monotonic() - t < MUTABLE_TTL:
                return node
        try:
            node = self.view.resolve(parts)
        except (PathNotFound, StoreError):
            raise fuse.FuseOSError(errno.ENOENT) from None
        self._remember(path, parts, node)
        return node

    def _remember(self, path: str, parts: list[str], node: Node) -> None:
        self.nodes.put(path, (node, None if self._immutable(parts) else time.monotonic()))

    def _attrs(self, n: Node) -> dict:
        t = n.mtime_ns
        if n.is_dir:
            mode, nlink, size = stat.S_IFDIR | 0o555, 2, 0
        elif n.kind == "symlink":
            mode, nlink, size = stat.S_IFLNK | 0o777, 1, n.size
        else:
            mode, nlink, size = stat.S_IFREG | ((n.mode & 0o555) or 0o444), 1, n.size
        # A file's blocks are its data: a sparse file's holes take none (du
        # shows what a restore will allocate). Names of one inode in the
        # snapshot are separate files here (nlink 1): each has its own inode
        # number, so claiming more links would only mislead tools that count them.
        data = n.entry.data_size if (n.entry is not None and not n.is_dir and n.kind != "symlink") else size
        return {"st_mode": mode, "st_nlink": nlink, "st_size": size, "st_mtime": t, "st_ctime": t,
                "st_atime": t, "st_uid": self.uid, "st_gid": self.gid, "st_blocks": (data + 511) // 512}

    # ------------------------------------------------------- operations
    def getattr(self, path, fh=None):
        return self._attrs(self._node(path))

    def readdir(self, path, fh):
        node = self._node(path)
        if not node.is_dir:
            raise fuse.FuseOSError(errno.ENOTDIR)
        try:
            kids = self.view.listdir(node)
        except (PathNotFound, StoreError):
            raise fuse.FuseOSError(errno.ENOENT) from None
        base = path.rstrip("/")
        out = [".", ".."]
        for k in kids:
            p = f"{base}/{k.name}"
            self._remember(p, [x for x in p.split("/") if x], k)
            out.append(k.name)
        return out

    def readlink(self, path):
        n = self._node(path)
        if n.kind != "symlink":
            raise fuse.FuseOSError(errno.EINVAL)
        return self.view.readlink(n)

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise fuse.FuseOSError(errno.EROFS)
        n = self._node(path)
        if n.is_dir:
            raise fuse.FuseOSError(errno.EISDIR)
        try:
            vf = self.view.open(n)
        except (PathNotFound, StoreError):
            raise fuse.FuseOSError(errno.EIO) from None
        fh = next(self._fh)
        with self._lock:
            self.files[fh] = vf
        return fh

    def read(self, path, size, offset, fh):
        vf = self.files.get(fh)
        if vf is None:
            raise fuse.FuseOSError(errno.EBADF)
        try:
            return vf.read(offset, size)
        except StoreError:
            raise fuse.FuseOSError(errno.EIO) from None

    def release(self, path, fh):
        with self._lock:
            self.files.pop(fh, None)
        return 0

    # The extended attributes the snapshot recorded (user.*, security.*, ACLs
    # as system.posix_acl_*: the kernel may keep the latter to itself on a
    # FUSE mount), of files, directories and symlinks inside snapshots.
    def _xattrs(self, path) -> dict[bytes, bytes]:
        n = self._node(path)
        if n.entry is None or n.kind not in ("snapdir", "file", "symlink"):
            return {}
        return dict(n.entry.xattrs)

    def listxattr(self, path):
        return [name.decode("utf-8", "surrogateescape") for name in self._xattrs(path)]

    def getxattr(self, path, name, position=0):
        value = self._xattrs(path).get(name.encode("utf-8", "surrogateescape"))
        if value is None:
            raise fuse.FuseOSError(errno.ENODATA)
        return value

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0,
                "f_files": 0, "f_ffree": 0, "f_namemax": 255}

    def access(self, path, amode):
        self._node(path)
        if amode & os.W_OK:
            raise fuse.FuseOSError(errno.EROFS)
        return 0

    # Everything that writes: read-only file system.
    def _rofs(self, *a, **k):
        raise fuse.FuseOSError(errno.EROFS)

    chmod = chown = create = mkdir = mknod = rename = rmdir = symlink = link = truncate = unlink = _rofs
    utimens = write = setxattr = removexattr = _rofs


def mount(view: View, mountpoint: str, foreground: bool = True, allow_other: bool = False,
          debug: bool = False) -> None:
    """Mount and serve until unmounted (`fusermount3 -u`) or SIGINT/SIGTERM,
    which unmount cleanly."""
    opts = {"ro": True, "foreground": foreground, "fsname": "pitstore", "subtype": "pit",
            "default_permissions": True}
    if allow_other:
        opts["allow_other"] = True
    if debug:
        opts["debug"] = True
    mp = os.path.abspath(mountpoint)
    # libfuse installs its own SIGINT/SIGTERM/SIGHUP handlers (leave the loop,
    # unmount) only where the handler is still the default; Python's own
    # handlers would only set a flag that no Python code runs to see.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    fuse.FUSE(ViewFS(view), mp, **opts)
