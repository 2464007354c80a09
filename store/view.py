"""The read-only view model that both restore servers (WebDAV, FUSE) show.

Layout, one path namespace::

    /                                   replication sets (those in scope)
    /<set>/                             snapshots by display name, plus `latest`
                                        and `.versions`
    /<set>/<snapshot>/<path...>         the snapshot's files
    /<set>/latest/<path...>             the newest snapshot
    /<set>/.versions/<dir...>/          every name that ever existed there
    /<set>/.versions/<dir...>/<file>/   one file per distinct version, named
                                        `<stem> <snapshot name><ext>`
                                        (`report 2026-11-24T14.05.00Z.xlsx`)

Snapshot names contain no ':' (Windows-legal); with `gmt_names` they follow
Samba's shadow_copy2 format `@GMT-YYYY.MM.DD-HH.MM.SS`.

A *scope* limits what a user sees to some sets and, inside them, some path
prefixes. It is applied to the snapshot-relative path of every node, so
`latest`, snapshot folders and `.versions` are limited alike; a name
outside the scope is simply absent (no 403 that would confirm it exists).

Every call opens its own short LMDB read transaction: readers never hold
back a writer's space reuse, and a new snapshot shows up on the next
listing. Decoded trees and chunks come from the repository's LRU caches.
"""
from __future__ import annotations

import posixpath
import stat
import time
from dataclasses import dataclass, field
from typing import Iterator

from . import versions as V
from .errors import BlobMissing, IntegrityError, PathNotFound, UnsafePath
from .files import ChunkList, FileReader, data_places
from .objects import ObjectReader
from .snapmeta import get_meta
from .snapshots import Snapshot, list_sets, list_snapshots
from .trees import DIR, FILE, SYMLINK, Entry

LATEST = "latest"
VERSIONS = ".versions"
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444

FULL, PARTIAL = 2, 1


def enc(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def dec(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def gmt_name(time_ns: int) -> str:
    return time.strftime("@GMT-%Y.%m.%d-%H.%M.%S", time.gmtime(time_ns // 1_000_000_000))


def version_name(filename: str, snap_name: str) -> str:
    """`report.xlsx` seen first in 2026-11-24T14.05.00Z -> `report 2026-11-24T14.05.00Z.xlsx`:
    the extension stays last so Explorer and Finder still open it with the right app."""
    stem, ext = posixpath.splitext(filename)
    if not stem:  # dotfiles: '.profile' has no extension
        stem, ext = filename, ""
    return f"{stem} {snap_name}{ext}"


class Scope:
    """Which sets and path prefixes a user may see. `{"*": [""]}` is everything."""

    def __init__(self, rules: dict[str, list[str]] | None = None) -> None:
        rules = {"*": [""]} if rules is None else rules
        self.rules: dict[str, list[tuple[bytes, ...]]] = {}
        for set_name, prefixes in rules.items():
            parsed = []
            for p in prefixes or [""]:
                parts = tuple(enc(x) for x in p.replace("\\", "/").split("/") if x not in ("", "."))
                if b".." in parts:
                    raise UnsafePath(f"scope prefix {p!r} contains '..'")
                parsed.append(parts)
            self.rules[set_name] = parsed

    def prefixes(self, set_name: str) -> list[tuple[bytes, ...]] | None:
        return self.rules.get(set_name, self.rules.get("*"))

    def allows_set(self, set_name: str) -> bool:
        return self.prefixes(set_name) is not None

    def level(self, set_name: str, parts: tuple[bytes, ...]) -> int:
        """FULL: inside an allowed prefix; PARTIAL: an ancestor of one (only the
        way down is visible); 0: outside."""
        pres = self.prefixes(set_name)
        if pres is None:
            return 0
        best = 0
        for pre in pres:
            if parts[:len(pre)] == pre:
                return FULL
            if pre[:len(parts)] == parts:
                best = PARTIAL
        return best

    def child_allowed(self, set_name: str, parts: tuple[bytes, ...], name: bytes) -> bool:
        return self.level(set_name, parts + (name,)) > 0


ALL = Scope()


@dataclass
class Node:
    """One thing in the view. `kind` is 'root', 'set', 'snapdir' (a directory in
    a snapshot, the snapshot folder included), 'file', 'symlink', 'vdir' (a
    `.versions` directory), 'vfile' (the versions folder of one file) or
    'version' (one version, a file)."""

    kind: str
    name: str
    size: int = 0
    mtime_ns: int = 0
    mode: int = DIR_MODE
    etag: str = ""
    set: str = ""
    snap: Snapshot | None = None
    rel: tuple[bytes, ...] = ()          # snapshot-relative path (for scope)
    entry: Entry | None = None
    status: dict | None = None           # verification status of a snapshot folder
    versions: list = field(default_factory=list)  # for 'version': the snapshots holding it

    @property
    def is_dir(self) -> bool:
        return self.kind in ("root", "set", "snapdir", "vdir", "vfile")

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9


def verification(repo, txn, snap: Snapshot) -> dict:
    """{'result': 'good'|'damaged'|'unverified', 'depth', 'time', 'pinned'} plus, when image
    selection examined the snapshot, 'app_check' {result, template, time, message} and 'image'
    {status, reason, time}; tolerant of whatever was stored (absent = unverified)."""
    try:
        meta = get_meta(repo, txn, snap.id)
    except Exception:  # a malformed record must not hide the snapshot
        meta = {}
    v = meta.get("verify") if isinstance(meta, dict) else None
    out = {"result": "unverified", "depth": None, "time": None, "pinned": bool(isinstance(meta, dict)
                                                                             and meta.get("pinned"))}
    if isinstance(v, dict) and v.get("result") in ("good", "damaged"):
        out.update(result=v["result"], depth=v.get("depth"), time=v.get("time"))
    if isinstance(meta, dict):
        # what failover image selection found (replicator/failover/select.py records it next to `verify`):
        # the operator sees on the mapped drive which image a failover would take, and why not the others
        a, i = meta.get("app_check"), meta.get("image")
        if isinstance(a, dict) and a.get("result") in ("good", "failed"):
            out["app_check"] = {"result": a["result"], "template": a.get("template"), "time": a.get("time"),
                                "message": a.get("message")}
        if isinstance(i, dict) and isinstance(i.get("status"), str):
            out["image"] = {"status": i["status"], "reason": i.get("reason"), "time": i.get("time")}
    return out


class View:
    """The whole read-only tree over one repository, limited to a scope."""

    def __init__(self, repo, scope: Scope = ALL, gmt_names: bool = False) -> None:
        self.repo = repo
        self.scope = scope
        self.gmt_names = gmt_names

    # ------------------------------------------------------------ helpers
    def snap_folder(self, s: Snapshot) -> str:
        return gmt_name(s.time_ns) if self.gmt_names else s.name

    def _snaps(self, txn, set_name: str) -> list[Snapshot]:
        return list_snapshots(self.repo, txn, set_name)

    def _set_node(self, txn, set_name: str) -> Node:
        snaps = self._snaps(txn, set_name)
        t = snaps[-1].time_ns if snaps else 0
        return Node("set", set_name, mtime_ns=t, set=set_name, etag=f"set-{set_name}-{t}")

    def _snap_node(self, txn, s: Snapshot, name: str) -> Node:
        return Node("snapdir", name, mtime_ns=s.time_ns, set=s.set, snap=s,
                    entry=Entry(b"", DIR, 0o555, 0, 0, s.time_ns, 0, s.root),
                    etag=s.root.hex(), status=verification(self.repo, txn, s),
                    size=int(s.stats.get("bytes", 0) or 0))

    def _entry_node(self, s: Snapshot, rel: tuple[bytes, ...], e: Entry) -> Node:
        name = dec(e.name)
        if e.type == DIR:
            return Node("snapdir", name, mtime_ns=e.mtime_ns, set=s.set, snap=s, rel=rel, entry=e,
                        etag=e.content.hex() if e.content else "", mode=stat.S_IFDIR | 0o555,
                        size=_subtree_bytes(e))
        if e.type == SYMLINK:
            return Node("symlink", name, size=len(e.content or b""), mtime_ns=e.mtime_ns, set=s.set, snap=s,
                        rel=rel, entry=e, mode=stat.S_IFLNK | 0o777, etag=(e.content or b"").hex()[:64])
        return Node("file", name, size=e.size, mtime_ns=e.mtime_ns, set=s.set, snap=s, rel=rel, entry=e,
                    mode=stat.S_IFREG | (e.mode & 0o555 or 0o444), etag=_etag(e))

    # ------------------------------------------------------------- lookup
    def resolve(self, path: str | list[str]) -> Node:
        """The node at a view path ('/'-separated, or already split). Raises
        PathNotFound for anything absent or out of scope."""
        parts = [p for p in (path.split("/") if isinstance(path, str) else path) if p not in ("", ".")]
        if ".." in parts or any("\0" in p for p in parts):
            raise PathNotFound("no such path")
        if not parts:
            return Node("root", "", etag="root")
        set_name = parts[0]
        with self.repo.reading() as txn:
            if not self.scope.allows_set(set_name) or set_name not in list_sets(self.repo, txn):
                raise PathNotFound("no such set")
            if len(parts) == 1:
                return self._set_node(txn, set_name)
            head, rest = parts[1], tuple(enc(p) for p in parts[2:])
            if head == VERSIONS:
                return self._resolve_versions(txn, set_name, rest)
            s = self._find_snapshot(txn, set_name, head)
            if not rest:
                return self._snap_node(txn, s, head)
            if not self.scope.level(set_name, rest):
                raise PathNotFound("no such path")
            return self._entry_node(s, rest, self._lookup(txn, s.root, rest))

    def _lookup(self, txn, root: bytes, parts: tuple[bytes, ...]) -> Entry:
        """Path lookup with each directory's name -> entry map cached (trees are
        immutable), so a lookup in a 10,000-entry folder is a dict hit, not a scan."""
        r = ObjectReader(self.repo, txn)
        cur = Entry(b"", DIR, 0o555, 0, 0, 0, 0, root)
        for name in parts:
            if cur.type != DIR:
                raise PathNotFound("no such path")
            key = ("view-dict", cur.content)
            d = self.repo.object_cache.get(key)
            if d is None:
                d = {e.name: e for e in r.tree(cur.content)}
                self.repo.object_cache.put(key, d)
            cur = d.get(name)
            if cur is None:
                raise PathNotFound("no such path")
        return cur

    def _find_snapshot(self, txn, set_name: str, name: str) -> Snapshot:
        snaps = self._snaps(txn, set_name)
        if name == LATEST and snaps:
            return snaps[-1]
        for s in snaps:
            if self.snap_folder(s) == name:
                return s
        raise PathNotFound("no such snapshot")

    def _resolve_versions(self, txn, set_name: str, rest: tuple[bytes, ...]) -> Node:
        if not rest:
            return Node("vdir", VERSIONS, set=set_name, rel=(), etag=f"v-{set_name}",
                        mtime_ns=self._set_node(txn, set_name).mtime_ns)
        # Either a directory/file path, or the last part is a version name below a file.
        lvl = self.scope.level(set_name, rest)
        if lvl:
            kids = V.list_children(self.repo, txn, set_name, b"/".join(rest[:-1]))
            for c in kids:
                if c.name == rest[-1]:
                    if c.state.type == DIR:
                        return Node("vdir", dec(c.name), set=set_name, rel=rest, mtime_ns=c.state.mtime_ns,
                                    etag="v-" + (c.state.content or b"").hex())
                    if lvl == FULL:
                        return Node("vfile", dec(c.name), set=set_name, rel=rest, mtime_ns=c.state.mtime_ns,
                                    etag="vf-" + (c.state.content or b"").hex())
        if len(rest) >= 2 and self.scope.level(set_name, rest[:-1]) == FULL:
            for n in self._version_nodes(txn, set_name, rest[:-1]):
                if enc(n.name) == rest[-1]:
                    return n
        raise PathNotFound("no such version")

    def _version_nodes(self, txn, set_name: str, rel: tuple[bytes, ...]) -> list[Node]:
        fname = dec(rel[-1])
        out = []
        for v in V.list_versions(self.repo, txn, set_name, b"/".join(rel)):
            if v.state.type != FILE:
                continue
            e = v.state.entry(rel[-1])
            first = v.snapshots[0]
            out.append(Node("version", version_name(fname, self.snap_folder(first)), size=e.size,
                            mtime_ns=e.mtime_ns, set=set_name, snap=v.snapshots[-1], rel=rel, entry=e,
                            mode=FILE_MODE, etag=_etag(e), versions=v.snapshots))
        return out

    # ------------------------------------------------------------ listing
    def listdir(self, node: Node) -> list[Node]:
        with self.repo.reading() as txn:
            if node.kind == "root":
                return [self._set_node(txn, s) for s in list_sets(self.repo, txn) if self.scope.allows_set(s)]
            if node.kind == "set":
                snaps = self._snaps(txn, node.set)
                out = [self._snap_node(txn, s, self.snap_folder(s)) for s in snaps]
                if snaps:
                    out.append(self._snap_node(txn, snaps[-1], LATEST))
                out.append(Node("vdir", VERSIONS, set=node.set, etag=f"v-{node.set}", mtime_ns=node.mtime_ns))
                return out
            if node.kind == "snapdir":
                s = node.snap
                r = ObjectReader(self.repo, txn)
                out = []
                lvl = self.scope.level(s.set, node.rel)
                for e in r.tree(node.entry.content):
                    if lvl == FULL or self.scope.child_allowed(s.set, node.rel, e.name):
                        out.append(self._entry_node(s, node.rel + (e.name,), e))
                return out
            if node.kind == "vdir":
                lvl = self.scope.level(node.set, node.rel)
                out = []
                for c in V.list_children(self.repo, txn, node.set, b"/".join(node.rel)):
                    rel = node.rel + (c.name,)
                    clvl = self.scope.level(node.set, rel)
                    if not (lvl == FULL or clvl):
                        continue
                    if c.state.type == DIR:
                        out.append(Node("vdir", dec(c.name), set=node.set, rel=rel, mtime_ns=c.state.mtime_ns,
                                        etag="v-" + (c.state.content or b"").hex()))
                    elif c.state.type == FILE and clvl == FULL:
                        out.append(Node("vfile", dec(c.name), set=node.set, rel=rel, mtime_ns=c.state.mtime_ns,
                                        etag="vf-" + (c.state.content or b"").hex()))
                return out
            if node.kind == "vfile":
                return self._version_nodes(txn, node.set, node.rel)
        raise PathNotFound(f"{node.name} is not a directory")

    def walk(self, node: Node, prefix: str = "") -> Iterator[tuple[str, Node]]:
        """(relative path, node) below a directory node, depth first."""
        for c in self.listdir(node):
            p = f"{prefix}/{c.name}" if prefix else c.name
            yield p, c
            if c.is_dir:
                yield from self.walk(c, p)

    def versions_index_current(self, set_name: str) -> bool:
        with self.repo.reading() as txn:
            return V.is_current(self.repo, txn, set_name)

    # -------------------------------------------------------------- reads
    def open(self, node: Node) -> "ViewFile":
        if node.kind not in ("file", "version") or node.entry is None:
            raise PathNotFound(f"{node.name} is not a file")
        entry = node.entry
        with self.repo.reading() as txn:
            r = ObjectReader(self.repo, txn)
            try:
                cl = r.chunk_list(entry)
            except IntegrityError:
                if node.kind != "version" or node.snap is None or not node.rel:
                    raise
                # A versions index of an older layout (before a writer rebuilt it)
                # lacks a sparse file's extents: its snapshot's tree has them.
                entry = self._lookup(txn, node.snap.root, node.rel)
                if entry.type != FILE or (entry.content, entry.nchunks) != (node.entry.content, node.entry.nchunks):
                    raise
                cl = r.chunk_list(entry)
        return ViewFile(self.repo, cl, entry.extents, entry.size)

    def readlink(self, node: Node) -> str:
        return dec(node.entry.content or b"")


def _etag(e: Entry) -> str:
    """The content id: the same bytes have the same ETag in every snapshot.
    A sparse file's bytes are its data *and* where it lies, so its ETag
    covers the extents and the size too."""
    ext = e.extents
    if ext is None:
        if e.content is None or e.nchunks == 0:
            return "empty"
        return e.content.hex()
    import blake3

    h = blake3.blake3(e.content or b"")
    h.update(b"%d:" % e.size + b",".join(b"%d+%d" % x for x in ext))
    return "s" + h.hexdigest()[:63]


def _subtree_bytes(e: Entry) -> int:
    b = e.extra.get("b") if isinstance(e.extra, dict) else None  # subtree bytes, from ingest
    return b if isinstance(b, int) else 0


class ViewFile:
    """Random-access reads of one file through the chunk offset table.

    Each chunk is looked up in its own short read transaction, so a file kept
    open for hours never pins an old LMDB view, and a chunk moved by pack
    compaction in the meantime is found at its new place. A sparse file's
    holes read as zeros without reading any chunk."""

    def __init__(self, repo, chunks: ChunkList, extents: list[tuple[int, int]] | None = None,
                 size: int | None = None) -> None:
        self.repo = repo
        self.chunks = chunks
        self.extents = extents
        self.size = chunks.size if size is None else size

    def _chunk(self, cid: bytes, cache: bool = True) -> bytes:
        if cache:
            hit = self.repo.chunk_cache.get(cid)
            if hit is not None:
                return hit
        with self.repo.reading() as txn:
            e = self.repo.blob_entry(txn, cid)
            if e is None:
                raise BlobMissing(f"chunk {cid.hex()[:16]} is not in the index")
            data = self.repo.read_entry(cid, e)
        if cache:
            self.repo.chunk_cache.put(cid, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        return FileReader(self.chunks, self._chunk, self.extents, self.size).read(offset, length)

    def iter_range(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes [start, end) chunk by chunk, bypassing the shared cache
        (a download reads each chunk once; caching it would evict useful ones);
        a sparse file's holes come as zeros, in pieces of at most 1 MiB."""
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return
        pos = start
        dbase = 0  # where the current run of data starts in the chunk data
        for off, n in data_places(self.extents, self.size):
            if off >= end:
                break
            if off + n > start:
                lo, hi = max(off, start), min(off + n, end)
                yield from _zeros(lo - pos)
                d = dbase + lo - off
                yield from self._data(d, d + hi - lo)
                pos = hi
            dbase += n
        yield from _zeros(end - pos)

    def _data(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of the chunk data."""
        import bisect

        starts = self.chunks.starts
        i = bisect.bisect_right(starts, start) - 1
        pos = start
        while pos < end:
            data = self._chunk(self.chunks.ids[i], cache=False)
            lo, hi = pos - starts[i], min(len(data), end - starts[i])
            yield data[lo:hi] if (lo, hi) != (0, len(data)) else data
            pos = starts[i] + hi
            i += 1


def _zeros(n: int) -> Iterator[bytes]:
    block = 1 << 20
    while n > 0:
        k = min(n, block)
        yield bytes(k)
        n -= k
