"""Rebuild the LMDB index from the packs alone.

The packs are the truth; the index is a cache of them. Repair builds a new
index beside the old one (`index.new/`), then swaps it in with one rename,
so a crash during repair leaves the old index (or none) exactly as it was.

1. Every pack is read: its footer when intact, else frame by frame (each
   frame's CRC is checked; a damaged stretch is skipped to the next frame).
2. Snapshot frames minus tombstones are the live snapshots.
3. Reference counts are recounted from the live roots (each distinct tree
   and filelist counts its children once per mention). Frames nothing
   reaches are garbage (counted as dead bytes, compacted later). Live blobs
   are numbered in pack order (the order they were first written, so the
   chunks of one chunk list stay neighbours in `refs`).
4. Referenced blobs that no pack holds intact are *quarantined*: recorded
   with what was found; the snapshots they break are marked damaged with the
   paths lost, never silently dropped.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import msgpack

from . import packs as P
from .backend import fsync_dir
from .errors import BackendError, IntegrityError, StoreError
from .files import decode_filelist
from .index import REF, U64, BlobEntry, Index, PackEntry, bytime_key, pack_seqs
from .repository import FORMAT_VERSION, _acquire_lock, _release_lock
from .snapshots import Snapshot
from .trees import DIR, FILE, decode_tree


@dataclass
class RepairReport:
    packs: int = 0
    packs_damaged: list[str] = field(default_factory=list)
    frames: int = 0
    blobs_indexed: int = 0
    garbage_frames: int = 0
    snapshots: int = 0
    snapshots_dropped: int = 0  # tombstoned
    quarantined: list[dict] = field(default_factory=list)
    blobs_quarantined: int = 0  # referenced blobs lost: numbered, not indexed, healed when stored again
    damaged_snapshots: dict = field(default_factory=dict)  # label -> [paths lost]
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


class _PackReader:
    def __init__(self, backend, name: str) -> None:
        self.backend, self.name = backend, name
        self.size = backend.size(name)

    def __call__(self, off: int, n: int) -> bytes:
        return self.backend.read(self.name, off, n)


def _scan_packs(repo, report: RepairReport, progress=None):
    """-> (blob places, snapshot records, tombstones, per-pack info)"""
    places: dict[bytes, tuple[int, P.FrameInfo]] = {}
    snaps: dict[bytes, bytes] = {}
    tombs: set[bytes] = set()
    packinfo: dict[int, dict] = {}
    settings: dict[tuple, dict] = {}
    names = list(repo.backend.list())
    for name in names:
        if progress is not None:
            progress({"phase": "scan", "packs": report.packs, "packs_total": len(names)})
        num = P.pack_number(name)
        rd = _PackReader(repo.backend, name)
        report.packs += 1
        try:
            P.check_header(rd, rd.size)
        except IntegrityError as exc:
            # The header carries nothing the frames need: note it, read on.
            report.packs_damaged.append(f"{name} offset 0: {exc}")
        footer = P.read_footer(rd, rd.size)
        frames: list[P.FrameInfo] = []
        if footer is not None:
            # Trust the footer for places, but check each frame's CRC: a flipped
            # byte inside a frame must not make it into the index.
            for f in footer:
                try:
                    P.decode_frame(rd(f.offset, P.FRAME_OVERHEAD + f.stored_len), f.offset)
                    frames.append(f)
                except BackendError:
                    raise  # the object store failed: nothing is known about this frame, so nothing is quarantined
                except (IntegrityError, StoreError) as exc:
                    report.packs_damaged.append(f"{name} offset {f.offset}: {exc}")
                    report.quarantined.append({"blob": f.id.hex(), "kind": P.KIND_NAMES.get(f.kind, "?"),
                                               "pack": name, "offset": f.offset, "reason": str(exc)})
        size = rd.size
        if footer is None:
            errors: list[tuple[int, IntegrityError]] = []  # (intact frames before it, error)
            for f in P.walk_frames(rd, rd.size):
                if isinstance(f, IntegrityError):
                    errors.append((len(frames), f))
                else:
                    frames.append(f)
            torn = _torn_tail(rd, frames)
            if torn is not None and (not errors or errors[-1][0] == len(frames)):
                # A crash mid-append (or a cut file) leaves a partial last frame:
                # the pack ends where it starts, so compaction never walks into it.
                if errors:
                    errors.pop()
                size = torn
            report.packs_damaged.extend(f"{name}: {exc}" for _, exc in errors)
            if torn is not None:
                report.packs_damaged.append(f"{name} offset {torn}: a partial frame runs past the end of the file "
                                            f"(an interrupted write, or a truncated pack); the pack ends there")
        if repo.codec.sealed:
            frames = _open_sealed(repo, rd, name, frames, report)
        packinfo[num] = {"size": size, "sealed": footer is not None, "frames": frames}
        for f in frames:
            report.frames += 1
            if f.kind in (P.CHUNK, P.TREE, P.FILELIST):
                places.setdefault(f.id, (num, f))
            elif f.kind == P.SNAPSHOT:
                data = _record(repo, rd, name, f, report)
                if data is not None:
                    snaps[f.id] = data
            elif f.kind == P.TOMBSTONE:
                tombs.add(f.id)
            elif f.kind == P.SETTING:
                data = _record(repo, rd, name, f, report)
                if data is None:
                    continue
                rec = msgpack.unpackb(data)
                k = (rec["what"], rec["key"])
                if k not in settings or settings[k]["t"] < rec["t"]:
                    settings[k] = rec
    return places, snaps, tombs, packinfo, settings


def _record(repo, rd: _PackReader, name: str, f: P.FrameInfo, report: RepairReport) -> bytes | None:
    """The plain bytes of a snapshot or setting frame, checked against its id;
    None (and reported) when they do not match: such a record is not taken."""
    try:
        _, _, data = repo.decode_frame(rd(f.offset, P.FRAME_OVERHEAD + f.stored_len), f.offset)
        return data
    except (IntegrityError, StoreError) as exc:
        report.packs_damaged.append(f"{name} offset {f.offset}: {exc}")
        return None


def _open_sealed(repo, rd: _PackReader, name: str, frames: list[P.FrameInfo], report: RepairReport
                 ) -> list[P.FrameInfo]:
    """An encrypted repository's frames under their logical ids: each is
    opened (its seal checked, the id inside it keyed to the stored one), since
    the pack shows only keyed ids (docs/format.md, 12.4). A frame that does
    not open is damage, reported like a bad CRC and quarantined under its
    stored id (the logical one is sealed inside it)."""
    out = []
    for f in frames:
        try:
            buf = rd(f.offset, P.FRAME_OVERHEAD + f.stored_len)
            _info, stored = P.decode_frame(buf, f.offset)
            bid, _ = repo.codec.open(buf, stored)
        except (IntegrityError, StoreError) as exc:
            report.packs_damaged.append(f"{name} offset {f.offset}: {exc}")
            report.quarantined.append({"blob": f.id.hex(), "kind": P.KIND_NAMES.get(f.kind, "?"),
                                       "pack": name, "offset": f.offset, "reason": str(exc)})
            continue
        out.append(replace(f, id=bytes(bid)))
    return out


def _torn_tail(rd: _PackReader, frames: list[P.FrameInfo]) -> int | None:
    """Where a partial frame at the end of a footerless pack starts (a frame
    header, or part of one, whose frame runs past the end of the file), or None."""
    end = frames[-1].end if frames else P.PACK_HEADER.size
    rest = rd.size - end
    if rest <= 0:
        return None
    if rest < P.FRAME_HEADER.size:
        return end if rd(end, min(rest, 4)) == P.FRAME_MAGIC[:min(rest, 4)] else None
    magic, _kind, _fl, _r, stored, _raw, _id = P.FRAME_HEADER.unpack(rd(end, P.FRAME_HEADER.size))
    return end if magic == P.FRAME_MAGIC and end + P.FRAME_OVERHEAD + stored > rd.size else None


def rebuild_index(repo_path: str, lock_wait: float = 10.0, progress=None, keys=None) -> RepairReport:
    """Rebuild `<repo>/index` from `<repo>/packs`. Works when the index is missing or broken.
    `progress`, if given, is called with {"phase": "scan", packs, packs_total} per pack read, then
    {"phase": "index"} while the new index is written."""
    from .repository import Repository

    t0 = time.monotonic()
    report = RepairReport()
    repo = Repository.__new__(Repository)
    _open_without_index(repo, repo_path, keys)
    lock = _acquire_lock(os.path.join(repo.path, "lock"), lock_wait)
    try:
        places, snap_records, tombs, packinfo, settings = _scan_packs(repo, report, progress)
        if progress is not None:
            progress({"phase": "index", "packs": report.packs, "packs_total": report.packs})
        new_dir = os.path.join(repo.path, "index.new")
        shutil.rmtree(new_dir, ignore_errors=True)
        os.makedirs(new_dir)
        idx = Index(new_dir, create=True)
        db = idx.db

        def read(bid: bytes) -> bytes:
            num, f = places[bid]
            e = BlobEntry(f.kind, f.flags, num, f.offset, f.stored_len, f.raw_len, 0)
            return repo.read_entry(bid, e)

        refs: Counter = Counter()
        children: dict[bytes, bytes] = {}  # tree or filelist -> its children's ids, joined
        seen: set[bytes] = set()
        missing: dict[bytes, str] = {}
        missing_kind: dict[bytes, str] = {}
        live = [Snapshot.decode(data, sid) for sid, data in snap_records.items() if sid not in tombs]
        report.snapshots_dropped = sum(1 for sid in snap_records if sid in tombs)

        def visit(bid: bytes, kind: str) -> list[tuple[bytes, str]]:
            """Count children of a distinct object; return them for the walk."""
            if bid not in places:
                missing.setdefault(bid, f"{kind} not found intact in any pack")
                missing_kind.setdefault(bid, kind)
                return []
            num, f = places[bid]
            if f.kind == P.CHUNK:
                return []
            try:
                data = read(bid)
                if f.kind == P.TREE:
                    kids = []
                    for e in decode_tree(data):
                        if e.type == DIR:
                            kids.append((e.content, "tree"))
                        elif e.type == FILE and e.nchunks == 1:
                            kids.append((e.content, "chunk"))
                        elif e.type == FILE and e.nchunks > 1:
                            kids.append((e.content, "filelist"))
                    return kids
                return [(c, "chunk") for c in decode_filelist(data)[0]]
            except BackendError:
                raise
            except StoreError as exc:
                missing.setdefault(bid, str(exc))
                missing_kind.setdefault(bid, kind)
                report.quarantined.append({"blob": bid.hex(), "kind": kind, "pack": P.pack_name(num),
                                           "offset": f.offset, "reason": str(exc)})
                places.pop(bid, None)
                return []

        for s in live:
            refs[s.root] += 1
            stack = [(s.root, "tree")]
            while stack:
                bid, kind = stack.pop()
                if bid in seen:
                    continue
                seen.add(bid)
                kids = visit(bid, kind)
                if bid in places and places[bid][1].kind in (P.TREE, P.FILELIST):
                    children[bid] = b"".join(c for c, _ in kids)
                for child, ckind in kids:
                    refs[child] += 1
                    stack.append((child, ckind))

        with idx.write() as txn:
            txn.put(b"format", str(FORMAT_VERSION).encode(), db=db["meta"])
            txn.put(b"repo_id", repo.id.encode(), db=db["meta"])
            top = max(packinfo, default=0)
            txn.put(b"next_pack", U64.pack(top + 1), db=db["meta"])
            usage = {num: [0, 0] for num in packinfo}  # live, dead
            seqs: dict[bytes, int] = {}
            # Where each quarantined frame was, so a lost blob's number is
            # reserved beside its neighbours (its chunk list's other chunks).
            was_at = {bytes.fromhex(q["blob"]): (P.pack_number(q["pack"]), q["offset"])
                      for q in report.quarantined if "pack" in q}
            never = (1 << 64, 0)
            order = [(num, f.offset, bid, f) for bid, (num, f) in places.items()]
            order += [(*was_at.get(bid, never), bid, None) for bid in missing if refs.get(bid)]
            order.sort(key=lambda t: (t[0], t[1], t[2]))
            for num, _off, bid, f in order:
                if f is None:
                    # Referenced but lost: a number and a count like any live blob,
                    # no `blobs` record (reads fail, `has` is false, so a writer that
                    # meets the bytes again stores them and takes this number).
                    seq = seqs[bid] = len(seqs) + 1
                    txn.put(U64.pack(seq), REF.pack(refs[bid], bid), db=db["refs"])
                    continue
                size = P.FRAME_OVERHEAD + f.stored_len
                if refs.get(bid):
                    seq = seqs[bid] = len(seqs) + 1
                    txn.put(bid, BlobEntry(f.kind, f.flags, num, f.offset, f.stored_len, f.raw_len,
                                           seq).encode(), db=db["blobs"])
                    txn.put(U64.pack(seq), REF.pack(refs[bid], bid), db=db["refs"])
                    usage[num][0] += size
                    report.blobs_indexed += 1
                else:
                    usage[num][1] += size
                    report.garbage_frames += 1
            txn.put(b"next_seq", U64.pack(len(seqs) + 1), db=db["meta"])
            for bid, joined in children.items():
                if bid in places:  # not quarantined while walking
                    kid_seqs = [seqs[c] for c in (joined[i:i + 32] for i in range(0, len(joined), 32)) if c in seqs]
                    txn.put(U64.pack(seqs[bid]), pack_seqs(kid_seqs), db=db["kids"])
            live_ids = {s.id for s in live}
            for num, info in packinfo.items():
                live_b, dead_b = usage[num]
                for f in info["frames"]:
                    if f.kind in (P.TOMBSTONE, P.SETTING) or (f.kind == P.SNAPSHOT and f.id in live_ids):
                        live_b += P.FRAME_OVERHEAD + f.stored_len
                    elif f.kind == P.SNAPSHOT:
                        dead_b += P.FRAME_OVERHEAD + f.stored_len
                # Every pack is closed for appending after a repair: the next
                # writer starts a fresh one. Unsealed packs still compact fine.
                txn.put(U64.pack(num), PackEntry(info["size"], True, live_b, dead_b).encode(), db=db["packs"])
            for s in live:
                data = snap_records[s.id]
                txn.put(s.id, data, db=db["snapshots"])
                txn.put(bytime_key(s.set, s.time_ns, s.id), b"", db=db["bytime"])
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            # One quarantine record per blob not indexed: a damaged frame
            # (without `seq` when nothing references it) or a referenced blob
            # no pack holds intact (with its reserved `seq`). A damaged copy of
            # a blob indexed from an intact one needs none: the report names it.
            quarantine: dict[bytes, dict] = {}
            for q in report.quarantined:
                bid = bytes.fromhex(q["blob"])
                if bid in places:
                    q["intact_copy"] = True  # another pack holds it intact: nothing is lost
                else:
                    quarantine.setdefault(bid, {**q, "time": now})
            for bid, why in missing.items():
                rec = quarantine.get(bid)
                if rec is None:
                    rec = quarantine[bid] = {"blob": bid.hex(), "kind": missing_kind.get(bid, "?"), "reason": why,
                                             "time": now}
                    report.quarantined.append({"blob": bid.hex(), "kind": rec["kind"], "reason": why})
                if bid in seqs:
                    rec["seq"] = seqs[bid]
            for bid, rec in quarantine.items():
                txn.put(bid, msgpack.packb(rec), db=db["quarantine"])
            report.blobs_quarantined = sum(1 for r in quarantine.values() if "seq" in r)
            for (what, key), rec in settings.items():
                if what == "pin" and key in live_ids:
                    txn.put(key, msgpack.packb({"pinned": bool(rec["value"])}), db=db["snapmeta"])
                elif what == "policy":
                    txn.put(key, msgpack.packb({"retention": rec["value"]}), db=db["sets"])
            report.snapshots = len(live)
        idx.close()
        report.damaged_snapshots = _mark_damaged(repo, new_dir, live, set(missing))
        report.packs_damaged = list(dict.fromkeys(report.packs_damaged))
        _swap_in(repo.path, new_dir)
    finally:
        _release_lock(lock)
        repo.backend.close()
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _mark_damaged(repo, index_dir: str, live: list[Snapshot], bad_ids: set[bytes]) -> dict:
    """Record, per snapshot, that it is damaged and which paths are lost."""
    if not bad_ids:
        return {}
    from .verify import Damage, locate_damage

    repo.index = Index(index_dir)
    try:
        bad = {b: Damage(b.hex(), "?", "", "lost") for b in bad_ids}
        with repo.reading() as txn:
            locate_damage(repo, txn, bad, live)
        out: dict[str, dict[str, None]] = {}  # label -> its lost paths, each once, in the order found
        for d in bad.values():
            for p in d.paths:
                label, path = p.split(":", 1)
                out.setdefault(label, {})[path] = None
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with repo.index.write() as txn:
            for s in live:
                label = f"{s.set}@{s.name}"
                if label in out:
                    raw = txn.get(s.id, db=repo.index.db["snapmeta"])
                    meta = msgpack.unpackb(raw) if raw else {}
                    meta.update(verify={"time": now, "depth": "repair", "result": "damaged"},
                                lost=list(out[label])[:1000])
                    txn.put(s.id, msgpack.packb(meta), db=repo.index.db["snapmeta"])
        return {label: list(paths) for label, paths in out.items()}
    finally:
        repo.index.close()


def _open_without_index(repo, path: str, keys=None) -> None:
    """Read config, unlock the key and set up the pack backend, as Repository() does, minus the index."""
    from .backends import open_backend
    from .cache import LRU
    from .chunker import ChunkerParams
    from .repository import open_codec, read_config

    repo.path = os.path.abspath(path)
    cfg = read_config(repo.path)
    repo.codec, repo.key_slot = open_codec(repo.path, cfg, keys)
    repo.config, repo.id = cfg, cfg["id"]
    repo.params = ChunkerParams.from_dict(cfg["chunker"])
    repo.level, repo.pack_size = int(cfg["compression"]["level"]), int(cfg["pack_size"])
    repo.backend = open_backend(repo.path, cfg)
    repo.chunk_cache = LRU(64 * 1024 * 1024, len)
    repo.object_cache = LRU(8192)
    repo.active_writer = None
    repo._local = threading.local()


def _swap_in(repo_path: str, new_dir: str) -> None:
    cur = os.path.join(repo_path, "index")
    # Leftovers of an earlier repair killed after its swap go first.
    for name in os.listdir(repo_path):
        if name.startswith("index.old-"):
            shutil.rmtree(os.path.join(repo_path, name), ignore_errors=True)
    old = os.path.join(repo_path, f"index.old-{time.time_ns()}")
    if os.path.exists(cur):
        os.rename(cur, old)
    os.rename(new_dir, cur)
    fsync_dir(repo_path)
    shutil.rmtree(old, ignore_errors=True)
