"""Catch-up: after any (re)connect, master and replica compare their trees, and only what differs travels.

The sender LISTs directories level by level, starting at the set's root;
the replica answers each with its (name, type, Merkle digest) rows. Equal
digests end the walk of that subtree; a directory on both sides with
another digest is listed on the next level; anything else (new on the
master, another type, a file that differs) is sent whole; a path only the
replica has is deleted in mirror mode (never a whole source root: a
vanished source must not wipe a mirror). `differing_paths` returns the
paths to send, in the order found.
"""
from __future__ import annotations

from typing import Callable

from store.trees import DIR

from . import protocol
from .tree import DNode, Tree

LIST_BYTES = protocol.MAX_FRAME // 4  # path bytes per LIST


def _by_bytes(paths: list[bytes], budget: int) -> list[list[bytes]]:
    """Consecutive groups of paths, each of at most `budget` bytes (estimated) on the wire."""
    out: list[list[bytes]] = [[]]
    room = budget
    for p in paths:
        n = len(p) + 8
        if out[-1] and n > room:
            out.append([])
            room = budget
        out[-1].append(p)
        room -= n
    return out


def _subtree(rel: bytes, node) -> list[bytes]:
    out = [rel]
    if isinstance(node, DNode):
        for n, c in node.children.items():
            out.extend(_subtree(rel + b"/" + n, c))
    return out


def differing_paths(conn: protocol.Conn, tree: Tree, mirror: bool, alert: Callable[[str], None]) -> list[bytes]:
    """The set-relative paths where the replica's tree differs from the master's (`tree`)."""
    send: list[bytes] = []
    level = [b""]
    while level:
        nxt: list[bytes] = []
        for part in _by_bytes(level, LIST_BYTES):
            conn.send({"t": "list", "paths": part})
            listing: dict[bytes, dict] = {p: {} for p in part}
            while True:
                msg = conn.recv("listing")
                for d in msg["dirs"]:
                    path, rows = d
                    if path in listing:
                        for name, typ, dig in rows:
                            listing[path][name] = (typ, dig)
                if msg["end"]:
                    break
            with tree.lock:
                for path in part:
                    mnode = tree.root if path == b"" else tree.lookup(path)
                    if not isinstance(mnode, DNode):
                        continue
                    rep = listing[path]
                    for name in sorted(set(mnode.children) | set(rep)):
                        m = mnode.children.get(name)
                        r = rep.get(name)
                        rel = path + b"/" + name if path else name
                        if m is None:
                            # Never delete a whole source root: a vanished source must not wipe a mirror.
                            if mirror and path != b"":
                                send.append(rel)
                        elif r is None:
                            send.extend(_subtree(rel, m))
                        elif r[1] == m.digest():
                            continue
                        elif isinstance(m, DNode) and r[0] == DIR:
                            if path == b"" and not m.children:
                                alert(f"source {name.decode(errors='replace')} is empty on the master: "
                                      "not propagated")
                                continue
                            nxt.append(rel)
                        else:
                            send.extend(_subtree(rel, m))
        level = nxt
    return send
