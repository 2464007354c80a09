"""Finding a path whose name you know but not where (or when) it was: `pit find`.

Words: a *hit* is one version of one matching path (store/history.py: a run
of snapshots with the same content), with the snapshots that hold it: a run
of consecutive snapshots of its set, so its first and last name it whole.

The answer comes from the previous-versions index alone: one pass over a
set's keys (`set \\0 parent \\0 name \\0 time sid`), testing each distinct
name once, and reading the state of a path only when it matches; never a
walk of 64 snapshot trees. A pattern is a gitignore-style line as for
`--exclude` (store/filters.py), except that only a leading slash anchors it:
`report.txt`, `*.xlsx`, `sales/*.xlsx` (at any depth), `/office/sales/`. A parent too long for a key is kept in the index by its
hash; such paths are resolved from their directories' own entries.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

from .catalogue import Snapshot, list_sets, list_snapshots
from .filters import PathMatcher
from .history import PARENT_ROOM, SUFFIX, State, _parent_key, decode_state, snap_suffix
from .trees import DIR
from .versions import _query

TYPE_NAMES = {1: "file", 2: "dir", 3: "symlink"}
PROGRESS_EVERY = 20000  # keys between progress calls


@dataclass
class Hit:
    set: str
    path: bytes
    state: State
    snapshots: list[Snapshot] = field(default_factory=list)  # holding this version, oldest first

    @property
    def newest(self) -> Snapshot:
        return self.snapshots[-1]

    def to_json(self) -> dict:
        s = self.state
        return {"set": self.set, "path": self.path.decode("utf-8", "surrogateescape"),
                "type": TYPE_NAMES.get(s.type, "?"), "size": s.size, "mtime_ns": s.mtime_ns,
                "id": (s.content or b"").hex() if s.type != DIR else None,
                "first": self.snapshots[0].name, "first_id": self.snapshots[0].hex,
                "last": self.newest.name, "last_id": self.newest.hex, "last_time": self.newest.time_iso,
                "snapshots": len(self.snapshots)}


def find(repo, pattern: str | list[str], set_name: str | None = None, ignore_case: bool = False,
         progress: Callable[[int, int], None] | None = None) -> list[Hit]:
    """Every version of every path matching, newest first (by the newest snapshot holding it)."""
    m = PathMatcher([pattern] if isinstance(pattern, str) else pattern, ignore_case, what="find pattern",
                    floating=True)
    hits: list[Hit] = []
    with _query(repo) as (dbs, txn):
        if dbs is None:
            return []
        sets = [set_name] if set_name else list_sets(repo, txn)
        for s in sets:
            hits += _find_in_set(repo, txn, dbs, s, m, progress, len(hits))
    hits.sort(key=lambda h: (-h.newest.time_ns, h.set, h.path))
    return hits


def _find_in_set(repo, txn, dbs, set_name: str, m: PathMatcher, progress, found: int) -> list[Hit]:
    snaps = list_snapshots(repo, txn, set_name)
    if not snaps:
        return []
    suffixes = [snap_suffix(x.time_ns, x.id) for x in snaps]
    prefix = set_name.encode() + b"\0"
    plen, tail = len(prefix), SUFFIX + 1
    set_b = set_name.encode()
    names_only = m.names_only
    candidate = m.candidate
    groups: list[tuple[bytes, bytes, list[bytes]]] = []  # (parent key, name, keys) of paths that match
    hashed: list[tuple[bytes, bytes, list[bytes]]] = []  # ... whose parent is kept by its hash
    seen = 0
    if progress is not None:
        progress(seen, found)
    with txn.cursor(db=dbs.events) as cur:
        if not cur.set_range(prefix):
            return []
        last, keys = None, None
        for key in cur.iternext(keys=True, values=False):
            if key[:plen] != prefix:
                break
            rest = key[plen:-tail]
            if rest == last:
                if keys is not None:
                    keys.append(key)
                continue
            last, keys = rest, None
            seen += 1
            if progress is not None and not seen % PROGRESS_EVERY:
                progress(seen, found + len(groups))
            parent, _, name = rest.partition(b"\0")
            if names_only:
                if not candidate(name):
                    continue
            elif parent[:1] == b"\x01":
                keys = [key]  # its path is known only once its parent's hash is resolved
                hashed.append((parent, name, keys))
                continue
            else:
                if not candidate(parent + b"/" + name if parent else name):
                    continue
            keys = [key]
            if parent[:1] == b"\x01":
                hashed.append((parent, name, keys))
            else:
                groups.append((parent, name, keys))
    out: list[Hit] = []
    for parent, name, keys in groups:
        out += _hits(txn, dbs, set_name, (parent + b"/" + name) if parent else name, keys, m, snaps, suffixes)
    if hashed:
        dirs: dict[bytes, bytes] = {}
        _resolve_hashed(txn, dbs, set_b, dirs)
        for parent, name, keys in hashed:
            path = dirs.get(parent)
            if path is not None:
                out += _hits(txn, dbs, set_name, path + b"/" + name, keys, m, snaps, suffixes)
    return out


def _hits(txn, dbs, set_name, path, keys, m, snaps, suffixes) -> list[Hit]:
    events = [(k[-SUFFIX:], decode_state(txn.get(k, db=dbs.events))) for k in keys]
    last_present = next((st for _, st in reversed(events) if st is not None), None)
    if last_present is None:
        return []
    if not m.match_bytes(path.rsplit(b"/", 1)[-1] if m.names_only else path, last_present.type == DIR):
        return []
    out = []
    for i, (suffix, state) in enumerate(events):
        if state is None:
            continue
        lo = bisect.bisect_left(suffixes, suffix)
        hi = bisect.bisect_left(suffixes, events[i + 1][0]) if i + 1 < len(events) else len(suffixes)
        if lo < hi:
            out.append(Hit(set_name, path, state, snaps[lo:hi]))
    return out


def _resolve_hashed(txn, dbs, set_b: bytes, dirs: dict) -> None:
    """Hashed parent keys -> paths, from every directory entry of the set (only when a match needs it)."""
    prefix = set_b + b"\0"
    entries: list[tuple[bytes, bytes]] = []
    with txn.cursor(db=dbs.events) as cur:
        if cur.set_range(prefix):
            last = None
            for key, val in cur.iternext():
                if not key.startswith(prefix):
                    break
                rest = key[len(prefix):-SUFFIX - 1]
                if rest == last:
                    continue
                st = decode_state(val)
                if st is not None and st.type == DIR:
                    last = rest
                    entries.append(tuple(rest.split(b"\0", 1)))
    known: dict[bytes, bytes] = {}
    changed = True
    while changed:  # a hashed parent's own parent may be hashed too: resolve top down
        changed = False
        for parent, name in entries:
            base = known.get(parent) if parent.startswith(b"\x01") else parent
            if base is None and parent.startswith(b"\x01"):
                continue
            path = (base + b"/" + name) if base else name
            if len(set_b) + len(path) > PARENT_ROOM:
                k = _parent_key(set_b, path)
                if k not in known:
                    known[k] = path
                    changed = True
    dirs.update(known)


def suggest_paths(repo, set_name: str, path: bytes, limit: int = 10) -> list[bytes]:
    """Paths of the set whose base name is `path`'s (for "no versions of report.txt": did you mean
    src/report.txt?). Empty when there is none."""
    name = path.strip(b"/").rsplit(b"/", 1)[-1]
    if not name:
        return []
    want = name
    out: list[bytes] = []
    with _query(repo) as (dbs, txn):
        if dbs is None:
            return []
        prefix = set_name.encode() + b"\0"
        groups = []
        with txn.cursor(db=dbs.events) as cur:
            last = None
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    rest = key[len(prefix):-SUFFIX - 1]
                    if rest != last:
                        last = rest
                        parent, _, n = rest.partition(b"\0")
                        if n == want:
                            groups.append((parent, n))
        dirs: dict[bytes, bytes] = {}
        if any(p.startswith(b"\x01") for p, _ in groups):
            _resolve_hashed(txn, dbs, set_name.encode(), dirs)
        for parent, n in groups:
            base = dirs.get(parent) if parent.startswith(b"\x01") else parent
            if base is None and parent.startswith(b"\x01"):
                continue
            p = (base + b"/" + n) if base else n
            if p != path.strip(b"/"):
                out.append(p)
    return sorted(out)[:limit]
