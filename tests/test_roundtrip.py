"""Snapshot then restore gives back the same bytes and metadata: empty files,
files of exactly one chunk, (sparse-ish) zeros, unicode and odd names,
symlinks, empty directories, modes, owners, nanosecond mtimes; through the
API, `pit` in-process (CliRunner) and `pit` as a real process."""
from __future__ import annotations

import json
import os
import random
import unicodedata

import pytest

from conftest import (D, F, Link, MiB, cli, cli_json, list_snaps, make_tree, opened, rand_bytes, restore,
                      run_pit, sha, snapshot, tree_digest)
from store.chunker import ChunkerParams, chunk_bytes
from store.objects import ObjectReader, iter_file_chunks
from store.snapshots import resolve
from store.trees import FILE

P16 = ChunkerParams.for_average(16384)


def one_chunk_random(n: int) -> bytes:
    """Random bytes of length n that FastCDC (default parameters) keeps as one chunk."""
    for seed in range(10_000):
        data = rand_bytes(n, ("one-chunk", seed).__repr__())
        if len(list(chunk_bytes(data, P16))) == 1:
            return data
    raise AssertionError("no single-chunk sample found")  # pragma: no cover


def sparse_file(path, size: int, islands: list[tuple[int, bytes]]) -> bytes:
    """A real sparse file (holes) with a few data islands; returns its content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in islands:
            f.seek(off)
            f.write(data)
    content = bytearray(size)
    for off, data in islands:
        content[off:off + len(data)] = data
    return bytes(content)


NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")

ODD_NAMES = {
    NFC: b"nfc", NFD: b"nfd",  # two distinct names that look the same
    "日本語のファイル名.txt": b"cjk", "emoji 🎉🐍.bin": b"emoji",
    "with space": b"space", " leading and trailing ": b"spaces", "new\nline": b"nl", "tab\there": b"tab",
    "back\\slash": b"bs", "colon:name": b"colon", "-rf": b"dash", "--help": b"dashdash", "...": b"dots",
    ".hidden": b"hidden", "a" * 255: b"long name", "*?[]{}$`'\"|<>&;": b"shell",
    b"latin1-\xe9\xff\xfe": b"not utf-8", b"\x01\x1f\x7f": b"control bytes",
}


def base_spec() -> dict:
    zeros_mixed = b"".join([b"\0" * 300_000, rand_bytes(5000, 1), b"\0" * 700_000, b"tail"])
    return {
        "empty": b"",
        "one-byte": b"x",
        "min-size": F(rand_bytes(P16.min_size, "min")),  # exactly the minimum chunk: one chunk
        "one-chunk": F(one_chunk_random(40_000)),
        "max-zeros": F(b"\0" * P16.max_size),  # exactly one maximum-size chunk
        "max-plus-one-zeros": F(b"\0" * (P16.max_size + 1)),
        "zeros-1m": F(b"\0" * MiB),
        "zeros-mixed": F(zeros_mixed),
        "random-1m": F(rand_bytes(MiB, "r1")),
        "text.txt": F(b"hello world\n" * 20_000),
        "modes": D({
            "private": F(b"secret", mode=0o600),
            "exec": F(b"#!/bin/sh\necho hi\n", mode=0o755),
            "setuid": F(b"suid", mode=0o4755),
            "readonly": F(b"ro", mode=0o444),
            "owned": F(b"owned by someone", uid=1234, gid=5678),
            "old": F(b"before 1970", mtime=-86_400_123_456_789),
            "future": F(b"2100", mtime=4_102_444_800_987_654_321),
            "ro-dir": D({"inside": b"i"}, mode=0o555),
            "sticky": D({}, mode=0o1777),
        }),
        "names": D(dict(ODD_NAMES)),
        "links": D({
            "rel": Link("../text.txt"),
            "abs": Link("/etc/hostname"),
            "dangling": Link("does/not/exist"),
            "to-dir": Link("../modes"),
            "self": Link("self"),
            "odd-target": Link(b"\xff\xfe weird \n target"),
            "long-target": Link("x/" * 500 + "end"),
        }),
        "empty-dir": D({}),
        "nested": D({"empty": D({"deeper-empty": D({})})}),
        "deep": _deep(25),
    }


def _deep(n: int) -> D:
    node = D({"leaf": F(b"bottom")})
    for i in range(n):
        node = D({f"level{i}": node, f"f{i}": F(b"%d" % i)})
    return node


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    spec = base_spec()
    make_tree(root, spec)
    # a real sparse file: 20 MiB with three islands
    islands = [(0, b"head"), (7 * MiB + 3, rand_bytes(9000, "island")), (20 * MiB - 5, b"end!!")]
    content = sparse_file(root / "sparse", 20 * MiB, islands)
    os.utime(root / "sparse", ns=(1_600_000_000_000_000_000,) * 2)
    os.utime(root, ns=(1_600_000_000_000_000_000,) * 2)
    return root, content


def test_api_round_trip(repo_path, src, tmp_path):
    root, sparse = src
    snap = snapshot(repo_path, "rt", root)
    assert snap.stats["files"] == len([p for p, d in tree_digest(root).items() if d["type"] == "file"])
    target = tmp_path / "out"
    restore(repo_path, "rt@latest", target)
    assert sorted(os.listdir(target)) == ["src"]
    assert tree_digest(target / "src") == tree_digest(root)
    with open(target / "src" / "sparse", "rb") as f:
        assert f.read() == sparse


def test_chunk_counts_of_edge_files(repo_path, src):
    """Empty files have no chunk, the one-chunk files exactly one, big files many."""
    root, _ = src
    snap = snapshot(repo_path, "rt", root)
    want = {"empty": 0, "one-byte": 1, "min-size": 1, "one-chunk": 1, "max-zeros": 1, "max-plus-one-zeros": 2}
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        r = ObjectReader(repo, txn)
        for name, n in want.items():
            e = r.lookup(snap.root, "src/" + name)
            assert (name, e.type, e.nchunks) == (name, FILE, n)
            assert b"".join(iter_file_chunks(r, e)) == (root / name).read_bytes()
        assert r.lookup(snap.root, "src/random-1m").nchunks > 20


def test_random_reads_at_any_offset(repo_path, tmp_path):
    data = rand_bytes(3 * MiB + 17, "random-reads")
    make_tree(tmp_path / "src", {"big": data})
    snap = snapshot(repo_path, "rr", tmp_path / "src")
    rnd = random.Random(5)
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        r = ObjectReader(repo, txn)
        fr = r.open_file(r.lookup(snap.root, "src/big"))
        assert fr.size == len(data)
        starts = fr.chunks.starts
        probes = [(0, 1), (0, len(data)), (len(data) - 1, 10), (len(data), 5), (len(data) + 100, 5), (5, 0)]
        probes += [(starts[i] - 1, 2) for i in range(1, len(starts) - 1, 7)]  # straddle chunk borders
        probes += [(rnd.randrange(len(data)), rnd.randrange(1, 300_000)) for _ in range(60)]
        for off, n in probes:
            assert fr.read(off, n) == data[off:off + n], (off, n)


def test_cli_round_trip_in_process(repo_path, src, tmp_path):
    root, _ = src
    out = cli_json(repo_path, "snapshot", "--set", "cli", str(root))
    assert out["set"] == "cli" and len(out["id"]) == 64 and ":" not in out["name"]
    res = cli(repo_path, "restore", "cli@latest", "--target", tmp_path / "out")
    assert "restored" in res.stdout
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(root)
    # `pit cat` gives every file's bytes exactly
    for rel, d in tree_digest(root).items():
        if d["type"] == "file" and b"\n" not in rel and not rel.startswith(b"names/"):
            got = cli(repo_path, "cat", f"cli@latest:src/{os.fsdecode(rel)}").stdout_bytes
            assert sha(got) == d["sha256"], rel


def test_cli_round_trip_subprocess(repo_path, src, tmp_path):
    root, _ = src
    snap = json.loads(run_pit(repo_path, "snapshot", "--set", "proc", root, "--json").stdout)
    run_pit(repo_path, "restore", snap["id"][:10], "--target", tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(root)
    p = run_pit(repo_path, "cat", f"{snap['id']}:src/random-1m")
    assert p.stdout == (root / "random-1m").read_bytes()


def test_odd_names_listed_and_catted(repo_path, tmp_path):
    make_tree(tmp_path / "src", dict(ODD_NAMES))
    snapshot(repo_path, "odd", tmp_path / "src")
    rows = cli_json(repo_path, "ls", "odd@latest:src")
    got = {os.fsencode(r["name"]) for r in rows}
    assert got == {os.fsencode(n) if isinstance(n, str) else n for n in ODD_NAMES}
    for name, content in ODD_NAMES.items():
        s = os.fsdecode(name) if isinstance(name, bytes) else name
        assert cli(repo_path, "cat", f"odd@latest:src/{s}").stdout_bytes == content, name


def test_multiple_sources_and_a_single_file_source(repo_path, tmp_path):
    make_tree(tmp_path / "a", {"x": b"in a", "sub": {"y": b"deeper"}})
    make_tree(tmp_path / "b", {"z": rand_bytes(200_000, "b")})
    make_tree(tmp_path / "c", {"lonely.bin": rand_bytes(70_000, "lonely")})
    snap = snapshot(repo_path, "multi", [tmp_path / "a", tmp_path / "b", tmp_path / "c" / "lonely.bin"])
    assert snap.paths == [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c" / "lonely.bin")]
    restore(repo_path, "multi@latest", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["a", "b", "lonely.bin"]
    assert tree_digest(tmp_path / "out" / "a") == tree_digest(tmp_path / "a")
    assert tree_digest(tmp_path / "out" / "b") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "out", owners=False)[b"lonely.bin"] == \
        tree_digest(tmp_path / "c", owners=False)[b"lonely.bin"]


def test_same_basename_sources_refused(repo_path, tmp_path):
    from store.errors import InvalidArgument

    make_tree(tmp_path / "one" / "data", {"x": b"1"})
    make_tree(tmp_path / "two" / "data", {"x": b"2"})
    with pytest.raises(InvalidArgument):
        snapshot(repo_path, "s", [tmp_path / "one" / "data", tmp_path / "two" / "data"])
    assert list_snaps(repo_path) == []


def test_special_files_skipped_with_warning(repo_path, tmp_path):
    make_tree(tmp_path / "src", {"plain": b"p"})
    os.mkfifo(tmp_path / "src" / "fifo")
    snap = snapshot(repo_path, "sp", tmp_path / "src")
    assert snap.stats["skipped"] == 1
    assert any("fifo" in w for w in snap.stats["warnings"])
    restore(repo_path, "sp@latest", tmp_path / "out")
    assert os.listdir(tmp_path / "out" / "src") == ["plain"]


def test_restore_twice_into_same_target(repo_path, src, tmp_path):
    root, _ = src
    snapshot(repo_path, "rt", root)
    restore(repo_path, "rt@latest", tmp_path / "out")
    restore(repo_path, "rt@latest", tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(root)
    leftovers = [p for p in tree_digest(tmp_path / "out") if b".pit-" in p]
    assert leftovers == []


def test_snapshot_record_and_stats(repo_path, tmp_path):
    make_tree(tmp_path / "src", {"a": rand_bytes(100_000, "a"), "d": {"b": b"bb", "e": {}}, "l": Link("a")})
    snap = snapshot(repo_path, "meta", tmp_path / "src", host="testhost")
    assert snap.host == "testhost"
    assert (snap.stats["files"], snap.stats["dirs"], snap.stats["bytes"]) == (2, 3, 100_002)
    assert snap.stats["new_chunks"] > 0 and snap.stats["mode"] == "scan"
    listed = cli_json(repo_path, "snapshots")
    assert [s["id"] for s in listed] == [snap.hex]
    assert listed[0]["name"] == snap.name and ":" not in snap.name and snap.name.endswith("Z")
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        assert resolve(repo, txn, snap.hex).root == snap.root
