"""The pack file: bytes on disk.

A pack is append-only: a 16-byte header, then frames, then (once sealed) a
footer listing every frame. Each frame carries its blob id, kind, lengths
and a CRC32, so an unsealed or damaged pack can still be walked frame by
frame, and the whole index can be rebuilt from packs alone. See
docs/format.md for every byte.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import msgpack

from .errors import IntegrityError

PACK_MAGIC = b"PITPACK1"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sII")  # magic, version, reserved
FRAME_MAGIC = b"PITF"
FRAME_HEADER = struct.Struct("<4sBBHII32s")  # magic, kind, flags, reserved, stored_len, raw_len, id
CRC = struct.Struct("<I")
TRAILER = struct.Struct("<II8s")  # footer length, footer crc32, magic
TRAILER_MAGIC = b"PITEND01"
FRAME_OVERHEAD = FRAME_HEADER.size + CRC.size

# Blob kinds
CHUNK = 1
TREE = 2
FILELIST = 3
SNAPSHOT = 4
TOMBSTONE = 5  # a dropped snapshot: repair must not bring it back
SETTING = 6  # a pin or a set's policy, timestamped: repair keeps the latest per key
KIND_NAMES = {CHUNK: "chunk", TREE: "tree", FILELIST: "filelist", SNAPSHOT: "snapshot", TOMBSTONE: "tombstone",
              SETTING: "setting"}

# Frame flags
ZSTD = 1

MAX_BLOB = (1 << 32) - 1  # lengths are u32: one blob (a filelist of a ~1.9 TB file) tops out here


def pack_name(number: int) -> str:
    return f"{number:016x}.pack"


def pack_number(name: str) -> int:
    return int(name.split(".")[0], 16)


@dataclass(frozen=True)
class FrameInfo:
    kind: int
    flags: int
    offset: int  # of the frame header within the pack
    stored_len: int
    raw_len: int
    id: bytes

    @property
    def payload_offset(self) -> int:
        return self.offset + FRAME_HEADER.size

    @property
    def end(self) -> int:
        return self.offset + FRAME_OVERHEAD + self.stored_len


def encode_frame(kind: int, flags: int, blob_id: bytes, payload: bytes, raw_len: int) -> bytes:
    header = FRAME_HEADER.pack(FRAME_MAGIC, kind, flags, 0, len(payload), raw_len, blob_id)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return b"".join((header, payload, CRC.pack(crc)))


def decode_frame(buf: bytes, offset: int = 0) -> tuple[FrameInfo, bytes]:
    """Parse and check one whole frame held in `buf` (the frame starts at 0)."""
    if len(buf) < FRAME_OVERHEAD:
        raise IntegrityError("frame shorter than its header")
    magic, kind, flags, _r, stored, raw, bid = FRAME_HEADER.unpack_from(buf, 0)
    if magic != FRAME_MAGIC:
        raise IntegrityError(f"bad frame magic at pack offset {offset}")
    if len(buf) != FRAME_OVERHEAD + stored:
        raise IntegrityError(f"frame at pack offset {offset} has a bad length")
    payload = buf[FRAME_HEADER.size:FRAME_HEADER.size + stored]
    (crc,) = CRC.unpack_from(buf, FRAME_HEADER.size + stored)
    if zlib.crc32(payload, zlib.crc32(buf[:FRAME_HEADER.size])) != crc:
        raise IntegrityError(f"frame checksum mismatch at pack offset {offset}")
    return FrameInfo(kind, flags, offset, stored, raw, bid), payload


def encode_footer(frames: list[FrameInfo]) -> bytes:
    body = msgpack.packb([[f.kind, f.flags, f.offset, f.stored_len, f.raw_len, f.id] for f in frames])
    return body + TRAILER.pack(len(body), zlib.crc32(body), TRAILER_MAGIC)


Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes


def read_footer(read: Reader, size: int) -> list[FrameInfo] | None:
    """The frame list of a sealed pack, or None when there is no valid footer."""
    rows = read_footer_rows(read, size)
    return None if rows is None else [FrameInfo(k, fl, o, s, r, i) for k, fl, o, s, r, i in rows]


def read_footer_rows(read: Reader, size: int) -> list[tuple[int, int, int, int, int, bytes]] | None:
    """read_footer as plain (kind, flags, offset, stored, raw, id) tuples, for
    checks that look at every frame of every pack."""
    if size < PACK_HEADER.size + TRAILER.size:
        return None
    flen, fcrc, magic = TRAILER.unpack(read(size - TRAILER.size, TRAILER.size))
    if magic != TRAILER_MAGIC or flen > size - PACK_HEADER.size - TRAILER.size:
        return None
    body = read(size - TRAILER.size - flen, flen)
    if zlib.crc32(body) != fcrc:
        return None
    try:
        rows = msgpack.unpackb(body, use_list=False)
        for k, fl, o, s, r, i in rows:
            if not (type(k) is type(fl) is type(o) is type(s) is type(r) is int and type(i) is bytes):
                return None
        return list(rows)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


def check_header(read: Reader, size: int) -> None:
    if size < PACK_HEADER.size:
        raise IntegrityError("pack shorter than its header")
    magic, version, _ = PACK_HEADER.unpack(read(0, PACK_HEADER.size))
    if magic != PACK_MAGIC:
        raise IntegrityError("not a pitstore pack (bad magic)")
    if version != PACK_VERSION:
        raise IntegrityError(f"pack format version {version} is not supported")


def walk_frames(read: Reader, size: int, resync: bool = True) -> Iterator[FrameInfo | IntegrityError]:
    """Walk a pack frame by frame, checking each CRC.

    Yields FrameInfo for good frames and an IntegrityError for each damaged
    stretch; with `resync` it searches forward for the next frame magic so one
    flipped byte costs one frame, not the rest of the pack (a sealed pack's
    footer, when intact, is the faster path; see `read_footer`).
    """
    pos = PACK_HEADER.size
    end = size
    footer = read_footer(read, size)
    if footer is not None:
        end = size - TRAILER.size - TRAILER.unpack(read(size - TRAILER.size, TRAILER.size))[0]
    while pos + FRAME_OVERHEAD <= end:
        head = read(pos, FRAME_HEADER.size)
        magic, kind, flags, _r, stored, raw, bid = FRAME_HEADER.unpack(head)
        bad: IntegrityError | None = None
        if magic != FRAME_MAGIC or stored > MAX_BLOB or pos + FRAME_OVERHEAD + stored > end:
            bad = IntegrityError(f"damaged frame header at offset {pos}")
        else:
            try:
                info, _ = decode_frame(read(pos, FRAME_OVERHEAD + stored), pos)
                yield info
                pos = info.end
                continue
            except IntegrityError as exc:
                bad = exc
        yield bad
        if not resync:
            return
        nxt = _find_magic(read, pos + 1, end)
        if nxt is None:
            return
        pos = nxt


def _find_magic(read: Reader, start: int, end: int) -> int | None:
    step = 1 << 20
    pos = start
    while pos < end:
        buf = read(pos, min(step + 3, end - pos))
        i = buf.find(FRAME_MAGIC)
        if i >= 0:
            return pos + i
        pos += step
    return None


class PackWriter:
    """Appends frames to one open pack and seals it with a footer.

    Frames are buffered and written in ~1 MiB pieces: one write per 16 KiB
    chunk cost more in system calls than hashing it. `flush` before reading
    this pack back; `sync` flushes too.
    """

    BUFFER = 1 << 20

    def __init__(self, name: str, handle, frames: list[FrameInfo]) -> None:
        self.name = name
        self.handle = handle
        self.frames = frames
        self._buf: list[bytes] = []
        self._buffered = 0

    @classmethod
    def create(cls, backend, name: str) -> "PackWriter":
        h = backend.create(name)
        h.write(PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))
        return cls(name, h, [])

    @property
    def size(self) -> int:
        return self.handle.tell() + self._buffered

    def append(self, kind: int, flags: int, blob_id: bytes, payload: bytes, raw_len: int) -> FrameInfo:
        return self.append_encoded(encode_frame(kind, flags, blob_id, payload, raw_len),
                                   kind, flags, blob_id, len(payload), raw_len)

    def append_encoded(self, frame: bytes, kind: int, flags: int, blob_id: bytes, stored_len: int,
                       raw_len: int) -> FrameInfo:
        """Append a frame already encoded by `encode_frame` (e.g. on a worker thread)."""
        off = self.size
        self._buf.append(frame)
        self._buffered += len(frame)
        if self._buffered >= self.BUFFER:
            self.flush()
        info = FrameInfo(kind, flags, off, stored_len, raw_len, blob_id)
        self.frames.append(info)
        return info

    def append_copied(self, src_fd: int, src_off: int, frames: list[tuple[int, int, bytes, int, int]]
                      ) -> list[FrameInfo]:
        """Append frames already encoded into another file (a snapshot
        worker's spool), back to back from `src_off` on, copied in the
        kernel. `frames`: (kind, flags, id as stored, stored length, raw
        length) of each, in file order."""
        self.flush()
        total = sum(FRAME_OVERHEAD + f[3] for f in frames)
        off = self.handle.copy_from(src_fd, src_off, total)
        out = []
        for kind, flags, blob_id, stored_len, raw_len in frames:
            info = FrameInfo(kind, flags, off, stored_len, raw_len, blob_id)
            out.append(info)
            off += FRAME_OVERHEAD + stored_len
        self.frames += out
        return out

    def flush(self) -> None:
        if self._buf:
            parts = self._buf
            self._buf, self._buffered = [], 0
            self.handle.write_parts(parts)

    def sync(self) -> None:
        self.flush()
        self.handle.sync()

    def seal(self, durable_later: Callable[[object], None] | None = None) -> None:
        """Write the footer and make the pack durable where it will live (an object store: uploaded
        and checked), or hand the handle to `durable_later`, which must have made it durable before
        any index commit names it (Writer: an fsync on a thread of its own, awaited at commit)."""
        self.flush()
        self.handle.write(encode_footer(self.frames))
        if durable_later is None:
            self.handle.seal()
        else:
            durable_later(self.handle)

    def close(self) -> None:
        self._buf, self._buffered = [], 0
        self.handle.close()
