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
            out.append(Entry(name, typ, mode, uid, gid, mtime, size, content, n, extra or {}))
        return out
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed tree: {exc}") from None


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
