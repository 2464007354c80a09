"""Totals over the whole repository, for `pit stats`."""
from __future__ import annotations

from . import packs as P
from .index import BlobEntry, PackEntry
from .snapshots import list_sets


def repository_stats(repo) -> dict:
    kinds = {k: {"count": 0, "raw": 0, "stored": 0} for k in ("chunk", "tree", "filelist")}
    with repo.reading() as txn:
        with txn.cursor(db=repo.index.db["blobs"]) as cur:
            for v in cur.iternext(keys=False, values=True):
                e = BlobEntry.decode(v)
                d = kinds.setdefault(P.KIND_NAMES.get(e.kind, str(e.kind)), {"count": 0, "raw": 0, "stored": 0})
                d["count"] += 1
                d["raw"] += e.raw_len
                d["stored"] += e.stored_len
        packs = sealed = pack_bytes = dead = 0
        with txn.cursor(db=repo.index.db["packs"]) as cur:
            for v in cur.iternext(keys=False, values=True):
                pe = PackEntry.decode(v)
                packs += 1
                sealed += pe.sealed
                pack_bytes += pe.size
                dead += pe.dead
        nsnap = txn.stat(repo.index.db["snapshots"])["entries"]
        sets = list_sets(repo, txn)
    raw = sum(d["raw"] for d in kinds.values())
    stored = sum(d["stored"] for d in kinds.values())
    return {"id": repo.id, "path": repo.path, "snapshots": nsnap, "sets": sets, "blobs": kinds,
            "packs": packs, "packs_sealed": sealed, "pack_bytes": pack_bytes, "garbage_bytes": dead,
            "raw_bytes": raw, "stored_bytes": stored,
            "compression_ratio": (raw / stored) if stored else 1.0,
            "chunker": repo.params.__dict__, "compression_level": repo.level}
