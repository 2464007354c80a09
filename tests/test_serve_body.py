"""GET bodies of `pit serve` (davserver/body.py): a file's chunks read in
runs from the packs must give exactly the file's bytes, for every seek and
read size wsgidav may use (Range), for stored and compressed chunks and for
sparse files; a damaged chunk is an error, never other bytes; a chunk that
cannot be read in a run (moved by compaction) is read again one by one."""
from __future__ import annotations

import os
import random

import pytest

from store.errors import BlobMissing, IntegrityError
from store.packs import pack_name
from store.repository import Repository
from store.view import ALL, View

from davserver import body as B

from test_view_support import snap, write


def _sparse(path: str, size: int, pieces: list[tuple[int, bytes]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("body")
    src = str(tmp / "data")
    rnd = random.Random(7)
    want = {
        "random.bin": os.urandom(3 * 1024 * 1024 + 17),
        # compressible, and not one repeated chunk: many different compressed frames
        "text.txt": "".join(f"line {i} {rnd.random()}\n" for i in range(120_000)).encode(),
        "empty.txt": b"",
        "one.txt": b"x",
    }
    for name, data in want.items():
        write(src, name, data)
    sparse = [(300_000, os.urandom(200_000)), (2_000_000, os.urandom(70_000))]
    _sparse(os.path.join(src, "sparse.bin"), 4_000_000, sparse)
    with open(os.path.join(src, "sparse.bin"), "rb") as f:
        want["sparse.bin"] = f.read()
    repo = Repository.init(str(tmp / "repo"))
    snap(repo, "s", src)
    repo.close()
    repo = Repository(str(tmp / "repo"))
    yield repo, View(repo, ALL), want
    repo.close()


@pytest.fixture(params=["inline", "read-ahead"])
def ahead(request, monkeypatch):
    """Each body test twice: read in the worker, and read ahead by a thread (any size qualifies)."""
    if request.param == "read-ahead":
        monkeypatch.setattr(B, "READ_AHEAD_MIN", 0)
    return request.param


def _open(view, name):
    return view.open(view.resolve(["s", "latest", "data", name]))


@pytest.mark.parametrize("name", ["random.bin", "text.txt", "empty.txt", "one.txt", "sparse.bin"])
def test_whole_file_in_blocks(files, name, ahead):
    _repo, view, want = files
    for block in (1, 4096, 100_003, 1 << 20, 8 << 20):
        if block == 1 and len(want[name]) > 10:
            continue
        b = B.Body(_open(view, name), block=block if block > 1 else 4096)
        got = []
        while True:
            d = b.read(block)
            assert isinstance(d, bytes) and len(d) <= block
            if not d:
                break
            got.append(d)
        assert b"".join(got) == want[name]
    assert B.Body(_open(view, name)).read() == want[name]


@pytest.mark.parametrize("name", ["random.bin", "text.txt", "sparse.bin"])
def test_seeks_and_ranges(files, name, ahead):
    """wsgidav's Range: seek to the start, then read up to the range's length."""
    _repo, view, want = files
    data = want[name]
    rnd = random.Random(name)
    b = B.Body(_open(view, name))
    for _ in range(60):
        start = rnd.randrange(len(data) + 10)
        n = rnd.choice([1, 10, 4095, 65536, 300_000, 2_000_000])
        assert b.seek(start) == start
        got = b.read(n)
        assert got == data[start:start + n], (start, n)
        assert b.tell() == start + len(got)
        # and on from there, as the next block of the same answer
        more = b.read(n)
        assert more == data[start + len(got):start + len(got) + n]
    assert b.seek(-5, 2) == len(data) - 5 and b.read() == data[-5:]


def test_runs_read_several_chunks_per_read(files, monkeypatch):
    repo, view, want = files
    reads = []
    real = repo.backend.read

    def counting(name, offset, length):
        reads.append(length)
        return real(name, offset, length)

    monkeypatch.setattr(repo.backend, "read", counting)
    vf = _open(view, "random.bin")
    assert B.Body(vf).read() == want["random.bin"]
    assert len(vf.chunks.ids) > 4 * len(reads)
    assert max(reads) <= B.RUN_MAX


def test_a_moved_chunk_is_read_again_one_by_one(files, monkeypatch, ahead):
    """The run's pread fails (the pack went away under compaction): each of its chunks
    is looked up again by the store's own path."""
    repo, view, want = files
    real = repo.backend.read
    failed = []

    def flaky(name, offset, length):
        if not failed:
            failed.append(name)
            raise BlobMissing(f"pack {name} is missing")
        return real(name, offset, length)

    monkeypatch.setattr(repo.backend, "read", flaky)
    assert B.Body(_open(view, "text.txt")).read() == want["text.txt"]
    assert failed


def test_damaged_chunk_is_an_error_not_other_bytes(tmp_path, ahead):
    src = str(tmp_path / "data")
    write(src, "f.bin", os.urandom(600_000))
    repo = Repository.init(str(tmp_path / "repo"))
    snap(repo, "s", src)
    view = View(repo, ALL)
    vf = _open(view, "f.bin")
    cid = vf.chunks.ids[len(vf.chunks.ids) // 2]
    with repo.reading() as txn:
        e = repo.blob_entry(txn, cid)
    repo.close()
    path = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "repo") for f in fs if f == pack_name(e.pack))
    with open(path, "r+b") as f:
        f.seek(e.offset + 48 + 100)  # inside the chunk's payload
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    repo = Repository(str(tmp_path / "repo"))
    try:
        with pytest.raises(IntegrityError):
            B.Body(_open(View(repo, ALL), "f.bin")).read()
        b = B.Body(_open(View(repo, ALL), "f.bin"), block=4096)
        with pytest.raises(IntegrityError):
            while b.read(4096):
                pass
    finally:
        repo.close()


def test_both_kinds_of_frames_are_covered(files):
    """text.txt is stored compressed, random.bin as it is: both paths of body._frame_data run above."""
    repo, view, _want = files
    with repo.reading() as txn:
        flags = {name: {repo.blob_entry(txn, c).flags & 1 for c in _open(view, name).chunks.ids}
                 for name in ("text.txt", "random.bin")}
    assert flags == {"text.txt": {1}, "random.bin": {0}}


def test_an_abandoned_answer_stops_its_read_ahead(files, monkeypatch):
    """The client went away mid-body: wsgidav closes the file, and the read-ahead thread ends."""
    monkeypatch.setattr(B, "READ_AHEAD_MIN", 0)
    monkeypatch.setattr(B, "STOP_POLL", 0.05)
    _repo, view, want = files
    b = B.Body(_open(view, "text.txt"), block=4096)
    got = b""
    while b._ahead is None:
        got += b.read(4096)
    assert got == want["text.txt"][:len(got)]
    thread = b._ahead.thread
    b.close()
    thread.join(30)
    assert not thread.is_alive()
