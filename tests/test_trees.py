"""Tree objects: encode/decode round trip (hypothesis), canonical bytes,
illegal names and malformed data rejected with IntegrityError only."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.errors import IntegrityError
from store.trees import DIR, FILE, SYMLINK, TREE_VERSION, Entry, check_name, decode_tree, encode_tree, tree_children

names = st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n
                                                   and n not in (b".", b".."))
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
uints = st.integers(min_value=0, max_value=2**32 - 1)
blob = st.binary(min_size=32, max_size=32)
extras = st.dictionaries(st.sampled_from(["f", "d", "b", "x"]), st.integers(0, 2**40), max_size=3)


@st.composite
def entries(draw, name=None):
    n = draw(names) if name is None else name
    typ = draw(st.sampled_from([FILE, DIR, SYMLINK]))
    mode = draw(st.integers(0, 0o7777))
    if typ == DIR:
        content, nchunks, size = draw(blob), 0, draw(st.integers(0, 10**6))
    elif typ == SYMLINK:
        content = draw(st.binary(min_size=1, max_size=300))
        nchunks, size = 0, len(content)
    else:
        nchunks = draw(st.integers(0, 10**6))
        content = None if nchunks == 0 else draw(blob)
        size = draw(st.integers(0, 2**50)) if nchunks else 0
    return Entry(n, typ, mode, draw(uints), draw(uints), draw(ints), size, content, nchunks, draw(extras))


@st.composite
def trees(draw):
    ns = draw(st.lists(names, unique=True, max_size=30))
    return [draw(entries(name=n)) for n in ns]


@settings(max_examples=300)
@given(es=trees())
def test_round_trip(es):
    data = encode_tree(es)
    assert decode_tree(data) == sorted(es, key=lambda e: e.name)


@settings(max_examples=150)
@given(es=trees(), seed=st.randoms())
def test_encoding_is_canonical(es, seed):
    """Any order of the same entries encodes to the same bytes (so to the same id)."""
    shuffled = list(es)
    seed.shuffle(shuffled)
    assert encode_tree(shuffled) == encode_tree(es)


@settings(max_examples=100)
@given(es=trees().filter(lambda t: len(t) > 0), data=st.data())
def test_any_change_changes_encoding(es, data):
    i = data.draw(st.integers(0, len(es) - 1))
    e = es[i]
    field = data.draw(st.sampled_from(["mode", "uid", "gid", "mtime_ns"]))
    changed = Entry(**{**e.__dict__, field: getattr(e, field) + 1})
    assert encode_tree(es[:i] + [changed] + es[i + 1:]) != encode_tree(es)


@settings(max_examples=50)
@given(es=trees().filter(lambda t: len(t) > 0), data=st.data())
def test_duplicate_names_refused(es, data):
    dup = data.draw(st.sampled_from(es))
    with pytest.raises(IntegrityError):
        encode_tree(es + [Entry(**dup.__dict__)])


ILLEGAL = [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"\0"]


@pytest.mark.parametrize("name", ILLEGAL)
def test_decode_refuses_illegal_names(name):
    row = [name, FILE, 0o644, 0, 0, 0, 0, None, 0, None]
    data = msgpack.packb([TREE_VERSION, [row]], use_bin_type=True)
    with pytest.raises(IntegrityError):
        decode_tree(data)
    with pytest.raises(IntegrityError):
        check_name(name)


def test_encode_refuses_illegal_names():
    """A tree the decoder would refuse must never be written: it would make
    every snapshot that references it unreadable."""
    accepted = []
    for name in ILLEGAL:
        try:
            data = encode_tree([Entry(name, FILE, 0o644, 0, 0, 0, 0)])
        except IntegrityError:
            continue
        accepted.append(name)
        with pytest.raises(IntegrityError):  # what the writer produced cannot be read back
            decode_tree(data)
    assert accepted == [], f"encode_tree wrote trees with names decode_tree refuses: {accepted}"


@pytest.mark.parametrize("name", [b"...", b".hidden", b"-rf", b" ", b"a\\b", b"\xff\xfe", "é".encode(),
                                  b"x" * 255, b"new\nline", b"C:"])
def test_odd_but_legal_names(name):
    e = Entry(name, FILE, 0o644, 0, 0, 0, 0)
    assert decode_tree(encode_tree([e])) == [e]


def test_names_sort_as_raw_bytes():
    es = [Entry(n, FILE, 0o644, 0, 0, 0, 0) for n in (b"b", b"B", b"a", b"\xff", b"\x01", "é".encode())]
    assert [e.name for e in decode_tree(encode_tree(es))] == sorted(e.name for e in es)


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\xc1", msgpack.packb([2, []]), msgpack.packb([TREE_VERSION]),
    msgpack.packb([TREE_VERSION, [[b"a", 9, 0, 0, 0, 0, 0, None, 0, None]]]),  # unknown type
    msgpack.packb([TREE_VERSION, [["a", FILE, 0, 0, 0, 0, 0, None, 0, None]]]),  # str name
    msgpack.packb([TREE_VERSION, [[b"a", FILE, 0, 0]]]),  # short row
    msgpack.packb([TREE_VERSION, 5]),
    msgpack.packb({"v": 1}),
    msgpack.packb([TREE_VERSION, []]) + b"\x00",  # trailing garbage
])
def test_malformed_trees_raise_integrity_error(data):
    with pytest.raises(IntegrityError):
        decode_tree(data)


@settings(max_examples=500)
@given(data=st.binary(max_size=400))
def test_decode_fuzz_only_integrity_errors(data):
    try:
        out = decode_tree(data)
    except IntegrityError:
        return
    assert isinstance(out, list)


@settings(max_examples=200)
@given(es=trees(), pos=st.integers(min_value=0), xor=st.integers(1, 255))
def test_decode_flipped_byte_only_integrity_errors(es, pos, xor):
    data = bytearray(encode_tree(es))
    data[pos % len(data)] ^= xor
    try:
        decode_tree(bytes(data))
    except IntegrityError:
        pass


def test_tree_children_are_the_referenced_blobs():
    d = Entry(b"d", DIR, 0o755, 0, 0, 0, 1, b"D" * 32)
    f1 = Entry(b"f1", FILE, 0o644, 0, 0, 0, 10, b"C" * 32, 1)
    fl = Entry(b"fl", FILE, 0o644, 0, 0, 0, 10**6, b"L" * 32, 40)
    empty = Entry(b"e", FILE, 0o644, 0, 0, 0, 0, None, 0)
    link = Entry(b"l", SYMLINK, 0o777, 0, 0, 0, 2, b"f1")
    assert sorted(tree_children([d, f1, fl, empty, link])) == sorted([b"D" * 32, b"C" * 32, b"L" * 32])
