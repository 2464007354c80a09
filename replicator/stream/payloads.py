"""Chunk bytes for the senders: compressed once, shared, read again only when they must be.

Two sources fill it. The scan compresses the chunks of the files it reads
while a sender streams (scan.py, readers.py) and hands them over as *fresh*
payloads: held until a sender takes them, so a seeding replica is sent what
the scan read without a second read, hash or compression. A chunk no scan
has in memory (a catch-up after a reconnect, a big file) is read from its
file at the offset the master's tree recorded, checked against its id (the
file may have changed since it was chunked) and compressed; the senders do
that through the reader processes when there is much of it (changes.py).
Every payload a sender took stays in a shared LRU, so every replica of the
set gets the same bytes without reading or compressing them again.

The fresh payloads are bounded: the scan waits (`wait_room`) while more
than FRESH_HIGH bytes are not yet taken, for as long as the senders make
progress; a replica that stops taking them costs a re-read later, never
unbounded memory (FRESH_MAX, and `expire` for what no sender will ask for).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from store.cache import LRU

from .readers import Cutter

SHARED_BYTES = 16 * 1024 * 1024  # payloads a sender took, kept for the set's other senders (then read again)
FRESH_HIGH = 16 * 1024 * 1024  # the scan waits above this much untaken payload ...
FRESH_MAX = 48 * 1024 * 1024   # ... and the oldest is dropped above this (a re-read later)
PATIENCE = 5.0  # seconds the scan waits for the senders to take anything before it drops the oldest
FRESH_AGE = 120.0  # a fresh payload no sender took in this long is dropped (the replica had it)


class Payloads:
    """(flags, stored bytes) of chunks by id, for every sender of one set."""

    def __init__(self) -> None:
        self.cache: LRU[tuple] = LRU(SHARED_BYTES, lambda v: len(v[1]) + 64)
        self.cond = threading.Condition()
        # id -> ((flags, payload), when made, raw length)
        self.fresh: OrderedDict[bytes, tuple[tuple[int, bytes], float, int]] = OrderedDict()
        self.fresh_bytes = 0
        self.taken = 0  # fresh payloads a sender took: the bytes the scan saved it reading again

    def put(self, cid: bytes, val: tuple[int, bytes]) -> None:
        self.cache.put(cid, val)

    def put_fresh(self, cid: bytes, val: tuple[int, bytes], raw_len: int) -> None:
        """A payload the scan made for the senders."""
        with self.cond:
            if cid in self.fresh:
                return
            self.fresh[cid] = (val, time.monotonic(), raw_len)
            self.fresh_bytes += len(val[1])
            while self.fresh_bytes > FRESH_MAX:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (val, _, _) = self.fresh.popitem(last=False)
        self.fresh_bytes -= len(val[1])

    def _take(self, cid: bytes) -> tuple[int, bytes] | None:
        with self.cond:
            got = self.fresh.pop(cid, None)
            if got is None:
                return None
            self.fresh_bytes -= len(got[0][1])
            self.taken += 1
            self.cond.notify_all()
        self.cache.put(cid, got[0])
        return got[0]

    def cached(self, cid: bytes) -> tuple[int, bytes] | None:
        """A payload in memory (fresh or shared), or None: never reads."""
        return self._take(cid) or self.cache.get(cid)

    def forget(self, ids) -> None:
        """Fresh payloads of chunks a replica said it has: no sender will take them."""
        with self.cond:
            for cid in ids:
                got = self.fresh.pop(cid, None)
                if got is not None:
                    self.fresh_bytes -= len(got[0][1])
            self.cond.notify_all()

    def expire(self, age: float = FRESH_AGE) -> None:
        """Drop fresh payloads older than `age` (files changed again or deleted before they were sent)."""
        with self.cond:
            limit = time.monotonic() - age
            while self.fresh and next(iter(self.fresh.values()))[1] < limit:
                self._drop_oldest()

    def take_ahead(self, budget: int, count: int) -> list[tuple[bytes, tuple[int, bytes], int]]:
        """Fresh payloads, oldest first, up to `budget` bytes and `count` chunks: (id, payload, raw
        length). What a sender with nothing queued sends ahead of their files' changes (changes.py):
        mostly the chunks of a big file the scan is still reading."""
        out = []
        size = 0
        with self.cond:
            while self.fresh and size < budget and len(out) < count:
                cid, (val, _, n) = self.fresh.popitem(last=False)
                self.fresh_bytes -= len(val[1])
                self.taken += 1
                size += len(val[1])
                out.append((cid, val, n))
            self.cond.notify_all()
        for cid, val, _ in out:
            self.cache.put(cid, val)
        return out

    def wait_room(self, want: Callable[[], bool], nudge: Callable[[], None] = lambda: None,
                  high: int = FRESH_HIGH, patience: float = PATIENCE) -> None:
        """The scan's brake: wait while more than `high` bytes are untaken and the senders take some
        within `patience` seconds; when none streams any more (`want()` false) or they stall, drop the
        oldest down to half of `high` and go on. Every fresh payload can be taken, a file's before the
        scan reaches its end too (`take_ahead`), so waiting never waits for the scan itself. `nudge`
        wakes the senders (one with nothing queued sends ahead)."""
        if self.fresh_bytes > high:
            nudge()
        with self.cond:
            last, since = self.fresh_bytes, time.monotonic()
            while self.fresh_bytes > high:
                if not want() or time.monotonic() - since > patience:
                    while self.fresh_bytes > high // 2:
                        self._drop_oldest()
                    return
                self.cond.wait(0.2)
                if self.fresh_bytes < last:
                    last, since = self.fresh_bytes, time.monotonic()

    def get(self, cid: bytes, where: tuple[bytes, int, int], cutter: Cutter) -> tuple[int, bytes] | None:
        """(flags, stored bytes) of a chunk; read from its file if not in memory; None if the file no
        longer holds it there (the sender reads the range anew)."""
        hit = self.cached(cid)
        if hit is not None:
            return hit
        path, off, n = where
        now = cutter.read_range(path, off, n, cid)
        if now is not None:
            self.put(cid, now)
        return now
