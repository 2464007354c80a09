"""Compaction: rewrite the live blobs of mostly-garbage packs, then delete them.

Prune leaves garbage inside sealed packs (a pack is never edited in place).
Compaction takes one pack at a time, in its own short writer session, so a
snapshot can commit between two packs: it copies every frame still in use
into the open pack (stored bytes as they are, after a CRC check; nothing is
recompressed), points the index at the copies, and commits.

The old pack is not deleted at that commit: a reader in another process may
hold an older LMDB view that still points into it (a WebDAV client
streaming a file from a snapshot just pruned). The pack is listed as
*doomed* with the id of the commit that retired it, and deleted only once
every live reader transaction is at least that new (LMDB's reader table
says so). A reader therefore gets the right bytes, never a missing pack.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgpack

from . import packs as P
from .errors import IntegrityError, StoreError
from .index import U64, PackEntry

DEFAULT_THRESHOLD = 0.25


@dataclass
class CompactStats:
    packs_compacted: int = 0
    bytes_copied: int = 0
    bytes_reclaimed: int = 0
    packs_deleted: int = 0
    packs_waiting: int = 0  # retired, waiting for older readers to finish
    damaged: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # What it cost an object-store backend: requests by kind, bytes up and down (None for local packs).
    backend: dict | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def garbage_ratio(pe: PackEntry) -> float:
    total = pe.live + pe.dead
    return pe.dead / total if total else 1.0


def _past(pe: PackEntry, threshold: float) -> bool:
    return pe.dead > 0 and garbage_ratio(pe) >= threshold


def candidates(repo, txn, threshold: float, small: int = 0, below: int | None = None
               ) -> list[tuple[int, PackEntry]]:
    """Retired-able packs, most garbage first. The open pack is never a candidate.

    With `small`, sealed packs smaller than that (numbered below `below`) follow, oldest
    first, when there are at least two of them: a backend that seals at every
    commit (an object store) makes one small pack per snapshot, and merging
    them keeps the bucket's object count (and a repair's or a listing's
    requests) in step with the data, as `restic prune` repacks small packs."""
    cur_open = txn.get(b"open_pack", db=repo.index.db["meta"])
    open_no = U64.unpack(cur_open)[0] if cur_open else None
    out = []
    tiny = []
    with txn.cursor(db=repo.index.db["packs"]) as cur:
        for k, v in cur:
            num = U64.unpack(k)[0]
            pe = PackEntry.decode(v)
            if num == open_no:
                continue
            if _past(pe, threshold):
                out.append((num, pe))
            elif small and pe.sealed and pe.size < small and (below is None or num < below):
                tiny.append((num, pe))
    out.sort(key=lambda t: garbage_ratio(t[1]), reverse=True)
    return out + (tiny if len(tiny) >= 2 else [])


def _doomed(txn, db) -> list[list[int]]:
    raw = txn.get(b"doomed", db=db["meta"])
    return msgpack.unpackb(raw) if raw else []


def compact_pack(w, num: int, stats: CompactStats) -> None:
    """Copy the live frames of pack `num` forward and retire it (inside writer session `w`)."""
    repo = w.repo
    name = P.pack_name(num)
    pe = PackEntry.decode(w.txn.get(U64.pack(num), db=w.db["packs"]))
    # The committed size: a repair ends a pack before a partial last frame
    # (an interrupted write), which is not damage and holds nothing in use.
    size = min(repo.backend.size(name), pe.size)

    def read(off: int, n: int) -> bytes:
        return repo.backend.read(name, off, n)

    frames = P.read_footer(read, size)
    if frames is None:
        frames = list(P.walk_frames(read, size))
    snaps = w.db["snapshots"]
    codec = repo.codec
    for f in frames:
        if isinstance(f, IntegrityError):
            raise IntegrityError(f"pack {name}: {f}")
        buf = None
        bid = f.id
        if codec.sealed and f.kind in (P.CHUNK, P.TREE, P.FILELIST, P.SNAPSHOT):
            # The index knows logical ids; the pack only keyed ones: open the
            # frame (its seal checked) to learn which blob it holds.
            buf = read(f.offset, P.FRAME_OVERHEAD + f.stored_len)
            info, payload = P.decode_frame(buf, f.offset)
            bid, _ = codec.open(buf, payload)
        keep = False
        entry = None
        if f.kind in (P.CHUNK, P.TREE, P.FILELIST):
            entry = w.entry(bid)
            if entry is not None:
                keep = entry.pack == num and entry.offset == f.offset
        elif f.kind == P.SNAPSHOT:
            keep = w.txn.get(bid, db=snaps) is not None
        elif f.kind in (P.TOMBSTONE, P.SETTING):
            keep = True  # tiny; tombstones stop repair resurrecting a dropped snapshot,
            # settings let it restore pins and policies
        if not keep:
            continue
        if buf is None:
            buf = read(f.offset, P.FRAME_OVERHEAD + f.stored_len)
        info, _payload = P.decode_frame(buf, f.offset)  # the CRC: never copy a damaged frame
        if info.id != f.id or info.kind != f.kind:
            raise IntegrityError(f"pack {name}: frame at {f.offset} is not what the footer says")
        # The stored bytes as they are: a sealed frame stays sealed under its own header.
        new_pack, new = w.append_stored_frame(bytes(buf), f.kind, f.flags, f.raw_len)
        if entry is not None:
            entry.pack, entry.offset = new_pack, new.offset
            w.put_entry(bid, entry)
        stats.bytes_copied += P.FRAME_OVERHEAD + f.stored_len
    w.txn.delete(U64.pack(num), db=w.db["packs"])
    doomed = _doomed(w.txn, w.db)
    doomed.append([num, w.txn.id()])
    w.txn.put(b"doomed", msgpack.packb(doomed), db=w.db["meta"])
    stats.packs_compacted += 1
    stats.bytes_reclaimed += pe.dead


def reader_floor(repo) -> int | None:
    """The oldest transaction id any live reader (in any process) still sees."""
    env = repo.index.env
    try:
        env.reader_check()  # clear slots of readers whose process died
    except Exception:  # pragma: no cover - depends on lmdb build
        pass
    ids = []
    for line in env.readers().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[2].isdigit():
            ids.append(int(parts[2]))
    return min(ids) if ids else None


def delete_doomed(w, stats: CompactStats) -> None:
    """Delete retired packs no reader can still need (inside writer session `w`)."""
    doomed = _doomed(w.txn, w.db)
    if not doomed:
        return
    floor = reader_floor(w.repo)
    keep = []
    for num, txnid in doomed:
        # Our own write transaction is not in the reader table; other readers are.
        if floor is None or floor >= txnid:
            w.repo.backend.delete(P.pack_name(num))
            stats.packs_deleted += 1
        else:
            keep.append([num, txnid])
    stats.packs_waiting = len(keep)
    w.txn.put(b"doomed", msgpack.packb(keep), db=w.db["meta"])


def compact(repo, threshold: float = DEFAULT_THRESHOLD, max_seconds: float | None = None,
            lock_wait: float = 10.0, progress=None) -> CompactStats:
    """Compact packs past the garbage threshold, one short session per pack, within a time budget.
    `progress`, if given, is called before each pack with {"packs_done", "packs_left", "bytes_copied"}."""
    if not 0.0 <= threshold <= 1.0:
        raise StoreError("the garbage threshold must be between 0 and 1")
    stats = CompactStats()
    t0 = time.monotonic()
    counters = getattr(repo.backend, "stats", None)
    before = counters.copy() if counters is not None else None
    # Where the open pack is sealed at every commit (an object store), one
    # session per old pack would leave one small new pack per old one: such
    # a backend gets several old packs per session, up to a pack's worth of copies.
    batch_bytes = repo.pack_size if getattr(repo.backend, "seal_on_commit", False) else 0
    small = repo.pack_size // 4 if batch_bytes else 0
    with repo.reading() as txn:
        # only packs there at the start are merged for being small: the merged ones are not merged again
        below = U64.unpack(txn.get(b"next_pack", db=repo.index.db["meta"]))[0]
    done: set[int] = set()
    while max_seconds is None or time.monotonic() - t0 < max_seconds:
        with repo.reading() as txn:
            todo = [c for c in candidates(repo, txn, threshold, small, below) if c[0] not in done]
            if len(todo) == 1 and not _past(todo[0][1], threshold):
                todo = []  # one small pack left alone: rewriting it would gain nothing
        if progress is not None:
            progress({"packs_done": len(done), "packs_left": len(todo), "bytes_copied": stats.bytes_copied})
        if not todo:
            break
        batch: list[int] = []
        kept = (stats.packs_compacted, stats.bytes_copied, stats.bytes_reclaimed)
        try:
            with repo.writer(lock_wait=lock_wait) as w:
                copied0 = stats.bytes_copied
                for num, pe in todo:
                    if batch and (not batch_bytes or stats.bytes_copied - copied0 + pe.live > batch_bytes
                                  or (max_seconds is not None and time.monotonic() - t0 >= max_seconds)):
                        break
                    batch.append(num)
                    done.add(num)
                    compact_pack(w, num, stats)
        except IntegrityError as exc:
            stats.damaged.append(str(exc))
            # The session was aborted: only the damaged pack (the last tried) is given up on.
            done.difference_update(batch[:-1])
            stats.packs_compacted, stats.bytes_copied, stats.bytes_reclaimed = kept
    with repo.writer(lock_wait=lock_wait) as w:
        delete_doomed(w, stats)
    if counters is not None:
        stats.backend = counters.since(before)
    stats.seconds = round(time.monotonic() - t0, 3)
    return stats
