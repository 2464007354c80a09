"""Change detection: watchdog (inotify on Linux) events mapped onto a set's dirty paths.

Events only say *where* to look; `MasterSet.refresh` (scan.py) looks. A file event
marks that file; a new or moved-in directory is marked to be walked whole;
directory "modified" events are ignored (their children report for
themselves), and so are the events watchdog makes up for the contents of a
directory moved in (the walk of that directory covers them). A path the set's filter excludes (store/filters.py, asked
through the scanner's `ignores`) is dropped here: it never triggers work.
What inotify misses (an overflowed queue, a network share)
the periodic reconcile scan finds.
"""
from __future__ import annotations

import logging
import os

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEventHandler)
from watchdog.observers import Observer

log = logging.getLogger("pit.watcher")

# What is asked of inotify. Not opens and closes without a write: every file the scan or a sender
# reads made two events (a seeding of 20,000 files: some 100,000), each handled in Python for nothing.
EVENTS = [FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, DirMovedEvent,
          FileDeletedEvent, DirDeletedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, ms) -> None:
        self.ms = ms

    def on_any_event(self, event) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        if getattr(event, "is_synthetic", False):
            # watchdog's made-up events for the contents of a directory moved in or created: the
            # directory's own event marks it to be walked whole, which finds them (marking each of a
            # moved-in tree's 20,000 files again cost a second look at every one)
            return
        src = os.fsencode(event.src_path)
        if kind == "modified" and event.is_directory:
            return
        if kind == "moved":
            self._mark(src, False, event.is_directory)
            self._mark(os.fsencode(event.dest_path), event.is_directory, event.is_directory)
        elif kind == "created":
            self._mark(src, event.is_directory, event.is_directory)
        else:  # modified, closed, deleted
            self._mark(src, False, event.is_directory)

    def _mark(self, p: bytes, recurse: bool, is_dir: bool) -> None:
        scanner = getattr(self.ms, "scanner", None)
        if scanner is not None:
            try:
                if scanner.ignores(p, is_dir):
                    return
            except Exception:  # a path that vanished meanwhile: let the scan look
                log.debug("filter check failed for %r", p, exc_info=True)
        self.ms.mark(p, recurse)


class Watcher:
    """One observer thread for every set this node masters."""

    def __init__(self) -> None:
        self.observer = Observer()
        self.observer.daemon = True
        self.watches: dict[str, list] = {}
        self.started = False

    def watch(self, ms) -> None:
        handler = _Handler(ms)
        ws = []
        for src in ms.sources:
            p = os.fsdecode(src)
            target, recursive = (p, True) if os.path.isdir(p) else (os.path.dirname(p), False)
            try:
                ws.append(self.observer.schedule(handler, target, recursive=recursive, event_filter=EVENTS))
            except OSError as exc:
                ms.alert(f"cannot watch {target}: {exc}; relying on the reconcile scan")
        self.watches[ms.name] = ws
        if not self.started:
            self.observer.start()
            self.started = True

    def unwatch(self, name: str) -> None:
        for w in self.watches.pop(name, []):
            try:
                self.observer.unschedule(w)
            except Exception:
                pass

    def stop(self) -> None:
        if self.started:
            self.observer.stop()
