"""Differences between two snapshots, walking only subtrees whose ids differ.

Because trees are content-addressed, equal ids mean equal subtrees: a diff
between two snapshots of a million files with three changes reads only the
trees on the paths to those three changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .objects import ObjectReader
from .trees import DIR, TYPE_NAMES, X_ATTRS, X_BYTES, X_DATA, X_DIRS, X_FILES, X_INODE, Entry

ADDED, REMOVED, MODIFIED, META, TYPE = "+", "-", "M", "m", "T"
# extra keys compared on their own terms (totals are derived, `s` is content, `i` is compared by presence)
_OWN_KEYS = {X_FILES, X_DIRS, X_BYTES, X_ATTRS, X_DATA, X_INODE}


@dataclass
class Change:
    status: str
    path: bytes
    old: Entry | None
    new: Entry | None

    @property
    def metadata(self) -> list[str]:
        """Which metadata differ (both sides present): see `meta_changes`."""
        if self.old is None or self.new is None or self.old.type != self.new.type:
            return []
        return meta_changes(self.old, self.new)

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
        meta = self.metadata
        if meta:
            d["metadata"] = meta
        return d


def meta_changes(a: Entry, b: Entry) -> list[str]:
    """What differs between two entries of one type besides their content:
    'mode', 'owner', 'mtime' (not for directories: adding a child changes
    it), 'xattrs' (extended attributes, ACLs included), 'hardlinks' (the
    file became, or stopped being, one of several names of an inode) and
    'other' (facts of `extra` this version does not know)."""
    out = []
    if a.mode != b.mode:
        out.append("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        out.append("owner")
    if a.type != DIR and a.mtime_ns != b.mtime_ns:
        out.append("mtime")
    if a.xattrs != b.xattrs:
        out.append("xattrs")
    if a.type != DIR and (a.inode_key is None) != (b.inode_key is None):
        out.append("hardlinks")
    ea = {k: v for k, v in (a.extra or {}).items() if k not in _OWN_KEYS}
    eb = {k: v for k, v in (b.extra or {}).items() if k not in _OWN_KEYS}
    if ea != eb:
        out.append("other")
    return out


def same_content(a: Entry, b: Entry) -> bool:
    """Equal bytes: equal chunks, and for a sparse file also the same size
    and the same places for them (the same data elsewhere is another file)."""
    return (a.content, a.nchunks) == (b.content, b.nchunks) and \
        (a.extents is None and b.extents is None or (a.size, a.extents) == (b.size, b.extents))


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
            if meta_changes(ea, eb):
                yield Change(META, path, ea, eb)
            yield from diff_trees(ra, ea.content, rb, eb.content, path)
        elif not same_content(ea, eb):
            yield Change(MODIFIED, path, ea, eb)
        elif meta_changes(ea, eb):
            yield Change(META, path, ea, eb)
