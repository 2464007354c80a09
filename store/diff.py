"""Differences between two snapshots, walking only subtrees whose ids differ.

Because trees are content-addressed, equal ids mean equal subtrees: a diff
between two snapshots of a million files with three changes reads only the
trees on the paths to those three changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .objects import ObjectReader
from .trees import DIR, TYPE_NAMES, Entry

ADDED, REMOVED, MODIFIED, META, TYPE = "+", "-", "M", "m", "T"


@dataclass
class Change:
    status: str
    path: bytes
    old: Entry | None
    new: Entry | None

    def to_json(self) -> dict:
        d = {"status": {"+": "added", "-": "removed", "M": "modified", "m": "metadata", "T": "type"}[self.status],
             "path": self.path.decode(errors="surrogateescape")}
        if self.old is not None:
            d["old_size"] = self.old.size
        if self.new is not None:
            d["new_size"] = self.new.size
            d["type"] = TYPE_NAMES[self.new.type]
        else:
            d["type"] = TYPE_NAMES[self.old.type]
        return d


def diff_trees(ra: ObjectReader, a: bytes | None, rb: ObjectReader, b: bytes | None,
               prefix: bytes = b"") -> Iterator[Change]:
    if a == b:
        return
    da = ra.tree_dict(a)
    db = rb.tree_dict(b)
    for name in sorted(da.keys() | db.keys()):
        ea, eb = da.get(name), db.get(name)
        path = prefix + b"/" + name if prefix else name
        if ea is None:
            yield Change(ADDED, path, None, eb)
            if eb.type == DIR:
                for p, e in rb.walk(eb.content, path):
                    yield Change(ADDED, p, None, e)
        elif eb is None:
            yield Change(REMOVED, path, ea, None)
            if ea.type == DIR:
                for p, e in ra.walk(ea.content, path):
                    yield Change(REMOVED, p, e, None)
        elif ea.type != eb.type:
            yield Change(TYPE, path, ea, eb)
        elif ea.type == DIR:
            if (ea.mode, ea.uid, ea.gid) != (eb.mode, eb.uid, eb.gid):
                yield Change(META, path, ea, eb)
            yield from diff_trees(ra, ea.content, rb, eb.content, path)
        elif (ea.content, ea.nchunks) != (eb.content, eb.nchunks):
            yield Change(MODIFIED, path, ea, eb)
        elif (ea.mode, ea.uid, ea.gid, ea.mtime_ns, ea.extra) != (eb.mode, eb.uid, eb.gid, eb.mtime_ns, eb.extra):
            yield Change(META, path, ea, eb)
