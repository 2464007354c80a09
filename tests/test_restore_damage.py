"""Restore and cat past damage (issue 12): a whole-snapshot restore restores
every file it can, names each file (or subtree) it cannot with the reason,
leaves nothing of a damaged file behind and exits 3; `--fail-fast` stops at
the first; `pit cat` of a file with a missing chunk writes nothing.

The damage is real: a flipped byte in a chunk's frame, a deleted pack, a
truncated pack, index records removed (as in test_corruption/test_repair).
What each case must name is worked out beforehand from the intact
repository: a file is damaged when its chunk list or a chunk is among the
damaged blobs, a directory when its tree is; only the topmost is named."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import pytest

from maint_helpers import all_blobs, flip_byte, init_repo, lmdb_put, opened, pack_path, pit, snap, write_file
from store import packs as P
from store.errors import BlobMissing, DamageFound, IntegrityError
from store.files import decode_filelist_level
from store.objects import ObjectReader
from store.restore import BAD_TREE, CORRUPT_CHUNK, MISSING_CHUNK, MISSING_LIST, Restorer
from store.snapshots import get_snapshot
from store.trees import DIR, FILE

DAMAGE = 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One snapshot of 40 files over 1 MiB packs; `a000.bin`, the victim,
    sorts first (the report: 0 of 571 files restored because the damaged one
    came first), with a few chunks of its own in the first pack."""
    d = tmp_path_factory.mktemp("restore-damage")
    repo = init_repo(str(d / "repo"), pack_mib=1)
    rng = random.Random(12)
    src = str(d / "src")
    write_file(os.path.join(src, "a000.bin"), rng.randbytes(60_000))
    for i in range(1, 40):
        sub = "" if i % 3 == 0 else f"d{i % 3}"
        write_file(os.path.join(src, sub, f"f{i:03d}.bin"), rng.randbytes(rng.randint(20_000, 110_000)))
    write_file(os.path.join(src, "d1", "deep", "z.txt"), b"deep file")
    os.symlink("a000.bin", os.path.join(src, "link"))
    from store import ingest

    with pytest.MonkeyPatch.context() as mp:
        # one file per read task: each file's chunk list follows its chunks, so cutting a pack after
        # a000.bin's chunks leaves the lists and trees of the files read later (a task's lists follow
        # all of its chunks)
        mp.setattr(ingest, "TASK_FILES", 1)
        s = snap(repo, "s", [src])
    return repo, src, s


@pytest.fixture
def env(base, tmp_path):
    repo, src, s = base
    dst = str(tmp_path / "repo")
    shutil.copytree(repo, dst)
    return dst, src, s


def blobs_by_path(repo, sid: str) -> dict[str, tuple[str, set[bytes]]]:
    """path -> ('dir', {tree id}) or ('file', {filelist ids and chunk ids})."""
    out = {}
    with opened(repo) as r, r.reading() as txn:
        s = get_snapshot(r, txn, bytes.fromhex(sid))
        rd = ObjectReader(r, txn)
        for p, e in rd.walk(s.root):
            path = p.decode()
            if e.type == DIR:
                out[path] = ("dir", {e.content})
            elif e.type == FILE and e.nchunks:
                ids = {e.content}
                if e.nchunks > 1:
                    lists = [e.content]
                    while lists:
                        level, kids, _ = decode_filelist_level(r.read_blob(txn, lists.pop()))
                        ids.update(kids)
                        if level == 2:
                            lists.extend(kids)
                out[path] = ("file", ids)
    return out


def expected(repo, sid: str, bad: set[bytes]) -> tuple[dict[str, str], set[str]]:
    """({damaged path: 'file'|'dir'} topmost only, {intact file paths})."""
    byp = blobs_by_path(repo, sid)
    damaged: dict[str, str] = {}
    for path in sorted(byp):
        typ, ids = byp[path]
        if any(path.startswith(q + "/") for q, t in damaged.items() if t == "dir"):
            continue
        if ids & bad:
            damaged[path] = typ
    intact = {p for p, (t, _) in byp.items() if t == "file" and p not in damaged
              and not any(p.startswith(q + "/") for q in damaged)}
    return damaged, intact


def sha_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def restore_cli(repo, sid, out, *args, expect=DAMAGE):
    p = pit(repo, "restore", sid, "--target", out, "--json", *args, expect=expect)
    return json.loads(p.stdout) if p.stdout.strip() else None, p


def check_restore(repo, src, s, out, bad: set[bytes], base_repo: str, reasons: set[str]):
    damaged, intact = expected(base_repo, s.hex, bad)
    assert damaged and intact, "the scenario must damage some files and leave others"
    res, p = restore_cli(repo, s.hex, out)
    got = {f["path"]: f["type"] for f in res["failed"]}
    assert got == damaged
    assert {f["reason"] for f in res["failed"]} <= reasons
    assert res["files"] == len(intact) and res["symlinks"] == 1
    for rel in intact:  # every intact file, byte for byte
        assert sha_file(os.path.join(out, rel)) == sha_file(os.path.join(os.path.dirname(src), rel)), rel
    for rel in damaged:  # nothing of a damaged file or subtree, no temporary file anywhere
        assert not os.path.lexists(os.path.join(out, rel)), rel
    assert not [n for _, ds, fs in os.walk(out) for n in ds + fs if n.startswith(".pit-")]
    err = p.stderr.decode()
    assert err.startswith("pit: error:") and err.count("\n") == 1  # --json lists them, stderr has the verdict
    return res, damaged


def test_corrupt_chunk_of_the_first_file(env, base, tmp_path):
    repo, src, s = env
    byp = blobs_by_path(repo, s.hex)
    _, ids = byp["src/a000.bin"]
    blobs = all_blobs(repo)
    cid = next(b for b in sorted(ids) if blobs[b].kind == P.CHUNK and sum(b in i for _, i in byp.values()) == 1)
    e = blobs[cid]
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 5)
    res, damaged = check_restore(repo, src, s, str(tmp_path / "out"), {cid}, base[0], {CORRUPT_CHUNK})
    assert damaged == {"src/a000.bin": "file"}
    assert cid.hex()[:16] in res["failed"][0]["detail"] and "offset" in res["failed"][0]["detail"]
    # text mode: one line per damaged file, then the verdict
    p = pit(repo, "restore", s.hex, "--target", tmp_path / "out2", expect=DAMAGE)
    lines = p.stderr.decode().splitlines()
    assert lines[0].startswith("pit: error: not restored: src/a000.bin: corrupt chunk: ")
    assert len(lines) == 2 and "1 file not restored" in lines[1]
    assert "1 not restored (damaged)" in p.stdout.decode()


def test_deleted_pack(env, base, tmp_path):
    repo, src, s = env
    blobs = all_blobs(repo)
    byp = blobs_by_path(repo, s.hex)
    num = blobs[min(byp["src/a000.bin"][1], key=lambda b: blobs[b].offset)].pack
    os.unlink(pack_path(repo, num))
    bad = {b for b, e in blobs.items() if e.pack == num}
    res, damaged = check_restore(repo, src, s, str(tmp_path / "out"), bad, base[0], {MISSING_CHUNK, BAD_TREE,
                                                                                      MISSING_LIST})
    assert "src/a000.bin" in damaged
    assert any("missing" in f["detail"] for f in res["failed"])


def test_truncated_pack(env, base, tmp_path):
    repo, src, s = env
    blobs = all_blobs(repo)
    byp = blobs_by_path(repo, s.hex)
    cid = max(byp["src/a000.bin"][1], key=lambda b: blobs[b].offset)
    e = blobs[cid]
    cut = e.offset + 10
    with open(pack_path(repo, e.pack), "r+b") as f:
        f.truncate(cut)
    bad = {b for b, be in blobs.items() if be.pack == e.pack and be.offset + P.FRAME_HEADER.size + be.stored_len > cut}
    res, damaged = check_restore(repo, src, s, str(tmp_path / "out"), bad, base[0], {MISSING_CHUNK, BAD_TREE,
                                                                                      MISSING_LIST})
    assert "src/a000.bin" in damaged
    assert any("truncated" in f["detail"] for f in res["failed"])


def test_unreadable_tree_names_the_subtree_once(env, base, tmp_path):
    repo, src, s = env
    tid = next(iter(blobs_by_path(repo, s.hex)["src/d1"][1]))
    lmdb_put(repo, "blobs", tid, None)
    res, damaged = check_restore(repo, src, s, str(tmp_path / "out"), {tid}, base[0], {BAD_TREE})
    assert damaged == {"src/d1": "dir"}
    p = pit(repo, "restore", s.hex, "--target", tmp_path / "out2", expect=DAMAGE)
    assert "not restored: src/d1/ (the whole directory): unreadable tree: " in p.stderr.decode()


def test_fail_fast_stops_at_the_first(env, tmp_path):
    repo, src, s = env
    byp = blobs_by_path(repo, s.hex)
    cid = sorted(byp["src/a000.bin"][1])[0]
    lmdb_put(repo, "blobs", cid, None)
    out = tmp_path / "out"
    p = pit(repo, "restore", s.hex, "--target", out, "--fail-fast", expect=(BlobMissing.exit_code,
                                                                            IntegrityError.exit_code))
    assert p.stderr.decode().startswith("pit: error:") and p.stderr.count(b"\n") == 1
    files = [n for _, _, fs in os.walk(out) for n in fs]
    assert files == []  # the first file failed: nothing after it was written, nothing of it left
    # the API: the first damage error as it is
    with opened(repo) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        with pytest.raises(IntegrityError):
            Restorer(rd, fail_fast=True).restore(rd.lookup(s.root, ""), str(tmp_path / "api"))
        with pytest.raises(DamageFound) as info:
            Restorer(rd).restore(rd.lookup(s.root, ""), str(tmp_path / "api2"))
    assert [f.path for f in info.value.failures] == ["src/a000.bin"]
    assert info.value.exit_code == DAMAGE and info.value.stats.files == len(byp) - len(
        [p for p, (t, _) in byp.items() if t == "dir"]) - 1


def test_subtree_restore_names_snapshot_paths(env, tmp_path):
    repo, src, s = env
    byp = blobs_by_path(repo, s.hex)
    victim = "src/d1/f004.bin"
    lmdb_put(repo, "blobs", sorted(byp[victim][1])[0], None)
    res, _ = restore_cli(repo, f"{s.hex}:src/d1", tmp_path / "out")
    assert [f["path"] for f in res["failed"]] == [victim]
    assert not os.path.exists(tmp_path / "out" / "d1" / "f004.bin")
    assert os.path.exists(tmp_path / "out" / "d1" / "f001.bin")


def test_many_failures_are_capped_with_a_count(tmp_path):
    repo = init_repo(str(tmp_path / "repo"))
    src = str(tmp_path / "src")
    for i in range(60):
        write_file(os.path.join(src, f"f{i:02d}"), b"file %d\n" % i)
    write_file(os.path.join(src, "keep"), os.urandom(5000))
    s = snap(repo, "m", [src])
    byp = blobs_by_path(repo, s.hex)
    for i in range(60):
        lmdb_put(repo, "blobs", next(iter(byp[f"src/f{i:02d}"][1])), None)
    p = pit(repo, "restore", s.hex, "--target", tmp_path / "out", expect=DAMAGE)
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 52
    assert lines[50] == "pit: error: ... and 10 more not restored (--json lists them all)"
    assert "60 files not restored" in lines[51]
    assert os.listdir(tmp_path / "out" / "src") == ["keep"]
    res, _ = restore_cli(repo, s.hex, tmp_path / "out2")
    assert len(res["failed"]) == 60 and {f["reason"] for f in res["failed"]} == {MISSING_CHUNK}


# -------------------------------------------------------------------- cat
def multi_chunk_file(repo, s) -> tuple[str, list[bytes]]:
    byp = blobs_by_path(repo, s.hex)
    with opened(repo) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        for path in sorted(byp):
            e = rd.lookup(s.root, path)
            if e.type == FILE and e.nchunks > 3:
                return path, list(rd.chunk_list(e).ids)
    raise AssertionError("no file of several chunks")


def test_cat_of_a_file_with_a_missing_chunk_writes_nothing(env):
    repo, src, s = env
    path, ids = multi_chunk_file(repo, s)
    lmdb_put(repo, "blobs", ids[-1], None)  # the last chunk: 73 MB would have gone out before it
    p = pit(repo, "cat", f"{s.hex}:{path}", expect=BlobMissing.exit_code)
    assert p.stdout == b""
    err = p.stderr.decode()
    assert err.count("\n") == 1 and path in err and ids[-1].hex()[:16] in err and "offset" in err


def test_cat_of_a_file_in_a_deleted_pack_writes_nothing(env):
    repo, src, s = env
    path, ids = multi_chunk_file(repo, s)
    blobs = all_blobs(repo)
    os.unlink(pack_path(repo, blobs[ids[-1]].pack))
    p = pit(repo, "cat", f"{s.hex}:{path}", expect=BlobMissing.exit_code)
    assert p.stdout == b"" and "missing" in p.stderr.decode()


def test_cat_of_a_corrupt_chunk_names_the_offset(env):
    repo, src, s = env
    path, ids = multi_chunk_file(repo, s)
    e = all_blobs(repo)[ids[2]]
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 3)
    p = pit(repo, "cat", f"{s.hex}:{path}", expect=IntegrityError.exit_code)
    with open(os.path.join(os.path.dirname(src), path), "rb") as f:
        want = f.read()
    assert want.startswith(p.stdout) and len(p.stdout) < len(want)
    assert f"at offset {len(p.stdout)}" in p.stderr.decode()


def test_cat_of_an_intact_file(env):
    repo, src, s = env
    path, _ = multi_chunk_file(repo, s)
    with open(os.path.join(os.path.dirname(src), path), "rb") as f:
        assert pit(repo, "cat", f"{s.hex}:{path}").stdout == f.read()


def test_unreadable_root_tree(env, tmp_path):
    repo, src, s = env
    lmdb_put(repo, "blobs", s.root, None)
    p = pit(repo, "restore", s.hex, "--target", tmp_path / "out", expect=DAMAGE)
    assert "not restored: / (everything: the top tree): unreadable tree: " in p.stderr.decode()
    assert os.listdir(tmp_path / "out") == []
