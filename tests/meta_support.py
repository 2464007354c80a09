"""Snapshots written entry by entry, with the metadata of docs/format.md 6.1
(extended attributes, sparse-file data extents, hard-link inode keys) set
exactly as a test wants them, through the store's own writer
(`store.apply.commit_changes`, what a replica uses): restore, the views and
diff are tested on what the format says, whatever the ingest records.

    craft(repo_path, "s", {
        "f": CF(b"data", xattrs={b"user.a": b"1"}),
        "sparse": CF(size=1 << 30, pieces=[(5 << 20, b"x" * 4096)]),   # holes elsewhere
        "x": CF(b"same", inode=(1, 7)), "y": CF(b"same", inode=(1, 7)), # hard links
        "d": CD({"l": CL("../f", xattrs={b"trusted.t": b"v"})}, xattrs={b"user.d": b""}),
    })

The tree goes under one top directory (`src`, like a snapshot of /src), on
top of the set's previous snapshot (as received changes are).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from store import packs as P
from store.apply import Change, commit_changes
from store.repository import Repository, object_id
from store.trees import DIR, FILE, SYMLINK, X_ATTRS, X_DATA, X_INODE, Entry

MTIME = 1_600_000_000_123_456_789
PIECE = 64 * 1024  # chunks of the crafted files (any cut is a valid chunk list)


@dataclass
class CF:
    data: bytes = b""                       # a dense file's bytes
    size: int | None = None                 # a sparse file's logical size
    pieces: list | None = None              # a sparse file's [(offset, bytes)], increasing
    mode: int = 0o644
    mtime: int = MTIME
    xattrs: dict = field(default_factory=dict)
    inode: tuple | None = None


@dataclass
class CD:
    children: dict = field(default_factory=dict)
    mode: int = 0o755
    mtime: int = MTIME
    xattrs: dict = field(default_factory=dict)


@dataclass
class CL:
    target: str
    mtime: int = MTIME
    xattrs: dict = field(default_factory=dict)


def _extra(xattrs: dict) -> dict:
    return {X_ATTRS: [[k, v] for k, v in sorted(xattrs.items())]} if xattrs else {}


def _chunks(w, data: bytes) -> list[tuple[bytes, int]]:
    out = []
    for i in range(0, len(data), PIECE):
        piece = data[i:i + PIECE]
        cid = object_id(P.CHUNK, piece)
        w.put(P.CHUNK, cid, piece)
        out.append((cid, len(piece)))
    return out


def file_bytes(node: CF) -> bytes:
    """The file as it reads: a sparse one with its holes as zeros."""
    if node.pieces is None:
        return node.data
    out = bytearray(node.size)
    for off, data in node.pieces:
        out[off:off + len(data)] = data
    return bytes(out)


def craft(repo_path, set_name: str, tree: dict, top: str = "src", top_xattrs: dict | None = None):
    """Commit `tree` as the set's next snapshot; returns the Snapshot."""
    uid, gid = os.getuid(), os.getgid()
    repo = Repository(str(repo_path))
    try:
        with repo.writer() as w:
            changes = [Change(top, Entry(top.encode(), DIR, 0o755, uid, gid, MTIME, 0,
                                         extra=_extra(top_xattrs or {})))]

            def walk(prefix: str, spec: dict) -> None:
                for name, node in spec.items():
                    path = f"{prefix}/{name}"
                    bname = name.encode()
                    if isinstance(node, CD):
                        changes.append(Change(path, Entry(bname, DIR, node.mode, uid, gid, node.mtime, 0,
                                                          extra=_extra(node.xattrs))))
                        walk(path, node.children)
                    elif isinstance(node, CL):
                        t = node.target.encode()
                        changes.append(Change(path, Entry(bname, SYMLINK, 0o777, uid, gid, node.mtime, len(t), t, 0,
                                                          extra=_extra(node.xattrs))))
                    else:
                        if isinstance(node, (bytes, bytearray)):
                            node = CF(bytes(node))
                        extra = _extra(node.xattrs)
                        if node.pieces is not None:
                            extra[X_DATA] = [[off, len(d)] for off, d in node.pieces]
                            data, size = b"".join(d for _, d in node.pieces), node.size
                        else:
                            data, size = node.data, len(node.data)
                        if node.inode is not None:
                            extra[X_INODE] = list(node.inode)
                        e = Entry(bname, FILE, node.mode, uid, gid, node.mtime, size, extra=extra)
                        changes.append(Change(path, e, _chunks(w, data)))

            walk(top, tree)
            return commit_changes(w, set_name, ["/" + top], changes, "crafted")
    finally:
        repo.close()
