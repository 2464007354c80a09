"""Worker processes for CPU-bound work: a snapshot's reading, chunking,
hashing and compressing, a deep verify's decompressing and hashing.

Threads cannot share that work well in CPython: each chunk is a few C calls
that release and retake the GIL, and with small chunks the hand-overs cost
more than they save. Processes share nothing, so they scale with the cores.

The workers are started with `spawn` (a fresh interpreter), because the
caller may be a threaded agent where `fork` can copy a held lock, and they
die with the process that started them: a SIGKILLed `pit verify` must not
leave workers behind waiting for work that never comes.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

from .errors import StoreError

PR_SET_PDEATHSIG = 1
M_TRIM_THRESHOLD = -1  # mallopt(3) parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # allocations from this size on get their own mapping


def return_large_frees() -> None:
    """Have glibc give blocks of MMAP_THRESHOLD bytes and more their own
    mapping, unmapped when freed, for the rest of this process.

    glibc's threshold starts at 128 KiB and rises to the size of the
    largest mapped block freed (up to 32 MiB): once the first segment's
    frames or their pickle (megabytes) are freed, every later one is carved
    from the heap, and a heap with a live object above a freed hole cannot
    shrink. In a snapshot that held 10-20 MiB more per process than in use
    (docs/benchmarks.md, issue 17 part 3). A fixed threshold also fixes the
    trim threshold, so the heap's free top goes back too."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        pass


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before we asked to follow it
        os._exit(1)


def _start(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    _die_with_parent(parent)
    return_large_frees()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    if initializer is not None:
        initializer(*initargs)


def default_workers() -> int:
    """One per core, at least two (one core still gains from overlapping
    reads), at most eight (past that the single writer is the limit)."""
    return max(2, min(8, os.cpu_count() or 2))


def process_pool(workers: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
                 ) -> ProcessPoolExecutor:
    """A pool whose processes exit when this process dies. The processes
    start on the first submits, in the submitting thread, which must outlive
    the pool (Linux ties the death signal to the thread that forked).
    This process gets their results, megabytes each: see return_large_frees."""
    return_large_frees()
    try:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start, initargs=(os.getpid(), initializer, initargs))
    except (OSError, ImportError, NotImplementedError) as exc:  # no /dev/shm, no sem_open
        raise StoreError(f"cannot start worker processes: {exc}") from exc


def stop_pool(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Shut a pool down; with `kill` (after an error, a worker gone) SIGKILL its
    processes first. The pool's own clean-up only sends SIGTERM and then waits
    for each process, and a process caught in the middle of starting was seen
    to outlive that, leaving the wait (and the caller) hanging."""
    if kill:
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            try:
                p.kill()
            except (OSError, ValueError, AttributeError):
                pass
    pool.shutdown(wait=True, cancel_futures=True)
