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
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import zstandard

from . import packs as P
from .errors import BlobMissing, IntegrityError, StoreError
from .files import INDEX_VERSION, decode_filelist_level
from .index import BLOB, SEQ_AT, SEQ_LE, U64, BlobEntry, PackEntry, ref_of, unpack_seqs
from .snapmeta import get_meta, update_meta
from .snapshots import Snapshot
from .trees import DIR, FILE, decode_tree, tree_children

T64 = struct.Struct(">Q")
BATCH = 8 * 1024 * 1024


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

    def __init__(self, repo, txn, report: VerifyReport, recount: bool) -> None:
        self.repo, self.txn, self.r = repo, txn, report
        self.blobs = repo.index.db["blobs"]
        self.seen: set[bytes] = set()
        self.chunks: set[bytes] = set()
        self.expected: Counter = Counter()
        self.recount = recount
        self.bad: dict[bytes, Damage] = {}

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

    def read_object(self, bid: bytes, kind: str) -> bytes | None:
        e = self.entry(bid)
        if e is None:
            self._damage(bid, kind, "not in the index", "referenced but missing")
            return None
        try:
            return self.repo.read_entry(bid, e)
        except (IntegrityError, BlobMissing) as exc:
            self._damage(bid, kind, self._where(e), str(exc))
            return None

    def snapshot(self, s: Snapshot) -> None:
        self.expected[s.root] += 1
        self.tree(s.root)

    def tree(self, tid: bytes) -> None:
        stack = [tid]
        while stack:
            t = stack.pop()
            if t in self.seen:
                continue
            self.seen.add(t)
            data = self.read_object(t, "tree")
            if data is None:
                continue
            try:
                entries = decode_tree(data)
            except IntegrityError as exc:
                self._damage(t, "tree", self._where(self.entry(t)), str(exc))
                continue
            self.r.trees += 1
            if self.recount:
                self.check_kids(t, "tree", tree_children(entries))
            for e in entries:
                if e.type == DIR:
                    self.expected[e.content] += 1
                    stack.append(e.content)
                elif e.type == FILE and e.nchunks:
                    self.expected[e.content] += 1
                    self.file(e.content, e.nchunks)

    def file(self, cid: bytes, nchunks: int) -> None:
        if cid in self.seen:
            return
        self.r.files += 1
        if nchunks == 1:
            self.seen.add(cid)
            self.chunk(cid)
            return
        self.filelist(cid)

    def filelist(self, cid: bytes) -> None:
        """A filelist: a leaf (entries are chunks) or an index (entries are leaves)."""
        if cid in self.seen:
            return
        self.seen.add(cid)
        data = self.read_object(cid, "filelist")
        if data is None:
            return
        try:
            level, ids, _ = decode_filelist_level(data)
        except IntegrityError as exc:
            self._damage(cid, "filelist", self._where(self.entry(cid)), str(exc))
            return
        if self.recount:
            self.check_kids(cid, "filelist", ids)
        for c in ids:
            self.expected[c] += 1
            if level == INDEX_VERSION:
                self.filelist(c)
            else:
                self.chunk(c)

    def check_kids(self, bid: bytes, kind: str, children: list[bytes]) -> None:
        """The object's `kids` record (what dropping it decrements) must list
        its children's sequence numbers in its order."""
        e = self.entry(bid)
        db = self.repo.index.db
        raw = self.txn.get(U64.pack(e.seq), db=db["kids"]) if e is not None else None
        try:
            have = list(unpack_seqs(raw)) if raw is not None else None
        except IntegrityError:
            have = None
        want = []
        for c in children:
            craw = self.txn.get(c, db=self.blobs)
            if craw is not None and len(craw) == BLOB.size:
                want.append(SEQ_LE.unpack_from(craw, SEQ_AT)[0])
        if have != want:
            self.r.problems.append(f"{kind} {bid.hex()[:16]}: its children record in the index does not match its "
                                   f"content (run `pit repair`)")

    def chunk(self, cid: bytes) -> None:
        if cid in self.chunks:
            return
        self.chunks.add(cid)
        if self.entry(cid) is None:
            self._damage(cid, "chunk", "not in the index", "referenced but missing")


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
                frames = P.read_footer(rd, sizes[num])
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
                for f in frames:
                    where.setdefault(f.id, set()).add(f.offset)
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
            if foot is not None and e.offset not in foot.get(k, ()):
                report.problems.append(f"blob {k.hex()[:16]}: pack {P.pack_name(e.pack)}'s footer does not list it "
                                       f"at offset {e.offset}")
            size = sizes.get(e.pack, -1)
            if size == -1:
                w._damage(k, P.KIND_NAMES.get(e.kind, "?"), w._where(e), "its pack is not in the index")
            elif size is not None and e.offset + P.FRAME_OVERHEAD + e.stored_len > size:
                w._damage(k, P.KIND_NAMES.get(e.kind, "?"), w._where(e), "its pack is truncated")
            elif size is None:
                w._damage(k, P.KIND_NAMES.get(e.kind, "?"), w._where(e), "its pack is missing")
    for name, want, what in (("refs", nblobs, "reference count records"), ("kids", nparents, "children records")):
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
            w._damage(k, "?", "not in the index", "referenced but missing")


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


def _deep(repo, txn, w: _Walker, report: VerifyReport, percent: float, seed: int, recheck_after: float
          ) -> list[bytes]:
    """Read, decompress and hash chunks, in pack order, hashing on worker threads."""
    now = int(time.time())
    vdb = repo.index.db["verified"]
    todo = []
    for cid in w.chunks:
        if cid in w.bad or not in_sample(cid, percent, seed):
            continue
        if recheck_after > 0:
            t = txn.get(cid, db=vdb)
            if t is not None and now - T64.unpack(t)[0] < recheck_after:
                report.chunks_skipped_recent += 1
                continue
        e = w.entry(cid)
        if e is not None:
            todo.append((e.pack, e.offset, cid, e))
    todo.sort()
    good: list[bytes] = []
    local = {}

    def check(batch):
        import threading

        d = local.setdefault(threading.get_ident(), zstandard.ZstdDecompressor())
        out = []
        for cid, e, frame in batch:
            try:
                if frame is None:
                    raise BlobMissing("pack missing or truncated")
                magic, kind, flags, _r, stored, raw_len, fid = P.FRAME_HEADER.unpack_from(frame, 0)
                if magic != P.FRAME_MAGIC or fid != cid or stored != e.stored_len or _r != 0 or kind != e.kind:
                    raise IntegrityError("frame header does not match the index")
                P.decode_frame(frame, e.offset)  # the CRC repair relies on
                payload = memoryview(frame)[P.FRAME_HEADER.size:P.FRAME_HEADER.size + stored]
                data = d.decompress(payload, max_output_size=raw_len) if flags & P.ZSTD else payload
                if len(data) != raw_len or blake3.blake3(data).digest() != cid:
                    raise IntegrityError("content does not match its id")
                out.append((cid, e, None))
            except (IntegrityError, BlobMissing, zstandard.ZstdError) as exc:
                out.append((cid, e, str(exc)))
        return out

    def results(fut):
        for cid, e, err in fut.result():
            report.chunks_read += 1
            report.bytes_read += e.stored_len
            if err is None:
                good.append(cid)
            else:
                w._damage(cid, "chunk", w._where(e), err)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="pit-verify") as pool:
        futs = []
        batch, size = [], 0
        for num, off, cid, e, frame in _read_spans(repo, todo):
            batch.append((cid, e, frame))
            size += e.stored_len
            if size >= BATCH:
                futs.append(pool.submit(check, batch))
                batch, size = [], 0
                while len(futs) > 3:
                    results(futs.pop(0))
        if batch:
            futs.append(pool.submit(check, batch))
        for f in futs:
            results(f)
    return good


def _has_trailer(read, size: int) -> bool:
    if size < P.TRAILER.size:
        return False
    try:
        tail = read(size - 8, 8)
    except (BlobMissing, IntegrityError):
        return False
    return tail == P.TRAILER_MAGIC


SPAN_GAP = 64 * 1024
SPAN_MAX = 8 * 1024 * 1024


def _read_spans(repo, todo):
    """Yield (pack, offset, id, entry, frame bytes or None) in pack order, reading
    runs of nearby frames with one read each (not one system call per chunk)."""
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
        try:
            span = memoryview(repo.backend.read(P.pack_name(num), start, end - start))
        except BlobMissing:
            span = None  # missing or truncated: read what we can one by one
        for num_, off, cid, e in todo[i:j]:
            length = P.FRAME_OVERHEAD + e.stored_len
            if span is not None:
                yield num_, off, cid, e, bytes(span[off - start:off - start + length])
                continue
            try:
                yield num_, off, cid, e, repo.backend.read(P.pack_name(num_), off, length)
            except BlobMissing:
                yield num_, off, cid, e, None
        i = j


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
           lock_wait: float = 10.0) -> VerifyReport:
    if depth not in ("structural", "sample", "deep"):
        raise StoreError(f"unknown verify depth {depth!r}")
    t0 = time.monotonic()
    report = VerifyReport(depth)
    with repo.reading() as txn:
        all_snaps = _readable_snapshots(repo, txn, report)
        whole = snapshots is None and set_name is None
        chosen = snapshots if snapshots is not None else [s for s in all_snaps if set_name in (None, s.set)]
        report.snapshots = [f"{s.set}@{s.name}" for s in chosen]
        w = _Walker(repo, txn, report, recount=whole)
        # Refcounts can only be recounted against every snapshot.
        for s in (all_snaps if whole else chosen):
            w.snapshot(s)
        if whole:  # received state not yet snapshotted holds references too
            from .apply import set_heads

            for head in set_heads(repo, txn).values():
                w.expected[head] += 1
                w.tree(head)
        if whole:
            _check_index(repo, txn, w, report)
        report.chunks = len(w.chunks)
        good: list[bytes] = []
        if depth != "structural":
            good = _deep(repo, txn, w, report, percent if depth == "sample" else 100.0, seed, recheck_after)
        locate_damage(repo, txn, w.bad, all_snaps)
        report.damage = list(w.bad.values())
    report.seconds = round(time.monotonic() - t0, 3)
    if record:
        _record(repo, report, chosen, good, lock_wait)
    return report


def _record(repo, report: VerifyReport, chosen: list[Snapshot], good: list[bytes], lock_wait: float) -> None:
    from .errors import RepositoryLocked

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
                update_meta(w, s.id, verify={"time": stamp, "depth": report.depth, "result": result})
        report.recorded = True
    except RepositoryLocked:
        report.notes.append("results not recorded: the repository was locked by a writer")


def snapshot_status(repo, txn, sid: bytes) -> dict | None:
    return get_meta(repo, txn, sid).get("verify")
