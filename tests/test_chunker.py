"""FastCDC chunking: streaming cuts equal whole-buffer cuts, size bounds, determinism."""
from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rand_bytes
from store.chunker import ChunkerParams, chunk_bytes, chunk_into, chunk_stream
from store.errors import InvalidArgument

SMALL = ChunkerParams.for_average(1024)  # min 256, avg 1024, max 4096; a stream block is >= 8 KiB


class ShortReads(io.RawIOBase):
    """A stream that hands out data in random, often short, pieces (like a pipe)."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data = data
        self.pos = 0
        self.rnd = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.pos >= len(self.data):
            return b""
        k = self.rnd.randint(1, max(1, n if n > 0 else len(self.data)))
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out

    def readinto(self, b) -> int:
        out = self.read(len(b))
        b[:len(out)] = out
        return len(out)


def cuts(chunks) -> list[int]:
    out, pos = [], 0
    for c in chunks:
        pos += len(c)
        out.append(pos)
    return out


def mixed_data(n: int, seed: int) -> bytes:
    """Random bytes with runs of zeros and of repeated text: every branch of the cut search."""
    rnd = random.Random(seed)
    parts, size = [], 0
    while size < n:
        kind = rnd.random()
        k = rnd.randint(1, 20_000)
        if kind < 0.6:
            parts.append(rand_bytes(k, rnd.getrandbits(32)))
        elif kind < 0.8:
            parts.append(b"\0" * k)
        else:
            parts.append((b"lorem ipsum dolor %d " % rnd.getrandbits(8)) * (k // 20 + 1))
        size += len(parts[-1])
    return b"".join(parts)[:n]


def test_params_for_average_and_validation():
    p = ChunkerParams.for_average(16384)
    assert (p.min_size, p.avg_size, p.max_size) == (4096, 16384, 65536)
    assert ChunkerParams.from_dict(p.to_dict()) == p
    for bad in (1000, 512, 3000, 16 * 1024 * 1024):
        with pytest.raises(InvalidArgument):
            ChunkerParams.for_average(bad)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block", [1, 8192, 8193, 10_007, 65_536])
def test_stream_cuts_equal_whole_buffer(seed, block):
    data = mixed_data(300_000 + seed * 7_919, seed)
    whole = cuts(chunk_bytes(data, SMALL))
    streamed = list(chunk_stream(io.BytesIO(data), SMALL, block=block))
    assert cuts(streamed) == whole
    assert b"".join(bytes(c) for c in streamed) == data


@pytest.mark.parametrize("size_hint", [None, 0, 1, 5_000, 299_999, 300_000, 10**9])
def test_stream_cuts_independent_of_size_hint(size_hint):
    data = mixed_data(300_000, 99)
    streamed = list(chunk_stream(io.BytesIO(data), SMALL, block=8192, size_hint=size_hint))
    assert cuts(streamed) == cuts(chunk_bytes(data, SMALL))
    assert b"".join(bytes(c) for c in streamed) == data


@pytest.mark.parametrize("seed", range(4))
def test_stream_with_short_reads(seed):
    data = mixed_data(200_000, 1000 + seed)
    streamed = list(chunk_stream(ShortReads(data, seed), SMALL, block=8192))
    assert cuts(streamed) == cuts(chunk_bytes(data, SMALL))
    assert b"".join(bytes(c) for c in streamed) == data


def copied(chunks) -> list[bytes]:
    """chunk_into's views are overwritten by the next block: copy each as it comes."""
    return [bytes(c) for c in chunks]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [8192, 8193, 10_007, 65_536])
@pytest.mark.parametrize("size_hint", [None, 0, 5_000, 10**9])
def test_into_a_reused_buffer_cuts_equal_whole_buffer(seed, size, size_hint):
    data = mixed_data(250_000 + seed * 7_919, 50 + seed)
    src = ShortReads(data, seed) if seed % 2 else io.BytesIO(data)
    got = copied(chunk_into(src, SMALL, bytearray(size), size_hint))
    assert cuts(got) == cuts(chunk_bytes(data, SMALL))
    assert b"".join(got) == data


def test_into_reuses_its_buffer_and_refuses_a_small_one():
    data = mixed_data(100_000, 5)
    buf = bytearray(8192)
    views = list(chunk_into(io.BytesIO(data), SMALL, buf))
    assert all(v.obj is buf for v in views)  # no block of its own: every chunk is read into buf
    assert b"".join(bytes(v) for v in views) != data  # so views kept past the next chunk are overwritten
    assert [bytes(c) for c in chunk_into(io.BytesIO(b"x" * 300), SMALL, buf)] == [b"x" * 300]
    assert list(chunk_into(io.BytesIO(b""), SMALL, buf)) == []
    with pytest.raises(InvalidArgument):
        list(chunk_into(io.BytesIO(data), SMALL, bytearray(2 * SMALL.max_size - 1)))


def test_views_stay_valid_after_later_blocks():
    """A yielded memoryview keeps its block alive; later reads must not overwrite it."""
    data = mixed_data(150_000, 7)
    views = list(chunk_stream(io.BytesIO(data), SMALL, block=8192))
    assert b"".join(bytes(v) for v in views) == data


@settings(max_examples=60)
@given(data=st.binary(min_size=0, max_size=40_000), block=st.integers(1, 20_000))
def test_stream_equals_whole_property(data, block):
    streamed = list(chunk_stream(io.BytesIO(data), SMALL, block=block))
    assert cuts(streamed) == cuts(chunk_bytes(data, SMALL))
    assert b"".join(bytes(c) for c in streamed) == data


def test_chunk_size_bounds_default_params():
    p = ChunkerParams.for_average(16384)
    data = mixed_data(2_000_000, 3)
    chunks = list(chunk_stream(io.BytesIO(data), p))
    assert b"".join(bytes(c) for c in chunks) == data
    assert all(len(c) <= p.max_size for c in chunks)
    assert all(len(c) >= p.min_size for c in chunks[:-1])
    # content-defined: an average in the right neighbourhood
    assert p.min_size < len(data) / len(chunks) < p.max_size


def test_empty_and_tiny_inputs():
    assert list(chunk_stream(io.BytesIO(b""), SMALL)) == []
    assert list(chunk_bytes(b"", SMALL)) == []
    for n in (1, 255, 256, 257):
        data = rand_bytes(n, n)
        assert [bytes(c) for c in chunk_stream(io.BytesIO(data), SMALL)] == [data]


def test_insertion_shifts_only_nearby_cuts():
    """Content-defined: inserting bytes early leaves later cut points (shifted) intact."""
    data = rand_bytes(400_000, "shift")
    before = cuts(chunk_bytes(data, SMALL))
    edited = data[:50_000] + b"INSERTED" * 3 + data[50_000:]
    after = cuts(chunk_bytes(edited, SMALL))
    late_before = {c for c in before if c > 70_000}
    late_after = {c - 24 for c in after if c > 70_000 + 24}
    assert late_before == late_after
