"""Chunk bytes for the senders: read from the source file, compressed once, shared.

A chunk a replica asks for is read from its file at the offset the master's
tree recorded, checked against its id (the file may have changed since it
was chunked), compressed (zstd, or stored raw when that does not pay) and
kept in a shared LRU, so every replica of the set gets the same bytes
without reading or compressing them again.
"""
from __future__ import annotations

import os
import threading

import blake3

from store import packs as P
from store.cache import LRU


class Payloads:
    """(flags, stored bytes) of chunks by id, for every sender of one set."""

    def __init__(self) -> None:
        self.cache: LRU[tuple] = LRU(64 * 1024 * 1024, lambda v: len(v[1]) + 64)
        self.lock = threading.Lock()

    def put(self, cid: bytes, val: tuple[int, bytes]) -> None:
        with self.lock:
            self.cache.put(cid, val)

    @staticmethod
    def read_range(path: bytes, off: int, n: int, cctx) -> tuple[bytes, tuple[int, bytes]] | None:
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

    def get(self, cid: bytes, where: tuple[bytes, int, int], cctx) -> tuple[int, bytes] | None:
        """(flags, stored bytes) of a chunk, compressed once and shared by all senders."""
        with self.lock:
            hit = self.cache.get(cid)
        if hit is not None:
            return hit
        now = self.read_range(*where, cctx)
        if now is None or now[0] != cid:
            return None  # the file changed since it was chunked (the sender reads the range anew)
        self.put(cid, now[1])
        return now[1]
