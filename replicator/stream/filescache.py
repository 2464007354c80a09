"""The master's files cache: its tree kept across restarts.

The tree (each file's stat key and chunk list) is kept in a small LMDB under
the node's state directory (`master-cache/`, one database per set, one row
per path), so that a restarted master trusts unchanged files by (size,
mtime, ctime, inode) instead of reading every byte again. Only changed rows
are written: every change to the tree is journaled (`Tree.journal`) and
`TreeCache.save()` writes the journal in one transaction, about once a
second while things change, and at stop. A damaged or missing cache costs
one full read, nothing else.
"""
from __future__ import annotations

import logging
import os
import threading
from array import array
from typing import Callable

from store.trees import DIR

from ..settings import SetConfig
from .chunklist import Chunks
from .tree import DNode, FNode, Tree

log = logging.getLogger("pit.master")

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


class TreeCache:
    """One set's tree and its rows in the files cache, kept in step: `load` at start, `save` the journal."""

    def __init__(self, tree: Tree, state_path: str, set_name: str, cfg: SetConfig, stats: dict,
                 alert: Callable[[str], None]) -> None:
        self.tree = tree
        self.state_path = state_path
        self.name = set_name
        self.cfg = cfg
        self.stats = stats
        self.alert = alert
        self.fcache: FilesCache | None = None
        self.save_lock = threading.Lock()

    def _cache_path(self) -> str:
        return os.path.join(self.state_path, f"master-{self.name}.cache")  # the old msgpack format

    def _signature(self) -> bytes:
        import msgpack

        return msgpack.packb({"v": 2, "paths": self.cfg.paths, "avg": self.cfg.avg_chunk}, use_bin_type=True)

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
                self.tree.journal = []
                return
            self._save()
            if final:
                self.fcache = None

    def _save(self) -> None:
        tree = self.tree
        with tree.lock:
            journal, tree.journal = tree.journal, []
            if not journal:
                self.stats["cache_pending"] = 0
                return
            wiped = {rel for rel, gone in journal if gone}
            writes: list[tuple[bytes, bytes | None, bool]] = []
            for rel in dict.fromkeys(rel for rel, _ in journal):  # each path once, with its current state
                node = tree.lookup(rel)
                raw = self._row(node) if node is not None else None
                # removed at some point (its old subtree with it), or a file now: drop the rows under it
                writes.append((rel, raw, rel in wiped or raw is None or isinstance(node, FNode)))
        try:
            self.fcache.write(writes)
        except BaseException:
            with tree.lock:
                tree.journal[:0] = journal
            raise
        with tree.lock:
            self.stats["cache_pending"] = len(tree.journal)
            self.stats["cache_rows"] = self.fcache.rows

    def load(self) -> None:
        tree = self.tree
        try:
            self.fcache = FilesCache(os.path.join(self.state_path, "master-cache"), self.name, self._signature())
        except Exception as exc:  # no cache: every start reads everything, nothing else is lost
            self.alert(f"files cache unavailable: {exc}")
            return
        n = 0
        try:
            for rel, raw in self.fcache.rows_iter():
                tree.set(rel, self._node(raw))
                n += 1
        except Exception as exc:  # a damaged cache costs one full read, nothing else
            log.warning("set %s: ignoring the files cache: %s", self.name, exc)
            tree.root = DNode()
            self.fcache.clear()
            n = 0
        tree.journal = []
        if n == 0:
            self._load_old()
        self.stats["cache_rows"] = self.fcache.rows
        self.stats["cache_loaded"] = n

    def _load_old(self) -> None:
        """The msgpack file of earlier versions: read once, written into the LMDB cache, removed."""
        import msgpack

        tree = self.tree
        try:
            with open(self._cache_path(), "rb") as f:
                d = msgpack.unpackb(f.read(), raw=False)
            if d.get("v") == 1 and d["paths"] == list(self.cfg.paths) and d["avg"] == self.cfg.avg_chunk:
                for row in d["rows"]:
                    rel, typ = row[0], row[1]
                    if typ == DIR:
                        tree.set(rel, DNode(row[2], row[3], row[4], row[5]))
                    else:
                        chunks = Chunks(row[8], array("I", row[9]))
                        tree.set(rel, FNode(typ, row[2], row[3], row[4], row[5], row[6], row[7], chunks,
                                            tuple(row[10])))
            self.save()
            os.unlink(self._cache_path())
        except FileNotFoundError:
            return
        except Exception as exc:
            log.warning("set %s: ignoring the old files cache: %s", self.name, exc)
            tree.root = DNode()
            tree.journal = []
