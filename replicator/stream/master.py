"""The master side of a set: its sources, their tree, and the loop that keeps them current.

`MasterSet` composes what a mastered set is made of: its in-memory Merkle
tree (tree.py), the scanner that looks at the sources and puts what changed
into the tree (scan.py), the files cache that keeps the tree across restarts
(filescache.py), and the compressed chunk bytes every sender shares
(payloads.py). Its own work is the event loop: watcher events are debounced
into refreshes, a reconcile scan runs every `rescan` seconds, the files
cache is saved about once a second while things change; a scheduled set
instead scans at each due time (schedule.py) and has every sender
reconcile and end with a consistent point.

The senders, one per replica (sender.py), are made and started by the agent
once the first full scan is done (a catch-up against a half-built tree
would look like mass deletion); the set hands each change on to every
sender in `senders`.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from ..errors import ReplError
from ..schedule import next_due
from ..settings import SetConfig
from .filescache import TreeCache
from .payloads import Payloads
from .scan import Scanner

from .tree import Tree

log = logging.getLogger("pit.master")


class MasterSet:
    """One set this node owns: its sources, their tree, and the senders."""

    def __init__(self, agent, name: str, cfg: SetConfig) -> None:
        self.agent = agent
        self.name = name
        self.cfg = cfg
        self.sources = [os.fsencode(p) for p in cfg.paths]
        self.tree = Tree(self.sources)
        self.payloads = Payloads()
        self.readers = getattr(agent, "readers", None)  # the agent's reader processes (readers.py)
        self.senders: dict = {}  # replica -> Sender (sender.py), added by the agent after the first scan
        self.alerts: list[str] = []
        # files_read/bytes_read: files chunked and hashed; unchanged: files the cache rule skipped;
        # scans: full (start-up and reconcile) scans done; cache_*: the files cache (rows, unsaved paths)
        # chunks_from_scan: chunks sent as the scan compressed them; chunks_read_again: chunks a sender
        # read from their file (a catch-up, a big file, a delta's new ranges: readers.py)
        self.stats = {"files_read": 0, "bytes_read": 0, "changes": 0, "unchanged": 0, "scans": 0,
                      "cache_rows": 0, "cache_loaded": 0, "cache_pending": 0, "chunks_read_again": 0}
        self.scanner = Scanner(self.tree, cfg, self.stats, self.alert, self._changed, self.payloads,
                               self._streaming, self.readers, self._nudge)
        self.files_cache = TreeCache(self.tree, agent.state.path, name, cfg, self.stats, self.alert)
        self.dirty: dict[bytes, bool] = {}
        self.dirty_cond = threading.Condition()
        self.last_event = 0.0
        self.first_event = 0.0
        self.stopped = False
        # Scheduled replication (`schedule` in the set): no streaming on events; at each due time a
        # full scan, then every sender reconciles by tree comparison and ends with a consistent point.
        self.schedule: dict | None = cfg.schedule
        self.runs = 0
        self.next_run: float | None = None
        self.wake = threading.Event()

    @property
    def root(self):
        """The root of the set's tree (tree.py)."""
        return self.tree.root

    def alert(self, msg: str) -> None:
        if msg not in self.alerts:
            self.alerts.append(msg)
            del self.alerts[:-20]
            log.warning("set %s: %s", self.name, msg)

    # ------------------------------------------------------------- the tree: scanning, the files cache
    def _changed(self, rels: list[bytes]) -> None:
        """Paths the scanner changed in the tree, handed on to every sender (under the scan lock)."""
        for s in list(self.senders.values()):
            s.enqueue(rels)

    def _streaming(self) -> bool:
        """Does a sender stream changes now (connected, not comparing trees)? Then the scan compresses
        what it reads for it (payloads.py); otherwise the catch-up that comes reads what it needs."""
        return any(s.connected and not s.need_catchup for s in list(self.senders.values()))

    def _nudge(self) -> None:
        """Wake every sender: payloads wait to be sent ahead (payloads.py)."""
        for s in list(self.senders.values()):
            with s.cond:
                s.cond.notify()

    def refresh(self, paths: dict[bytes, bool]) -> tuple[list[bytes], dict[bytes, bool]]:
        """Look at absolute paths afresh (value: recurse into directories). -> (changed rels, deferred)."""
        return self.scanner.refresh(paths)

    def full_scan(self) -> list[bytes]:
        """A whole scan; files it deferred as still being written are marked dirty, so the event loop
        looks at them again once they settle instead of at the next reconcile scan (`rescan`, minutes
        later: a write a takeover hook's service made just before the watch began would wait that long)."""
        changed, deferred = self.scanner.full_scan()
        if not self.schedule:  # a scheduled set looks at everything at its point (flush)
            for p, r in deferred.items():
                self.mark(p, r)
        return changed

    def load(self) -> None:
        """Fill the tree from the files cache (nothing is read from the sources)."""
        self.files_cache.load()

    def save(self, final: bool = False) -> None:
        """Write the tree's journaled changes to the files cache (filescache.py)."""
        self.files_cache.save(final)

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
        """Bring the tree up to what the sources hold now (a consistent point was asked for).

        Every source is looked at afresh, not only what is dirty: an event the watcher has not handed
        on yet (watchdog reads inotify on its own threads) or a batch the event loop has taken but not
        yet refreshed would otherwise miss the point, and a write acknowledged before the point was
        asked must be in it. The files cache rule keeps this an lstat per unchanged file (a reconcile
        scan's cost: 2.2 s of CPU per 100,000 files, docs/benchmarks.md)."""
        with self.dirty_cond:
            self.dirty = {}  # covered by the whole look below; what is marked from now on stays marked
        self.stats["scans"] += 1
        _, deferred = self.refresh({src: True for src in self.sources})
        if deferred:  # the point waits for files still being written, bounded by settle_max
            deadline = time.monotonic() + self.cfg.settle_max + 1
            while deferred and time.monotonic() < deadline:
                time.sleep(0.1)
                _, deferred = self.refresh(deferred)

    def run(self) -> None:
        """Debounce events into refreshes; reconcile scan every `rescan` seconds."""
        if self.schedule:
            return self._run_scheduled()
        deb = self.cfg.debounce
        next_scan = time.monotonic() + self.cfg.rescan
        next_save = time.monotonic()
        while not self.stopped:
            self.payloads.expire()
            if self.readers is not None:
                self.readers.tick()
            if self.tree.journal and time.monotonic() >= next_save:
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
                next_scan = time.monotonic() + self.cfg.rescan

    def _run_scheduled(self) -> None:
        """Scheduled replication: at each due time a full scan, then a reconcile on every replica."""
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
            app = self.cfg.app or {}
            if app.get("pre") or app.get("post"):
                # an application set (a database): its consistent point needs its hooks around it
                try:
                    self.agent.master_point(self, 600.0, scheduled=True)
                except ReplError as exc:
                    self.alert(f"scheduled point failed: {exc}")
            else:
                for s in list(self.senders.values()):
                    s.trigger()
            try:
                self.save()
            except Exception as exc:
                self.alert(f"cannot save the files cache: {exc}")

    def status(self) -> dict:
        out = {"role": "master", "set": self.name, "mode": self.cfg.mode, "alerts": list(self.alerts),
               "capture": self.scanner.capture_mode,
               "stats": {**self.stats, "chunks_from_scan": self.payloads.taken},
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
