"""The master's in-memory Merkle tree of a set's sources.

One `Tree` per mastered set: the top-level names are the base names of the
set's source paths, below them `DNode` directories and `FNode` files and
symlinks (a file holds its chunk list, and the list of the version before as
the base of the next delta). Every node memoises its Merkle digest
(`merkle.leaf_digest` / `dir_digest`, what catch-up compares with the
replica); a change clears the memo of the node's ancestors. Every change is
also journaled (`journal`: (path, removed)), so the files cache writes only
what changed.

`lock` guards the nodes and the journal: the scanner changes them, senders
read them (and a rewritten file's chunk list goes back into them).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from store.trees import DIR

from .chunklist import Chunks
from .merkle import dir_digest, leaf_digest


@dataclass(slots=True)
class FNode:
    type: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    content: bytes | None
    chunks: Chunks = field(default_factory=Chunks)  # files: (id, len) pairs
    skey: tuple = ()
    prev: Chunks | None = None  # the chunk list of the version before (base for deltas)
    prev_content: bytes | None = None
    _digest: bytes | None = None

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = leaf_digest(self.type, self.mode, self.uid, self.gid, self.mtime_ns, self.size,
                                       self.content)
        return self._digest


@dataclass(slots=True)
class DNode:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    children: dict = field(default_factory=dict)
    _digest: bytes | None = None
    type: int = DIR

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = dir_digest([(n, c.digest()) for n, c in self.children.items()])
        return self._digest


class Tree:
    """A set's sources as one tree of set-relative paths (`name/rest`, name: a source's base name)."""

    def __init__(self, sources: list[bytes]) -> None:
        self.sources = sources
        self.names = [os.path.basename(s) for s in sources]
        self.root = DNode()
        self.lock = threading.RLock()
        # (path, removed) for every change of the tree since the files cache was last written
        self.journal: list[tuple[bytes, bool]] = []

    def lookup(self, rel: bytes):
        node = self.root
        for part in rel.split(b"/"):
            if not isinstance(node, DNode):
                return None
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def _parent(self, rel: bytes, create: bool) -> DNode | None:
        parts = rel.split(b"/")[:-1]
        node = self.root
        path = []
        for part in parts:
            path.append(part)
            nxt = node.children.get(part)
            if not isinstance(nxt, DNode):
                if not create:
                    return None
                nxt = DNode()
                node.children[part] = nxt
            node = nxt
        return node

    def _invalidate(self, rel: bytes) -> None:
        node = self.root
        node._digest = None
        for part in rel.split(b"/")[:-1]:
            node = node.children.get(part)
            if not isinstance(node, DNode):
                return
            node._digest = None

    def set(self, rel: bytes, node) -> None:
        parent = self._parent(rel, create=True)
        parent.children[rel.rsplit(b"/", 1)[-1]] = node
        self._invalidate(rel)
        self.journal.append((rel, False))

    def remove(self, rel: bytes) -> bool:
        parent = self._parent(rel, create=False)
        if parent is None:
            return False
        gone = parent.children.pop(rel.rsplit(b"/", 1)[-1], None) is not None
        if gone:
            self._invalidate(rel)
            self.journal.append((rel, True))
        return gone

    def abs_path(self, rel: bytes) -> bytes:
        name, _, rest = rel.partition(b"/")
        src = self.sources[self.names.index(name)]
        return os.path.join(src, rest) if rest else src

    def rel_path(self, p: bytes) -> bytes | None:
        p = os.path.normpath(p)
        for src, name in zip(self.sources, self.names):
            if p == src:
                return name
            if p.startswith(src + b"/"):
                return name + p[len(src):]
        return None
