"""Corruption, like borg's tests: flip a byte in a pack, truncate a pack, delete
a pack, corrupt LMDB records. Verify must find and name each (pack, offset,
snapshots, paths) and exit 3; unaffected snapshots still restore; nothing
prints a traceback; a restore never yields wrong bytes."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from maint_helpers import (
    all_blobs, all_refs, file_chunks, flip_byte, init_repo, lmdb_put, make_tree, opened, pack_entries, pack_path, set_refcount,
    pit, pit_json, reachable, restore_digest, snap, source_digest, write_file,
)
from store import packs as P
from store.errors import IntegrityError, StoreError
from store.index import U64, BlobEntry

DAMAGE = 3
VICTIM = "src/d1/victim.bin"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """b@1 (small, first pack) | a@s1 (~2.3 MiB) | a@s2 (+ d1/victim.bin) | c@1 (1.2 MiB filler,
    which seals the pack holding the victim)."""
    d = tmp_path_factory.mktemp("corrupt")
    repo = init_repo(str(d / "repo"), pack_mib=1)
    rng = random.Random(51)
    srcb = str(d / "b" / "src")
    make_tree(srcb, rng, nfiles=5, size_range=(10_000, 30_000))
    b1 = snap(repo, "b", [srcb])
    src = str(d / "a" / "src")
    make_tree(src, rng, nfiles=24, size_range=(60_000, 130_000))
    s1 = snap(repo, "a", [src])
    d_s1 = source_digest(src)
    write_file(os.path.join(src, "d1", "victim.bin"), rng.randbytes(90_000))
    s2 = snap(repo, "a", [src])
    d_s2 = source_digest(src)
    srcc = str(d / "c" / "src")
    write_file(os.path.join(srcc, "filler.bin"), rng.randbytes(1_200_000))
    c1 = snap(repo, "c", [srcc])
    snaps = {"b1": b1, "s1": s1, "s2": s2, "c1": c1}
    digests = {b1.hex: source_digest(srcb), s1.hex: d_s1, s2.hex: d_s2, c1.hex: source_digest(srcc)}
    victim = file_chunks(repo, s2.hex, VICTIM)
    ve = all_blobs(repo)[victim[0]]
    assert pack_entries(repo)[ve.pack].sealed, "the victim's pack should be sealed by c's filler"
    return repo, snaps, digests


@pytest.fixture
def env(base, tmp_path):
    repo, snaps, digests = base
    dst = str(tmp_path / "repo")
    shutil.copytree(repo, dst)
    return dst, snaps, digests


def label(s) -> str:
    return f"{s.set}@{s.name}"


def packs_of(repo, sid) -> set[int]:
    blobs = all_blobs(repo)
    return {blobs[b].pack for b in reachable(repo, sid)}


def check_unaffected_restore(repo, digests, bad_packs: set[int], base_repo: str):
    """Every snapshot that needs none of `bad_packs` (judged on the intact copy) restores identically."""
    n = 0
    for sid, d in digests.items():
        if not packs_of(base_repo, sid) & bad_packs:
            assert restore_digest(repo, sid) == d
            n += 1
    assert n, "the scenario should leave at least one snapshot untouched"


def verify_json(repo, *args, expect=DAMAGE):
    out, p = pit_json(repo, "verify", *args, expect=expect)
    return out


def assert_names_path(out, s, path):
    """Some damage entry names snapshot `s` and `path` or a lost ancestor of it (when a
    file's chunk list or a directory is lost too, the chunks cannot be placed, the
    list or directory can)."""
    def covers(p: str) -> bool:  # the path itself or a lost ancestor directory
        lbl, _, q = p.partition(":")
        return lbl == label(s) and (q == "/" or q == path or path.startswith(q + "/"))

    hits = [d for d in out["damage"] if label(s) in d["snapshots"] and any(covers(p) for p in d["paths"])]
    assert hits, f"{label(s)}:{path} not named; damage: {json.dumps(out['damage'])[:2000]}"


def one_damage(out, blob: bytes):
    hits = [d for d in out["damage"] if d["blob"] == blob.hex()]
    assert hits, f"blob {blob.hex()[:16]} not named; damage: {json.dumps(out['damage'])[:2000]}"
    return hits[0]


# --------------------------------------------------------------- flipped bytes


def test_flipped_chunk_byte_named_with_pack_offset_snapshot_path(env, base):
    repo, snaps, digests = env
    s2 = snaps["s2"]
    cid = file_chunks(repo, s2.hex, VICTIM)[1]
    e = all_blobs(repo)[cid]
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 7)

    out = verify_json(repo, "--deep")
    assert out["result"] == "damaged"
    d = one_damage(out, cid)
    assert d["kind"] == "chunk"
    assert d["where"] == f"pack {P.pack_name(e.pack)} offset {e.offset}"
    assert d["snapshots"] == [label(s2)]
    assert d["paths"] == [f"{label(s2)}:{VICTIM}"]
    assert len(out["damage"]) == 1
    text = pit(repo, "verify", "--deep", expect=DAMAGE).stdout.decode()
    assert P.pack_name(e.pack) in text and f"{label(s2)}:{VICTIM}" in text and "DAMAGE FOUND" in text
    # recorded as data
    from maint_helpers import get_snapmeta

    assert get_snapmeta(repo, s2.hex)["verify"]["result"] == "damaged"
    assert get_snapmeta(repo, snaps["s1"].hex)["verify"]["result"] == "good"

    # unaffected snapshots restore; the damaged one fails cleanly (never wrong bytes)
    for k in ("b1", "s1", "c1"):
        assert restore_digest(repo, snaps[k].hex) == digests[snaps[k].hex]
    p = pit(repo, "restore", s2.hex, "--target", os.path.join(os.path.dirname(repo), "out"),
            expect=DAMAGE)  # the rest restored, the victim named (tests/test_restore_damage.py)
    assert p.stderr.decode().startswith("pit: error:") and VICTIM in p.stderr.decode()
    p = pit(repo, "restore", s2.hex, "--target", os.path.join(os.path.dirname(repo), "out2"), "--fail-fast",
            expect=IntegrityError.exit_code)
    assert p.stderr.decode().startswith("pit: error:")
    # the rest of the damaged snapshot is still readable
    ok = pit(repo, "cat", f"{s2.hex}:src/f004.bin").stdout
    assert len(ok) > 0
    pit(repo, "cat", f"{s2.hex}:{VICTIM}", expect=IntegrityError.exit_code)


def test_flipped_shared_chunk_names_every_snapshot(env):
    repo, snaps, digests = env
    s1, s2 = snaps["s1"], snaps["s2"]
    cid = file_chunks(repo, s1.hex, "src/f004.bin")[0]
    assert cid in file_chunks(repo, s2.hex, "src/f004.bin")
    e = all_blobs(repo)[cid]
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + e.stored_len // 2)
    out = verify_json(repo, "--deep")
    d = one_damage(out, cid)
    assert sorted(d["snapshots"]) == sorted([label(s1), label(s2)])
    assert sorted(d["paths"]) == sorted([f"{label(s1)}:src/f004.bin", f"{label(s2)}:src/f004.bin"])
    for k in ("b1", "c1"):
        assert restore_digest(repo, snaps[k].hex) == digests[snaps[k].hex]


def test_flipped_tree_byte_found_by_structural_verify(env):
    repo, snaps, digests = env
    s2 = snaps["s2"]
    with opened(repo) as r, r.reading() as txn:
        from store.objects import ObjectReader

        tid = ObjectReader(r, txn).lookup(s2.root, "src/d1").content
    e = all_blobs(repo)[tid]
    assert tid not in reachable(repo, snaps["s1"].hex)  # d1 changed in s2
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 3)
    out = verify_json(repo)  # structural reads every tree
    d = one_damage(out, tid)
    assert d["kind"] == "tree"
    assert d["where"] == f"pack {P.pack_name(e.pack)} offset {e.offset}"
    assert d["snapshots"] == [label(s2)]
    assert d["paths"] == [f"{label(s2)}:src/d1"]
    for k in ("b1", "s1", "c1"):
        assert restore_digest(repo, snaps[k].hex) == digests[snaps[k].hex]


@pytest.mark.parametrize("where", ["crc", "reserved", "flags"])
def test_deep_verify_checks_tree_frames_as_repair_does(env, where):
    """A bit flipped in a tree frame's CRC, reserved bytes or unused flag bits
    reads fine through the index (which checks neither) but makes repair
    quarantine the frame: deep verify must find it first, with the path."""
    repo, snaps, digests = env
    s2 = snaps["s2"]
    with opened(repo) as r, r.reading() as txn:
        from store.objects import ObjectReader

        tid = ObjectReader(r, txn).lookup(s2.root, "src/d1").content
    e = all_blobs(repo)[tid]
    at = {"crc": P.FRAME_HEADER.size + e.stored_len + 1, "reserved": 6, "flags": 5}[where]
    with open(pack_path(repo, e.pack), "r+b") as f:
        f.seek(e.offset + at)
        b = f.read(1)
        f.seek(e.offset + at)
        f.write(bytes([b[0] ^ 0x02]))
    out = verify_json(repo, "--deep")
    d = one_damage(out, tid)
    assert d["kind"] == "tree" and d["paths"] == [f"{label(s2)}:src/d1"]


def _region_offset(repo, region: str, snaps) -> tuple[int, int]:
    """(pack number, byte offset) of `region` in the sealed pack that holds the victim."""
    cid = file_chunks(repo, snaps["s2"].hex, VICTIM)[0]
    e = all_blobs(repo)[cid]
    size = os.path.getsize(pack_path(repo, e.pack))
    footer_len = P.TRAILER.unpack(open(pack_path(repo, e.pack), "rb").read()[-P.TRAILER.size:])[0]
    return e.pack, {
        "pack-header": 3,                                             # inside the magic
        "frame-id": e.offset + 20,                                    # the blob id in a frame header
        "payload": e.offset + P.FRAME_HEADER.size + 1,
        "frame-crc": e.offset + P.FRAME_HEADER.size + e.stored_len + 1,
        "footer": size - P.TRAILER.size - footer_len // 2,            # the footer's frame list
    }[region]


@pytest.mark.parametrize("region", ["pack-header", "frame-id", "payload", "frame-crc", "footer"])
def test_flip_anywhere_in_a_sealed_pack_is_found(env, region):
    """A flipped byte anywhere in a pack is damage (repair trusts headers, CRCs and
    footers), so deep verify must find it and name the pack."""
    repo, snaps, digests = env
    num, off = _region_offset(repo, region, snaps)
    flip_byte(pack_path(repo, num), off)
    p = pit(repo, "verify", "--deep", "--json", expect=None)
    assert p.returncode == DAMAGE, f"flip in {region} at {off}: verify exit {p.returncode}, result {json.loads(p.stdout).get('result') if p.stdout.strip() else None}"
    assert P.pack_name(num) in p.stdout.decode()


def test_random_flips_never_give_wrong_bytes(env, base):
    """Flip bytes at seeded random offsets (one at a time, then undo): verify never
    crashes, and every restore either matches or fails with a store error; when a
    restore fails, verify --deep must have reported damage."""
    repo, snaps, digests = env
    seed = 20240601
    rng = random.Random(seed)
    print("random flip seed", seed)
    packs = sorted(pack_entries(repo))
    for trial in range(6):
        num = rng.choice(packs)
        path = pack_path(repo, num)
        off = rng.randrange(os.path.getsize(path))
        flip_byte(path, off)
        try:
            p = pit(repo, "verify", "--deep", "--json", expect=(0, DAMAGE))
            failed = []
            for sid, d in digests.items():
                try:
                    got = restore_digest(repo, sid)
                except StoreError:
                    failed.append(sid)
                    continue
                assert got == d, f"wrong bytes restored after a flip at {P.pack_name(num)}:{off}"
            if failed:
                assert p.returncode == DAMAGE, f"restore failed after flip at {P.pack_name(num)}:{off}, verify said clean"
        finally:
            flip_byte(path, off)  # undo


# ------------------------------------------------------- truncated / missing packs


def test_truncated_pack(env, base):
    repo, snaps, digests = env
    s2 = snaps["s2"]
    cid = file_chunks(repo, s2.hex, VICTIM)[0]
    e = all_blobs(repo)[cid]
    with open(pack_path(repo, e.pack), "r+b") as f:
        f.truncate(e.offset + 10)
    out = verify_json(repo)  # structural already sees it
    d = one_damage(out, cid)
    assert P.pack_name(e.pack) in d["where"]
    assert "truncated" in d["reason"]
    assert_names_path(out, s2, VICTIM)
    out = verify_json(repo, "--deep")
    one_damage(out, cid)
    check_unaffected_restore(repo, digests, {e.pack}, base[0])


def test_deleted_pack(env, base):
    repo, snaps, digests = env
    s2 = snaps["s2"]
    cid = file_chunks(repo, s2.hex, VICTIM)[0]
    e = all_blobs(repo)[cid]
    os.unlink(pack_path(repo, e.pack))
    out = verify_json(repo)
    assert any(P.pack_name(e.pack) in p and "missing" in p for p in out["problems"])
    d = one_damage(out, cid)
    assert P.pack_name(e.pack) in d["where"]
    assert_names_path(out, s2, VICTIM)
    # every blob of that pack is named
    lost = {b for b, be in all_blobs(repo).items() if be.pack == e.pack}
    assert lost <= {bytes.fromhex(x["blob"]) for x in out["damage"]}
    verify_json(repo, "--deep")
    check_unaffected_restore(repo, digests, {e.pack}, base[0])


def test_uncommitted_pack_past_next_pack_is_not_damage(env):
    """A pack numbered from `next_pack` on was never committed (a writer died before
    its commit): crash debris the next writer deletes, not damage."""
    repo, snaps, digests = env
    with opened(repo) as r, r.reading() as txn:
        nxt = U64.unpack(txn.get(b"next_pack", db=r.index.db["meta"]))[0]
    dst = pack_path(repo, nxt)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(pack_path(repo, min(pack_entries(repo))), dst)
    verify_json(repo, expect=0)
    pit(repo, "forget", "--set", "b", snaps["b1"].hex)  # any writer
    assert not os.path.exists(dst)


# ---------------------------------------------------------------- LMDB records


def test_index_points_at_wrong_offset(env):
    repo, snaps, digests = env
    s2 = snaps["s2"]
    cid = file_chunks(repo, s2.hex, VICTIM)[0]
    e = all_blobs(repo)[cid]
    bad = BlobEntry(e.kind, e.flags, e.pack, e.offset + 1, e.stored_len, e.raw_len, e.seq)
    lmdb_put(repo, "blobs", cid, bad.encode())
    out = verify_json(repo, "--deep")
    d = one_damage(out, cid)
    assert d["where"] == f"pack {P.pack_name(e.pack)} offset {e.offset + 1}"
    assert d["paths"] == [f"{label(s2)}:{VICTIM}"]
    for k in ("b1", "s1", "c1"):
        assert restore_digest(repo, snaps[k].hex) == digests[snaps[k].hex]


def test_index_loses_a_tree(env):
    repo, snaps, digests = env
    s2 = snaps["s2"]
    with opened(repo) as r, r.reading() as txn:
        from store.objects import ObjectReader

        tid = ObjectReader(r, txn).lookup(s2.root, "src/d1").content
    lmdb_put(repo, "blobs", tid, None)
    out = verify_json(repo)
    d = one_damage(out, tid)
    assert "missing" in d["reason"]
    assert d["snapshots"] == [label(s2)]
    assert d["paths"] == [f"{label(s2)}:src/d1"]
    for k in ("b1", "s1", "c1"):
        assert restore_digest(repo, snaps[k].hex) == digests[snaps[k].hex]


def test_index_loses_a_chunk(env):
    repo, snaps, digests = env
    s2 = snaps["s2"]
    cid = file_chunks(repo, s2.hex, VICTIM)[-1]
    lmdb_put(repo, "blobs", cid, None)
    out = verify_json(repo)
    d = one_damage(out, cid)
    assert d["paths"] == [f"{label(s2)}:{VICTIM}"]
    pit(repo, "cat", f"{s2.hex}:{VICTIM}", expect=(20, 21))


def test_index_loses_a_pack_record(env, base):
    """The pack is on disk, the index has forgotten it: verify names the pack and the
    blobs (and so the snapshots and paths) that point into it."""
    repo, snaps, digests = env
    s2 = snaps["s2"]
    cid = file_chunks(repo, s2.hex, VICTIM)[0]
    num = all_blobs(repo)[cid].pack
    lmdb_put(repo, "packs", U64.pack(num), None)
    out = verify_json(repo)
    assert any(P.pack_name(num) in p for p in out["problems"])
    d = one_damage(out, cid)
    assert P.pack_name(num) in d["where"]
    assert_names_path(out, s2, VICTIM)


def test_index_refcount_off_by_one(env):
    repo, snaps, digests = env
    cid = file_chunks(repo, snaps["s1"].hex, "src/f008.bin")[0]
    set_refcount(repo, cid, all_refs(repo)[cid] + 1)
    out = verify_json(repo)
    assert any(cid.hex()[:16] in p and "reference count" in p for p in out["problems"])
    # a snapshot-scoped verify cannot recount, but the deep read is still good
    verify_json(repo, "--snapshot", snaps["s1"].hex, "--deep", expect=0)


def _garbage_cases(snaps, repo):
    cid = file_chunks(repo, snaps["s1"].hex, "src/f012.bin")[0]
    first_pack = min(pack_entries(repo))
    s2 = snaps["s2"]
    dangling = b"\x07" * 32
    return {
        # key in db, value written, what verify must name
        "blob-record": ("blobs", cid, b"xx", cid.hex()[:16]),
        "snapshot-record": ("snapshots", s2.id, b"\xc1garbage", s2.id.hex()[:12]),
        "pack-record": ("packs", U64.pack(first_pack), b"\xc1", P.pack_name(first_pack)),
        "bytime-dangling": ("bytime", b"a\0" + U64.pack(1) + dangling, b"", dangling.hex()[:12]),
    }


@pytest.mark.parametrize("case", ["blob-record", "snapshot-record", "pack-record", "bytime-dangling"])
def test_unreadable_index_record_named_without_traceback(env, case):
    repo, snaps, digests = env
    db, key, value, name = _garbage_cases(snaps, repo)[case]
    lmdb_put(repo, db, key, value)
    p = pit(repo, "verify", expect=None)  # pit() itself fails on a traceback
    assert p.returncode == DAMAGE, f"{case}: verify exit {p.returncode}: {p.stderr.decode()[-500:]}"
    assert name in p.stdout.decode()


# ------------------------------------------------------- the parallel deep check


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_worker_processes_find_what_the_inline_check_finds(env, monkeypatch, damage):
    """Big deep checks run in worker processes (store.verify.PARALLEL_MIN): they
    must name the same blobs, places and reasons as the check run in-process."""
    from store import verify as V

    repo, snaps, _digests = env
    cid = file_chunks(repo, snaps["s2"].hex, VICTIM)[1]
    e = all_blobs(repo)[cid]
    path = pack_path(repo, e.pack)
    if damage == "flip":
        flip_byte(path, e.offset + P.FRAME_HEADER.size + 3)
    elif damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(e.offset + 10)
    else:
        os.unlink(path)

    def run():
        with opened(repo) as r:
            rep = V.verify(r, depth="deep", record=False)
        return (sorted((d.blob, d.kind, d.where, d.reason, tuple(d.snapshots)) for d in rep.damage),
                rep.chunks_read, rep.bytes_read)

    here = []  # spans checked in this process
    real = V.check_span
    monkeypatch.setattr(V, "check_span", lambda *a: here.append(a) or real(*a))
    inline = run()
    assert cid.hex() in {d[0] for d in inline[0]} and here
    here.clear()
    monkeypatch.setattr(V, "PARALLEL_MIN", 0)
    assert run() == inline
    assert not here, "the workers should have checked every span"
