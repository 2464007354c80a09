"""Ingest a file from its written byte ranges instead of reading it whole.

A 1 % page change in a 400 MB database would otherwise cost a read, chunk
and hash of all 400 MB. When the change set (store/changeset.py) or the
capture (store/capture.py) gives a file's written ranges, and the parent
snapshot holds the file as a dense chunk list whose size and mtime match the
baseline the ranges are relative to, store/rechunk.py re-reads only the
written chunks and the few after them; everything else is the parent's
chunks. Anything that makes the ranges untrustworthy falls back to the whole
read, and the snapshot's stats say which way each file went and why.

This runs on the main thread (a range job reads a few MB at most); new chunks
go through Writer.put, the same dedup and compression as every chunk.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import packs as P
from .changeset import FileRanges
from .errors import StoreError
from .rechunk import rechunk
from .repository import blob_id
from .trees import FILE, X_DATA, Entry

RANGE_LOG_MAX = 100  # per-file lines kept in the snapshot's stats
HOLE_MIN = 64 * 1024  # as store/ingest.py: fewer blocks than this below the size means holes


@dataclass
class RangeOutcome:
    path: str
    mode: str          # "ranges" or "whole"
    reason: str = ""   # why whole (empty for "ranges")
    size: int = 0
    bytes_read: int = 0

    def to_json(self) -> dict:
        d = {"path": self.path, "mode": self.mode, "size": self.size, "bytes_read": self.bytes_read}
        if self.reason:
            d["reason"] = self.reason
        return d


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


class RangeIngestMixin:
    """Methods of the Ingester (store/ingest.py) for files that come with ranges."""

    range_log: list[RangeOutcome]
    range_counts: dict[str, int]

    def _range_init(self) -> None:
        self.range_log = []
        self.range_counts = {"ranges": 0, "whole": 0, "range_bytes_read": 0}

    def _range_note(self, out: RangeOutcome) -> None:
        self.range_counts[out.mode] += 1
        if out.mode == "ranges":
            self.range_counts["range_bytes_read"] += out.bytes_read
        if len(self.range_log) < RANGE_LOG_MAX:
            self.range_log.append(out)
        if out.mode == "whole" and len(self.warnings) < 100:
            self.warnings.append(f"{out.path}: written ranges not used ({out.reason}); read whole")

    def _parent_entry(self, path: bytes) -> Entry | None:
        if self.parent_root is None:
            return None
        rel = self._src_name + path[len(self._src):]
        try:
            return self.reader.lookup(self.parent_root, rel)
        except StoreError:
            return None

    def _why_not_ranges(self, plan: FileRanges, old: Entry | None, st: os.stat_result) -> str | None:
        if plan.ranges is None:
            return plan.why or "no ranges"
        if old is None or old.type != FILE:
            return "no parent entry for the file"
        if old.extra.get(X_DATA) is not None:
            return "sparse in the parent snapshot"
        if st.st_blocks * 512 + HOLE_MIN <= st.st_size:
            return "sparse file"
        if plan.baseline is not None and plan.baseline != (old.size, old.mtime_ns):
            return (f"stale baseline: the ranges are relative to size {plan.baseline[0]} mtime_ns {plan.baseline[1]}, "
                    f"the parent snapshot has size {old.size} mtime_ns {old.mtime_ns}")
        return None

    def _range_file(self, path: bytes, e: Entry, node, ckey: bytes | None, cstat: tuple,
                    st: os.stat_result, plan: FileRanges) -> bool:
        """Ingest `path` from its ranges; False (and the reason noted) when it must be read whole."""
        shown = os.fsdecode(path)
        old = self._parent_entry(path)
        why = self._why_not_ranges(plan, old, st)
        cl = None
        if why is None:
            try:
                cl = self.reader.chunk_list(old)
                if cl.size != old.size:
                    why = "the parent's chunk list does not cover the file"
            except StoreError as exc:
                why = f"the parent's chunk list is unreadable ({exc})"
        if why is not None:
            self._range_note(RangeOutcome(shown, "whole", why, st.st_size))
            return False
        src = plan.read_path or path
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            self._range_note(RangeOutcome(shown, "whole", f"cannot open: {exc.strerror}", st.st_size))
            return False
        try:
            try:  # scattered reads of a few chunks: kernel read-ahead would read (and count) far more
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                pass
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or fst.st_size != st.st_size or \
                    (plan.read_path is None and fst.st_ino != st.st_ino):
                why = "the file changed since it was examined"
            else:
                res = rechunk(cl.lengths, plan.ranges, st.st_size, lambda o, n: _pread_all(fd, n, o), self.params)
                after = os.fstat(fd)
                if plan.read_path is None and (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != cstat[:3]:
                    why = "written to while its ranges were read"
        except (OSError, StoreError) as exc:
            why = f"read failed: {exc}"
        finally:
            os.close(fd)
        if why is not None:
            self._range_note(RangeOutcome(shown, "whole", why, st.st_size))
            return False
        job = self._new_job(path, e, node, ckey, cstat)
        for p in res.pieces:
            if isinstance(p, int):
                job.ids.append(cl.ids[p])
                job.lens.append(cl.lengths[p])
            else:
                h = blob_id(p)
                self.w.put(P.CHUNK, h, p)
                job.ids.append(h)
                job.lens.append(len(p))
        node.pending += 1
        self.stats["files_read"] += 1
        self.stats["bytes_read"] += res.bytes_read
        self._range_note(RangeOutcome(shown, "ranges", "", st.st_size, res.bytes_read))
        self._finish_file(job)
        return True

    def range_stats(self) -> dict:
        """What the snapshot's stats say about range ingest (empty when no file had ranges)."""
        if not self.range_log and not any(self.range_counts[k] for k in ("ranges", "whole")):
            return {}
        return {"range_files": self.range_counts["ranges"], "range_fallbacks": self.range_counts["whole"],
                "range_bytes_read": self.range_counts["range_bytes_read"],
                "range_log": [o.to_json() for o in self.range_log]}
