"""Mutable facts about a snapshot, kept beside its immutable record:
verification results and pins."""
from __future__ import annotations

import msgpack


def get_meta(repo, txn, sid: bytes) -> dict:
    raw = txn.get(sid, db=repo.index.db["snapmeta"])
    return msgpack.unpackb(raw) if raw else {}


def put_meta(writer, sid: bytes, meta: dict) -> None:
    writer.txn.put(sid, msgpack.packb(meta, use_bin_type=True), db=writer.db["snapmeta"])


def update_meta(writer, sid: bytes, **changes) -> dict:
    meta = get_meta(writer.repo, writer.txn, sid)
    meta.update(changes)
    put_meta(writer, sid, meta)
    return meta


def is_pinned(repo, txn, sid: bytes) -> bool:
    return bool(get_meta(repo, txn, sid).get("pinned"))


def record_setting(writer, what: str, key: bytes, value) -> None:
    """Write a SETTING frame so `pit repair` can restore pins and policies from packs alone."""
    import time

    from . import packs as P
    from .repository import blob_id

    payload = msgpack.packb({"t": time.time_ns(), "what": what, "key": key, "value": value}, use_bin_type=True)
    writer.put_record(P.SETTING, blob_id(payload), payload)
