"""Polling until a condition holds.

The demo, the quickstart lab and the tests watch real processes (agents,
etcd, PostgreSQL) that become ready on their own time and offer no event to
wait on: they look again until a deadline, and a miss says what was last
seen, so a timeout in CI names its cause.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(Exception):
    def __init__(self, what: str, timeout: float, last: object) -> None:
        super().__init__(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        self.last = last


def poll_until(pred: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.1) -> T:
    """The first true value `pred()` returns within `timeout` seconds. An
    exception from `pred` counts as "not yet" (a process still starting),
    and is what the WaitTimeout reports if nothing better came."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 -- not ready yet; look again
            last = exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(what, timeout, last)
        time.sleep(interval)
