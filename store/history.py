"""The previous-versions index: for every path of a set, the snapshots where it changed.

This module holds its layout and keeps it inside the writer's transaction:
a snapshot's commit (`snapshots.add_snapshot`) and drop
(`prune.drop_snapshot`) call it, so every commit and drop keeps it, whoever
makes it. The queries the views make are in `versions.py`.

Words: an *event* says "in snapshot S, path p has state X, and X differs from
p's state in the snapshot just before S (in the set's time order)". A *state*
is absent, a directory, or a file/symlink with its content id; metadata-only
changes (mtime, mode) are not versions. A *version* of a file is a run of
snapshots between one event and the next. The *base* of a set is the state
of every path present in its oldest indexed snapshot: those first events
belong to no snapshot.

Layout (4), three named LMDB databases beside the index's own:

- ``versions_v4``: ``set \\0 parent \\0 name \\0 time_ns(u64 BE) sid(32)`` ->
  msgpack state (``nil`` = absent): ``[type, content, nchunks, size,
  mtime_ns, mode]``, and for a sparse file a seventh element, its data
  extents (docs/format.md 6.1 ``"s"``), without which its chunks could not
  be put in place. ``parent`` is the parent's path, or ``\\x01`` + its
  BLAKE3 hex when set and parent together exceed ``PARENT_ROOM`` (213
  bytes), so that a key with a name of 255 bytes still fits LMDB's 511. A
  base entry has the suffix ``BASE`` (40
  zero bytes, before every snapshot's) and only present states. Keying by
  (parent, name) lets a directory's children be listed by one prefix scan
  with a skip per name, and the versions of one path by one prefix scan:
  O(entries shown), never a walk of every snapshot's tree (what makes
  restic/borg/kopia mounts slow).
- ``versions_v4_bysnap``: ``sid + set \\0 parent \\0 name \\0`` -> ``b""``: the
  events of one snapshot other than the oldest (base entries have none), so
  dropping a snapshot costs O(what it, or for the oldest the next one,
  changed).
- ``versions_v4_marks``: ``set \\0 time_ns sid`` -> ``b""``: which snapshots the
  index covers. A reader compares the marks with the catalogue; any
  difference (a snapshot dropped by a process that did not run our hook, an
  index rebuilt by `pit repair`) shows the index as stale instead of wrong,
  and the next snapshot commit rebuilds the set.

Older layouts: layout 3 (``versions_v3*``) hashed parents only past 300
bytes, so a long name under a long parent made a key LMDB refuses (the
snapshot's commit failed); layout 2 (``versions_v2*``) is layout 3 without
the extents of sparse files (a version of one could not be read); layout 1
(``versions``, ``versions_bysnap``, ``versions_marks``) also keyed the
oldest snapshot's events like any other's, so dropping the oldest re-keyed
one event per path: O(files). Readers query the newest layout present
(the queries are the same for all of them). A writer that finds no layout 4
rebuilds every set's index from its snapshots in its transaction (once;
O(the oldest snapshot's paths + each later snapshot's changes) per set) and
empties the old databases: a pit of an older layout that runs later sees
its marks gone and rebuilds its own, and this code then finds its marks
differ from the catalogue and rebuilds.

Maintenance, all inside the writer's transaction:

- `record_snapshot` at commit: events = diff of the previous snapshot's root
  and the new root (`store.diff`, which walks only differing subtrees), so
  O(changed paths). A snapshot inserted before the newest also re-bases the
  next snapshot's events on it (before the oldest: the old base becomes the
  next snapshot's events where the two differ).
- `forget_snapshot` on drop, before the catalogue entry goes: for the oldest,
  fold the next snapshot's events into the base, O(what the next one
  changed); otherwise O(events of the dropped snapshot). Oldest, newest or
  middle, the index stays exact.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import lmdb
import msgpack

from .catalogue import get_snapshot, list_sets, list_snapshots
from .diff import ADDED, MODIFIED, REMOVED, TYPE, diff_trees
from .objects import ObjectReader
from .trees import DIR, FILE, X_DATA, Entry

DB_NAMES = (b"versions_v4", b"versions_v4_bysnap", b"versions_v4_marks")
DB_NAMES_V3 = (b"versions_v3", b"versions_v3_bysnap", b"versions_v3_marks")
DB_NAMES_V2 = (b"versions_v2", b"versions_v2_bysnap", b"versions_v2_marks")
DB_NAMES_V1 = (b"versions", b"versions_bysnap", b"versions_marks")
OLD_LAYOUTS = (DB_NAMES_V3, DB_NAMES_V2, DB_NAMES_V1)  # newest first
TS = struct.Struct(">Q")
SUFFIX = 8 + 32  # time_ns + snapshot id
BASE = bytes(SUFFIX)  # the suffix of a base entry: before every snapshot's


# ---------------------------------------------------------------- states
def encode_state(e: Entry | None) -> bytes:
    if e is None:
        return msgpack.packb(None)
    row = [e.type, e.content, e.nchunks, e.size, e.mtime_ns, e.mode]
    ext = e.extents if e.type == FILE else None
    if ext is not None:
        row.append([list(x) for x in ext])
    return msgpack.packb(row, use_bin_type=True)


def decode_state(raw: bytes) -> "State | None":
    v = msgpack.unpackb(raw)
    return None if v is None else State(*v[:7])


@dataclass
class State:
    type: int
    content: bytes | None
    nchunks: int
    size: int
    mtime_ns: int
    mode: int
    extents: list | None = None  # a sparse file's data extents (layout 3 on)

    def entry(self, name: bytes) -> Entry:
        extra = {X_DATA: self.extents} if self.extents is not None else {}
        return Entry(name, self.type, self.mode, 0, 0, self.mtime_ns, self.size, self.content, self.nchunks, extra)


def _sig(raw: bytes | None):
    """What makes two states the same version: type and content (not mtime/mode);
    for a sparse file also where its data lies."""
    if raw is None:
        return None
    st = decode_state(raw)
    if st is None:
        return None
    if st.type == DIR:
        return (DIR,)
    if st.extents is not None:
        return (st.type, st.content, st.nchunks, st.size, tuple(tuple(x) for x in st.extents))
    return (st.type, st.content, st.nchunks)


# ------------------------------------------------------------------ keys
MAX_KEY = 511    # LMDB's key limit
NAME_MAX = 255   # the longest name a Linux file system has
# Room for set + parent in an event key that must fit a name of NAME_MAX bytes:
# set \0 parent \0 name \0 time_ns sid. A longer parent is keyed by its hash
# (65 bytes), the same for all its children, so a directory is still one prefix.
PARENT_ROOM = MAX_KEY - SUFFIX - 3 - NAME_MAX


def _parent_key(set_b: bytes, parent: bytes) -> bytes:
    if len(set_b) + len(parent) <= PARENT_ROOM:
        return parent
    import blake3

    return b"\x01" + blake3.blake3(parent).hexdigest().encode()


def path_key(set_name: str, path: bytes) -> bytes:
    parent, _, name = path.rpartition(b"/")
    set_b = set_name.encode()
    return set_b + b"\0" + _parent_key(set_b, parent) + b"\0" + name + b"\0"


def dir_prefix(set_name: str, dirpath: bytes) -> bytes:
    set_b = set_name.encode()
    return set_b + b"\0" + _parent_key(set_b, dirpath) + b"\0"


def _fits(pk: bytes) -> bool:
    """A name longer than NAME_MAX (possible only in a tree made elsewhere)
    would overflow the key: such a path is left out of the index rather
    than failing the snapshot's commit."""
    return len(pk) + SUFFIX <= MAX_KEY


def snap_suffix(time_ns: int, sid: bytes) -> bytes:
    return TS.pack(time_ns) + sid


def _mark_key(snap) -> bytes:
    return snap.set.encode() + b"\0" + snap_suffix(snap.time_ns, snap.id)


# ------------------------------------------------------------- databases
@dataclass
class Dbs:
    events: object
    bysnap: object
    marks: object


def writer_dbs(writer) -> Dbs:
    """Open (creating on first use) inside the writer's transaction. The handles
    are kept on the writer only: a handle opened in a transaction that later
    aborts must not outlive it. The first writer to find an index of an older
    layout rebuilds it in layout 4."""
    dbs = getattr(writer, "_versions_dbs", None)
    if dbs is None:
        env, txn = writer.repo.index.env, writer.txn
        try:
            dbs = Dbs(*(env.open_db(n, txn=txn, create=False) for n in DB_NAMES))
            writer._versions_dbs = dbs
        except lmdb.NotFoundError:
            dbs = Dbs(*(env.open_db(n, txn=txn, create=True) for n in DB_NAMES))
            writer._versions_dbs = dbs
            _replace_old_layouts(writer)
    return dbs


def _replace_old_layouts(writer) -> int:
    """Layout 4 is new here: if an older layout's databases exist, rebuild
    every set's index from its snapshots and empty the old databases (their
    keys or states differ from layout 4's). Returns the events written."""
    env, txn = writer.repo.index.env, writer.txn
    found = []
    for names in OLD_LAYOUTS:
        try:
            found.append([env.open_db(n, txn=txn, create=False) for n in names])
        except lmdb.NotFoundError:
            continue
    if not found:
        return 0
    n = sum(reindex_set(writer, s) for s in list_sets(writer.repo, txn))
    for dbs in found:
        for db in dbs:
            txn.drop(db, delete=False)
    return n



# -------------------------------------------------------------- neighbours
def _neighbours(repo, txn, snap):
    """The set's snapshots just before and just after `snap` in time order
    (whether or not `snap` itself is still in the catalogue)."""
    db = repo.index.db["bytime"]
    prefix = snap.set.encode() + b"\0"
    me = prefix + snap_suffix(snap.time_ns, snap.id)
    before = after = None
    with txn.cursor(db=db) as cur:
        if cur.set_range(me):
            k = cur.key()
            if k == me:
                ok = cur.next()
                k = cur.key() if ok else None
            if k is not None and k.startswith(prefix):
                after = k[-32:]
            if cur.set_range(me):
                ok = cur.prev()
            else:
                ok = cur.last()
        else:
            ok = cur.last()
        if ok and cur.key().startswith(prefix) and cur.key() != me:
            before = cur.key()[-32:]
    return (get_snapshot(repo, txn, before) if before else None,
            get_snapshot(repo, txn, after) if after else None)


def _event_before(txn, dbs: Dbs, pk: bytes, suffix: bytes) -> bytes | None:
    """The state of the last event of `pk` strictly before `suffix`, or None (never seen)."""
    with txn.cursor(db=dbs.events) as cur:
        ok = cur.prev() if cur.set_range(pk + suffix) else cur.last()
        if ok and cur.key().startswith(pk) and len(cur.key()) == len(pk) + SUFFIX:
            return cur.value()
    return None


class _WriterReader(ObjectReader):
    """Reads trees through the writer session, which sees its own new blobs
    (their index entries may still wait in memory until commit).

    A tree that cannot be read (damage: an older snapshot's tree lost by a
    repair) reads as an empty directory here, so the index records what
    is known: that snapshot's paths below it are absent from it. The index
    is kept inside a snapshot's commit, and damage in an old snapshot must
    not stop every later snapshot of the set (verify and repair name it)."""

    def __init__(self, writer) -> None:
        super().__init__(writer.repo, writer.txn)
        self.writer = writer
        self.unreadable = 0  # trees read as empty because of damage

    def blob(self, bid: bytes) -> bytes:
        return self.writer.read_blob(bid)

    def tree(self, tree_id: bytes):
        from . import packs as P
        from .errors import IntegrityError
        from .trees import decode_tree

        key = (P.TREE, tree_id)
        cached = self.repo.object_cache.get(key)
        if cached is None:
            try:
                cached = decode_tree(self.writer.read_blob(tree_id))
            except IntegrityError:  # BlobMissing included
                self.unreadable += 1
                return []
            self.repo.object_cache.put(key, cached)
        return cached


# ---------------------------------------------------------- state changes
def state_changes(reader: ObjectReader, old_root: bytes | None, new_root: bytes
                  ) -> Iterator[tuple[bytes, Entry | None]]:
    """(path, new entry or None for absent) for every path whose version changed."""
    for c in diff_trees(reader, old_root, reader, new_root):
        if c.status in (ADDED, MODIFIED):
            yield c.path, c.new
        elif c.status == REMOVED:
            yield c.path, None
        elif c.status == TYPE:
            # diff_trees reports a type change without descending: do it here.
            if c.old.type == DIR:
                for p, _e in reader.walk(c.old.content, c.path):
                    yield p, None
            yield c.path, c.new
            if c.new.type == DIR:
                yield from reader.walk(c.new.content, c.path)
        # META: same content, not a new version


def _put_event(txn, dbs: Dbs, snap, pk: bytes, state: bytes) -> None:
    if not _fits(pk):
        return
    txn.put(pk + snap_suffix(snap.time_ns, snap.id), state, db=dbs.events)
    txn.put(snap.id + pk, b"", db=dbs.bysnap)


def _del_event(txn, dbs: Dbs, snap, pk: bytes) -> None:
    txn.delete(pk + snap_suffix(snap.time_ns, snap.id), db=dbs.events)
    txn.delete(snap.id + pk, db=dbs.bysnap)


def _put_base(txn, dbs: Dbs, pk: bytes, state: bytes | None) -> None:
    """Set a path's base state; an absent state means no base entry."""
    if not _fits(pk):
        return
    if _sig(state) is None:
        txn.delete(pk + BASE, db=dbs.events)
    else:
        txn.put(pk + BASE, state, db=dbs.events)


def _snap_event_keys(txn, dbs: Dbs, sid: bytes) -> list[bytes]:
    """The path keys of one snapshot's events (none for the base snapshot)."""
    keys = []
    with txn.cursor(db=dbs.bysnap) as cur:
        ok = cur.set_range(sid)
        while ok and cur.key()[:32] == sid:
            keys.append(cur.key()[32:])
            ok = cur.next()
    return keys


def _set_keys(txn, db, set_name: str) -> list[bytes]:
    prefix = set_name.encode() + b"\0"
    out = []
    with txn.cursor(db=db) as cur:
        ok = cur.set_range(prefix)
        while ok and cur.key().startswith(prefix):
            out.append(cur.key())
            ok = cur.next()
    return out


# ------------------------------------------------------------ maintenance
def record_snapshot(writer, snap) -> int:
    """Index a snapshot just added to the catalogue (same transaction). Returns
    the number of events written. O(paths changed since the previous snapshot;
    for a new oldest, since the next one)."""
    repo, txn = writer.repo, writer.txn
    dbs = writer_dbs(writer)
    if txn.get(_mark_key(snap), db=dbs.marks) is not None:
        return 0  # indexed already (opening the databases rebuilt an older layout, this snapshot included)
    if not _marks_match(repo, txn, dbs, snap.set, skip=snap.id):
        return reindex_set(writer, snap.set)
    before, after = _neighbours(repo, txn, snap)
    reader = _WriterReader(writer)
    n = 0
    if before is None:
        if after is None:  # the set's first snapshot: everything is base
            for path, entry in state_changes(reader, None, snap.root):
                _put_base(txn, dbs, path_key(snap.set, path), encode_state(entry))
                n += 1
        else:
            # A new oldest: it becomes the base, and where the old base (the
            # next snapshot's state) differs from it, the next snapshot gets
            # an event holding its state.
            for path, entry in state_changes(reader, after.root, snap.root):
                pk = path_key(snap.set, path)
                old = txn.get(pk + BASE, db=dbs.events)
                _put_event(txn, dbs, after, pk, old if old is not None else encode_state(None))
                _put_base(txn, dbs, pk, encode_state(entry))
                n += 1
        txn.put(_mark_key(snap), b"", db=dbs.marks)
        return n
    me = snap_suffix(snap.time_ns, snap.id)
    for path, entry in state_changes(reader, before.root, snap.root):
        pk = path_key(snap.set, path)
        state = encode_state(entry)
        _put_event(txn, dbs, snap, pk, state)
        n += 1
        if after is not None:
            # Re-base the next snapshot's event for this path on the new one.
            nkey = pk + snap_suffix(after.time_ns, after.id)
            nstate = txn.get(nkey, db=dbs.events)
            if nstate is not None:
                if _sig(nstate) == _sig(state):
                    _del_event(txn, dbs, after, pk)
            else:
                prev = _event_before(txn, dbs, pk, me)
                _put_event(txn, dbs, after, pk, prev if prev is not None else encode_state(None))
    txn.put(_mark_key(snap), b"", db=dbs.marks)
    return n


def forget_snapshot(writer, snap) -> int:
    """Remove a snapshot from the index; call inside the transaction that drops
    it. Works whether or not its catalogue entries are already deleted.
    Returns the number of events visited: for the oldest snapshot, what the
    next one changed (folded into the base); otherwise what it changed."""
    repo, txn = writer.repo, writer.txn
    dbs = writer_dbs(writer)
    mark = _mark_key(snap)
    if txn.get(mark, db=dbs.marks) is None:
        return 0  # never indexed (stale index: the next commit rebuilds the set)
    if not _marks_match(repo, txn, dbs, snap.set, skip=snap.id):
        # Stale already (a drop or a repair that bypassed us): the neighbours
        # in the catalogue are not the index's. Leave it to the rebuild.
        txn.delete(mark, db=dbs.marks)
        return 0
    before, after = _neighbours(repo, txn, snap)
    if before is None:
        txn.delete(mark, db=dbs.marks)
        if after is None:  # the set's last snapshot: only base entries are left
            keys = _set_keys(txn, dbs.events, snap.set)
            for k in keys:
                txn.delete(k, db=dbs.events)
            return len(keys)
        # The next snapshot becomes the oldest: its events go into the base.
        keys = _snap_event_keys(txn, dbs, after.id)
        for pk in keys:
            state = txn.get(pk + snap_suffix(after.time_ns, after.id), db=dbs.events)
            _del_event(txn, dbs, after, pk)
            _put_base(txn, dbs, pk, state)
        return len(keys)
    keys = _snap_event_keys(txn, dbs, snap.id)
    nsuffix = snap_suffix(after.time_ns, after.id) if after is not None else None
    for pk in keys:
        state = txn.get(pk + snap_suffix(snap.time_ns, snap.id), db=dbs.events)
        _del_event(txn, dbs, snap, pk)
        if after is None or state is None:
            continue
        nstate = txn.get(pk + nsuffix, db=dbs.events)
        if nstate is None:
            # The next snapshot had the dropped one's state, which differs
            # from the one before it: the next snapshot now starts it.
            _put_event(txn, dbs, after, pk, state)
        elif _sig(_event_before(txn, dbs, pk, nsuffix)) == _sig(nstate):
            _del_event(txn, dbs, after, pk)  # the next one no longer changes anything
    txn.delete(mark, db=dbs.marks)
    return len(keys)


def reindex_set(writer, set_name: str) -> int:
    """Rebuild a set's index from its snapshots: O(sum of consecutive diffs)."""
    repo, txn = writer.repo, writer.txn
    dbs = writer_dbs(writer)
    for k in _set_keys(txn, dbs.events, set_name):
        txn.delete(k, db=dbs.events)
        if k[-SUFFIX:] != BASE:
            txn.delete(k[-32:] + k[:-SUFFIX], db=dbs.bysnap)
    for k in _set_keys(txn, dbs.marks, set_name):
        txn.delete(k, db=dbs.marks)
    reader = _WriterReader(writer)
    n = 0
    prev_root = None
    for i, snap in enumerate(list_snapshots(repo, txn, set_name)):
        for path, entry in state_changes(reader, prev_root, snap.root):
            pk = path_key(set_name, path)
            if i == 0:
                _put_base(txn, dbs, pk, encode_state(entry))
            else:
                _put_event(txn, dbs, snap, pk, encode_state(entry))
            n += 1
        txn.put(_mark_key(snap), b"", db=dbs.marks)
        prev_root = snap.root
    return n


def _marks_match(repo, txn, dbs: Dbs, set_name: str, skip: bytes | None = None) -> bool:
    """The set's marks are its catalogue entries (both without `skip`)."""
    want = [k for k in _set_keys(txn, repo.index.db["bytime"], set_name) if k[-32:] != skip]
    have = [k for k in _set_keys(txn, dbs.marks, set_name) if k[-32:] != skip]
    return want == have
