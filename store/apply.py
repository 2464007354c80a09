"""Snapshots from entries that arrive ready-made (the replica side).

A master chunks and hashes its files; the replica receives, for each changed
path, the entry (metadata plus the ids of chunks it already stored) or a
deletion, and turns a consistent point into a snapshot here. Like the
change-set path of `ingest.py`, the cost is O(changed paths + their
ancestors): untouched subtrees keep their ids and are shared.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from . import packs as P
from .errors import IntegrityError, InvalidArgument
from .objects import ObjectReader, split_path
from .repository import Writer, object_id, write_filelist
from .snapshots import Snapshot, add_snapshot, check_set_name, list_snapshots, unique_name
from .trees import DIR, FILE, X_BYTES, X_DIRS, X_FILES, Entry, encode_tree, subtree_totals, tree_children

_LEAF = object()


@dataclass
class Change:
    """One path's new state; `entry` None means deleted. `chunks` (ids with
    lengths) is given for files, and every chunk must already be stored."""

    path: str
    entry: Entry | None
    chunks: list[tuple[bytes, int]] | None = None


def store_file_content(w: Writer, entry: Entry, chunks: list[tuple[bytes, int]]) -> None:
    """Point a file entry at its chunks (storing the filelist blob when it has more than one).

    A dense file's size is the sum of its chunks; a sparse file (data
    extents in `extra`) keeps its logical size, and its chunks must hold
    exactly its extents' bytes."""
    for cid, _ in chunks:
        if not w.has(cid):
            raise IntegrityError(f"chunk {cid.hex()[:16]} of {entry.name!r} has not been received")
    total = sum(n for _, n in chunks)
    if entry.extents is None:
        entry.size = total
    elif total != entry.data_size:
        raise IntegrityError(f"the chunks of sparse file {entry.name!r} do not add up to its data extents")
    entry.nchunks = len(chunks)
    if not chunks:
        entry.content = None
    elif len(chunks) == 1:
        entry.content = chunks[0][0]
    else:
        entry.content = write_filelist(w, [c for c, _ in chunks], [n for _, n in chunks])


def _write_tree(w: Writer, entries: list[Entry]) -> bytes:
    # Sorted as the tree is encoded: its children record in the index lists them in the order a reader of the
    # tree finds them (a name added before existing ones made verify --deep report every such tree damaged)
    entries = sorted(entries, key=lambda e: e.name)
    payload = encode_tree(entries)
    tid = object_id(P.TREE, payload)
    if w.put(P.TREE, tid, payload):
        w.link(tid, tree_children(entries))
    return tid


def apply_to_tree(w: Writer, reader: ObjectReader, root: bytes | None, changes: list[Change]) -> tuple[bytes, dict]:
    trie: dict = {}
    for ch in changes:
        parts = split_path(ch.path)
        if not parts:
            raise InvalidArgument("a change must name a path below the set's root")
        node = trie
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):  # a deeper change under a replaced path: rebuild from it
                nxt = node[p] = {_LEAF: nxt}
            node = nxt
        slot = node.get(parts[-1])
        if isinstance(slot, dict):
            slot[_LEAF] = ch
        else:
            node[parts[-1]] = ch

    now = time.time_ns()

    def build(tree_id: bytes | None, sub: dict) -> tuple[bytes, list[Entry]]:
        cur = reader.tree_dict(tree_id)
        for name, node in sub.items():
            if name is _LEAF:
                continue
            leaf, deeper = (node, None) if isinstance(node, Change) else (node.get(_LEAF), node)
            old = cur.get(name)
            if leaf is not None and leaf.entry is None:  # deleted (and maybe made anew below)
                cur.pop(name, None)
                old = None
                if deeper is None:
                    continue
            if leaf is not None and leaf.entry is not None and leaf.entry.type != DIR:
                e = Entry(**{**leaf.entry.__dict__, "name": name, "extra": dict(leaf.entry.extra)})
                if e.type == FILE:
                    store_file_content(w, e, leaf.chunks or [])
                cur[name] = e
                continue
            # A directory: given with its metadata, or implied by a change below it.
            if leaf is not None and leaf.entry is not None:
                meta = leaf.entry
            elif old is not None and old.type == DIR:
                meta = old
            else:
                meta = Entry(name, DIR, 0o755, 0, 0, now, 0)
            base = old.content if old is not None and old.type == DIR else None
            tid, kids = build(base, deeper or {})
            # the directory's own facts (extended attributes, ...) with its new subtree totals
            extra = {k: v for k, v in (meta.extra or {}).items() if k not in (X_FILES, X_DIRS, X_BYTES)}
            cur[name] = Entry(name, DIR, meta.mode, meta.uid, meta.gid, meta.mtime_ns, len(kids), tid, 0,
                              {**extra, **subtree_totals(kids)})
        entries = list(cur.values())
        return _write_tree(w, entries), entries

    tid, entries = build(root, trie)
    return tid, subtree_totals(entries)


def commit_changes(w: Writer, set_name: str, paths: list[str], changes: list[Change], host: str,
                   time_ns: int | None = None, stats: dict | None = None) -> Snapshot:
    """Turn received changes into the set's next snapshot (inside writer session `w`)."""
    check_set_name(set_name)
    repo = w.repo
    reader = ObjectReader(repo, w.txn)
    prev = list_snapshots(repo, w.txn, set_name)
    parent = prev[-1] if prev else None
    root, totals = apply_to_tree(w, reader, parent.root if parent else None, changes)
    now = time_ns or time.time_ns()
    st = dict(stats or {})
    st.update(files=totals["f"], dirs=totals["d"], bytes=totals["b"], mode="received",
              examined_files=len(changes), new_chunks=w.stats["new_blobs"], new_bytes=w.stats["new_raw"],
              new_stored=w.stats["new_stored"])
    snap = Snapshot(set_name, unique_name(repo, w.txn, set_name, now), now, host, paths, root,
                    parent.id if parent else None, st)
    return add_snapshot(w, snap)


# --- the set's head: received state that is not yet a snapshot -------------
#
# A replica receives changes continuously but makes snapshots only at
# consistent points. Between the two, the received state lives in the set's
# *head*: a root tree referenced from the `sets` database exactly like a
# snapshot references its root, so every received blob is always referenced
# (nothing is swept as garbage) and a restart loses nothing committed.

def _set_record(w: Writer, set_name: str) -> dict:
    import msgpack

    raw = w.txn.get(set_name.encode(), db=w.db["sets"])
    return msgpack.unpackb(raw) if raw else {}


def _put_set_record(w: Writer, set_name: str, rec: dict) -> None:
    import msgpack

    w.txn.put(set_name.encode(), msgpack.packb(rec, use_bin_type=True), db=w.db["sets"])


def head_root(repo, txn, set_name: str) -> bytes | None:
    """The set's received-but-not-snapshotted root, else its latest snapshot's root."""
    import msgpack

    raw = txn.get(set_name.encode(), db=repo.index.db["sets"])
    rec = msgpack.unpackb(raw) if raw else {}
    if rec.get("head"):
        return rec["head"]
    snaps = list_snapshots(repo, txn, set_name)
    return snaps[-1].root if snaps else None


def update_head(w: Writer, set_name: str, changes: list[Change]) -> bytes:
    """Apply received changes to the set's head (inside writer session `w`); returns the new head root."""
    from .refcounts import DropStats, decref

    check_set_name(set_name)
    rec = _set_record(w, set_name)
    old = rec.get("head")
    base = old if old else head_root(w.repo, w.txn, set_name)
    new, _ = apply_to_tree(w, ObjectReader(w.repo, w.txn), base, changes)
    w.incref(new)
    if old:
        decref(w, old, DropStats())
    rec["head"] = new
    _put_set_record(w, set_name, rec)
    return new


def snapshot_head(w: Writer, set_name: str, paths: list[str], host: str, time_ns: int | None = None,
                  stats: dict | None = None) -> Snapshot | None:
    """Make the head a snapshot (a consistent point). None when nothing changed since the last one."""
    from .refcounts import DropStats, decref

    rec = _set_record(w, set_name)
    head = rec.get("head")
    prev = list_snapshots(w.repo, w.txn, set_name)
    parent = prev[-1] if prev else None
    if head is None or (parent is not None and parent.root == head):
        if head is not None:
            decref(w, head, DropStats())
            rec.pop("head")
            _put_set_record(w, set_name, rec)
        return None
    entries = ObjectReader(w.repo, w.txn).tree(head)
    totals = subtree_totals(entries)
    now = time_ns or time.time_ns()
    st = dict(stats or {})
    st.update(files=totals["f"], dirs=totals["d"], bytes=totals["b"], mode="received")
    snap = Snapshot(set_name, unique_name(w.repo, w.txn, set_name, now), now, host, paths, head,
                    parent.id if parent else None, st)
    add_snapshot(w, snap)
    # The snapshot now holds the root; the head's own reference goes.
    decref(w, head, DropStats())
    rec.pop("head")
    _put_set_record(w, set_name, rec)
    return snap


def set_heads(repo, txn) -> dict[str, bytes]:
    import msgpack

    out = {}
    with txn.cursor(db=repo.index.db["sets"]) as cur:
        for k, v in cur:
            rec = msgpack.unpackb(v)
            if rec.get("head"):
                out[k.decode()] = rec["head"]
    return out
