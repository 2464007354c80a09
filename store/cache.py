"""A small LRU bounded by total bytes (decompressed chunks) or entry count (trees)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    def __init__(self, budget: int, weigh: Callable[[V], int] = lambda v: 1) -> None:
        self.budget = budget
        self.weigh = weigh
        self.used = 0
        self._d: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()  # readers in FUSE/WebDAV threads share one cache

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: Hashable, value: V) -> None:
        w = self.weigh(value)
        if w > self.budget:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.used -= self.weigh(old)
            self._d[key] = value
            self.used += w
            while self.used > self.budget:
                _, ev = self._d.popitem(last=False)
                self.used -= self.weigh(ev)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.used = 0
