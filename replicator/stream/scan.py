"""Looking at a set's sources afresh: what changed, into the master's tree.

`Scanner.refresh(paths)` looks at changed paths (from the watcher, or a
reconcile scan), re-chunks files whose (size, mtime, ctime, inode) changed
(the files-cache rule), puts what changed into the tree and hands the
changed set-relative paths on (`on_changed`: to every sender) before the
scan lock is released. Files are read by `readers.FileReads`: on this
thread at first, in the agent's worker processes once a scan is big; while
a sender streams, new files are compressed in the same pass and their
payloads handed over (payloads.py), and the changed paths go out in steps
while the scan goes on, so a seeding replica receives the first files while
the last are read, and the scan never runs far ahead of the sending. A file still being written waits until it has been
quiet for `settle` seconds (at most `settle_max`); a file that changes while
it is read is read again. Deletions under a source root that vanished or is
empty (an unmounted share) are held, with an alert.

The set's filter (`exclude`, `exclude_if_present`, `exclude_caches`,
`one_file_system`: store/filters.py) is applied here: an excluded path is
never read, and one the tree still holds (the filter changed) leaves the
tree like a deleted file, so in mirror mode the replicas delete it too
(docs/replication.md, "Filters"). `ignores` answers the watcher.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import replace
from typing import Callable

import blake3

from store.capture import ReflinkCapture, default_clone_dir
from store.chunker import ChunkerParams
from store.errors import CaptureError, InvalidArgument, StoreError
from store.rechunk import rechunk
from store.filters import Filter, FilterRules, check_pattern
from store.segments import SEGMENT_BYTES
from store.trees import FILE, SYMLINK

from ..settings import SetConfig
from .chunklist import Chunks, content_id
from .payloads import Payloads
from .readers import Cutter, FileReads, ReaderPool, ReadJob
from .tree import DNode, FNode, Tree


CLONE_DIR = b".pit-clones"  # reflink baselines (store/capture.py) in a source: never replicated
EMIT_PATHS = 512  # changed paths handed on to the senders while a scan goes on (a sender's batch)
EMIT_BYTES = 8 * 1024 * 1024  # ... or as soon as this much payload waits for them


class Scanner:
    """Scans one set's sources into its tree; `stats` (shared with the set's status) counts the work."""

    def __init__(self, tree: Tree, cfg: SetConfig, stats: dict, alert: Callable[[str], None],
                 on_changed: Callable[[list[bytes]], None], payloads: Payloads | None = None,
                 want_payloads: Callable[[], bool] = lambda: False, readers: ReaderPool | None = None,
                 nudge: Callable[[], None] = lambda: None) -> None:
        """`payloads` takes what the scan compressed for the senders while `want_payloads()` says one
        streams (`nudge` wakes them); `readers` (the agent's worker processes) read big scans
        (readers.py)."""
        self.tree = tree
        self.payloads = payloads
        self.want_payloads = want_payloads
        self.readers = readers
        self.nudge = nudge
        self.cutter = Cutter()
        self._cap: ReflinkCapture | None = None  # this refresh's byte-range capture, opened when first needed
        self.capture_mode: dict = {"mechanism": cfg.capture}  # what the last capture did (pit status)
        self._reads: FileReads | None = None
        self._cur: tuple[list, dict] = ([], {})
        self._emitted = 0
        self._fresh_at_emit = 0
        self.cfg = cfg
        self.stats = stats
        self.alert = alert
        self.on_changed = on_changed
        self.params = ChunkerParams.for_average(cfg.avg_chunk)
        self.lock = threading.Lock()  # one scan at a time; a point waits for it (MasterSet.flush)
        self.settle_since: dict[bytes, float] = {}
        self.filt: Filter = self._compile(cfg)
        self.clone_dir = os.fsencode(default_clone_dir(cfg.paths[0], cfg.name or "set")) if cfg.paths else b""
        self._devs: dict[bytes, int] = {}  # source name -> its device (one_file_system)

    # ------------------------------------------------------------- the filter
    def _compile(self, cfg: SetConfig) -> Filter:
        """The set's filter for these sources. A pattern they cannot take (checked when the configuration
        was loaded, against the configured paths) is left out with an alert: replicating a file too many
        is better than a set that replicates nothing."""
        rules = cfg.filter_rules()
        try:
            return rules.compile(cfg.paths)
        except InvalidArgument:
            pass
        keep = {}
        for key in ("exclude", "iexclude"):
            keep[key] = []
            for p in getattr(rules, key):
                try:
                    check_pattern(p, cfg.paths)
                    keep[key].append(p)
                except InvalidArgument as exc:
                    self.alert(f"filter pattern left out: {exc}")
        try:
            return replace(rules, exclude=tuple(keep["exclude"]), iexclude=tuple(keep["iexclude"])).compile(cfg.paths)
        except InvalidArgument as exc:  # a marker: the same
            self.alert(f"filter left out: {exc}")
            return replace(rules, exclude_if_present=()).compile(cfg.paths) if rules.exclude_if_present else Filter(
                FilterRules())

    def _root_dev(self, rel: bytes) -> int | None:
        name = rel.split(b"/", 1)[0]
        dev = self._devs.get(name)
        if dev is None:
            try:
                dev = self._devs[name] = os.lstat(self.tree.abs_path(name)).st_dev
            except (OSError, ValueError):
                return None
        return dev

    def _skip(self, p: bytes, rel: bytes, st) -> bool:
        """The filter on one path whose ancestors are in: True when it is left out."""
        if stat.S_ISDIR(st.st_mode):
            return self.filt.dir_excluded(rel, p)
        return self.filt.match(rel, False)

    def ignores(self, p: bytes, is_dir: bool = False) -> bool:
        """Is this absolute path (or a directory above it) excluded? The watcher asks before marking
        anything dirty, so excluded paths never trigger work; a path outside the sources is not ours
        to judge (False). A source's clone directory (byte-range capture) is never the set's."""
        rel = self.tree.rel_path(p)
        if rel is None or b"/" not in rel:
            return False
        if rel.split(b"/", 2)[1] == CLONE_DIR:
            return True
        if not self.filt.active:
            return False
        if self.filt.excluded(rel, is_dir):
            return True
        if not (self.filt.markers or self.filt.one_file_system):
            return False
        parts = rel.split(b"/")
        dev = self._root_dev(rel) if self.filt.one_file_system else None
        for i in range(2, len(parts)):  # the directories between the source and the path
            d = self.tree.abs_path(b"/".join(parts[:i]))
            if self.filt.markers and self.filt.marked(d) is not None:
                return True
            if dev is not None:
                try:
                    if os.lstat(d).st_dev != dev:
                        return True
                except OSError:
                    return False
        return False

    def refresh(self, paths: dict[bytes, bool]) -> tuple[list[bytes], dict[bytes, bool]]:
        """Look at absolute paths afresh (value: recurse into directories). -> (changed rels, deferred)."""
        changed: list[bytes] = []
        deferred: dict[bytes, bool] = {}
        with self.lock:
            self._cur = (changed, deferred)
            self._emitted = 0
            self._fresh_at_emit = self.payloads.fresh_bytes if self.payloads is not None else 0
            self._reads = self._reads_for(self._finish)
            try:
                for p, rec in sorted(paths.items()):
                    rel = self.tree.rel_path(p)
                    if rel is None:
                        continue
                    if self.ignores(p):
                        with self.tree.lock:
                            if self.tree.remove(rel):  # excluded since it was replicated (the filter changed)
                                changed.append(rel)
                        continue
                    self._ensure_parents(rel, changed)
                    self._visit(p, rel, rec, changed, deferred)
            finally:
                try:
                    self._reads.drain()
                finally:
                    self._reads = None
                    self._end_capture()
            if changed:
                # Queued before the scan lock is released: a point asked meanwhile (`flush` waits for
                # this lock) then follows these paths on every sender's stream.
                self.stats["changes"] += len(changed)
                self._emit(final=True)
        return changed, deferred

    def full_scan(self) -> tuple[list[bytes], dict[bytes, bool]]:
        """Everything afresh -> (changed rels, deferred): files still settling are the caller's to retry."""
        out = self.refresh({s: True for s in self.tree.sources})
        self.stats["scans"] += 1
        return out

    def _ensure_parents(self, rel: bytes, changed: list) -> None:
        tree = self.tree
        parts = rel.split(b"/")
        for i in range(1, len(parts)):
            sub = b"/".join(parts[:i])
            if isinstance(tree.lookup(sub), DNode):
                continue
            try:
                st = os.lstat(tree.abs_path(sub))
            except OSError:
                return
            if stat.S_ISDIR(st.st_mode):
                with tree.lock:
                    tree.set(sub, DNode(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns))
                changed.append(sub)

    def _visit(self, p: bytes, rel: bytes, recurse: bool, changed: list, deferred: dict) -> None:
        tree = self.tree
        is_source = b"/" not in rel
        old = tree.lookup(rel)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if is_source:
                if old is not None:
                    self.alert(f"source path {os.fsdecode(p)} vanished: its files are kept on the replicas")
                return
            if self._source_gone(rel):
                return
            with tree.lock:
                if tree.remove(rel):
                    changed.append(rel)
            return
        except OSError as exc:
            self.alert(f"{os.fsdecode(p)}: {exc.strerror}")
            return
        m = st.st_mode
        other_fs = False
        if self.filt.active and not is_source:
            if self._skip(p, rel, st):
                self.settle_since.pop(p, None)
                with tree.lock:
                    if tree.remove(rel):  # excluded since it was replicated: it leaves the set
                        changed.append(rel)
                return
            other_fs = stat.S_ISDIR(m) and self.filt.other_device(st, self._root_dev(rel))
        if stat.S_ISDIR(m):
            node = old if isinstance(old, DNode) else None
            meta = (stat.S_IMODE(m), st.st_uid, st.st_gid)
            if node is None or (node.mode, node.uid, node.gid) != meta:
                new = DNode(*meta, st.st_mtime_ns, children=node.children if node else {})
                with tree.lock:
                    tree.set(rel, new)
                changed.append(rel)
                node = new
                recurse = True if old is None or not isinstance(old, DNode) else recurse
            if not recurse:
                return
            try:
                names = set() if other_fs else set(os.listdir(p))  # a mount point is kept empty
            except OSError as exc:
                self.alert(f"{os.fsdecode(p)}: {exc.strerror}")
                return
            if is_source and not names and node.children:
                self.alert(f"source path {os.fsdecode(p)} is empty: deletions held (an unmounted share?)")
                return
            for gone in set(node.children) - names:
                with tree.lock:
                    if tree.remove(rel + b"/" + gone):
                        changed.append(rel + b"/" + gone)
            for n in sorted(names):
                if is_source and n == CLONE_DIR:
                    continue
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
            if now - st.st_mtime_ns / 1e9 < self.cfg.settle and now - first < self.cfg.settle_max:
                deferred[p] = False
                return
            self._read(p, rel, st, old, first, now)
        elif stat.S_ISLNK(m):
            try:
                target = os.readlink(p)
            except OSError:
                return
            node = FNode(SYMLINK, stat.S_IMODE(m), st.st_uid, st.st_gid, st.st_mtime_ns, len(target), target)
            if isinstance(old, FNode) and old.digest() == node.digest():
                return
            with tree.lock:
                tree.set(rel, node)
            changed.append(rel)
        # other special files are not replicated

    def _source_gone(self, rel: bytes) -> bool:
        """True (and an alert) when the source root of `rel` is missing or empty: deletions are held."""
        src = self.tree.abs_path(rel.split(b"/", 1)[0])
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

    # ------------------------------------------------------------- reading files
    def _compress(self, old, size: int) -> bool:
        """Compress while reading (for the senders) a new file, or a small changed one, while a sender
        streams: a big changed file sends only the chunks its delta names, which the sender reads
        itself. A big new file's payloads go out before the scan reaches its end (`take_ahead`)."""
        if self.payloads is None or not self.want_payloads():
            return False
        return not (isinstance(old, FNode) and old.type == FILE) or size <= SEGMENT_BYTES

    def _read(self, p: bytes, rel: bytes, st, old, first: float, now: float) -> None:
        """Ask for a file to be read; `_finish` puts it into the tree once it is (refresh drains)."""
        job = ReadJob(p, st.st_size, self._compress(old, st.st_size), (rel, st, first, now))
        if self.cfg.capture == "reflink" and st.st_size >= self.cfg.capture_min and self._by_ranges(job, st, old):
            return
        self._reads.add(job)

    # ------------------------------------------------------------- byte-range capture
    def _by_ranges(self, job: ReadJob, st, old) -> bool:
        """A big file under `capture = "reflink"`: a fresh reflink clone, compared with the last one by
        FIEMAP, gives the ranges written since (store/capture.py); only the chunks around them are cut
        again (store/rechunk.py), from the clone, a frozen copy. True when done here; otherwise `job`
        is read whole, from the clone where there is one. The ranges are used only if the last clone
        is the version the tree's chunk list is of (same size and mtime): a files cache behind its
        clones (a crash between the two) costs a whole read, never a wrong list."""
        if self._cap is None:
            try:
                self._cap = ReflinkCapture.open(os.fsdecode(self.clone_dir), self.cfg.capture_min)
            except (CaptureError, OSError) as exc:
                self.alert(f"byte-range capture off for now: {exc}")
                return False
        try:
            fr = self._cap.for_file(job.path, st)
        except OSError as exc:  # a clone that could not be made (a full disk): read the file as it is
            self.capture_mode.setdefault("errors", []).append(f"{os.fsdecode(job.path)}: {exc.strerror}")
            return False
        if fr is None:
            return False
        job.src = fr.read_path  # the clone: what is read is one moment of the file
        if fr.ranges is None or not (isinstance(old, FNode) and old.type == FILE and old.chunks
                                     and tuple(old.skey[:2]) == tuple(fr.baseline or ())):
            return False
        try:
            fd = os.open(fr.read_path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            res = rechunk(old.chunks.lens.tolist(), fr.ranges, st.st_size, lambda off, n: os.pread(fd, n, off),
                          self.params)
        except (StoreError, OSError):
            return False
        finally:
            os.close(fd)
        for piece in res.pieces:
            if isinstance(piece, int):
                cid, n = old.chunks[piece]
            else:
                cid, n = blake3.blake3(piece).digest(), len(piece)
            job.ids += cid
            job.lens.append(n)
        job.after = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        job.read = res.bytes_read
        self._finish(job)
        return True

    def _end_capture(self) -> None:
        """After a refresh: the fresh clones become the baselines (their files' lists are in the tree)."""
        cap, self._cap = self._cap, None
        if cap is None:
            return
        try:
            cap.commit()
        except OSError as exc:
            cap.abort()
            self.alert(f"byte-range capture: cannot keep the clones: {exc}")
        self.capture_mode = {**cap.mode, "mechanism": "reflink", "clone_dir": os.fsdecode(self.clone_dir)}

    def _reads_for(self, done) -> FileReads:
        if self.payloads is None:
            return FileReads(self.readers, self.params, self.cutter, done, lambda cid, v, n: None)
        return FileReads(self.readers, self.params, self.cutter, done, self.payloads.put_fresh,
                         lambda: self.payloads.wait_room(self.want_payloads, self.nudge))

    def _chunks_of(self, job: ReadJob, st, check: bool) -> Chunks | None:
        """A read file's chunk list, or None if it changed while being read (or could not be read)."""
        if job.failed:
            return None
        out = Chunks(job.ids, job.lens)
        total = out.total()
        self.stats["files_read"] += 1
        self.stats["bytes_read"] += total if job.read is None else job.read
        if job.src is not None:  # a clone, frozen when it was made from the file as `st` saw it
            return out if job.after is not None and total == st.st_size else None
        if check and (job.after is None or job.after[:2] != (st.st_size, st.st_mtime_ns) or total != job.after[0]):
            return None
        return out

    def _finish(self, job: ReadJob) -> None:
        """A file read: its node into the tree (under the scan lock, on the scanning thread)."""
        rel, st, first, now = job.tag
        p = job.path
        tree = self.tree
        changed, deferred = self._cur
        chunks = self._chunks_of(job, st, True)
        if chunks is None:
            if now - first < self.cfg.settle_max:
                deferred[p] = False
                return
            try:  # changing for too long: take it as it is now
                st = os.lstat(p)
            except OSError:
                return
            again = ReadJob(p, st.st_size, False, job.tag)
            self._reads_for(lambda _j: None).read_here(again)
            chunks = self._chunks_of(again, st, False)
            if chunks is None:
                return
        skey = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        self.settle_since.pop(p, None)
        node = FNode(FILE, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                     chunks.total(), content_id(chunks), chunks, skey)
        with tree.lock:
            old = tree.lookup(rel)  # now, not when the read was asked: a sender may have rewritten it
            if isinstance(old, FNode) and old.type == FILE:
                if old.content == node.content and (old.mode, old.uid, old.gid, old.mtime_ns) == \
                        (node.mode, node.uid, node.gid, node.mtime_ns):
                    old.skey = skey  # touched (ctime) but equal: nothing to send
                    tree.journal.append((rel, False))
                    return
                node.prev, node.prev_content = old.chunks, old.content
            tree.set(rel, node)
        changed.append(rel)
        self._emit()

    def _emit(self, final: bool = False) -> None:
        """Hand the paths changed so far on to the senders while the scan goes on (a seeding replica
        receives the first files while the last are read). The brake that keeps the scan from reading
        far ahead of the sending is FileReads' (`_reads_for`), after each file or segment read."""
        changed, _ = self._cur
        n = len(changed) - self._emitted
        fresh = self.payloads.fresh_bytes if self.payloads is not None else 0
        if n and (final or n >= EMIT_PATHS or fresh - self._fresh_at_emit >= EMIT_BYTES):
            self.on_changed(changed[self._emitted:])
            self._emitted = len(changed)
            self._fresh_at_emit = fresh
