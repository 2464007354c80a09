"""Deduplication: the same data twice stores no new chunk bytes, and a small
change in a big file stores only the chunks around it."""
from __future__ import annotations

import os
import shutil

from conftest import MiB, blob_ids, cli_json, make_tree, rand_bytes, restore, snapshot, tree_digest, write_stream
from store import packs as P
from store.chunker import ChunkerParams

P16 = ChunkerParams.for_average(16384)


def chunk_bytes_of(ids: dict) -> int:
    return sum(e.raw_len for e in ids.values())


def test_same_data_twice_no_new_chunks(repo_path, tmp_path):
    spec = {"a.bin": rand_bytes(2 * MiB, "a"), "b.txt": b"".join(b"line %06d\n" % i for i in range(40_000)),
            "d": {"c.bin": rand_bytes(300_000, "c"), "small": b"tiny"}}
    make_tree(tmp_path / "one", spec)
    s1 = snapshot(repo_path, "one", tmp_path / "one")
    chunks1 = blob_ids(repo_path)
    assert chunk_bytes_of(chunks1) == 2 * MiB + 480_000 + 300_000 + 4

    # the same bytes under other names, other mtimes, another set and path
    make_tree(tmp_path / "two", {"renamed.bin": spec["a.bin"], "x": {"y": {"z.txt": spec["b.txt"]}},
                                 "c-copy": spec["d"]["c.bin"], "small2": b"tiny"}, mtime=1_700_000_000 * 10**9)
    s2 = snapshot(repo_path, "two", tmp_path / "two")
    assert blob_ids(repo_path).keys() == chunks1.keys(), "same data stored new chunks"
    assert s2.stats["files_read"] == 4  # it did read them (different paths): dedup, not the files cache
    non_chunk = blob_ids(repo_path, None).keys() - chunks1.keys()
    kinds = {e.kind for e in blob_ids(repo_path, None).values() if e.raw_len} - {P.CHUNK}
    assert kinds <= {P.TREE, P.FILELIST} and non_chunk


def test_unchanged_resnapshot_stores_nothing(repo_path, tmp_path):
    make_tree(tmp_path / "src", {"a": rand_bytes(500_000, 1), "d": {"b": rand_bytes(70_000, 2)}})
    s1 = snapshot(repo_path, "s", tmp_path / "src")
    before = blob_ids(repo_path, None)
    s2 = snapshot(repo_path, "s", tmp_path / "src")
    assert s2.root == s1.root
    assert (s2.stats["new_chunks"], s2.stats["new_bytes"]) == (0, 0)
    assert blob_ids(repo_path, None).keys() == before.keys()


def test_duplicates_inside_one_snapshot(repo_path, tmp_path):
    data = rand_bytes(MiB, "dup")
    make_tree(tmp_path / "src", {f"copy{i}": data for i in range(6)} | {"d": {"again": data}})
    s = snapshot(repo_path, "dup", tmp_path / "src")
    assert chunk_bytes_of(blob_ids(repo_path)) == MiB
    assert s.stats["bytes"] == 7 * MiB


def test_zeros_collapse(repo_path, tmp_path):
    make_tree(tmp_path / "src", {"zeros": b"\0" * (8 * MiB + 123)})
    snapshot(repo_path, "z", tmp_path / "src")
    chunks = blob_ids(repo_path)
    assert len(chunks) <= 2  # one max-size chunk of zeros, repeated, and the tail
    assert chunk_bytes_of(chunks) <= 2 * P16.max_size
    stored = sum(e.stored_len for e in chunks.values())
    assert stored < 1024  # zstd squeezes zeros
    restore(tmp_path / "repo", "z@latest", tmp_path / "out")
    assert (tmp_path / "out" / "src" / "zeros").read_bytes() == b"\0" * (8 * MiB + 123)


def test_restored_tree_resnapshot_dedups(repo_path, tmp_path):
    make_tree(tmp_path / "src", {"a": rand_bytes(MiB, "r"), "b": {"c": rand_bytes(100_000, "rc")}})
    snapshot(repo_path, "s", tmp_path / "src")
    chunks = blob_ids(repo_path)
    restore(repo_path, "s@latest", tmp_path / "out")
    s2 = snapshot(repo_path, "restored", tmp_path / "out" / "src")
    assert blob_ids(repo_path).keys() == chunks.keys()
    assert s2.root == snapshot(repo_path, "s", tmp_path / "src").root  # same names, bytes and metadata


def test_insertion_in_the_middle_stores_about_two_chunks(repo_path, tmp_path):
    """Content-defined chunking: inserting 64 KiB shifts every later byte, yet
    only the chunks touching the insertion are new."""
    path = tmp_path / "src" / "f"
    os.makedirs(path.parent)
    write_stream(path, 32 * MiB, "ins")
    snapshot(repo_path, "s", tmp_path / "src")
    before = blob_ids(repo_path)
    data = path.read_bytes()
    off = 13 * MiB + 4321
    path.write_bytes(data[:off] + rand_bytes(64 * 1024, "inserted") + data[off:])
    snapshot(repo_path, "s", tmp_path / "src")
    new = {k: v for k, v in blob_ids(repo_path).items() if k not in before}
    assert chunk_bytes_of(new) <= 64 * 1024 + 2 * P16.max_size, (len(new), chunk_bytes_of(new))
    restore(repo_path, "s@latest", tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(tmp_path / "src")


def test_64k_change_in_256mib_file(repo_path, tmp_path):
    """The issue's number: a 64 KiB change in a 256 MiB file stores at most
    about two chunks beyond the changed bytes. With 16 KiB average chunks a
    64 KiB change spans several chunks itself, so the bound is: new chunk
    bytes <= 64 KiB + 2 maximum-size chunks (one cut-point resync on each
    side). The file is generated streaming from a fixed seed (256 MiB)."""
    size = 256 * MiB
    path = tmp_path / "src" / "big.img"
    os.makedirs(path.parent)
    write_stream(path, size, "vm-image")
    s1 = snapshot(repo_path, "vm", tmp_path / "src")
    assert s1.stats["bytes"] == size
    before = blob_ids(repo_path)
    assert chunk_bytes_of(before) == size  # random data: no internal dedup
    off = 151 * MiB + 12_345
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(rand_bytes(64 * 1024, "patch"))
    s2 = snapshot(repo_path, "vm", tmp_path / "src")
    after = blob_ids(repo_path)
    new = {k: v for k, v in after.items() if k not in before}
    assert new, "the change stored nothing"
    assert chunk_bytes_of(new) <= 64 * 1024 + 2 * P16.max_size, (len(new), chunk_bytes_of(new))
    assert len(new) <= (64 * 1024) // P16.min_size + 2
    # every old chunk is still referenced by the first snapshot; the file reads back right
    assert before.keys() <= after.keys()
    out = cli_json(repo_path, "diff", s1.hex, s2.hex)
    assert [c["path"] for c in out["changes"]] == ["src/big.img"]
    restore(repo_path, "vm@latest", tmp_path / "out", path="src/big.img")
    with open(path, "rb") as a, open(tmp_path / "out" / "big.img", "rb") as b:
        a.seek(off - 100_000)
        b.seek(off - 100_000)
        assert a.read(300_000) == b.read(300_000)
    assert os.path.getsize(tmp_path / "out" / "big.img") == size
    shutil.rmtree(tmp_path / "out")
