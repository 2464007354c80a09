"""A size-capped local cache of pack byte ranges fetched from an object store.

Sealed packs never change, so a block fetched once is good for ever (until
the pack is deleted). The cache keeps fixed-size blocks of packs as files in
the repository directory (`s3cache/<pack>.<block>`), evicts the least
recently used ones when the total passes the cap, and survives restarts: at
open it adopts the blocks already on disk, oldest modification first.

Each process keeps its own view of what is cached; two processes reading at
once may overshoot the cap by what each added before seeing the other's
blocks, and the next eviction in either brings it back under.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_BLOCK = 1 << 20


class BlockCache:
    """Blocks of `block` bytes of named packs, at most `cap` bytes in all (0: cache nothing)."""

    def __init__(self, root: str, cap: int = DEFAULT_CACHE_BYTES, block: int = DEFAULT_BLOCK) -> None:
        self.root = root
        self.cap = max(0, int(cap))
        self.block = block
        self._lock = threading.Lock()
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.total = 0
        if self.cap:
            self._adopt()

    def _adopt(self) -> None:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        found = []
        for fn in names:
            pack, _, blk = fn.rpartition(".")
            if not pack.endswith(".pack") or not blk.isdigit():
                try:  # a temporary file a killed process left
                    os.unlink(os.path.join(self.root, fn))
                except OSError:
                    pass
                continue
            try:
                st = os.stat(os.path.join(self.root, fn))
            except OSError:
                continue
            found.append((st.st_mtime_ns, pack, int(blk), st.st_size))
        for _, pack, blk, size in sorted(found):
            self._lru[(pack, blk)] = size
            self.total += size
        self._evict()

    def _path(self, pack: str, blk: int) -> str:
        return os.path.join(self.root, f"{pack}.{blk}")

    @property
    def enabled(self) -> bool:
        return self.cap > 0

    def has(self, pack: str, blk: int) -> bool:
        with self._lock:
            return (pack, blk) in self._lru

    def get(self, pack: str, blk: int, start: int = 0, length: int | None = None) -> bytes | None:
        """`length` bytes (all when None) from `start` within a cached block, or None.
        Only the bytes asked for are read: a 16 KiB chunk costs no 1 MiB read."""
        if not self.cap:
            return None
        with self._lock:
            if (pack, blk) not in self._lru:
                return None
            self._lru.move_to_end((pack, blk))
        try:
            fd = os.open(self._path(pack, blk), os.O_RDONLY)
            try:
                if length is None:
                    length = os.fstat(fd).st_size - start
                return os.pread(fd, length, start)
            finally:
                os.close(fd)
        except OSError:  # evicted by another process: forget it here too
            with self._lock:
                size = self._lru.pop((pack, blk), None)
                if size is not None:
                    self.total -= size
            return None

    def put(self, pack: str, blk: int, data: bytes) -> None:
        """Keep one block. Not fsynced: a block lost in a crash is fetched again."""
        if not self.cap or len(data) > self.cap:
            return
        os.makedirs(self.root, exist_ok=True)
        tmp = self._path(pack, blk) + f".tmp{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(pack, blk))
        except OSError:  # a full disk must not fail a read: the block is simply not cached
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        with self._lock:
            old = self._lru.pop((pack, blk), None)
            if old is not None:
                self.total -= old
            self._lru[(pack, blk)] = len(data)
            self.total += len(data)
            self._evict()

    def _evict(self) -> None:
        while self.total > self.cap and self._lru:
            (pack, blk), size = self._lru.popitem(last=False)
            self.total -= size
            try:
                os.unlink(self._path(pack, blk))
            except OSError:
                pass

    def drop_pack(self, pack: str) -> None:
        """Forget every block of a deleted pack (its name may be written again after an aborted session)."""
        with self._lock:
            for key in [k for k in self._lru if k[0] == pack]:
                self.total -= self._lru.pop(key)
                try:
                    os.unlink(self._path(*key))
                except OSError:
                    pass

    def disk_bytes(self) -> int:
        """What the cache directory really holds (tests check the cap against this)."""
        try:
            return sum(os.path.getsize(os.path.join(self.root, fn)) for fn in os.listdir(self.root))
        except FileNotFoundError:
            return 0
