"""Trees: directory listings as content-addressed objects (a Merkle tree).

A tree is a msgpack array of entries sorted by name (raw bytes, as the
kernel gives them). Its id is the BLAKE3 of that encoding, so an unchanged
directory encodes to the same bytes and the same id in every snapshot, and
a snapshot shares every unchanged subtree with its parent.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field

import msgpack

from .errors import IntegrityError

FILE = 1
DIR = 2
SYMLINK = 3
TYPE_NAMES = {FILE: "file", DIR: "dir", SYMLINK: "symlink"}
TREE_VERSION = 1

# Keys of an entry's `extra` map (docs/format.md 6.1). Each is absent when it
# would be empty, so a tree of plain files encodes as it always did.
X_FILES, X_DIRS, X_BYTES = "f", "d", "b"  # a directory's subtree totals
X_ATTRS = "x"   # extended attributes: [[name, value], ...], bin, sorted by name
X_DATA = "s"    # a sparse file's data extents: [[offset, length], ...], increasing;
                # its chunk list holds their bytes back to back, the rest reads as zeros
X_INODE = "i"   # a file with hard links: [st_dev, st_ino]; equal values in one
                # snapshot are one inode, restored as links to one file


@dataclass
class Entry:
    """One name in a directory.

    `content` is what the entry points at: for a directory, its subtree id;
    for a file, either the single chunk's id (`nchunks == 1`), the id of a
    filelist blob (`nchunks > 1`), or None (empty file); for a symlink, the
    target bytes.
    """

    name: bytes
    type: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    content: bytes | None = None
    nchunks: int = 0
    extra: dict = field(default_factory=dict)

    def refs(self) -> bytes | None:
        """The blob this entry references (for reference counting)."""
        if self.type == DIR:
            return self.content
        if self.type == FILE and self.nchunks > 0:
            return self.content
        return None

    def is_dir(self) -> bool:
        return self.type == DIR

    def to_list(self) -> list:
        return [self.name, self.type, self.mode, self.uid, self.gid, self.mtime_ns,
                self.size, self.content, self.nchunks, self.extra or None]

    @property
    def xattrs(self) -> list[tuple[bytes, bytes]]:
        return [(bytes(k), bytes(v)) for k, v in self.extra.get(X_ATTRS) or ()]

    @property
    def extents(self) -> list[tuple[int, int]] | None:
        """The data extents of a sparse file, or None for a dense one."""
        ext = self.extra.get(X_DATA)
        return [(int(o), int(n)) for o, n in ext] if ext is not None else None

    @property
    def data_size(self) -> int:
        """Bytes the chunk list holds: the size, less a sparse file's holes."""
        ext = self.extents
        return self.size if ext is None else sum(n for _, n in ext)

    @property
    def inode_key(self) -> tuple[int, int] | None:
        key = self.extra.get(X_INODE)
        return (int(key[0]), int(key[1])) if key else None

    @property
    def st_mode(self) -> int:
        kind = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}[self.type]
        return kind | (self.mode & 0o7777)


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise IntegrityError(f"illegal name in tree: {name!r}")


def encode_tree(entries: list[Entry]) -> bytes:
    entries = sorted(entries, key=lambda e: e.name)
    for e in entries:
        check_name(e.name)  # never write a tree the reader would refuse
    for a, b in zip(entries, entries[1:]):
        if a.name == b.name:
            raise IntegrityError(f"duplicate name in tree: {a.name!r}")
    return msgpack.packb([TREE_VERSION, [e.to_list() for e in entries]], use_bin_type=True)


def decode_tree(data: bytes) -> list[Entry]:
    try:
        version, rows = msgpack.unpackb(data, raw=False)
        if version != TREE_VERSION:
            raise IntegrityError(f"tree format version {version} is not supported")
        out = []
        for r in rows:
            name, typ, mode, uid, gid, mtime, size, content, n, extra = r
            if not isinstance(name, bytes) or typ not in TYPE_NAMES:
                raise IntegrityError("malformed tree entry")
            check_name(name)
            if extra is not None and not isinstance(extra, dict):
                raise IntegrityError("malformed tree entry")
            if extra and X_DATA in extra:
                check_extents(extra[X_DATA], size)
            out.append(Entry(name, typ, mode, uid, gid, mtime, size, content, n, extra or {}))
        return out
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed tree: {exc}") from None


def check_extents(extents, size: int) -> None:
    """Data extents must be increasing, non-overlapping and inside the file."""
    end = 0
    try:
        for off, n in extents:
            if not (isinstance(off, int) and isinstance(n, int)) or off < end or n <= 0 or off + n > size:
                raise IntegrityError("malformed sparse-file extents in tree")
            end = off + n
    except (TypeError, ValueError):
        raise IntegrityError("malformed sparse-file extents in tree") from None


def tree_children(entries: list[Entry]) -> list[bytes]:
    return [r for e in entries if (r := e.refs()) is not None]


def subtree_totals(entries: list[Entry]) -> dict:
    """Files, directories and bytes below a directory with these entries.

    Each directory entry carries its subtree's totals in `extra` (f, d, b), so
    a change-set snapshot knows the whole tree's size without walking it."""
    files = dirs = nbytes = 0
    for e in entries:
        if e.type == FILE:
            files += 1
            nbytes += e.size
        elif e.type == DIR:
            dirs += 1 + e.extra.get("d", 0)
            files += e.extra.get("f", 0)
            nbytes += e.extra.get("b", 0)
    return {"f": files, "d": dirs, "b": nbytes}
