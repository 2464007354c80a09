"""Reading objects: trees by id, files as chunk lists, paths inside a snapshot.

Everything here reads through one LMDB read transaction, so a caller sees one
consistent commit even while a writer works (MVCC).
"""
from __future__ import annotations

from typing import Iterator

import lmdb

from . import packs as P
from .errors import IntegrityError, PathNotFound
from .files import INDEX_VERSION, ChunkList, FileReader, decode_filelist_level
from .trees import DIR, FILE, Entry, decode_tree


class ObjectReader:
    def __init__(self, repo, txn: lmdb.Transaction) -> None:
        self.repo = repo
        self.txn = txn

    def blob(self, bid: bytes) -> bytes:
        return self.repo.read_blob(self.txn, bid)

    def tree(self, tree_id: bytes) -> list[Entry]:
        key = (P.TREE, tree_id)
        cached = self.repo.object_cache.get(key)
        if cached is not None:
            return cached
        entries = decode_tree(self.repo.read_blob(self.txn, tree_id))
        self.repo.object_cache.put(key, entries)
        return entries

    def tree_dict(self, tree_id: bytes | None) -> dict[bytes, Entry]:
        return {e.name: e for e in self.tree(tree_id)} if tree_id else {}

    def chunk_list(self, entry: Entry) -> ChunkList:
        if entry.type != FILE:
            raise IntegrityError(f"{entry.name!r} is not a file")
        if entry.nchunks == 0:
            return ChunkList([], [])
        if entry.nchunks == 1:
            return ChunkList([entry.content], [entry.data_size])
        key = (P.FILELIST, entry.content)
        cached = self.repo.object_cache.get(key)
        if cached is None:
            level, ids, lens = decode_filelist_level(self.repo.read_blob(self.txn, entry.content))
            if level == INDEX_VERSION:  # leaves under an index: expand them
                all_ids: list[bytes] = []
                all_lens: list[int] = []
                for leaf, leaf_len in zip(ids, lens):
                    lv, lids, llens = decode_filelist_level(self.repo.read_blob(self.txn, leaf))
                    if lv != 1 or sum(llens) != leaf_len:
                        raise IntegrityError(f"leaf filelist of {entry.name!r} does not match its index")
                    all_ids += lids
                    all_lens += llens
                ids, lens = all_ids, all_lens
            cached = ChunkList(ids, lens)
            self.repo.object_cache.put(key, cached)
        if len(cached.ids) != entry.nchunks or cached.size != entry.data_size:
            raise IntegrityError(f"chunk list of {entry.name!r} does not match its tree entry")
        return cached

    def open_file(self, entry: Entry) -> FileReader:
        return FileReader(self.chunk_list(entry), self.blob, entry.extents, entry.size)

    def lookup(self, root: bytes, path: str | bytes) -> Entry:
        """The entry at `path` (relative, '/'-separated) below tree `root`.

        The root itself is returned as a synthetic directory entry named ''."""
        parts = split_path(path)
        cur = Entry(b"", DIR, 0o755, 0, 0, 0, 0, root)
        for i, name in enumerate(parts):
            if cur.type != DIR:
                raise PathNotFound(f"{b'/'.join(parts[:i]).decode(errors='replace')} is not a directory")
            found = self.tree_dict(cur.content).get(name)
            if found is None:
                raise PathNotFound(f"{b'/'.join(parts[:i + 1]).decode(errors='replace')} is not in the snapshot")
            cur = found
        return cur

    def walk(self, tree_id: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
        """Every (path, entry) below a tree, depth first, in name order."""
        for e in self.tree(tree_id):
            p = prefix + b"/" + e.name if prefix else e.name
            yield p, e
            if e.type == DIR:
                yield from self.walk(e.content, p)


def split_path(path: str | bytes) -> list[bytes]:
    """Split a snapshot-relative path; `..` and NUL are refused, `.` and empty parts dropped."""
    from .errors import UnsafePath

    b = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    if b"\0" in b:
        raise UnsafePath("path contains a NUL byte")
    parts = [p for p in b.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UnsafePath(f"path {b.decode(errors='replace')!r} contains '..'")
    return parts


def iter_file_chunks(reader: ObjectReader, entry: Entry) -> Iterator[bytes]:
    """Stream a file's chunks in order without filling the shared chunk cache
    (a restore reads each chunk once; caching it would only evict useful ones)."""
    repo, txn = reader.repo, reader.txn
    cl = reader.chunk_list(entry)
    from .errors import BlobMissing

    for cid, n in zip(cl.ids, cl.lengths):
        e = repo.blob_entry(txn, cid)
        if e is None:
            raise BlobMissing(f"chunk {cid.hex()[:16]} of {entry.name.decode(errors='replace')} is not in the index")
        data = repo.read_entry(cid, e)
        if len(data) != n:
            raise IntegrityError("chunk length differs from the file's chunk list")
        yield data
