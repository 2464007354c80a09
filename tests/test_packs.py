"""Pack framing: encode/decode round trip, every flipped byte detected, walk
resyncs after damage, footers list every frame, real pack files on disk."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import packs as P
from store.backend import LocalBackend
from store.errors import IntegrityError

ids = st.binary(min_size=32, max_size=32)
kinds = st.sampled_from([P.CHUNK, P.TREE, P.FILELIST, P.SNAPSHOT, P.TOMBSTONE, P.SETTING])
payloads = st.binary(min_size=0, max_size=3000)


@st.composite
def frames(draw):
    return (draw(kinds), draw(st.sampled_from([0, P.ZSTD])), draw(ids), draw(payloads),
            draw(st.integers(0, 2**32 - 1)))


def build_pack(specs, sealed: bool) -> tuple[bytes, list[P.FrameInfo]]:
    buf = bytearray(P.PACK_HEADER.pack(P.PACK_MAGIC, P.PACK_VERSION, 0))
    infos = []
    for kind, flags, bid, payload, raw in specs:
        off = len(buf)
        buf += P.encode_frame(kind, flags, bid, payload, raw)
        infos.append(P.FrameInfo(kind, flags, off, len(payload), raw, bid))
    if sealed:
        buf += P.encode_footer(infos)
    return bytes(buf), infos


def reader_of(buf: bytes):
    def read(off: int, n: int) -> bytes:
        return buf[off:off + n]
    return read


@settings(max_examples=200)
@given(f=frames(), at=st.integers(0, 10**6))
def test_frame_round_trip(f, at):
    kind, flags, bid, payload, raw = f
    frame = P.encode_frame(kind, flags, bid, payload, raw)
    assert len(frame) == P.FRAME_OVERHEAD + len(payload)
    info, got = P.decode_frame(frame, at)
    assert bytes(got) == payload
    assert info == P.FrameInfo(kind, flags, at, len(payload), raw, bid)
    assert info.end == at + len(frame)


@settings(max_examples=300)
@given(f=frames(), pos=st.integers(min_value=0), xor=st.integers(1, 255))
def test_every_flipped_byte_is_detected(f, pos, xor):
    kind, flags, bid, payload, raw = f
    frame = bytearray(P.encode_frame(kind, flags, bid, payload, raw))
    frame[pos % len(frame)] ^= xor
    with pytest.raises(IntegrityError):
        P.decode_frame(bytes(frame))


@settings(max_examples=100)
@given(f=frames(), cut=st.integers(min_value=1))
def test_truncated_or_extended_frame_rejected(f, cut):
    kind, flags, bid, payload, raw = f
    frame = P.encode_frame(kind, flags, bid, payload, raw)
    with pytest.raises(IntegrityError):
        P.decode_frame(frame[:len(frame) - 1 - cut % len(frame)])
    with pytest.raises(IntegrityError):
        P.decode_frame(frame + b"\0")


@settings(max_examples=150)
@given(specs=st.lists(frames(), min_size=1, max_size=8), sealed=st.booleans())
def test_walk_and_footer_list_every_frame(specs, sealed):
    buf, infos = build_pack(specs, sealed)
    read = reader_of(buf)
    walked = list(P.walk_frames(read, len(buf)))
    assert walked == infos
    footer = P.read_footer(read, len(buf))
    assert footer == (infos if sealed else None)
    P.check_header(read, len(buf))


@settings(max_examples=300)
@given(specs=st.lists(frames(), min_size=1, max_size=8), sealed=st.booleans(),
       which=st.integers(min_value=0), pos=st.integers(min_value=0), xor=st.integers(1, 255))
def test_walk_resyncs_after_a_flipped_byte(specs, sealed, which, pos, xor):
    """One flipped byte inside frame k costs frame k only: every other frame
    is still found, and the damage is reported."""
    buf, infos = build_pack(specs, sealed)
    k = which % len(infos)
    victim = infos[k]
    damaged = bytearray(buf)
    damaged[victim.offset + pos % (victim.end - victim.offset)] ^= xor
    walked = list(P.walk_frames(reader_of(bytes(damaged)), len(damaged)))
    good = [f for f in walked if isinstance(f, P.FrameInfo)]
    bad = [f for f in walked if isinstance(f, IntegrityError)]
    assert bad, "the damaged frame was not reported"
    assert victim not in good
    assert good == infos[:k] + infos[k + 1:]


@settings(max_examples=100)
@given(specs=st.lists(frames(), min_size=1, max_size=6), pos=st.integers(min_value=0), xor=st.integers(1, 255))
def test_damaged_footer_is_ignored_not_trusted(specs, pos, xor):
    buf, infos = build_pack(specs, True)
    start = infos[-1].end
    damaged = bytearray(buf)
    damaged[start + pos % (len(buf) - start)] ^= xor
    read = reader_of(bytes(damaged))
    assert P.read_footer(read, len(damaged)) is None
    good = [f for f in P.walk_frames(read, len(damaged)) if isinstance(f, P.FrameInfo)]
    assert good == infos


def test_walk_without_resync_stops_at_damage():
    specs = [(P.CHUNK, 0, bytes([i]) * 32, os.urandom(500), 500) for i in range(5)]
    buf, infos = build_pack(specs, False)
    damaged = bytearray(buf)
    damaged[infos[2].payload_offset + 10] ^= 0xFF
    walked = list(P.walk_frames(reader_of(bytes(damaged)), len(damaged), resync=False))
    assert walked[:2] == infos[:2]
    assert isinstance(walked[2], IntegrityError)
    assert len(walked) == 3


def test_truncated_unsealed_pack_keeps_whole_frames():
    """A crash mid-append leaves a partial last frame: the walk keeps the whole ones."""
    specs = [(P.CHUNK, 0, bytes([i]) * 32, os.urandom(1000), 1000) for i in range(4)]
    buf, infos = build_pack(specs, False)
    for cut in (infos[3].offset + 1, infos[3].offset + 40, infos[3].end - 1):
        walked = list(P.walk_frames(reader_of(buf[:cut]), cut))
        assert [f for f in walked if isinstance(f, P.FrameInfo)] == infos[:3]


def test_check_header_rejects_foreign_files():
    good = P.PACK_HEADER.pack(P.PACK_MAGIC, P.PACK_VERSION, 0)
    P.check_header(reader_of(good), len(good))
    for bad in (b"", b"PITPACK", P.PACK_HEADER.pack(b"NOTAPACK", 1, 0), P.PACK_HEADER.pack(P.PACK_MAGIC, 2, 0)):
        with pytest.raises(IntegrityError):
            P.check_header(reader_of(bad), len(bad))


def test_pack_names_round_trip():
    for n in (1, 255, 2**40 + 7):
        assert P.pack_number(P.pack_name(n)) == n
        assert P.pack_name(n).endswith(".pack") and len(P.pack_name(n)) == 21


def test_packwriter_on_local_backend(tmp_path):
    """Real files: frames appended through the buffer, sealed, read back by footer and walk."""
    be = LocalBackend(str(tmp_path / "packs"))
    name = P.pack_name(0x1234)
    w = P.PackWriter.create(be, name)
    written = []
    for i in range(300):  # ~3 MiB: crosses the 1 MiB write buffer several times
        payload = os.urandom(10_000 + i)
        bid = i.to_bytes(32, "big")
        written.append((w.append(P.CHUNK, 0, bid, payload, len(payload)), payload))
    w.seal()
    w.close()
    assert os.path.exists(tmp_path / "packs" / "34" / name)
    assert list(be.list()) == [name]
    size = be.size(name)

    def read(off, n):
        return be.read(name, off, n)

    P.check_header(read, size)
    assert P.read_footer(read, size) == [f for f, _ in written]
    assert list(P.walk_frames(read, size)) == [f for f, _ in written]
    for info, payload in written[::37]:
        _, got = P.decode_frame(be.read(name, info.offset, info.end - info.offset), info.offset)
        assert got == payload
    be.delete(name)
    assert list(be.list()) == []
    be.close()
