"""Written byte ranges of big files from reflink clones and FIEMAP (XFS, btrfs).

At each snapshot we keep a reflink clone of each big file: it shares every
extent with the file at that moment, and copy-on-write moves any extent
written later to a new physical place. Comparing the extent maps (FIEMAP) of
the previous clone and a fresh one tells, without reading a byte, which
ranges were written since: a range mapped at the same physical address at
the same offset in both is unchanged; anything else (moved, new, hole vs
data, unwritten vs written, a map entry we cannot reason about) is written.
No daemon: nothing is missed while the agent is down. See
/work/shared/notes/change-capture.md for what was measured on this kernel.

Why a fresh clone *before* the snapshot (and not a clone after it): the
snapshot reads the fresh clone, a frozen copy of one moment, so what the
snapshot holds is exactly the clone's content, and the clone, renamed over
the old one once the snapshot committed, is a true baseline for the next
point. A clone taken after the commit could hold writes the snapshot never
saw, which the next comparison would then miss.

Where reflink is not supported (ext4, tmpfs: EOPNOTSUPP, EXDEV across file
systems, EINVAL) the file is read whole and the stats say why.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
from dataclasses import dataclass, field

import blake3

from .changeset import FileRanges, merge_ranges
from .errors import CaptureError

FICLONE = 0x40049409           # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B     # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1         # write back dirty data (delalloc) before mapping
FIEMAP_EXTENT_LAST = 0x1
# extents whose physical address says nothing reliable about their bytes
UNTRUSTED = 0x2 | 0x4 | 0x8 | 0x80 | 0x200 | 0x400  # UNKNOWN DELALLOC ENCODED DATA_ENCRYPTED DATA_INLINE DATA_TAIL
FIEMAP_EXTENT_UNWRITTEN = 0x800
_HDR = struct.Struct("=QQIIII")          # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXT = struct.Struct("=QQQQQIIII")       # logical, physical, length, reserved64[2], flags, reserved[3]
BATCH = 512                               # extents asked for per ioctl
UNSUPPORTED = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS, errno.EPERM)
DEFAULT_MIN_SIZE = 64 * 1024 * 1024
STATE = "state.json"


def default_clone_dir(first_source: str, set_name: str) -> str:
    """`.pit-clones/SET` in the first source directory (or beside a file source):
    on the sources' file system, as a reflink needs."""
    src = os.path.abspath(first_source)
    base = src if os.path.isdir(src) and not os.path.islink(src) else os.path.dirname(src)
    return os.path.join(base, ".pit-clones", set_name)


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int


def fiemap(fd: int) -> list[Extent]:
    """Every extent of an open file, in order, however many ioctl calls it takes."""
    out: list[Extent] = []
    start = 0
    buf = bytearray(_HDR.size + BATCH * _EXT.size)
    while True:
        _HDR.pack_into(buf, 0, start, 0xFFFFFFFFFFFFFFFF - start, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _HDR.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        last = False
        for i in range(mapped):
            lo, ph, ln, _r1, _r2, fl, *_ = _EXT.unpack_from(buf, _HDR.size + i * _EXT.size)
            out.append(Extent(lo, ph, ln, fl))
            last = bool(fl & FIEMAP_EXTENT_LAST)
        if last:
            return out
        start = out[-1].logical + out[-1].length


def changed_ranges(old: list[Extent], new: list[Extent], size: int) -> list[tuple[int, int]]:
    """Byte ranges of [0, size) where `new` does not map the same bytes as
    `old`: same offset, same physical address, both plain written data; or
    both holes. False positives are possible (a rewritten extent with equal
    bytes), misses are not."""
    cuts = {0, size}
    for e in (*old, *new):
        for x in (e.logical, e.logical + e.length):
            if 0 < x < size:
                cuts.add(x)
    points = sorted(cuts)
    oi = ni = 0
    out: list[tuple[int, int]] = []

    def at(exts: list[Extent], i: int, x: int) -> tuple[int, Extent | None]:
        while i < len(exts) and exts[i].logical + exts[i].length <= x:
            i += 1
        return i, (exts[i] if i < len(exts) and exts[i].logical <= x else None)

    for a, b in zip(points, points[1:]):
        oi, eo = at(old, oi, a)
        ni, en = at(new, ni, a)
        if eo is None and en is None:
            continue  # a hole in both
        same = (eo is not None and en is not None and not (eo.flags | en.flags) & UNTRUSTED
                and (eo.flags & FIEMAP_EXTENT_UNWRITTEN) == (en.flags & FIEMAP_EXTENT_UNWRITTEN)
                and eo.physical + (a - eo.logical) == en.physical + (a - en.logical))
        if not same:
            out.append((a, b - a))
    return merge_ranges(out)


def clone_file(src_fd: int, dst: str) -> None:
    """A reflink clone of the open file at `dst` (created, mode 0600). OSError
    with an errno in UNSUPPORTED where the file system cannot."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.ioctl(fd, FICLONE, src_fd)
    except OSError:
        os.close(fd)
        os.unlink(dst)
        raise
    os.close(fd)


@dataclass
class Baseline:
    clone: str       # file name in the clone directory
    size: int
    mtime_ns: int


@dataclass
class ReflinkCapture:
    """Per snapshot: clones big files as the ingester meets them and gives
    their written ranges; `commit()` after the snapshot is stored makes the
    fresh clones the next baselines, `abort()` drops them."""

    clone_dir: str               # per set, on the sources' file system
    min_size: int = DEFAULT_MIN_SIZE
    mode: dict = field(default_factory=dict)  # for the snapshot's stats
    skip_paths: frozenset[bytes] = frozenset()
    _state: dict[str, Baseline] = field(default_factory=dict)
    _fresh: dict[str, tuple[str, Baseline]] = field(default_factory=dict)  # path -> (tmp clone, its baseline)
    _unsupported: dict[int, str] = field(default_factory=dict)  # st_dev -> why reflink fails there
    given: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # path -> ranges handed out (tests, bench)
    _lock: int | None = None  # fd holding the clone directory's flock until commit or abort

    @classmethod
    def open(cls, clone_dir: str, min_size: int = DEFAULT_MIN_SIZE) -> "ReflinkCapture":
        try:
            os.makedirs(clone_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CaptureError(f"cannot create the clone directory {clone_dir}: {exc.strerror}") from None
        cap = cls(os.path.abspath(clone_dir), min_size)
        # one capture of a set at a time: another would delete this one's fresh clones as leftovers
        cap._lock = os.open(os.path.join(cap.clone_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(cap._lock, fcntl.LOCK_EX)
        cap.skip_paths = frozenset({os.fsencode(cap.clone_dir), os.fsencode(os.path.dirname(cap.clone_dir))}
                                   if os.path.basename(os.path.dirname(cap.clone_dir)) == ".pit-clones"
                                   else {os.fsencode(cap.clone_dir)})
        try:
            with open(os.path.join(cap.clone_dir, STATE)) as f:
                raw = json.load(f)
            cap._state = {p: Baseline(**b) for p, b in raw.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:  # a damaged state costs whole reads, never wrong ranges
            cap._state = {}
            cap.mode["state_error"] = str(exc)
        for name in os.listdir(cap.clone_dir):  # tmp clones of a run that died
            if name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(cap.clone_dir, name))
                except OSError:
                    pass
        cap.mode.update({"mechanism": "reflink", "min_size": min_size, "files": {}})
        return cap

    def _note(self, path: str, how: str) -> None:
        files = self.mode["files"]
        if len(files) < 100:
            files[path] = how

    def for_file(self, path: bytes, st: os.stat_result) -> FileRanges | None:
        """The written ranges of a file the snapshot is about to read, or a
        plan to read it whole (from a fresh clone where possible); None for a
        file below the size threshold (read as usual)."""
        if not stat.S_ISREG(st.st_mode) or st.st_size < self.min_size:
            return None
        shown = os.fsdecode(path)
        why = self._unsupported.get(st.st_dev)
        if why is not None:
            self._note(shown, f"whole: {why}")
            return FileRanges(None, why)
        name = blake3.blake3(path).hexdigest()[:32]
        tmp = os.path.join(self.clone_dir, name + ".tmp")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            return FileRanges(None, f"cannot open: {exc.strerror}")
        try:
            before = os.fstat(fd)
            try:
                clone_file(fd, tmp)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED:
                    raise
                why = f"reflink unsupported here ({errno.errorcode.get(exc.errno, exc.errno)})"
                self._unsupported[st.st_dev] = why
                self._note(shown, f"whole: {why}")
                return FileRanges(None, why)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        stamp = lambda s: (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)  # noqa: E731
        if not (stamp(before) == stamp(after) == stamp(st)):
            os.unlink(tmp)
            why = "written to while cloned"
            self._note(shown, f"whole: {why}")
            return FileRanges(None, why)
        fresh = Baseline(name, st.st_size, st.st_mtime_ns)
        self._fresh[shown] = (tmp, fresh)
        base = self._state.get(shown)
        old_path = os.path.join(self.clone_dir, base.clone) if base is not None else None
        if base is None or not os.path.exists(old_path):
            why = "no baseline clone yet"
            self._note(shown, f"whole: {why}")
            return FileRanges(None, why, read_path=os.fsencode(tmp))
        try:
            ranges = self._compare(old_path, tmp, st.st_size)
        except OSError as exc:
            why = f"FIEMAP failed ({exc.strerror})"
            self._note(shown, f"whole: {why}")
            return FileRanges(None, why, read_path=os.fsencode(tmp))
        self._note(shown, f"ranges: {len(ranges)} ranges, {sum(n for _, n in ranges)} bytes")
        self.given[shown] = ranges
        return FileRanges(ranges, baseline=(base.size, base.mtime_ns), read_path=os.fsencode(tmp))

    @staticmethod
    def _compare(old_path: str, new_path: str, size: int) -> list[tuple[int, int]]:
        fds = [os.open(p, os.O_RDONLY | os.O_NOFOLLOW) for p in (old_path, new_path)]
        try:
            old, new = (fiemap(fd) for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)
        return changed_ranges(old, new, size)

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def commit(self) -> None:
        """The snapshot is stored: the fresh clones become the baselines."""
        for path, (tmp, base) in self._fresh.items():
            os.replace(tmp, os.path.join(self.clone_dir, base.clone))
            self._state[path] = base
        self._fresh.clear()
        for path in [p for p in self._state if not os.path.lexists(p)]:  # deleted files: their clones go
            try:
                os.unlink(os.path.join(self.clone_dir, self._state.pop(path).clone))
            except OSError:
                pass
        tmp = os.path.join(self.clone_dir, STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({p: vars(b) for p, b in self._state.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.clone_dir, STATE))
        self._unlock()

    def abort(self) -> None:
        """No snapshot: the old baselines stay, the fresh clones go."""
        for tmp, _ in self._fresh.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._fresh.clear()
        self._unlock()
