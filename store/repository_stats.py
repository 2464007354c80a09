"""Totals over the whole repository, for `pit stats`."""
from __future__ import annotations

import os

from . import packs as P
from .index import BlobEntry, PackEntry
from .snapshots import list_sets


def index_size(repo) -> dict:
    """The LMDB index on disk: `index_bytes` (what `data.mdb` occupies; LMDB never shrinks its file, so
    after a big prune it can rival the packs) and `index_used_bytes` (its pages in use; the rest is
    reused by later writes, and `pit repair` rebuilds a compact one)."""
    path = os.path.join(repo.index_dir, "data.mdb")
    try:
        st = os.stat(path)
        on_disk = min(st.st_size, st.st_blocks * 512)
    except OSError:
        on_disk = 0
    info, stat = repo.index.env.info(), repo.index.env.stat()
    used = (info["last_pgno"] + 1) * stat["psize"]
    return {"index_bytes": on_disk, "index_used_bytes": min(used, on_disk) if on_disk else used}


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
    index = index_size(repo)
    raw = sum(d["raw"] for d in kinds.values())
    stored = sum(d["stored"] for d in kinds.values())
    return {"id": repo.id, "path": repo.path, "snapshots": nsnap, "sets": sets, "blobs": kinds,
            "packs": packs, "packs_sealed": sealed, "pack_bytes": pack_bytes, "garbage_bytes": dead,
            "raw_bytes": raw, "stored_bytes": stored, **index,
            "compression_ratio": (raw / stored) if stored else 1.0,
            "chunker": repo.params.__dict__, "compression_level": repo.level}
