"""The master side of a set: an in-memory Merkle tree of the sources, and one
sender per replica.

`MasterSet.refresh(paths)` looks at changed paths (from the watcher, or a
reconcile scan), re-chunks files whose (size, mtime, ctime, inode) changed
— the files-cache rule — and hands the changed set-relative paths to every
sender. A sender holds a *bounded* ordered set of paths, never data: it
reads the current state of each path when it sends, so bursts coalesce and
a slow replica costs memory proportional to the paths it lags, up to the
bound; past it the queue is dropped and the sender catches up by comparing
trees (`_catchup`), which sends only differing subtrees.

A file travels as its chunk list *relative to the previous version* the
master knew (`base` + keep/new ranges), and only the chunk ids in new
ranges are offered, so a 64 KiB change in a 512 MiB file costs the changed
chunks plus a few hundred bytes. If the replica's entry is not that base,
it asks for the full list (`retry`). Chunks are compressed once and kept in
a shared LRU, so every replica gets the same bytes without recompressing.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import blake3
import zstandard

from store import packs as P
from store.cache import LRU
from store.chunker import ChunkerParams, chunk_stream
from store.repository import filelist_id
from store.trees import DIR, FILE, SYMLINK

from ..errors import ConnectionLost, NotAuthorised, ProtocolError, ReplError
from . import protocol
from .merkle import dir_digest, leaf_digest

log = logging.getLogger("pit.master")

# Every frame is sized from protocol.MAX_FRAME (16 MiB), with room to spare for msgpack overhead.
CHUNKS_FRAME = min(4 * 1024 * 1024, protocol.MAX_FRAME // 4)  # chunk payload bytes per CHUNKS frame
OFFER_IDS = min(8192, protocol.MAX_FRAME // 80)                  # ids per OFFER (and so per NEED)
CHANGES_BYTES = protocol.MAX_FRAME // 2                          # estimated bytes per CHANGES / OPS frame
LIST_BYTES = protocol.MAX_FRAME // 4                             # path bytes per LIST
REF_BYTES = 48  # an [id, length] pair as msgpack is 38-40 bytes; rounded up
BATCH_PATHS = 512


def change_bytes(c: dict) -> int:
    """An upper estimate of one change's msgpack size."""
    n = len(c["p"]) + 64 + len(c.get("x") or b"")
    for op in c.get("ops", ()):
        n += 16 if op[0] == 0 else 8 + REF_BYTES * len(op[1])
    return n


def split_ops(ops: list, budget: int) -> list[list]:
    """Cut a file's ops into pieces of at most `budget` estimated bytes (a new-range op is cut
    between chunk references); concatenated, the pieces are the same ops."""
    per = max(1, (budget - 64) // REF_BYTES)
    pieces: list[list] = [[]]
    room = budget
    for op in ops:
        if op[0] == 0:
            if room < 16:
                pieces.append([])
                room = budget
            pieces[-1].append(op)
            room -= 16
            continue
        refs = op[1]
        i = 0
        while i < len(refs):
            take = min(len(refs) - i, (room - 8) // REF_BYTES)
            if take <= 0:
                pieces.append([])
                room = budget
                continue
            take = min(take, per)
            pieces[-1].append([1, refs[i:i + take]])
            room -= 8 + REF_BYTES * take
            i += take
    return [p for p in pieces if p] or [[]]


class Chunks:
    """A file's chunk list, compact: the ids concatenated (32 bytes each) and the lengths in an
    array('I'), about 36 bytes a chunk instead of ~150 as a list of (id, length) tuples (a 1 TiB
    image at 16 KiB is 64 million chunks). Indexes, slices and iterates as (id, length) pairs."""

    __slots__ = ("ids", "lens")

    def __init__(self, ids: bytes = b"", lens: array | None = None) -> None:
        self.ids = bytes(ids)
        self.lens = lens if lens is not None else array("I")
        if len(self.ids) != 32 * len(self.lens):
            raise ValueError("chunk ids and lengths differ in number")

    def __len__(self) -> int:
        return len(self.lens)

    def __iter__(self):
        ids = self.ids
        for i, n in enumerate(self.lens):
            yield ids[i * 32:i * 32 + 32], n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.lens)))]
        if i < 0:
            i += len(self.lens)
        if not 0 <= i < len(self.lens):
            raise IndexError("chunk index out of range")
        return self.ids[i * 32:i * 32 + 32], self.lens[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, Chunks):
            return self.ids == other.ids and self.lens == other.lens
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Chunks({len(self)} chunks, {self.total()} bytes)"

    def total(self) -> int:
        return sum(self.lens)

    def id_list(self) -> list[bytes]:
        ids = self.ids
        return [ids[i:i + 32] for i in range(0, len(ids), 32)]


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


def content_id(chunks: Chunks) -> bytes | None:
    if not chunks:
        return None
    if len(chunks) == 1:
        return chunks[0][0]
    # The replica stores the same filelist, so the same id (store.apply.store_file_content).
    return filelist_id(chunks.id_list(), chunks.lens.tolist())


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


_BLOCK = 4096  # chunks compared at once (as bytes) when looking for the common prefix and suffix


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    if isinstance(a, Chunks) and isinstance(b, Chunks):
        while i + _BLOCK <= n and a.ids[i * 32:(i + _BLOCK) * 32] == b.ids[i * 32:(i + _BLOCK) * 32] \
                and a.lens[i:i + _BLOCK] == b.lens[i:i + _BLOCK]:
            i += _BLOCK
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a, b, limit: int) -> int:
    la, lb = len(a), len(b)
    k = 0
    if isinstance(a, Chunks) and isinstance(b, Chunks):
        while k + _BLOCK <= limit and \
                a.ids[(la - k - _BLOCK) * 32:(la - k) * 32] == b.ids[(lb - k - _BLOCK) * 32:(lb - k) * 32] \
                and a.lens[la - k - _BLOCK:la - k] == b.lens[lb - k - _BLOCK:lb - k]:
            k += _BLOCK
    while k < limit and a[la - 1 - k] == b[lb - 1 - k]:
        k += 1
    return k


def delta_ops(old, new) -> list:
    """Keep/new ranges turning `old` into `new` (Chunks, or lists of (id, length)): common prefix
    and suffix are kept."""
    if not old:
        return [[1, [list(c) for c in new]]] if new else []
    pre = _common_prefix(old, new)
    suf = _common_suffix(old, new, min(len(old), len(new)) - pre)
    ops: list = []
    if pre:
        ops.append([0, 0, pre])
    mid = new[pre:len(new) - suf]
    if mid:
        ops.append([1, [list(c) for c in mid]])
    if suf:
        ops.append([0, len(old) - suf, suf])
    return ops


_ENVS: dict[str, object] = {}
_ENVS_LOCK = threading.Lock()


class FilesCache:
    """The master's files cache: `state/master-cache/`, an LMDB environment with one database per set.

    Key: the set-relative path; value: msgpack [type, mode, uid, gid, mtime, size, content, chunk ids,
    chunk lengths, stat key] (directories: the first five). Key b"\0sig" (no path has a NUL) holds the
    set's paths and chunking parameters: another signature empties the set's rows. Sorted keys put
    a directory before its contents, and a subtree is a key range (`rel/`...), deleted as one.
    The environment is opened once per process (LMDB forbids two opens), shared by every set."""

    SIG = b"\0sig"

    def __init__(self, path: str, set_name: str, signature: bytes) -> None:
        import lmdb

        with _ENVS_LOCK:  # held through the first write: sets' masters start in parallel threads
            env = _ENVS.get(path)
            if env is None:
                os.makedirs(path, mode=0o700, exist_ok=True)
                env = lmdb.open(path, map_size=64 << 30, max_dbs=1024, subdir=True, metasync=False,
                                readahead=False, max_readers=64)
                _ENVS[path] = env
            self.env = env
            with env.begin(write=True) as txn:
                self.db = env.open_db(b"set:" + set_name.encode("utf-8", "surrogateescape"), txn=txn)
                if txn.get(self.SIG, db=self.db) != signature:
                    txn.drop(self.db, delete=False)
                    txn.put(self.SIG, signature, db=self.db)
        self.rows = self._count()

    def _count(self) -> int:
        with self.env.begin(db=self.db) as txn:
            return txn.stat(self.db)["entries"] - 1

    def rows_iter(self):
        with self.env.begin(db=self.db, buffers=False) as txn:
            for k, v in txn.cursor():
                if k != self.SIG:
                    yield k, v

    def write(self, writes: list[tuple[bytes, bytes | None, bool]]) -> None:
        """(path, row, wipe): put the row (None: delete the path); wipe: first delete everything under it."""
        with self.env.begin(write=True, db=self.db) as txn:
            cur = txn.cursor()
            for rel, raw, wipe in writes:
                if wipe:
                    prefix = rel + b"/"
                    if cur.set_range(prefix):
                        while cur.key().startswith(prefix):
                            if not cur.delete():
                                break
                if raw is None:
                    txn.delete(rel)
                else:
                    txn.put(rel, raw)
        self.rows = self._count()

    def clear(self) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            sig = txn.get(self.SIG)
            txn.drop(self.db, delete=False)
            if sig is not None:
                txn.put(self.SIG, sig)
        self.rows = 0


class MasterSet:
    """One set this node owns: its sources, their tree, and the senders."""

    def __init__(self, agent, name: str, cfg: dict) -> None:
        self.agent = agent
        self.name = name
        self.cfg = cfg
        self.sources = [os.fsencode(p) for p in cfg["paths"]]
        self.names = [os.path.basename(s) for s in self.sources]
        self.params = ChunkerParams.for_average(cfg["avg_chunk"])
        self.root = DNode()
        self.lock = threading.RLock()
        self.scan_lock = threading.Lock()
        self.cache: LRU[tuple] = LRU(64 * 1024 * 1024, lambda v: len(v[1]) + 64)
        self.cache_lock = threading.Lock()
        self.senders: dict[str, Sender] = {}
        self.alerts: list[str] = []
        # files_read/bytes_read: files chunked and hashed; unchanged: files the cache rule skipped;
        # scans: full (start-up and reconcile) scans done; cache_*: the files cache (rows, unsaved paths)
        self.stats = {"files_read": 0, "bytes_read": 0, "changes": 0, "unchanged": 0, "scans": 0,
                      "cache_rows": 0, "cache_loaded": 0, "cache_pending": 0}
        # (path, removed) for every change of the tree since the files cache was last written
        self._journal: list[tuple[bytes, bool]] = []
        self.fcache: FilesCache | None = None
        self.save_lock = threading.Lock()
        self.dirty: dict[bytes, bool] = {}
        self.dirty_cond = threading.Condition()
        self.last_event = 0.0
        self.first_event = 0.0
        self.settle_since: dict[bytes, float] = {}
        self.stopped = False
        # Scheduled replication (`schedule` in the set): no streaming on events; at each due time a
        # full scan, then every sender reconciles by tree comparison and ends with a consistent point.
        self.schedule: dict | None = cfg.get("schedule")
        self.runs = 0
        self.next_run: float | None = None
        self.wake = threading.Event()

    # ------------------------------------------------------------- files cache
    # The tree (each file's stat key and chunk list) is kept in a small LMDB under the node's state
    # directory (`master-cache/`, one database per set, one row per path), so that a restarted master
    # trusts unchanged files by (size, mtime, ctime, inode) instead of reading every byte again. Only
    # changed rows are written: every change to the tree is journaled (`_journal`) and `save()` writes
    # the journal in one transaction, about once a second while things change, and at stop.
    def _cache_path(self) -> str:
        return os.path.join(self.agent.state.path, f"master-{self.name}.cache")  # the old msgpack format

    def _signature(self) -> bytes:
        import msgpack

        return msgpack.packb({"v": 2, "paths": self.cfg["paths"], "avg": self.cfg["avg_chunk"]}, use_bin_type=True)

    @staticmethod
    def _row(node) -> bytes:
        import msgpack

        if isinstance(node, DNode):
            row = [DIR, node.mode, node.uid, node.gid, node.mtime_ns]
        else:
            row = [node.type, node.mode, node.uid, node.gid, node.mtime_ns, node.size, node.content,
                   node.chunks.ids, node.chunks.lens.tolist(), list(node.skey)]
        return msgpack.packb(row, use_bin_type=True)

    @staticmethod
    def _node(raw: bytes):
        import msgpack

        row = msgpack.unpackb(raw, raw=False)
        if row[0] == DIR:
            return DNode(row[1], row[2], row[3], row[4])
        return FNode(row[0], row[1], row[2], row[3], row[4], row[5], row[6], Chunks(row[7], array("I", row[8])),
                     tuple(row[9]))

    def save(self, final: bool = False) -> None:
        """Write the journaled changes of the tree to the files cache (one transaction). After the
        final save (at stop) nothing more is written: a successor for the same set may be loading."""
        with self.save_lock:
            if self.fcache is None:
                self._journal = []
                return
            self._save()
            if final:
                self.fcache = None

    def _save(self) -> None:
        with self.lock:
            journal, self._journal = self._journal, []
            if not journal:
                self.stats["cache_pending"] = 0
                return
            wiped = {rel for rel, gone in journal if gone}
            writes: list[tuple[bytes, bytes | None, bool]] = []
            for rel in dict.fromkeys(rel for rel, _ in journal):  # each path once, with its current state
                node = self.lookup(rel)
                raw = self._row(node) if node is not None else None
                # removed at some point (its old subtree with it), or a file now: drop the rows under it
                writes.append((rel, raw, rel in wiped or raw is None or isinstance(node, FNode)))
        try:
            self.fcache.write(writes)
        except BaseException:
            with self.lock:
                self._journal[:0] = journal
            raise
        with self.lock:
            self.stats["cache_pending"] = len(self._journal)
            self.stats["cache_rows"] = self.fcache.rows

    def load(self) -> None:
        try:
            self.fcache = FilesCache(os.path.join(self.agent.state.path, "master-cache"), self.name,
                                     self._signature())
        except Exception as exc:  # no cache: every start reads everything, nothing else is lost
            self.alert(f"files cache unavailable: {exc}")
            return
        n = 0
        try:
            for rel, raw in self.fcache.rows_iter():
                self._set(rel, self._node(raw))
                n += 1
        except Exception as exc:  # a damaged cache costs one full read, nothing else
            log.warning("set %s: ignoring the files cache: %s", self.name, exc)
            self.root = DNode()
            self.fcache.clear()
            n = 0
        self._journal = []
        if n == 0:
            self._load_old()
        self.stats["cache_rows"] = self.fcache.rows
        self.stats["cache_loaded"] = n

    def _load_old(self) -> None:
        """The msgpack file of earlier versions: read once, written into the LMDB cache, removed."""
        import msgpack

        try:
            with open(self._cache_path(), "rb") as f:
                d = msgpack.unpackb(f.read(), raw=False)
            if d.get("v") == 1 and d["paths"] == self.cfg["paths"] and d["avg"] == self.cfg["avg_chunk"]:
                for row in d["rows"]:
                    rel, typ = row[0], row[1]
                    if typ == DIR:
                        self._set(rel, DNode(row[2], row[3], row[4], row[5]))
                    else:
                        chunks = Chunks(row[8], array("I", row[9]))
                        self._set(rel, FNode(typ, row[2], row[3], row[4], row[5], row[6], row[7], chunks,
                                             tuple(row[10])))
            self.save()
            os.unlink(self._cache_path())
        except FileNotFoundError:
            return
        except Exception as exc:
            log.warning("set %s: ignoring the old files cache: %s", self.name, exc)
            self.root = DNode()
            self._journal = []

    # ------------------------------------------------------------- the tree
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

    def _set(self, rel: bytes, node) -> None:
        parent = self._parent(rel, create=True)
        parent.children[rel.rsplit(b"/", 1)[-1]] = node
        self._invalidate(rel)
        self._journal.append((rel, False))

    def _remove(self, rel: bytes) -> bool:
        parent = self._parent(rel, create=False)
        if parent is None:
            return False
        gone = parent.children.pop(rel.rsplit(b"/", 1)[-1], None) is not None
        if gone:
            self._invalidate(rel)
            self._journal.append((rel, True))
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

    # ------------------------------------------------------------- scanning
    def alert(self, msg: str) -> None:
        if msg not in self.alerts:
            self.alerts.append(msg)
            del self.alerts[:-20]
            log.warning("set %s: %s", self.name, msg)

    def refresh(self, paths: dict[bytes, bool]) -> tuple[list[bytes], dict[bytes, bool]]:
        """Look at absolute paths afresh (value: recurse into directories). -> (changed rels, deferred)."""
        changed: list[bytes] = []
        deferred: dict[bytes, bool] = {}
        with self.scan_lock:
            for p, rec in sorted(paths.items()):
                rel = self.rel_path(p)
                if rel is None:
                    continue
                self._ensure_parents(rel, changed)
                self._visit(p, rel, rec, changed, deferred)
            if changed:
                # Queued before the scan lock is released: a point asked meanwhile (`flush` waits for
                # this lock) then follows these paths on every sender's stream.
                self.stats["changes"] += len(changed)
                for s in list(self.senders.values()):
                    s.enqueue(changed)
        return changed, deferred

    def full_scan(self) -> list[bytes]:
        out = self.refresh({s: True for s in self.sources})[0]
        self.stats["scans"] += 1
        return out

    def _ensure_parents(self, rel: bytes, changed: list) -> None:
        parts = rel.split(b"/")
        for i in range(1, len(parts)):
            sub = b"/".join(parts[:i])
            if isinstance(self.lookup(sub), DNode):
                continue
            try:
                st = os.lstat(self.abs_path(sub))
            except OSError:
                return
            if stat.S_ISDIR(st.st_mode):
                with self.lock:
                    self._set(sub, DNode(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns))
                changed.append(sub)

    def _visit(self, p: bytes, rel: bytes, recurse: bool, changed: list, deferred: dict) -> None:
        is_source = b"/" not in rel
        old = self.lookup(rel)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if is_source:
                if old is not None:
                    self.alert(f"source path {os.fsdecode(p)} vanished: its files are kept on the replicas")
                return
            if self._source_gone(rel):
                return
            with self.lock:
                if self._remove(rel):
                    changed.append(rel)
            return
        except OSError as exc:
            self.alert(f"{os.fsdecode(p)}: {exc.strerror}")
            return
        m = st.st_mode
        if stat.S_ISDIR(m):
            node = old if isinstance(old, DNode) else None
            meta = (stat.S_IMODE(m), st.st_uid, st.st_gid)
            if node is None or (node.mode, node.uid, node.gid) != meta:
                new = DNode(*meta, st.st_mtime_ns, children=node.children if node else {})
                with self.lock:
                    self._set(rel, new)
                changed.append(rel)
                node = new
                recurse = True if old is None or not isinstance(old, DNode) else recurse
            if not recurse:
                return
            try:
                names = set(os.listdir(p))
            except OSError as exc:
                self.alert(f"{os.fsdecode(p)}: {exc.strerror}")
                return
            if is_source and not names and node.children:
                self.alert(f"source path {os.fsdecode(p)} is empty: deletions held (an unmounted share?)")
                return
            for gone in set(node.children) - names:
                with self.lock:
                    if self._remove(rel + b"/" + gone):
                        changed.append(rel + b"/" + gone)
            for n in sorted(names):
                self._visit(os.path.join(p, n), rel + b"/" + n, True, changed, deferred)
        elif stat.S_ISREG(m):
            skey = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            if isinstance(old, FNode) and old.type == FILE and old.skey == skey and \
                    (old.mode, old.uid, old.gid) == (stat.S_IMODE(m), st.st_uid, st.st_gid):
                self.stats["unchanged"] += 1
                return
            now = time.time()
            first = self.settle_since.setdefault(p, now)
            # A file still being written: wait until it has been quiet for `settle`, at most `settle_max`.
            if now - st.st_mtime_ns / 1e9 < self.cfg["settle"] and now - first < self.cfg["settle_max"]:
                deferred[p] = False
                return
            chunks = self._chunk(p, st)
            if chunks is None:
                if now - first < self.cfg["settle_max"]:
                    deferred[p] = False
                    return
                try:  # changing for too long: take it as it is now
                    st = os.lstat(p)
                    chunks = self._chunk(p, st, check=False)
                except OSError:
                    return
                if chunks is None:
                    return
                skey = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            self.settle_since.pop(p, None)
            node = FNode(FILE, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                         chunks.total(), content_id(chunks), chunks, skey)
            if isinstance(old, FNode) and old.type == FILE:
                if old.content == node.content and (old.mode, old.uid, old.gid, old.mtime_ns) == \
                        (node.mode, node.uid, node.gid, node.mtime_ns):
                    with self.lock:
                        old.skey = skey  # touched (ctime) but equal: nothing to send
                        self._journal.append((rel, False))
                    return
                node.prev, node.prev_content = old.chunks, old.content
            with self.lock:
                self._set(rel, node)
            changed.append(rel)
        elif stat.S_ISLNK(m):
            try:
                target = os.readlink(p)
            except OSError:
                return
            node = FNode(SYMLINK, stat.S_IMODE(m), st.st_uid, st.st_gid, st.st_mtime_ns, len(target), target)
            if isinstance(old, FNode) and old.digest() == node.digest():
                return
            with self.lock:
                self._set(rel, node)
            changed.append(rel)
        # other special files are not replicated

    def _source_gone(self, rel: bytes) -> bool:
        """True (and an alert) when the source root of `rel` is missing or empty: deletions are held."""
        src = self.abs_path(rel.split(b"/", 1)[0])
        try:
            with os.scandir(src) as it:
                empty = next(it, None) is None
        except FileNotFoundError:
            self.alert(f"source path {os.fsdecode(src)} vanished: deletions held, files kept on the replicas")
            return True
        except OSError:
            return True
        if empty:
            self.alert(f"source path {os.fsdecode(src)} is empty: deletions held (an unmounted share?)")
        return empty

    def _chunk(self, p: bytes, st, check: bool = True) -> Chunks | None:
        """Chunk ids of a file, or None if it changed while being read."""
        ids = bytearray()
        lens = array("I")
        try:
            with open(p, "rb", buffering=0) as f:
                for v in chunk_stream(f, self.params, size_hint=st.st_size):
                    ids += blake3.blake3(v).digest()
                    lens.append(len(v))
                st2 = os.fstat(f.fileno())
        except OSError:
            return None
        out = Chunks(ids, lens)
        total = out.total()
        self.stats["files_read"] += 1
        self.stats["bytes_read"] += total
        if check and ((st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or total != st2.st_size):
            return None
        return out

    # ------------------------------------------------------------- the event loop
    def mark(self, p: bytes, recurse: bool) -> None:
        with self.dirty_cond:
            now = time.monotonic()
            if not self.dirty:
                self.first_event = now
            self.dirty[p] = self.dirty.get(p, False) or recurse
            self.last_event = now
            self.dirty_cond.notify()

    def flush(self) -> None:
        """Process whatever is dirty now (a consistent point was asked for)."""
        if self.schedule:  # no events are watched: look at everything (the files cache keeps it cheap)
            self.stats["scans"] += 1
            changed, deferred = self.refresh({src: True for src in self.sources})
        else:
            with self.dirty_cond:
                todo, self.dirty = self.dirty, {}
            changed, deferred = self.refresh(todo)
        if deferred:  # the point waits for files still being written, bounded by settle_max
            deadline = time.monotonic() + self.cfg["settle_max"] + 1
            while deferred and time.monotonic() < deadline:
                time.sleep(0.1)
                _, deferred = self.refresh(deferred)

    def run(self) -> None:
        """Debounce events into refreshes; reconcile scan every `rescan` seconds."""
        if self.schedule:
            return self._run_scheduled()
        deb = self.cfg["debounce"]
        next_scan = time.monotonic() + self.cfg["rescan"]
        next_save = time.monotonic()
        while not self.stopped:
            if self._journal and time.monotonic() >= next_save:
                next_save = time.monotonic() + 1.0
                try:
                    self.save()
                except Exception as exc:
                    self.alert(f"cannot save the files cache: {exc}")
            with self.dirty_cond:
                timeout = max(0.0, next_scan - time.monotonic())
                if not self.dirty:
                    self.dirty_cond.wait(min(timeout, 1.0))
                now = time.monotonic()
                ready = self.dirty and (now - self.last_event >= deb or now - self.first_event >= max(2.0, 5 * deb))
                todo = {}
                if ready:
                    todo, self.dirty = self.dirty, {}
            if self.stopped:
                return
            if todo:
                try:
                    _, deferred = self.refresh(todo)
                except Exception:
                    log.exception("set %s: refresh failed", self.name)
                    deferred = {}
                for p, r in deferred.items():
                    self.mark(p, r)
                if deferred:
                    time.sleep(0.05)
            elif self.dirty:
                time.sleep(min(deb, 0.05))
            if time.monotonic() >= next_scan:
                try:
                    self.full_scan()
                except Exception:
                    log.exception("set %s: reconcile scan failed", self.name)
                next_scan = time.monotonic() + self.cfg["rescan"]

    def _run_scheduled(self) -> None:
        """Scheduled replication: at each due time a full scan, then a reconcile on every replica."""
        from .schedule import next_due

        last = None
        while not self.stopped:
            self.next_run = next_due(self.schedule, time.time(), last)
            while not self.stopped and time.time() < self.next_run:
                self.wake.wait(min(1.0, max(0.0, self.next_run - time.time())))
            if self.stopped:
                return
            last = time.time()
            try:
                self.full_scan()
            except Exception:
                log.exception("set %s: scheduled scan failed", self.name)
            self.runs += 1
            log.info("set %s: scheduled reconcile %d", self.name, self.runs)
            app = self.cfg.get("app") or {}
            if app.get("pre") or app.get("post"):
                # an application set (a database): its consistent point needs its hooks around it
                try:
                    self.agent._master_point(self, 600.0, scheduled=True)
                except ReplError as exc:
                    self.alert(f"scheduled point failed: {exc}")
            else:
                for s in list(self.senders.values()):
                    s.trigger()
            try:
                self.save()
            except Exception as exc:
                self.alert(f"cannot save the files cache: {exc}")

    # ------------------------------------------------------------- chunk data for senders
    def cache_put(self, cid: bytes, val: tuple[int, bytes]) -> None:
        with self.cache_lock:
            self.cache.put(cid, val)

    def read_range(self, path: bytes, off: int, n: int, cctx) -> tuple[bytes, tuple[int, bytes]] | None:
        """(id, (flags, stored bytes)) of a file's range as it is now; None if it cannot be read whole."""
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, n, off)
            finally:
                os.close(fd)
        except OSError:
            return None
        if len(data) != n:
            return None
        c = cctx.compress(data)
        return blake3.blake3(data).digest(), ((P.ZSTD, c) if len(c) < len(data) else (0, data))

    def chunk_payload(self, cid: bytes, where: tuple[bytes, int, int], cctx) -> tuple[int, bytes] | None:
        """(flags, stored bytes) of a chunk, compressed once and shared by all senders."""
        with self.cache_lock:
            hit = self.cache.get(cid)
        if hit is not None:
            return hit
        now = self.read_range(*where, cctx)
        if now is None or now[0] != cid:
            return None  # the file changed since it was chunked (the sender reads the range anew)
        self.cache_put(cid, now[1])
        return now[1]

    def status(self) -> dict:
        out = {"role": "master", "set": self.name, "mode": self.cfg["mode"], "alerts": list(self.alerts),
               "stats": dict(self.stats),
               "replicas": {r: s.status() for r, s in self.senders.items()}}
        if self.schedule:
            out["schedule"] = {**self.schedule, "runs": self.runs, "next_run": (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.next_run)) if self.next_run else None)}
        return out

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        try:
            self.save(final=True)
        except Exception as exc:
            log.warning("set %s: cannot save the files cache: %s", self.name, exc)
        with self.dirty_cond:
            self.dirty_cond.notify_all()
        for s in self.senders.values():
            s.stop()


class Sender:
    """Streams one set to one replica: bounded path queue, catch-up on (re)connect."""

    def __init__(self, ms: MasterSet, replica: str) -> None:
        self.ms = ms
        self.replica = replica
        self.queue: OrderedDict[bytes, None] = OrderedDict()
        self.points: list = []
        self.inflight: list = []  # points sent on the current session, not yet answered
        self.cond = threading.Condition()
        self.need_catchup = True
        self.connected = False
        self.stopped = False
        self.conn: protocol.Conn | None = None
        self.seq = 0
        self.acked = 0
        self.last_error = ""
        self.held = 0
        self.bytes_sent = 0
        self.ops_frames = 0  # OPS frames sent: parts of chunk lists too big for one frame
        self.cctx = zstandard.ZstdCompressor(level=3)
        self.due = False  # scheduled sets: a reconcile is due
        self.runs = 0
        self.last_run: float | None = None
        self.thread = threading.Thread(target=self.run_scheduled if ms.schedule else self.run, daemon=True,
                                       name=f"pit-send-{ms.name}-{replica}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        with self.cond:
            self.cond.notify_all()
        if self.conn:
            self.conn.close()

    def status(self) -> dict:
        out = {"connected": self.connected, "queued": len(self.queue), "catchup": self.need_catchup,
               "acked_batches": self.acked, "held_deletes": self.held,
               "bytes_sent": self.bytes_sent + (self.conn.bytes_sent if self.conn else 0),
               "ops_frames": self.ops_frames, "last_error": self.last_error}
        if self.ms.schedule:
            out.update(due=self.due, runs=self.runs, last_run=(
                time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_run)) if self.last_run else None))
        return out

    def trigger(self) -> None:
        """Scheduled sets: reconcile now (and end with a consistent point)."""
        with self.cond:
            self.due = True
            self.cond.notify()

    def enqueue(self, rels: list[bytes]) -> None:
        if self.ms.schedule:
            return  # scheduled: nothing streams; the next run compares trees
        with self.cond:
            if self.need_catchup:
                return  # the catch-up will compare whole trees anyway
            for r in rels:
                self.queue[r] = None
                self.queue.move_to_end(r)
            if len(self.queue) > self.ms.cfg["queue"]:
                # A slow replica: stop queueing, compare trees when it is ready again.
                self.queue.clear()
                self.need_catchup = True
            self.cond.notify()

    def request_mark(self, snapshot: str, ok: bool, error: str | None, deadline: float) -> dict:
        """Record a point's hook outcome on the replica's snapshot (a failed post hook: image selection
        then skips that image). Queued like a point, so it follows it on the same stream."""
        slot = self.request_point(0, deadline)
        slot["mark"] = {"snapshot": snapshot, "ok": ok, "error": error or ""}
        return slot

    def _serve_slot(self, conn: protocol.Conn, slot: dict) -> None:
        if "mark" in slot:
            conn.send({"t": "mark", **slot["mark"]})
            conn.recv("marked")
            slot["result"] = {"marked": slot["mark"]["snapshot"]}
        else:
            conn.send({"t": "point", "id": slot["id"]})
            slot["result"] = {"snapshot": conn.recv("pointed")["snapshot"]}
        slot["done"].set()

    def request_point(self, pid: int, deadline: float | None = None) -> dict:
        """Ask for a consistent point; `deadline` (monotonic) is when whoever asked stops waiting, so a
        scheduled sender keeps retrying a transient failure (replica restarting, configuration not yet
        pushed) until then instead of failing the point on the first refusal."""
        slot = {"id": pid, "done": threading.Event(), "result": None,
                "deadline": deadline if deadline is not None else time.monotonic()}
        with self.cond:
            self.points.append(slot)
            self.cond.notify()
        return slot

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        backoff = 0.2
        while not self.stopped:
            try:
                self._session()
                backoff = 0.2
            except (ReplError, OSError) as exc:
                self.last_error = str(exc)
                log.info("set %s -> %s: %s", self.ms.name, self.replica, exc)
            except Exception as exc:  # keep the sender alive; the next session catches up
                self.last_error = f"internal error: {exc!r}"
                log.exception("set %s -> %s", self.ms.name, self.replica)
            finally:
                self.connected = False
                if self.conn:
                    self.conn.close()
                    self.bytes_sent += self.conn.bytes_sent
                    self.conn = None
                with self.cond:
                    self.need_catchup = True
                    self.queue.clear()
                    # a point taken by the session that just died is asked again on the next one
                    self.points[:0] = [p for p in self.inflight if not p["done"].is_set()]
                    self.inflight = []
            # fail only the points whose asker gives up before the next try; the rest wait for it
            self._fail_points(time.monotonic() + backoff + (0 if not self.stopped else 1e9))
            if self.stopped:
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _connect(self) -> protocol.Conn:
        agent = self.ms.agent
        addr = agent.roster().get(self.replica, {}).get("address")
        if not addr:
            raise ReplError(f"replica {self.replica} is not in the roster")
        from .membership import connect

        sock, peer = connect(agent.state, addr)
        if peer != self.replica:
            sock.close()
            raise ProtocolError(f"{addr} is node {peer}, not {self.replica}")
        self.conn = conn = protocol.Conn(sock, self.replica)
        token = getattr(agent, "fencing_token", None)  # failover (agent.py) may not provide it yet
        protocol.hello(conn, agent.state.node, "repl", self.ms.name, token=token() if token else 0)
        self.connected = True
        self.last_error = ""
        return conn

    def _end_session(self) -> None:
        self.connected = False
        if self.conn:
            self.conn.close()
            self.bytes_sent += self.conn.bytes_sent
            self.conn = None

    def _fail_points(self, horizon: float) -> None:
        """Fail the points whose asker gives up before `horizon` (monotonic); keep the rest for a retry."""
        with self.cond:
            keep = []
            for slot in self.points:
                if slot["deadline"] <= horizon:  # unreachable until then: tell whoever waits
                    slot["result"] = {"error": self.last_error or "replica not connected"}
                    slot["done"].set()
                else:
                    keep.append(slot)
            self.points[:] = keep

    def run_scheduled(self) -> None:
        """Scheduled sets: connect only when a run is due (or a point is asked for), reconcile by tree
        comparison, make a consistent point, disconnect. A failed run is retried until it succeeds."""
        backoff = 0.2
        while not self.stopped:
            with self.cond:
                while not self.due and not self.points and not self.stopped:
                    self.cond.wait(1.0)
            if self.stopped:
                return
            try:
                conn = self._connect()
                with self.cond:
                    scheduled, self.due = self.due, False
                    points = list(self.points)
                    self.points.clear()
                try:
                    self._catchup(conn)
                    if scheduled and not points:
                        self.ms.agent.point_seq += 1
                        conn.send({"t": "point", "id": self.ms.agent.point_seq})
                        conn.recv("pointed")
                    for slot in points:
                        self._serve_slot(conn, slot)
                except BaseException:
                    with self.cond:
                        self.due = self.due or scheduled
                        self.points[:0] = [p for p in points if not p["done"].is_set()]
                    raise
                self.runs += 1
                self.last_run = time.time()
                backoff = 0.2
            except (ReplError, OSError) as exc:
                self.last_error = str(exc)
                log.info("set %s -> %s (scheduled): %s", self.ms.name, self.replica, exc)
            except Exception as exc:
                self.last_error = f"internal error: {exc!r}"
                log.exception("set %s -> %s (scheduled)", self.ms.name, self.replica)
            finally:
                self._end_session()
            if self.last_error and (self.due or self.points):
                self._fail_points(time.monotonic() + backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _session(self) -> None:
        agent = self.ms.agent
        conn = self._connect()
        while not self.stopped:
            with self.cond:
                if self.need_catchup:
                    self.need_catchup = False
                    self.queue.clear()
                    catchup = True
                else:
                    catchup = False
                    while not self.queue and not self.points and not self.need_catchup and not self.stopped:
                        self.cond.wait(1.0)
                        if conn.closed:
                            raise ConnectionLost("connection closed")
                        if self.replica not in agent.roster():  # removed: stop at once
                            raise NotAuthorised(f"replica {self.replica} was removed from the roster")
                    batch = []
                    while self.queue and len(batch) < BATCH_PATHS:
                        batch.append(self.queue.popitem(last=False)[0])
                    points = list(self.points) if not self.queue else []
                    if points:
                        self.points.clear()
            if self.replica not in agent.roster():
                raise NotAuthorised(f"replica {self.replica} was removed from the roster")
            if catchup:
                self._catchup(conn)
                continue
            if batch:
                self._send_paths(conn, batch)
            self.inflight = points
            for slot in points:
                self._serve_slot(conn, slot)
            self.inflight = []

    # ----------------------------------------------------------------- catch-up
    def _catchup(self, conn: protocol.Conn) -> None:
        ms = self.ms
        mirror = ms.cfg["mode"] == "mirror"
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
                with ms.lock:
                    for path in part:
                        mnode = ms.root if path == b"" else ms.lookup(path)
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
                                send.extend(self._subtree(rel, m))
                            elif r[1] == m.digest():
                                continue
                            elif isinstance(m, DNode) and r[0] == DIR:
                                if path == b"" and not m.children:
                                    ms.alert(f"source {name.decode(errors='replace')} is empty on the master: "
                                             "not propagated")
                                    continue
                                nxt.append(rel)
                            else:
                                send.extend(self._subtree(rel, m))
            level = nxt
        for i in range(0, len(send), BATCH_PATHS):
            self._send_paths(conn, send[i:i + BATCH_PATHS])

    def _subtree(self, rel: bytes, node) -> list[bytes]:
        out = [rel]
        if isinstance(node, DNode):
            for n, c in node.children.items():
                out.extend(self._subtree(rel + b"/" + n, c))
        return out

    # ----------------------------------------------------------------- sending
    def _offer_and_send(self, conn: protocol.Conn, ids: list[bytes], wanted: dict, stale: set,
                        fixed: dict | None) -> None:
        """OFFER ids, send the chunks the replica NEEDs. A range that changed since it was chunked
        (a file written in place while it is sent, like a database's log) is read as it is now and
        noted in `fixed` (path -> {offset: (new id, payload, length)}) to go out under its new id, so a point
        never leaves such a file out; a range that can no longer be read whole makes its path stale."""
        ms = self.ms
        for i in range(0, len(ids), OFFER_IDS):
            conn.send({"t": "offer", "ids": ids[i:i + OFFER_IDS]})
            need = conn.recv("need")["ids"]
            buf, size = [], 0
            for cid in need:
                where = wanted.get(cid)
                if where is None:
                    raise ProtocolError(f"{self.replica} asked for a chunk that was not offered")
                got = ms.chunk_payload(cid, where, self.cctx)
                if got is None:
                    now = ms.read_range(*where, self.cctx) if fixed is not None else None
                    if now is None:
                        stale.add(where[0])
                    else:
                        fixed.setdefault(where[0], {})[where[1]] = (*now, where[2])
                    continue
                if buf and size + len(got[1]) + 64 > CHUNKS_FRAME:
                    conn.send({"t": "chunks", "chunks": buf})
                    buf, size = [], 0
                buf.append([cid, got[0], where[2], got[1]])
                size += len(got[1]) + 64
            if buf:
                conn.send({"t": "chunks", "chunks": buf})

    def _send_rewritten(self, conn: protocol.Conn, changes: list, fixed: dict, stale: set) -> list:
        """Files with ranges read anew: their chunk lists get the new ids at those offsets (the other
        ranges keep the ids they had when chunked), the new chunks are offered and sent, and the
        master's tree takes the list the replica will hold, so later deltas start from it."""
        ms = self.ms
        out = []
        for c in changes:
            path = ms.abs_path(c["p"]) if c.get("e") is not None and "ops" in c else None
            if path is None or path not in fixed or path in stale:
                out.append(c)
                continue
            with ms.lock:
                node = ms.lookup(c["p"])
                if not isinstance(node, FNode) or node.type != FILE:
                    stale.add(path)
                    continue
                ids, lens, off, wanted = bytearray(), array("I"), 0, {}
                for cid, n in node.chunks:
                    new = fixed[path].get(off)
                    if new is not None and new[2] == n:  # the same range (the node was not re-chunked)
                        cid = new[0]
                        ms.cache_put(cid, new[1])
                    ids += cid
                    lens.append(n)
                    wanted.setdefault(cid, (path, off, n))
                    off += n
                chunks = Chunks(bytes(ids), lens)
                base = c["base"] and node.prev
                ops = delta_ops(node.prev if base else None, chunks)
                repl = FNode(FILE, node.mode, node.uid, node.gid, node.mtime_ns, node.size, content_id(chunks),
                             chunks, node.skey, node.prev, node.prev_content)
                ms._set(c["p"], repl)
            new_ids = [cid for op in ops if op[0] == 1 for cid, _ in op[1]]
            self._offer_and_send(conn, list(dict.fromkeys(new_ids)), wanted, stale, None)
            if path not in stale:
                out.append(dict(c, ops=ops))
        return out

    def _send_paths(self, conn: protocol.Conn, rels: list[bytes], full: set | None = None) -> None:
        ms = self.ms
        mirror = ms.cfg["mode"] == "mirror"
        changes = []
        wanted: dict[bytes, tuple[bytes, int, int]] = {}
        with ms.lock:
            for rel in rels:
                node = ms.lookup(rel)
                if node is None:
                    if mirror:
                        changes.append({"p": rel, "e": None})
                    continue
                e = [node.type, node.mode, node.uid, node.gid, node.mtime_ns]
                if isinstance(node, DNode):
                    changes.append({"p": rel, "e": e})
                elif node.type == SYMLINK:
                    changes.append({"p": rel, "e": e, "x": node.content})
                else:
                    base = node.prev if (node.prev is not None and not (full and rel in full)) else None
                    ops = delta_ops(base, node.chunks)
                    changes.append({"p": rel, "e": e, "base": node.prev_content if base is not None else None,
                                    "ops": ops, "size": node.size})
                    path = ms.abs_path(rel)
                    off = 0
                    offsets = {}
                    for cid, n in node.chunks:
                        offsets.setdefault(cid, (path, off, n))
                        off += n
                    for op in ops:
                        if op[0] == 1:
                            for cid, n in op[1]:
                                wanted.setdefault(cid, offsets[cid])
        # Offer the ids of new ranges; send only what the replica lacks.
        stale: set[bytes] = set()
        fixed: dict[bytes, dict[int, tuple[bytes, tuple[int, bytes], int]]] = {}
        self._offer_and_send(conn, list(wanted), wanted, stale, fixed)
        if fixed:
            changes = self._send_rewritten(conn, changes, fixed, stale)
        if stale:
            # Changed since chunked: leave them out; the watcher (or the next scan) brings the new version.
            changes = [c for c in changes if c["e"] is None or ms.abs_path(c["p"]) not in stale]
            for p in stale:
                ms.mark(p, False)
        if not changes:
            return
        # Frames stay below the limit. Changes are grouped into CHANGES frames by their estimated size;
        # a file whose chunk list alone is too big for one frame (a seeded file of more than ~170,000
        # chunks, 2.6 GiB at 16 KiB) sends the leading part of its ops in OPS frames just before the
        # CHANGES frame that carries its last part: the replica joins them and commits all at once.
        parts: list[tuple[list, list]] = []  # ([OPS messages], [changes]) per CHANGES frame
        cur: list = []
        pre: list = []
        room = CHANGES_BYTES
        for c in changes:
            n = change_bytes(c)
            if n > CHANGES_BYTES:
                pieces = split_ops(c["ops"], CHANGES_BYTES - len(c["p"]) - 128)
                c = dict(c, ops=pieces[-1])
                n = change_bytes(c)
                if cur and n > room:
                    parts.append((pre, cur))
                    cur, pre, room = [], [], CHANGES_BYTES
                pre.extend({"t": "ops", "p": c["p"], "ops": piece} for piece in pieces[:-1])
            elif cur and n > room:
                parts.append((pre, cur))
                cur, pre, room = [], [], CHANGES_BYTES
            cur.append(c)
            room -= n
        parts.append((pre, cur))
        retry: list[bytes] = []
        for pre, part in parts:
            for m in pre:
                conn.send(m)
                self.ops_frames += 1
            self.seq += 1
            conn.send({"t": "changes", "seq": self.seq, "changes": part})
            ack = conn.recv("ack")
            if ack["seq"] != self.seq:
                raise ProtocolError(f"{self.replica} acknowledged batch {ack['seq']}, not {self.seq}")
            self.acked += 1
            self.held = ack["held"]
            retry.extend(ack["retry"])
        log.debug("set %s -> %s: %d changes, %d ids offered, %d retried, %d bytes so far",
                  ms.name, self.replica, len(changes), len(wanted), len(retry), conn.bytes_sent)
        if retry and full is None:
            self._send_paths(conn, [protocol.check_path(r) for r in retry], full=set(retry))
