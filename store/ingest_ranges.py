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

import bisect
import os
import stat
from dataclasses import dataclass

from . import packs as P
from .changeset import FileRanges
from .errors import IntegrityError, StoreError
from .files import FILELIST_VERSION, INDEX_VERSION, LEAF_SPLIT, decode_filelist_level, encode_filelist, leaf_ends
from .rechunk import rechunk, written_chunks
from .repository import blob_id, object_id
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


@dataclass
class _Chunks:
    """A re-chunked file as its whole chunk list."""

    ids: list[bytes]
    lens: list[int]
    bytes_read: int


@dataclass
class _Leaves:
    """A re-chunked file as the parent's leaves (by index) and new runs of chunks cut into leaves."""

    leaf_ids: list[bytes]
    leaf_lens: list[int]
    parts: list  # int: the parent's leaf; (ids, lens, leaf ends): new leaves
    nchunks: int
    bytes_read: int = 0


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
        if why is not None:
            self._range_note(RangeOutcome(shown, "whole", why, st.st_size))
            return False
        src = plan.read_path or path
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            self._range_note(RangeOutcome(shown, "whole", f"cannot open: {exc.strerror}", st.st_size))
            return False
        made = None
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
                read = lambda o, n: _pread_all(fd, n, o)  # noqa: E731
                def advise(o: int, n: int) -> None:
                    try:
                        os.posix_fadvise(fd, o, n, os.POSIX_FADV_WILLNEED)
                    except OSError:
                        pass  # only advice

                made = self._by_leaves(old, plan.ranges, st.st_size, read, advise) \
                    if old.nchunks > LEAF_SPLIT else None
                if made is None:
                    made = self._by_chunks(old, plan.ranges, st.st_size, read)
                after = os.fstat(fd)
                if plan.read_path is None and (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != cstat[:3]:
                    why = "written to while its ranges were read"
        except (OSError, StoreError) as exc:
            why = f"read failed: {exc}"
        finally:
            os.close(fd)
        if why is not None:  # new chunks stored meanwhile are unreferenced: swept at commit
            self._range_note(RangeOutcome(shown, "whole", why, st.st_size))
            return False
        job = self._new_job(path, e, node, ckey, cstat)
        if isinstance(made, _Leaves):
            job.premade = (self._write_leaves(made), made.nchunks, st.st_size)
        else:
            job.ids, job.lens = made.ids, made.lens
        node.pending += 1
        self.stats["files_read"] += 1
        self.stats["bytes_read"] += made.bytes_read
        self._range_note(RangeOutcome(shown, "ranges", "", st.st_size, made.bytes_read))
        self._finish_file(job)
        return True

    def _store_pieces(self, pieces: list, ids: list[bytes], lens: list[int]) -> tuple[list[bytes], list[int]]:
        """The chunk list of re-chunked pieces (old chunks by index into ids/lens); new chunks stored."""
        out_ids, out_lens = [], []
        for p in pieces:
            if isinstance(p, int):
                out_ids.append(ids[p])
                out_lens.append(lens[p])
            else:
                h = blob_id(p)
                self.w.put(P.CHUNK, h, p)
                out_ids.append(h)
                out_lens.append(len(p))
        return out_ids, out_lens

    def _by_chunks(self, old: Entry, ranges, size: int, read) -> "_Chunks":
        """The whole parent chunk list, re-chunked where written (a small file, or one of one level)."""
        cl = self.reader.chunk_list(old)
        if cl.size != old.size:
            raise IntegrityError("the parent's chunk list does not cover the file")
        res = rechunk(cl.lengths, ranges, size, read, self.params)
        ids, lens = self._store_pieces(res.pieces, cl.ids, cl.lengths)
        return _Chunks(ids, lens, res.bytes_read)

    def _leaf(self, lid: bytes, nbytes: int) -> tuple[list[bytes], list[int]]:
        level, ids, lens = decode_filelist_level(self.reader.blob(lid))
        if level != FILELIST_VERSION or sum(lens) != nbytes:
            raise IntegrityError("a leaf filelist of the parent does not match its index")
        return ids, lens

    @staticmethod
    def _advise_written(ranges, starts: list[int], hit: list[bool], leaf, advise) -> None:
        """Tell the kernel every old chunk holding a written byte before the
        first is read: the scattered reads then go to the disk together, not
        one round trip after the other (0.23 s of a 0.9 s cold snapshot of
        the 402 MB db). Only those chunks: read-ahead is off (FADV_RANDOM)."""
        for k, h in enumerate(hit):
            if not h:
                continue
            _ids, lens = leaf(k)
            cstarts = [starts[k]]
            for n in lens:
                cstarts.append(cstarts[-1] + n)
            spans: list[list[int]] = []
            for off, n in ranges:
                if off >= cstarts[-1] or off + n <= cstarts[0]:
                    continue
                a = bisect.bisect_right(cstarts, max(off, cstarts[0])) - 1
                b = bisect.bisect_right(cstarts, min(off + n, cstarts[-1]) - 1)
                if spans and cstarts[a] <= spans[-1][1]:
                    spans[-1][1] = max(spans[-1][1], cstarts[b])
                else:
                    spans.append([cstarts[a], cstarts[b]])
            for lo, hi in spans:
                advise(lo, hi - lo)

    def _by_leaves(self, old: Entry, ranges, size: int, read, advise) -> "_Leaves | None":
        """Only the parent's leaves that hold a written byte (and the next one,
        for the cuts to line up again) are loaded, re-chunked and re-planned
        (store/files.py: leaf cuts, like chunk cuts, depend only on what lies
        since the previous cut); every other leaf is the parent's, by id. So
        the cost follows the change, not the file's size. None: not two levels."""
        level, leaf_ids, leaf_lens = decode_filelist_level(self.reader.blob(old.content))
        if level != INDEX_VERSION:
            return None
        starts = [0]
        for n in leaf_lens:
            starts.append(starts[-1] + n)
        if starts[-1] != old.size:
            raise IntegrityError("the parent's chunk list does not cover the file")
        nleaves = len(leaf_ids)
        hit = written_chunks(starts, ranges, size)
        out = _Leaves(leaf_ids, leaf_lens, [], old.nchunks)
        loaded: dict[int, tuple[list[bytes], list[int]]] = {}

        def leaf(k: int) -> tuple[list[bytes], list[int]]:
            if k not in loaded:
                loaded[k] = self._leaf(leaf_ids[k], leaf_lens[k])
            return loaded[k]

        self._advise_written(ranges, starts, hit, leaf, advise)
        i = 0
        while i < nleaves:
            if not hit[i]:
                out.parts.append(i)
                i += 1
                continue
            b = i
            while b < nleaves and hit[b]:
                b += 1
            b = min(nleaves, b + 1)  # one unwritten leaf after: room for the cuts to line up
            while True:
                win_ids: list[bytes] = []
                win_lens: list[int] = []
                for k in range(i, b):
                    lids, llens = leaf(k)
                    win_ids += lids
                    win_lens += llens
                tail = b == nleaves
                w0, w1 = starts[i], starts[b]
                wr = [(max(o, w0) - w0, min(o + n, w1) - max(o, w0)) for o, n in ranges if o < w1 and o + n > w0]
                res = rechunk(win_lens, wr, (size if tail else w1) - w0, lambda o, n: read(w0 + o, n), self.params)
                out.bytes_read += res.bytes_read
                ok = tail or (bool(res.pieces) and res.pieces[-1] == len(win_lens) - 1)
                if ok:
                    ids, lens = self._store_pieces(res.pieces, win_ids, win_lens)
                    ends = leaf_ends(ids, to_end=tail)
                    ok = tail or (bool(ends) and ends[-1] == len(ids))
                if ok:
                    break
                b += 1  # the cuts (of chunks or of leaves) line up only further on: widen the window
            out.parts.append((ids, lens, ends))
            out.nchunks += len(ids) - len(win_ids)
            i = b
        if out.nchunks <= LEAF_SPLIT:  # the file now fits one leaf: plan it whole
            return None
        return out

    def _write_leaves(self, made: "_Leaves") -> bytes:
        """Store the new leaves and the index over all of them (as write_filelist would); its id."""
        w = self.w
        top_ids: list[bytes] = []
        top_lens: list[int] = []
        for part in made.parts:
            if isinstance(part, int):
                top_ids.append(made.leaf_ids[part])
                top_lens.append(made.leaf_lens[part])
                continue
            ids, lens, ends = part
            start = 0
            for end in ends:
                payload = encode_filelist(ids[start:end], lens[start:end])
                fid = object_id(P.FILELIST, payload)
                if w.put(P.FILELIST, fid, payload):
                    w.link(fid, ids[start:end])
                top_ids.append(fid)
                top_lens.append(sum(lens[start:end]))
                start = end
        payload = encode_filelist(top_ids, top_lens, INDEX_VERSION)
        tid = object_id(P.FILELIST, payload)
        if w.put(P.FILELIST, tid, payload):
            w.link(tid, top_ids)
        return tid

    def range_stats(self) -> dict:
        """What the snapshot's stats say about range ingest (empty when no file had ranges)."""
        if not self.range_log and not any(self.range_counts[k] for k in ("ranges", "whole")):
            return {}
        return {"range_files": self.range_counts["ranges"], "range_fallbacks": self.range_counts["whole"],
                "range_bytes_read": self.range_counts["range_bytes_read"],
                "range_log": [o.to_json() for o in self.range_log]}
