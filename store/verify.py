"""Verification: structural (every reference resolves, reference counts match
a recount, packs and index agree) and deep (read, decompress and hash every
chunk, or a deterministic sample).

Damage is reported the way an operator needs it: which pack and offset,
and which snapshots and file paths it breaks. Results are recorded as data:
per snapshot (when, how deep, result) in `snapmeta`, and per chunk (last good
read) in `verified`, so checking the next-older snapshot re-reads only what
was not read recently. Failover image selection builds on this.
"""
from __future__ import annotations

import struct
import threading
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator
from dataclasses import dataclass, field

import blake3
import zstandard

from . import packs as P
from .errors import BlobMissing, IntegrityError, StoreError
from .files import INDEX_VERSION, decode_filelist_level
from .index import BLOB, SEQ_AT, SEQ_LE, U64, BlobEntry, PackEntry, ref_of, unpack_seqs
from .snapmeta import get_meta, put_meta
from .snapshots import Snapshot
from .trees import DIR, FILE, decode_tree, tree_children
from .crypto import FrameCodec, PlainCodec, codec_from_spec
from .workers import default_workers, process_pool, stop_pool

T64 = struct.Struct(">Q")


@dataclass
class Damage:
    blob: str
    kind: str
    where: str
    reason: str
    snapshots: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    depth: str
    snapshots: list[str] = field(default_factory=list)
    trees: int = 0
    files: int = 0
    chunks: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    chunks_skipped_recent: int = 0
    damage: list[Damage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # structural findings that are not one blob
    seconds: float = 0.0
    recorded: bool = False
    notes: list[str] = field(default_factory=list)  # not findings: e.g. results could not be recorded

    @property
    def clean(self) -> bool:
        return not self.damage and not self.problems

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["damage"] = [x.to_json() for x in self.damage]
        d["result"] = "good" if self.clean else "damaged"
        return d


def in_sample(bid: bytes, percent: float, seed: int) -> bool:
    """Deterministic: the same ids for the same seed; a new seed picks a new subset."""
    if percent >= 100:
        return True
    x = (int.from_bytes(bid[:4], "big") + seed * 0x9E3779B9) % (1 << 32)
    return x < percent / 100.0 * (1 << 32)


class _Walker:
    """Walks snapshots' trees once per distinct object, collecting what deep checks need."""

    def __init__(self, repo, txn, report: VerifyReport, recount: bool, frames: bool = False) -> None:
        self.repo, self.txn, self.r = repo, txn, report
        self.frames = frames  # check tree and filelist frames as repair reads them (CRC, header)
        self.progress = None  # called with a dict now and then (the CLI's status line)
        self.blobs = repo.index.db["blobs"]
        self.seen: set[bytes] = set()
        self.chunks: dict[bytes, BlobEntry | None] = {}  # id -> its index entry
        self.expected: Counter = Counter()
        self.recount = recount
        self.bad: dict[bytes, Damage] = {}
        self.quarantine = _quarantine(repo, txn)  # blob id -> its record (repair found it damaged or lost)

    def entry(self, bid: bytes) -> BlobEntry | None:
        raw = self.txn.get(bid, db=self.blobs)
        if raw is None:
            return None
        try:
            return BlobEntry.decode(raw)
        except IntegrityError:
            self._damage(bid, "?", "the index", "its index record is corrupt")
            return None

    def _damage(self, bid: bytes, kind: str, where: str, reason: str) -> None:
        if bid not in self.bad:
            self.bad[bid] = Damage(bid.hex(), kind, where, reason)

    def _where(self, e: BlobEntry | None) -> str:
        return f"pack {P.pack_name(e.pack)} offset {e.offset}" if e else "not in the index"

    def missing(self, bid: bytes, kind: str) -> None:
        """A referenced blob with no index record: lost, and quarantined by a
        repair (which says where it was and why) until stored again, or gone
        for no recorded reason."""
        q = self.quarantine.get(bid)
        if q is None:
            self._damage(bid, kind, "not in the index", "referenced but missing")
            return
        where = f"pack {q['pack']} offset {q['offset']}" if "pack" in q and "offset" in q else "not in the index"
        self._damage(bid, kind if kind != "?" else str(q.get("kind", "?")), where,
                     f"quarantined by repair: {q.get('reason', '?')}")

    def walk(self, roots: list[bytes]) -> None:
        """Breadth first, one level of trees and file lists at a time, each
        level read in pack order after telling the kernel what comes: on a
        cold cache the reads overlap instead of waiting one after another."""
        level = []
        for r in roots:
            self.expected[r] += 1
            if r not in self.seen:
                self.seen.add(r)
                level.append((r, "tree"))
        while level:
            todo = []
            for bid, kind in level:
                e = self.entry(bid)
                if e is None:
                    self.missing(bid, kind)
                else:
                    todo.append((e.pack, e.offset, bid, kind, e))
            todo.sort(key=lambda t: (t[0], t[1]))
            for num, off, _bid, _kind, e in todo:
                self.repo.backend.will_need(P.pack_name(num), off, P.FRAME_HEADER.size + e.stored_len)
            level = []
            if self.progress is not None:
                self.progress({"phase": "walk", "trees": self.r.trees, "files": self.r.files,
                               "chunks": len(self.chunks)})
            for _num, _off, bid, kind, e in todo:
                try:
                    data = self._read_frame(bid, e) if self.frames else self.repo.read_entry(bid, e)
                except (IntegrityError, BlobMissing) as exc:
                    self._damage(bid, kind, self._where(e), str(exc))
                    continue
                (self.tree if kind == "tree" else self.filelist)(bid, e, data, level)

    def _read_frame(self, bid: bytes, e: BlobEntry) -> bytes:
        """A tree's or filelist's plain bytes, its frame checked as repair
        checks it: the header against the index (reserved bytes zero), the
        CRC over header and payload, then the content against its id. The
        index's read path checks neither CRC nor reserved bytes, so a flipped
        bit there passed a deep verify and a later repair quarantined the frame."""
        from .repository import object_id

        frame = self.repo.backend.read(P.pack_name(e.pack), e.offset, P.FRAME_OVERHEAD + e.stored_len)
        magic, kind, flags, reserved, stored, raw_len, fid = P.FRAME_HEADER.unpack_from(frame, 0)
        if (magic != P.FRAME_MAGIC or fid != self.repo.codec.stored_id(bid) or stored != e.stored_len
                or kind != e.kind or flags != e.flags
                or reserved != 0 or raw_len != e.raw_len):
            raise IntegrityError("frame header does not match the index")
        _info, payload = P.decode_frame(frame, e.offset)
        _bid, payload = self.repo.codec.open(frame, payload, bid)  # an encrypted frame's seal
        try:
            data = self.repo.dctx().decompress(payload, max_output_size=raw_len) if flags & P.ZSTD else bytes(payload)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"cannot decompress: {exc}") from None
        if len(data) != raw_len or object_id(kind, data) != bid:
            raise IntegrityError("content does not match its id")
        return data

    def _queue(self, bid: bytes, kind: str, level: list) -> None:
        if bid not in self.seen:
            self.seen.add(bid)
            level.append((bid, kind))

    def tree(self, tid: bytes, e: BlobEntry, data: bytes, level: list) -> None:
        try:
            entries = decode_tree(data)
        except IntegrityError as exc:
            self._damage(tid, "tree", self._where(e), str(exc))
            return
        self.r.trees += 1
        for x in entries:
            if x.type == DIR:
                self.expected[x.content] += 1
                self._queue(x.content, "tree", level)
            elif x.type == FILE and x.nchunks:
                self.expected[x.content] += 1
                if x.content in self.seen or x.content in self.chunks:
                    continue
                self.r.files += 1
                if x.nchunks == 1:
                    self.chunk(x.content)
                else:
                    self._queue(x.content, "filelist", level)
        if self.recount:
            self.check_kids(tid, e, "tree", tree_children(entries))

    def filelist(self, cid: bytes, e: BlobEntry, data: bytes, level: list) -> None:
        """A file list: a leaf (entries are chunks) or an index (entries are leaves)."""
        try:
            index, ids, _ = decode_filelist_level(data)
        except IntegrityError as exc:
            self._damage(cid, "filelist", self._where(e), str(exc))
            return
        for c in ids:
            self.expected[c] += 1
            if index == INDEX_VERSION:
                self._queue(c, "filelist", level)
            else:
                self.chunk(c)
        if self.recount:
            self.check_kids(cid, e, "filelist", ids)

    def _seq(self, bid: bytes) -> int | None:
        if bid in self.chunks and self.chunks[bid] is not None:
            return self.chunks[bid].seq
        raw = self.txn.get(bid, db=self.blobs)
        if raw is None:  # lost: a repair reserved its number (parents' `kids` name it)
            seq = self.quarantine.get(bid, {}).get("seq")
            return seq if type(seq) is int else None
        return SEQ_LE.unpack_from(raw, SEQ_AT)[0] if len(raw) == BLOB.size else None

    def check_kids(self, bid: bytes, e: BlobEntry, kind: str, children: list[bytes]) -> None:
        """The object's `kids` record (what dropping it decrements) must list
        its children's sequence numbers in its order."""
        raw = self.txn.get(U64.pack(e.seq), db=self.repo.index.db["kids"])
        try:
            have = list(unpack_seqs(raw)) if raw is not None else None
        except IntegrityError:
            have = None
        want = [q for q in map(self._seq, children) if q is not None]
        if have != want:
            self.r.problems.append(f"{kind} {bid.hex()[:16]}: its children record in the index does not match its "
                                   f"content (run `pit repair`)")

    def chunk(self, cid: bytes) -> None:
        if cid in self.chunks:
            return
        e = self.chunks[cid] = self.entry(cid)
        if e is None:
            self.missing(cid, "chunk")


def _check_index(repo, txn, w: _Walker, report: VerifyReport) -> None:
    """Whole-repository checks: refcounts against the recount, packs against the index."""
    packs: dict[int, PackEntry] = {}
    with txn.cursor(db=repo.index.db["packs"]) as cur:
        for k, v in cur:
            try:
                packs[U64.unpack(k)[0]] = PackEntry.decode(v)
            except (IntegrityError, struct.error):
                report.problems.append(f"the index record of pack key {k.hex()} is corrupt (run `pit repair`)")
    footers: dict[int, dict[bytes, set[int]] | None] = {}
    sizes: dict[int, int | None] = {}
    for num in packs:
        name = P.pack_name(num)
        try:
            sizes[num] = repo.backend.size(name)
            P.check_header(lambda o, n, name=name: repo.backend.read(name, o, n), sizes[num])
        except BlobMissing:
            sizes[num] = None
            report.problems.append(f"pack {name} is in the index but missing on disk")
        except IntegrityError as exc:
            report.problems.append(f"pack {name} offset 0: damaged pack header: {exc}")
        if sizes.get(num) is not None and packs[num].sealed:
            rd = lambda o, n, name=name: repo.backend.read(name, o, n)  # noqa: E731
            try:
                frames = P.read_footer_rows(rd, sizes[num])
            except (BlobMissing, IntegrityError):
                frames = None
            if frames is None:
                # Repair marks footerless packs sealed too; only a damaged footer is a finding.
                if _has_trailer(rd, sizes[num]):
                    report.problems.append(f"pack {name}: its footer is damaged (repair can still walk its frames)")
                footers[num] = None
            else:
                # An id may have several frames in one pack (a blob dropped, then stored again
                # before the pack sealed); the index may point at any of them.
                where: dict[bytes, set[int]] = {}
                for _k, _fl, off, _s, _r, fid in frames:
                    where.setdefault(fid, set()).add(off)
                footers[num] = where
    on_disk = {P.pack_number(n) for n in repo.backend.list()}
    doomed_raw = txn.get(b"doomed", db=repo.index.db["meta"])
    import msgpack

    doomed = {d[0] for d in msgpack.unpackb(doomed_raw)} if doomed_raw else set()
    nxt_raw = txn.get(b"next_pack", db=repo.index.db["meta"])
    nxt = U64.unpack(nxt_raw)[0] if nxt_raw else 0
    # Packs numbered from next_pack on were never committed (a writer died);
    # the next writer deletes them. They are not damage.
    for num in sorted(n for n in on_disk - set(packs) - doomed if n < nxt):
        report.problems.append(f"pack {P.pack_name(num)} is on disk but not in the index (run `pit repair`)")
    db = repo.index.db
    nblobs = nparents = 0
    stored_id = repo.codec.stored_id  # footers list the ids as stored (keyed, when encrypted)
    with txn.cursor(db=repo.index.db["blobs"]) as cur:
        for k, v in cur:
            try:
                e = BlobEntry.decode(v)
            except IntegrityError:
                w._damage(k, "?", "the index", "its index record is corrupt")
                continue
            nblobs += 1
            nparents += e.kind in (P.TREE, P.FILELIST)
            _check_count(txn, db, w, report, k, e)
            foot = footers.get(e.pack)
            if foot is not None and e.offset not in foot.get(stored_id(k), ()):
                report.problems.append(f"blob {k.hex()[:16]}: pack {P.pack_name(e.pack)}'s footer does not list it "
                                       f"at offset {e.offset}")
            size = sizes.get(e.pack, -1)
            if size == -1:
                w._damage(k, P.KIND_NAMES.get(e.kind, "?"), w._where(e), "its pack is not in the index")
            elif size is not None and e.offset + P.FRAME_OVERHEAD + e.stored_len > size:
                w._damage(k, P.KIND_NAMES.get(e.kind, "?"), w._where(e), "its pack is truncated")
            elif size is None:
                w._damage(k, P.KIND_NAMES.get(e.kind, "?"), w._where(e), "its pack is missing")
    nreserved = _check_quarantine(txn, db, w, report)
    for name, want, what in (("refs", nblobs + nreserved, "reference count records"),
                             ("kids", nparents, "children records")):
        have = txn.stat(db[name])["entries"]
        if have != want:
            report.problems.append(f"the index holds {have} {what} for {want} blobs that need one (run `pit repair`)")
    snapdb, timedb = repo.index.db["snapshots"], repo.index.db["bytime"]
    with txn.cursor(db=timedb) as cur:
        for k in cur.iternext(keys=True, values=False):
            if txn.get(k[-32:], db=snapdb) is None:
                set_name = k.split(b"\0", 1)[0].decode(errors="replace")
                report.problems.append(f"catalogue entry {set_name} {k[-32:].hex()[:12]} points at no snapshot record")
    for k, n in w.expected.items():
        if n and txn.get(k, db=repo.index.db["blobs"]) is None and k not in w.bad:
            w.missing(k, "?")


def _quarantine(repo, txn) -> dict[bytes, dict]:
    import msgpack

    out = {}
    with txn.cursor(db=repo.index.db["quarantine"]) as cur:
        for k, v in cur:
            try:
                rec = msgpack.unpackb(v)
            except (ValueError, TypeError, msgpack.UnpackException):
                rec = None
            out[bytes(k)] = rec if isinstance(rec, dict) else {"reason": "its quarantine record is corrupt"}
    return out


def _check_quarantine(txn, db, w: "_Walker", report: VerifyReport) -> int:
    """The numbers a repair reserved for lost blobs: each has a reference
    count (what would be freed if the snapshots needing it went) that must
    match the recount, and no index record (a blob stored again takes the
    number and drops the quarantine record). Returns how many there are."""
    n = 0
    for bid, q in w.quarantine.items():
        seq = q.get("seq")
        if seq is None:
            continue  # a damaged frame nothing referenced when repair ran: not a finding
        if type(seq) is not int or txn.get(bid, db=db["blobs"]) is not None:
            report.problems.append(f"blob {bid.hex()[:16]}: its quarantine record does not fit the index "
                                   f"(run `pit repair`)")
            continue
        n += 1
        try:
            r = ref_of(txn, db, seq)
        except IntegrityError:
            r = None
        if r is None or r[1] != bid:
            report.problems.append(f"lost blob {bid.hex()[:16]} has no reference count record under its "
                                   f"reserved number {seq} (run `pit repair`)")
            continue
        want = w.expected.get(bid, 0)
        if r[0] != want:
            report.problems.append(f"lost blob {bid.hex()[:16]} has reference count {r[0]}, recount says {want}")
    return n


def _check_count(txn, db, w: "_Walker", report: VerifyReport, bid: bytes, e: BlobEntry) -> None:
    """A blob's reference count (in `refs`, under its sequence number) against the recount."""
    try:
        r = ref_of(txn, db, e.seq)
    except IntegrityError:
        r = None
    if r is None or r[1] != bid:
        report.problems.append(f"blob {bid.hex()[:16]} ({P.KIND_NAMES.get(e.kind)}) has no reference count "
                               f"record under its number {e.seq} (run `pit repair`)")
        return
    want = w.expected.get(bid, 0)
    if r[0] != want:
        report.problems.append(f"blob {bid.hex()[:16]} ({P.KIND_NAMES.get(e.kind)}) has reference count {r[0]}, "
                               f"recount says {want}")


class _DeepCheck:
    """Read, decompress and hash chunks in pack order. Big checks start in
    worker processes at once, so the caller's own checks of the index run
    meanwhile; finish() gathers the results."""

    def __init__(self, repo, txn, w: _Walker, report: VerifyReport, percent: float, seed: int,
                 recheck_after: float) -> None:
        self.w, self.report, self.pool = w, report, None
        now = int(time.time())
        vdb = repo.index.db["verified"]
        todo = []
        for cid, e in w.chunks.items():
            if e is None or cid in w.bad or not in_sample(cid, percent, seed):
                continue
            if recheck_after > 0:
                t = txn.get(cid, db=vdb)
                if t is not None and now - T64.unpack(t)[0] < recheck_after:
                    report.chunks_skipped_recent += 1
                    continue
            todo.append((e.pack, e.offset, cid, e))
        todo.sort()
        self.jobs = list(_spans(todo))
        self.results = (check_span(repo.backend, j, repo.codec) for j in self.jobs)
        if sum(j[2] - j[1] for j in self.jobs) < PARALLEL_MIN:
            return
        try:
            self.pool = process_pool(default_workers(), _worker_init, (repo.backend, repo.codec.spec()))
        except StoreError as exc:  # slower here, but checked all the same
            report.notes.append(f"{exc}; checking in this process")
            return
        try:
            self.results = self.pool.map(_worker_check, self.jobs)
        except (OSError, BrokenProcessPool) as exc:  # the processes start here (EAGAIN, ENOMEM)
            self.close(failed=True)
            self.results = (check_span(repo.backend, j, repo.codec) for j in self.jobs)
            report.notes.append(f"cannot start worker processes: {exc}; checking in this process")
        except BaseException:
            self.close(failed=True)
            raise

    progress = None  # called with a dict per span read (the CLI's status line)

    def finish(self) -> list[bytes]:
        """The ids of the chunks that checked good; damage goes to the walker."""
        w, report, good = self.w, self.report, []
        progress = self.progress
        total = sum(j[2] - j[1] for j in self.jobs)
        done = 0
        try:
            for (_num, start, end, items), errors in zip(self.jobs, self.results):
                done += end - start
                if progress is not None:
                    progress({"phase": "deep", "chunks_read": report.chunks_read, "bytes_read": done,
                              "bytes_total": total})
                bad = dict(errors)
                for i, (_off, cid, stored, _kind) in enumerate(items):
                    if cid in w.bad:  # the index checks found it first (its pack is gone)
                        continue
                    report.chunks_read += 1
                    report.bytes_read += stored
                    if i in bad:
                        w._damage(cid, "chunk", w._where(w.chunks[cid]), bad[i])
                    else:
                        good.append(cid)
        except BrokenProcessPool as exc:
            raise StoreError(f"a verify worker died: {exc}") from exc
        return good

    def close(self, failed: bool = False) -> None:
        if self.pool is not None:
            stop_pool(self.pool, kill=failed)
            self.pool = None


def _has_trailer(read, size: int) -> bool:
    if size < P.TRAILER.size:
        return False
    try:
        tail = read(size - 8, 8)
    except (BlobMissing, IntegrityError):
        return False
    return tail == P.TRAILER_MAGIC


SPAN_GAP = 64 * 1024
SPAN_MAX = 4 * 1024 * 1024
# Below this many stored bytes the check runs in this process: starting
# worker processes costs more than it saves (failover's selection re-reads
# only what was not verified recently, usually little).
PARALLEL_MIN = 64 * 1024 * 1024

Job = tuple[int, int, int, list[tuple[int, bytes, int, int]]]  # pack, start, end, [(offset, id, stored, kind)]


def _spans(todo) -> Iterator[Job]:
    """Group sorted (pack, offset, id, entry) rows into runs of nearby frames
    that one read fetches (not one system call per chunk)."""
    i, n = 0, len(todo)
    while i < n:
        num, start = todo[i][0], todo[i][1]
        j, end = i, start
        while j < n and todo[j][0] == num and todo[j][1] - end <= SPAN_GAP \
                and todo[j][1] + P.FRAME_OVERHEAD + todo[j][3].stored_len - start <= SPAN_MAX:
            end = max(end, todo[j][1] + P.FRAME_OVERHEAD + todo[j][3].stored_len)
            j += 1
        if j == i:  # one frame bigger than a span
            end = start + P.FRAME_OVERHEAD + todo[i][3].stored_len
            j = i + 1
        yield num, start, end, [(off, cid, e.stored_len, e.kind) for _n, off, cid, e in todo[i:j]]
        i = j


_worker_backend = None


def _worker_init(backend, codec_spec=None) -> None:
    global _worker_backend, _worker_codec
    _worker_backend = backend
    _worker_codec = codec_from_spec(codec_spec)


def _worker_check(job: Job) -> list[tuple[int, str]]:
    return check_span(_worker_backend, job, _worker_codec)


_zstd = threading.local()


def check_span(backend, job: Job, codec: FrameCodec | None = None) -> list[tuple[int, str]]:
    """Check every frame of one span as repair would read it (header matches
    the index, CRC, an encrypted frame's seal, content hashes to its id);
    (item index, reason) per bad one."""
    codec = codec or PlainCodec()
    num, start, end, items = job
    name = P.pack_name(num)
    try:
        span = memoryview(backend.read(name, start, end - start))
    except BlobMissing:
        span = None  # missing or truncated: read what we can frame by frame
    d = getattr(_zstd, "d", None)
    if d is None:
        d = _zstd.d = zstandard.ZstdDecompressor()
    errors = []
    for i, (off, cid, stored_len, want_kind) in enumerate(items):
        try:
            if span is not None:
                frame = span[off - start:off - start + P.FRAME_OVERHEAD + stored_len]
            else:
                frame = backend.read(name, off, P.FRAME_OVERHEAD + stored_len)
            magic, kind, flags, _r, stored, raw_len, fid = P.FRAME_HEADER.unpack_from(frame, 0)
            if (magic != P.FRAME_MAGIC or fid != codec.stored_id(cid) or stored != stored_len or _r != 0
                    or kind != want_kind):
                raise IntegrityError("frame header does not match the index")
            _info, payload = P.decode_frame(frame, off)  # the CRC repair relies on
            _cid, payload = codec.open(frame, payload, cid)
            data = d.decompress(payload, max_output_size=raw_len) if flags & P.ZSTD else payload
            if len(data) != raw_len or blake3.blake3(data).digest() != cid:
                raise IntegrityError("content does not match its id")
        except (IntegrityError, BlobMissing, zstandard.ZstdError, struct.error) as exc:
            errors.append((i, str(exc) if not isinstance(exc, BlobMissing) else "pack missing or truncated"))
    return errors


def locate_damage(repo, txn, bad: dict[bytes, Damage], snaps: list[Snapshot]) -> None:
    """Name every snapshot and file path each damaged blob breaks (walks only when damage exists)."""
    if not bad:
        return
    from .objects import ObjectReader

    r = ObjectReader(repo, txn)
    memo: dict[bytes, list[tuple[bytes, bytes]]] = {}  # tree id -> [(relpath, bad blob)]

    def scan(tid: bytes) -> list[tuple[bytes, bytes]]:
        if tid in memo:
            return memo[tid]
        hits: list[tuple[bytes, bytes]] = []
        if tid in bad:
            hits.append((b"", tid))
            memo[tid] = hits
            return hits
        try:
            entries = r.tree(tid)
        except StoreError:
            memo[tid] = [(b"", tid)]
            return memo[tid]
        for e in entries:
            if e.type == DIR:
                for p, b in scan(e.content):
                    hits.append((e.name + (b"/" + p if p else b""), b))
            elif e.type == FILE and e.nchunks:
                ids = [e.content]
                if e.nchunks > 1 and e.content not in bad:
                    try:  # an index's leaves may be what is broken
                        level, kids, _ = decode_filelist_level(r.blob(e.content))
                        if level == INDEX_VERSION:
                            ids += kids
                    except StoreError:
                        pass
                    if not any(i in bad for i in ids):
                        try:
                            ids += r.chunk_list(e).ids
                        except StoreError:
                            pass
                for c in ids:
                    if c in bad:
                        hits.append((e.name, c))
        memo[tid] = hits
        return hits

    for s in snaps:
        for path, b in scan(s.root):
            d = bad[b]
            label = f"{s.set}@{s.name}"
            if label not in d.snapshots:
                d.snapshots.append(label)
            p = f"{label}:{path.decode(errors='replace') or '/'}"
            if p not in d.paths and len(d.paths) < 1000:
                d.paths.append(p)


def _readable_snapshots(repo, txn, report: VerifyReport) -> list[Snapshot]:
    """Every snapshot whose record decodes; a corrupt record is a finding, not a crash."""
    out = []
    db = repo.index.db["snapshots"]
    with txn.cursor(db=db) as cur:
        for k, v in cur:
            try:
                out.append(Snapshot.decode(v, k))
            except IntegrityError as exc:
                report.problems.append(f"{exc} (its frame in the packs lets `pit repair` restore it)")
    out.sort(key=lambda s: (s.time_ns, s.set))
    return out


def verify(repo, snapshots: list[Snapshot] | None = None, set_name: str | None = None, depth: str = "structural",
           percent: float = 100.0, seed: int = 0, recheck_after: float = 0.0, record: bool = True,
           lock_wait: float = 10.0, progress=None) -> VerifyReport:
    """`progress`, if given, is called now and then with a dict: {"phase": "walk", trees, files, chunks}
    while the trees are walked, {"phase": "deep", chunks_read, bytes_read, bytes_total} while chunks are
    read (bytes of packs, in pack order)."""
    if depth not in ("structural", "sample", "deep"):
        raise StoreError(f"unknown verify depth {depth!r}")
    t0 = time.monotonic()
    report = VerifyReport(depth)
    with repo.reading() as txn:
        all_snaps = _readable_snapshots(repo, txn, report)
        whole = snapshots is None and set_name is None
        chosen = snapshots if snapshots is not None else [s for s in all_snaps if set_name in (None, s.set)]
        report.snapshots = [f"{s.set}@{s.name}" for s in chosen]
        w = _Walker(repo, txn, report, recount=whole, frames=depth != "structural")
        w.progress = progress
        # Refcounts can only be recounted against every snapshot.
        roots = [s.root for s in (all_snaps if whole else chosen)]
        if whole:  # received state not yet snapshotted holds references too
            from .apply import set_heads

            roots += set_heads(repo, txn).values()
        w.walk(roots)
        report.chunks = len(w.chunks)
        deep = None
        if depth != "structural":
            deep = _DeepCheck(repo, txn, w, report, percent if depth == "sample" else 100.0, seed, recheck_after)
        failed = True
        try:
            if whole:
                _check_index(repo, txn, w, report)
            if deep is not None:
                deep.progress = progress
            good = deep.finish() if deep is not None else []
            failed = False
        finally:
            if deep is not None:
                deep.close(failed)
        locate_damage(repo, txn, w.bad, all_snaps)
        report.damage = list(w.bad.values())
    report.seconds = round(time.monotonic() - t0, 3)
    if record and repo.readonly:
        report.notes.append("results not recorded: the repository is open read-only (a read-only file system, "
                            "or no write permission)")
    elif record:
        _record(repo, report, chosen, good, lock_wait)
    return report


def _record(repo, report: VerifyReport, chosen: list[Snapshot], good: list[bytes], lock_wait: float) -> None:
    from .errors import PermissionDenied, ReadOnlyRepository, RepositoryLocked

    now = int(time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    broken = {lbl for d in report.damage for lbl in d.snapshots}
    try:
        with repo.writer(lock_wait=lock_wait) as w:
            vdb = w.db["verified"]
            t = T64.pack(now)
            for cid in good:
                w.txn.put(cid, t, db=vdb)
            for s in chosen:
                if w.txn.get(s.id, db=w.db["snapshots"]) is None:
                    continue  # dropped meanwhile
                label = f"{s.set}@{s.name}"
                result = "damaged" if label in broken else "good"
                meta = get_meta(repo, w.txn, s.id)
                meta["verify"] = {"time": stamp, "depth": report.depth, "result": result}
                if result == "good":
                    meta.pop("lost", None)  # a repair's finding, healed since (docs/format.md, `quarantine`)
                put_meta(w, s.id, meta)
        report.recorded = True
    except RepositoryLocked:
        report.notes.append("results not recorded: the repository was locked by a writer")
    except (ReadOnlyRepository, PermissionDenied) as exc:
        report.notes.append(f"results not recorded: {exc}")


def snapshot_status(repo, txn, sid: bytes) -> dict | None:
    return get_meta(repo, txn, sid).get("verify")
