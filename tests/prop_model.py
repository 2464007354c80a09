"""Model trees for the property tests (tests/test_properties.py, issue 12).

A *tree* is a dict: relative path (bytes, '/'-separated; the first component
is a source's base name) -> node (`File`, `Dir`, `Symlink`). Every parent
directory of a path is in the dict too. `write_tree` makes a tree on disk,
`observe` reads a directory back, `expect` says what `observe` must see for
a model tree, and `diff` says how two observations differ.

File contents are described, not held: `Content(kind, size, seed, ops)`
makes its bytes on demand (the BLAKE3 XOF for random data), so a failing
example prints short and shrinks well.

`SourceTree` keeps a model and a real directory equal while a state machine
changes them, and logs every path it touches (what a replicator would name
in a change set).
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace

import blake3
from hypothesis import strategies as st

ROOT = os.geteuid() == 0
BASE_MTIME = 1_600_000_000_123_456_789  # 2020-09-13: far from the files cache's racy window
MAX_NAME = 255


# ------------------------------------------------------------------ contents
@dataclass(frozen=True)
class Content:
    """A file's bytes: `kind` of `size` bytes, then `ops` applied in order.

    kind: "random" (incompressible), "zeros", "text" (compressible), or
    "sparse": zeros written as a hole (ftruncate), whose ops are the data
    islands written with pwrite.
    ops: ("w", offset, length, seed) writes random bytes at offset (the file
    grows if it ends past its size); ("t", size) truncates or extends with
    zeros (a hole, on disk)."""

    kind: str
    size: int
    seed: int = 0
    ops: tuple = ()

    @property
    def data(self) -> bytes:
        return _content_bytes(self)

    @property
    def length(self) -> int:
        n = self.size
        for op in self.ops:
            n = max(n, op[1] + op[2]) if op[0] == "w" else op[1]
        return n

    def with_op(self, op: tuple) -> "Content":
        return replace(self, ops=self.ops + (op,))

    def __repr__(self) -> str:
        ops = f", ops={self.ops!r}" if self.ops else ""
        return f"Content({self.kind!r}, {self.size}, seed={self.seed}{ops})"


def rand_bytes(n: int, seed: int) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "little", signed=True)).digest(length=n) if n > 0 else b""


def _base_bytes(kind: str, size: int, seed: int) -> bytes:
    if kind == "random":
        return rand_bytes(size, seed)
    if kind in ("zeros", "sparse"):
        return bytes(size)
    if kind == "text":
        line = b"line %d of a compressible file, seed %d\n"
        out, i = bytearray(), 0
        while len(out) < size:
            out += line % (i, seed)
            i += 1
        return bytes(out[:size])
    raise ValueError(kind)


@functools.lru_cache(maxsize=128)
def _content_bytes(c: Content) -> bytes:
    buf = bytearray(_base_bytes(c.kind, c.size, c.seed))
    for op in c.ops:
        if op[0] == "w":
            _, off, n, seed = op
            if off > len(buf):
                buf += bytes(off - len(buf))
            buf[off:off + n] = rand_bytes(n, seed)
        else:
            size = op[1]
            del buf[size:]
            buf += bytes(size - len(buf))
    return bytes(buf)


def write_content(path: bytes, c: Content) -> None:
    """Write a file's content from scratch (a new inode's worth of bytes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        if c.kind == "sparse":
            os.ftruncate(fd, c.size)
            for op in c.ops:
                apply_op(fd, op)
        else:
            data = c.data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def apply_op(fd: int, op: tuple) -> None:
    """One Content op on an open file, in place (the inode stays)."""
    if op[0] == "w":
        _, off, n, seed = op
        data = rand_bytes(n, seed)
        done = 0
        while done < n:
            done += os.pwrite(fd, data[done:], off + done)
    else:
        os.ftruncate(fd, op[1])


# --------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class File:
    content: Content
    mode: int = 0o644
    mtime: int = BASE_MTIME
    uid: int = 0
    gid: int = 0
    xattrs: tuple = ()     # ((name, value), ...) sorted by name
    inode: int | None = None  # hard-link group in the model: names with one value are one inode


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    mtime: int = BASE_MTIME
    uid: int = 0
    gid: int = 0
    xattrs: tuple = ()


@dataclass(frozen=True)
class Symlink:
    target: bytes
    mtime: int = BASE_MTIME
    uid: int = 0
    gid: int = 0
    xattrs: tuple = ()


def parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def under(path: bytes, top: bytes) -> bool:
    """path is top or below it."""
    return path == top or path.startswith(top + b"/")


def set_meta(p: bytes, node) -> None:
    """Owner, mode, xattrs, then mtime (each earlier step moves ctime only;
    chown before chmod: chown clears set-id bits)."""
    link = isinstance(node, Symlink)
    if ROOT:
        os.chown(p, node.uid, node.gid, follow_symlinks=False)
    if not link:
        os.chmod(p, node.mode)
    for name in os.listxattr(p, follow_symlinks=False):
        if os.fsencode(name) not in dict(node.xattrs):
            os.removexattr(p, name, follow_symlinks=False)
    for name, value in node.xattrs:
        os.setxattr(p, name, value, follow_symlinks=False)
    os.utime(p, ns=(node.mtime, node.mtime), follow_symlinks=False)


def write_tree(base: bytes, tree: dict) -> None:
    """Create `tree` under `base` (which must not hold any of its paths).
    Directory metadata goes on after the children, deepest first."""
    os.makedirs(base, exist_ok=True)
    first: dict[int, bytes] = {}
    for path in sorted(tree):
        node, p = tree[path], os.path.join(base, path)
        if isinstance(node, Dir):
            os.mkdir(p, 0o700)
        elif isinstance(node, File):
            if node.inode is not None and node.inode in first:
                os.link(first[node.inode], p)
                continue
            write_content(p, node.content)
            set_meta(p, node)
            if node.inode is not None:
                first[node.inode] = p
        else:
            os.symlink(node.target, p)
            set_meta(p, node)
    for path in sorted(tree, reverse=True):
        if isinstance(tree[path], Dir):
            set_meta(os.path.join(base, path), tree[path])


def rmtree(path) -> None:
    """Remove a file or a directory tree, read-only directories in it too (not root)."""
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
        except OSError:
            pass
        func(p)

    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=fix)
    else:
        os.unlink(path)


@contextmanager
def workdir(prefix: str = "pit-prop-"):
    """A fresh directory per example (hypothesis does not reset pytest's
    function-scoped fixtures between examples)."""
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield os.fsencode(d)
    finally:
        rmtree(d)


# ---------------------------------------------------------------- observing
@dataclass(frozen=True)
class Seen:
    """One observed (or expected) entry: what a restore must reproduce."""

    type: str
    mode: int | None
    mtime: int | None
    owner: tuple | None
    xattrs: tuple
    size: int | None = None
    digest: str | None = None    # file: BLAKE3 of the bytes (16 hex digits)
    target: bytes | None = None  # symlink
    link: bytes | None = None    # file: the first path (in this tree) of its inode, when it has several

    def __repr__(self) -> str:
        parts = [self.type]
        if self.mode is not None:
            parts.append(f"mode={self.mode:o}")
        if self.mtime is not None:
            parts.append(f"mtime={self.mtime}")
        if self.owner is not None:
            parts.append(f"owner={self.owner[0]}:{self.owner[1]}")
        if self.xattrs:
            parts.append(f"xattrs={self.xattrs!r}")
        if self.size is not None:
            parts.append(f"size={self.size} {self.digest}")
        if self.target is not None:
            parts.append(f"-> {self.target!r}")
        if self.link is not None:
            parts.append(f"link={self.link!r}")
        return "<" + " ".join(parts) + ">"


@dataclass(frozen=True)
class Aspects:
    """What to compare. Owners need root to restore; xattrs need restore support."""

    owners: bool = ROOT
    xattrs: bool = False
    links: bool = False


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()[:16]


def _xattrs_of(p: bytes) -> tuple:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    return tuple(sorted((os.fsencode(n), os.getxattr(p, n, follow_symlinks=False)) for n in names))


def observe(root: bytes, aspects: Aspects = Aspects()) -> dict[bytes, Seen]:
    """Every entry below `root` (not root itself) -> Seen."""
    out: dict[bytes, Seen] = {}
    inodes: dict[tuple, list[bytes]] = {}

    def walk(d: bytes, rel: bytes) -> None:
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            r = rel + b"/" + name if rel else name
            st_ = os.lstat(p)
            owner = (st_.st_uid, st_.st_gid) if aspects.owners else None
            xa = _xattrs_of(p) if aspects.xattrs else ()
            if stat.S_ISLNK(st_.st_mode):
                out[r] = Seen("symlink", None, st_.st_mtime_ns, owner, xa, target=os.readlink(p))
            elif stat.S_ISDIR(st_.st_mode):
                out[r] = Seen("dir", stat.S_IMODE(st_.st_mode), st_.st_mtime_ns, owner, xa)
                walk(p, r)
            elif stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
                out[r] = Seen("file", stat.S_IMODE(st_.st_mode), st_.st_mtime_ns, owner, xa, len(data), digest(data))
                if aspects.links and st_.st_nlink > 1:
                    inodes.setdefault((st_.st_dev, st_.st_ino), []).append(r)
            else:
                out[r] = Seen(f"special {stat.S_IFMT(st_.st_mode):o}", None, None, None, ())

    walk(root, b"")
    for names in inodes.values():
        if len(names) > 1:
            first = min(names)
            for r in names:
                out[r] = replace(out[r], link=first)
    return out


def expect(tree: dict, aspects: Aspects = Aspects(), top: bytes | None = None) -> dict[bytes, Seen]:
    """What `observe` must see after restoring `tree` (or the subtree at
    `top`, which then appears under its base name)."""
    out: dict[bytes, Seen] = {}
    groups: dict[int, list[bytes]] = {}
    cut = len(parent_of(top)) + 1 if top is not None and b"/" in top else 0
    for path, node in tree.items():
        if top is not None and not under(path, top):
            continue
        r = path[cut:]
        owner = (node.uid, node.gid) if aspects.owners else None
        xa = tuple(node.xattrs) if aspects.xattrs else ()
        if isinstance(node, Symlink):
            out[r] = Seen("symlink", None, node.mtime, owner, xa, target=node.target)
        elif isinstance(node, Dir):
            out[r] = Seen("dir", node.mode, node.mtime, owner, xa)
        else:
            data = node.content.data
            out[r] = Seen("file", node.mode, node.mtime, owner, xa, len(data), digest(data))
            if aspects.links and node.inode is not None:
                groups.setdefault(node.inode, []).append(r)
    for names in groups.values():
        if len(names) > 1:
            first = min(names)
            for r in names:
                out[r] = replace(out[r], link=first)
    return out


def diff(want: dict, got: dict, limit: int = 12) -> str:
    """A readable account of how two observations differ ('' when equal)."""
    lines = []
    for p in sorted(set(want) | set(got)):
        w, g = want.get(p), got.get(p)
        if w != g:
            lines.append(f"  {p!r}:\n    want {w!r}\n    got  {g!r}")
    if not lines:
        return ""
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{len(lines)} paths differ:\n" + "\n".join(lines[:limit]) + more


def allocated(path: bytes) -> int:
    return os.lstat(path).st_blocks * 512


def sparse_bound(c: Content, block: int = 4096, hole_min: int = 64 * 1024) -> int:
    """The most a restore of sparse content `c` may allocate: its data
    islands rounded out to whole blocks (holes shorter than hole_min between
    them are stored, and may be restored, as zeros), a block of slack each.
    A file whose holes come to less than hole_min is stored dense: then its
    length, rounded up."""
    runs: list[list[int]] = []  # the file system keeps data in whole blocks: so does SEEK_DATA
    for op in c.ops:
        if op[0] == "w":
            runs.append([op[1] // block * block, -(-(op[1] + op[2]) // block) * block])
        else:
            runs = [[a, min(b, -(-op[1] // block) * block)] for a, b in runs if a < op[1]]
    runs.sort()
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a - merged[-1][1] < hole_min:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    dense = -(-c.length // block) * block + block
    used, end = 0, 0  # blocks the source file has: the store keeps holes only when they add up to hole_min
    for a, b in runs:
        used += max(0, b - max(a, end))
        end = max(end, b)
    if used + hole_min > c.length:
        return dense
    return min(dense, sum(b - a + block for a, b in merged) + block)


# -------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Features:
    """What the generators may make. xattrs/holes/hardlinks are on only when
    the store keeps them (tests/test_properties.py, `GATES`)."""

    xattrs: bool = False
    holes: bool = False
    hardlinks: bool = False
    big: bool = True  # files of more than 256 chunks (two-level chunk lists)


def _clean_name(b: bytes) -> bytes:
    b = b.replace(b"/", b"_").replace(b"\0", b"_")[:MAX_NAME]
    return b if b not in (b"", b".", b"..") else b + b"x" if b else b"x"


ODD_NAMES = [
    b"-rf", b"--help", b"-", b" leading", b"trailing ", b" ", b"new\nline", b"tab\there", b"\xff\xfe",
    b"latin1-\xe9", b"\x01\x1f\x7f", b".hidden", b"...", b"a" * MAX_NAME, b"\xe9" * MAX_NAME,
    b"x" * (MAX_NAME - 1) + b"\xff", "日本語".encode(), "café".encode(), "cafe\u0301".encode(),
    b"*?[]{}$`'\"|<>&;", b"back\\slash", b".pit-000000000000.tmp",
]

names = st.one_of(
    st.binary(min_size=1, max_size=10).map(_clean_name),
    st.text(min_size=1, max_size=10).map(lambda s: _clean_name(s.encode("utf-8", "surrogatepass"))),
    st.sampled_from(ODD_NAMES),
    st.integers(1, MAX_NAME).map(lambda n: b"L" * n),
)

AVG = 1024  # the repositories' average chunk size: min 256, max 4096
EDGE_SIZES = [0, 1, 2, 255, 256, 257, 1023, 1024, 1025, 4095, 4096, 4097, 8191, 8192, 8193, 12_288, 16_385]
BIG = 300_000  # > 256 chunks of ~1 KiB: a two-level chunk list

sizes = st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 20_000))
seeds = st.integers(0, 2**31)


def contents(features: Features = Features()):
    base = st.builds(Content, st.sampled_from(["random", "random", "zeros", "text"]), sizes, seeds)
    options = [base]
    if features.big:
        options.append(st.builds(Content, st.sampled_from(["random", "text"]), st.integers(BIG, BIG + 50_000),
                                 seeds))
    if features.holes:
        options.append(sparse_contents())
    return st.one_of(*options) if len(options) > 1 else base


@st.composite
def sparse_contents(draw):
    """A sparse file: a hole of 128 KiB to 2 MiB with 0-3 islands of data
    (some closer than the 64 KiB the store keeps as holes), maybe data at
    the very end."""
    size = draw(st.integers(128 * 1024, 2 * 1024 * 1024))
    ops = []
    for _ in range(draw(st.integers(0, 3))):
        off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(20_000, size - off)))
        ops.append(("w", off, n, draw(seeds)))
    if draw(st.booleans()):
        ops.append(("w", size - 10, 10, draw(seeds)))
    return Content("sparse", size, 0, tuple(ops))


file_modes = st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o400, 0o4755, 0o2755, 0o1644, 0o777]
                             + ([0o000, 0o6711] if ROOT else []))
dir_modes = st.sampled_from([0o755, 0o700, 0o555, 0o1777, 0o2775, 0o750] + ([0o000, 0o311] if ROOT else []))
owners = st.sampled_from([(0, 0), (1, 1), (1000, 1000), (65534, 65534), (123456, 7)]) if ROOT else \
    st.just((os.geteuid(), os.getegid()))
mtimes = st.one_of(
    st.integers(BASE_MTIME - 10**17, BASE_MTIME),
    st.sampled_from([0, 1, -1, -86_400_123_456_789, 4_102_444_800_987_654_321, BASE_MTIME]),
)


def xattr_sets(namespace: bytes):
    entry = st.tuples(
        st.binary(min_size=1, max_size=20).map(lambda b: namespace + b.replace(b"\0", b"_")),
        st.binary(min_size=0, max_size=300),
    )
    return st.lists(entry, max_size=3, unique_by=lambda kv: kv[0]).map(lambda kvs: tuple(sorted(kvs)))


def link_targets(siblings: list[bytes]):
    opts = [
        st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"_")),  # dangling, any bytes
        st.sampled_from([b".", b"..", b"/", b"/etc/hostname", b"../../../../etc/passwd", b"does/not/exist",
                         b"x/" * 500 + b"end", b"\xff\xfe weird \n target", b"self"]),
    ]
    if siblings:
        opts.append(st.sampled_from(siblings))
    return st.one_of(*opts)


@st.composite
def nodes_meta(draw, kind: str, features: Features):
    uid, gid = draw(owners)
    mtime = draw(mtimes)
    if kind == "symlink":
        # user.* is not allowed on symlinks (Linux); trusted.* is, for root
        xa = draw(xattr_sets(b"trusted.")) if features.xattrs and ROOT and draw(st.booleans()) else ()
        return dict(uid=uid, gid=gid, mtime=mtime, xattrs=xa)
    xa = draw(xattr_sets(b"user.")) if features.xattrs else ()
    mode = draw(dir_modes if kind == "dir" else file_modes)
    return dict(uid=uid, gid=gid, mtime=mtime, xattrs=xa, mode=mode)


@st.composite
def trees(draw, features: Features = Features(), max_sources: int = 3, max_entries: int = 30,
          max_depth: int = 4):
    """A random source tree: 1-`max_sources` sources (mostly directories, maybe
    a lone file or symlink), nested directories, empty ones, files across
    chunk boundaries, identical files, symlinks (dangling too), modes,
    owners, times, and (when on) xattrs, sparse files and hard links."""
    pool = draw(st.lists(contents(features), min_size=1, max_size=5))  # shared contents: dedup
    tree: dict[bytes, object] = {}
    budget = [max_entries]

    def node(kind: str, siblings: list[bytes]):
        meta = draw(nodes_meta(kind, features))
        if kind == "dir":
            return Dir(**meta)
        if kind == "symlink":
            return Symlink(draw(link_targets(siblings)), **meta)
        c = draw(st.one_of(st.sampled_from(pool), contents(features)))
        return File(c, **meta)

    def fill(prefix: bytes, depth: int) -> None:
        n = draw(st.integers(0, max(0, min(6, budget[0]))))
        kids = draw(st.lists(names, min_size=n, max_size=n, unique=True))
        for name in kids:
            budget[0] -= 1
            kinds = ["file", "file", "file", "symlink"] + (["dir", "dir"] if depth < max_depth else [])
            kind = draw(st.sampled_from(kinds))
            path = prefix + b"/" + name
            tree[path] = node(kind, [k for k in kids if k != name])
            if kind == "dir":
                fill(path, depth + 1)

    srcs = draw(st.lists(names, min_size=1, max_size=max_sources, unique=True))
    for name in srcs:
        kind = draw(st.sampled_from(["dir", "dir", "dir", "dir", "file", "symlink"]))
        tree[name] = node(kind, [])
        if kind == "dir":
            fill(name, 1)

    if features.hardlinks:
        files = sorted(p for p, n in tree.items() if isinstance(n, File))
        dirs = sorted(p for p, n in tree.items() if isinstance(n, Dir))
        for group in range(draw(st.integers(0, 2)) if files and dirs else 0):
            p = draw(st.sampled_from(files))
            if tree[p].inode is not None:
                continue
            shared = replace(tree[p], inode=group + 1)
            tree[p] = shared
            for _ in range(draw(st.integers(1, 2))):
                d = draw(st.sampled_from(dirs))
                q = d + b"/" + draw(names)
                if q not in tree:
                    tree[q] = shared
    return tree


def sources_of(tree: dict) -> list[bytes]:
    return sorted(p for p in tree if b"/" not in p)


# ------------------------------------------------------- a changing source
class SourceTree:
    """A real directory kept equal to a model tree while it changes.

    Every change bumps the affected directory's mtime to a fresh value (as
    the kernel would, but deterministically) and logs the paths it touched,
    the way a replicator names changes. mtimes are unique per change, so the
    files cache's (size, mtime, ctime, inode) key always notices one."""

    def __init__(self, base: bytes, tree: dict) -> None:
        self.base = base
        self.tree = dict(tree)
        self.events: list[bytes] = []
        self._clock = BASE_MTIME + 7 * 10**15
        write_tree(base, self.tree)

    def abs(self, path: bytes) -> bytes:
        return os.path.join(self.base, path)

    def tick(self) -> int:
        self._clock += 1_000_003_001
        return self._clock

    def snapshot_tree(self, sources: list[bytes]) -> dict:
        """The model of a snapshot of these sources (a copy: nodes are immutable)."""
        return {p: n for p, n in self.tree.items() if any(under(p, s) for s in sources)}

    def _touch_dir(self, d: bytes) -> None:
        """Give directory d (a child of it changed) a fresh mtime."""
        if not d:
            return
        node = replace(self.tree[d], mtime=self.tick())
        self.tree[d] = node
        os.utime(self.abs(d), ns=(node.mtime, node.mtime))

    def _log(self, *paths: bytes) -> None:
        self.events.extend(paths)

    def put_file(self, path: bytes, content: Content, mode: int, owner=(0, 0), xattrs=()) -> None:
        """Create or rewrite (as a new inode) the file at path."""
        if path in self.tree:
            self.remove(path, log=False)
        node = File(content, mode, self.tick(), owner[0], owner[1], tuple(xattrs))
        write_content(self.abs(path), content)
        set_meta(self.abs(path), node)
        self.tree[path] = node
        self._touch_dir(parent_of(path))
        self._log(path)

    def patch_file(self, path: bytes, ops: list[tuple]) -> None:
        """Change a file in place (same inode): pwrite/truncate, then a new mtime."""
        node = self.tree[path]
        c = node.content
        fd = os.open(self.abs(path), os.O_WRONLY | os.O_NOFOLLOW)
        try:
            for op in ops:
                apply_op(fd, op)
                c = c.with_op(op)
        finally:
            os.close(fd)
        node = replace(node, content=c, mtime=self.tick())
        os.utime(self.abs(path), ns=(node.mtime, node.mtime))
        self._set(path, node)
        self._log(*self._names_of(path))

    def _names_of(self, path: bytes) -> list[bytes]:
        """path and every other name of its inode."""
        node = self.tree[path]
        if not isinstance(node, File) or node.inode is None:
            return [path]
        return sorted(p for p, n in self.tree.items() if isinstance(n, File) and n.inode == node.inode)

    def _set(self, path: bytes, node) -> None:
        """Give path (and its inode's other names) the new node."""
        for p in self._names_of(path):
            self.tree[p] = node

    def mkdir(self, path: bytes, mode: int, owner=(0, 0), xattrs=()) -> None:
        node = Dir(mode, self.tick(), owner[0], owner[1], tuple(xattrs))
        os.mkdir(self.abs(path), 0o700)
        set_meta(self.abs(path), node)
        self.tree[path] = node
        self._touch_dir(parent_of(path))
        self._log(path)

    def symlink(self, path: bytes, target: bytes, owner=(0, 0)) -> None:
        node = Symlink(target, self.tick(), owner[0], owner[1])
        os.symlink(target, self.abs(path))
        set_meta(self.abs(path), node)
        self.tree[path] = node
        self._touch_dir(parent_of(path))
        self._log(path)

    def link(self, existing: bytes, path: bytes, group: int) -> None:
        """A hard link: path becomes another name of existing's inode. The
        link count of every name changes (inotify says IN_ATTRIB for them):
        all are logged."""
        node = self.tree[existing]
        if node.inode is None:
            node = replace(node, inode=group)
            self.tree[existing] = node
        os.link(self.abs(existing), self.abs(path))
        self.tree[path] = node
        self._touch_dir(parent_of(path))
        self._log(*self._names_of(path))

    def remove(self, path: bytes, log: bool = True) -> None:
        """Remove path and everything below it. Names elsewhere of an inode
        that lost a name here have a new link count: logged too."""
        rmtree(self.abs(path))
        gone = [p for p in self.tree if under(p, path)]
        groups = {self.tree[p].inode for p in gone if isinstance(self.tree[p], File)} - {None}
        for p in gone:
            del self.tree[p]
        others = sorted(p for p, n in self.tree.items() if isinstance(n, File) and n.inode in groups)
        self._log(*others)
        if log:
            self._touch_dir(parent_of(path))
            self._log(path)

    def rename(self, src: bytes, dst: bytes) -> None:
        """Move src (and everything below it) to dst, which must not exist."""
        os.rename(self.abs(src), self.abs(dst))
        moved = {dst + p[len(src):]: n for p, n in self.tree.items() if under(p, src)}
        for p in [p for p in self.tree if under(p, src)]:
            del self.tree[p]
        self.tree.update(moved)
        self._touch_dir(parent_of(src))
        if parent_of(dst) != parent_of(src):
            self._touch_dir(parent_of(dst))
        self._log(src, dst)

    def chmod(self, path: bytes, mode: int) -> None:
        node = replace(self.tree[path], mode=mode)
        os.chmod(self.abs(path), mode)
        self._set(path, node)
        self._log(*self._names_of(path))

    def set_xattr(self, path: bytes, name: bytes, value: bytes | None) -> None:
        node = self.tree[path]
        xa = dict(node.xattrs)
        if value is None:
            xa.pop(name, None)
            try:
                os.removexattr(self.abs(path), name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        else:
            xa[name] = value
            os.setxattr(self.abs(path), name, value, follow_symlinks=False)
        node = replace(node, xattrs=tuple(sorted(xa.items())))
        self._set(path, node)
        self._log(*self._names_of(path))

    def check(self, aspects: Aspects) -> None:
        """The directory still is the model (a bug here is in this helper, not the store)."""
        want, got = expect(self.tree, aspects), observe(self.base, aspects)
        assert want == got, "the source tree drifted from its model:\n" + diff(want, got)


# ------------------------------------------------ an oracle for repair
def _frames_of(data: bytes) -> list[tuple[int, int, int, int, int, bytes]]:
    """(kind, flags, offset, stored, raw, id) of every intact frame of one
    pack, read as docs/format.md (4.5-4.7, 11) says, without store/: the
    footer's rows when it is intact (each frame's CRC checked), else a walk
    that resyncs on the next magic."""
    import struct
    import zlib

    import msgpack

    frame = struct.Struct("<4sBBHII32s")

    def intact(off: int, stored: int) -> bool:
        end = off + 48 + stored
        return end + 4 <= len(data) and data[off:off + 4] == b"PITF" and \
            zlib.crc32(data[off:end]) == struct.unpack_from("<I", data, end)[0]

    size = len(data)
    if size >= 32:
        flen, fcrc, magic = struct.unpack_from("<II8s", data, size - 16)
        body = data[size - 16 - flen:size - 16] if flen <= size - 32 else b""
        if magic == b"PITEND01" and flen <= size - 32 and zlib.crc32(body) == fcrc:
            rows = [tuple(r) for r in msgpack.unpackb(body)]
            return [r for r in rows if intact(r[2], r[3])]
    out, pos = [], 16
    while pos + 52 <= size:
        magic, kind, flags, _, stored, raw, bid = frame.unpack_from(data, pos)
        if magic == b"PITF" and pos + 52 + stored <= size and intact(pos, stored):
            out.append((kind, flags, pos, stored, raw, bid))
            pos += 52 + stored
        else:
            pos = data.find(b"PITF", pos + 1)
            if pos < 0:
                break
    return out


def pack_records(repo_path: str) -> tuple[set, set, dict]:
    """What a repair must find in a repository's packs: the ids of snapshot
    records with an intact frame, the ids of tombstones, and the newest
    setting per (what, key) as (t, value)."""
    import msgpack
    import zstandard

    snaps, tombs, settings = set(), set(), {}
    for dp, _, fns in os.walk(os.path.join(repo_path, "packs")):
        for fn in sorted(fns):
            if not fn.endswith(".pack"):
                continue
            with open(os.path.join(dp, fn), "rb") as f:
                data = f.read()
            for kind, flags, off, stored, raw, bid in _frames_of(data):
                if kind == 4:
                    snaps.add(bytes(bid))
                elif kind == 5:
                    tombs.add(bytes(bid))
                elif kind == 6:
                    payload = data[off + 48:off + 48 + stored]
                    if flags & 1:
                        payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw)
                    rec = msgpack.unpackb(payload)
                    key = (rec["what"], bytes(rec["key"]))
                    if key not in settings or settings[key][0] < rec["t"]:
                        settings[key] = (rec["t"], rec["value"])
    return snaps, tombs, settings
