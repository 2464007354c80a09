"""Repair: rebuild the LMDB index from the packs alone. Every snapshot restores
identically, pins and policies survive (SETTING frames), dropped snapshots stay
dropped (TOMBSTONE frames, also after compaction), counts are recounted; a
corrupt chunk is quarantined and the snapshots it breaks are marked damaged
with the lost paths, never silently dropped."""
from __future__ import annotations

import os
import random
import shutil

import pytest

from maint_helpers import (
    all_blobs, all_refs, assert_verify_clean, file_chunks, flip_byte, get_snapmeta, init_repo, lmdb_put, make_tree, set_refcount,
    mutate_tree, opened, pack_entries, pack_path, pit, pit_json, restore_digest, snap, snapshot_ids,
    source_digest, structural_verify, write_file,
)
from store import packs as P
from store.errors import IndexMissing, StoreError
from store.index import U64

DAMAGE = 3
VICTIM = "src/d1/victim.bin"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("repair")
    repo = init_repo(str(d / "repo"), pack_mib=1)
    rng = random.Random(61)
    src = str(d / "a" / "src")
    make_tree(src, rng, nfiles=16, size_range=(20_000, 120_000))
    digests, a = {}, []
    for i in range(5):
        if i:
            mutate_tree(src, rng, 3)
        if i == 3:
            write_file(os.path.join(src, "d1", "victim.bin"), rng.randbytes(70_000))
        s = snap(repo, "a", [src])
        a.append(s.hex)
        digests[s.hex] = source_digest(src)
    srcb = str(d / "b" / "src")
    make_tree(srcb, rng, nfiles=4, size_range=(5_000, 20_000))
    write_file(os.path.join(srcb, "big.bin"), rng.randbytes(1_100_000))  # seals the victim's pack
    b = snap(repo, "b", [srcb]).hex
    digests[b] = source_digest(srcb)
    victim_pack = all_blobs(repo)[file_chunks(repo, a[3], VICTIM)[0]].pack
    assert pack_entries(repo)[victim_pack].sealed
    return repo, a, b, digests


@pytest.fixture
def env(base, tmp_path):
    repo, a, b, digests = base
    dst = str(tmp_path / "repo")
    shutil.copytree(repo, dst)
    return dst, list(a), b, dict(digests)


def settings_state(repo):
    out, _ = pit_json(repo, "policy", "--set", "a")
    return out


def test_rebuild_after_deleting_the_index(env, tmp_path):
    repo, a, b, digests = env
    pit(repo, "policy", "--set", "a", "--max", "30", "--keep-last", "25")
    pit(repo, "pin", a[0])
    pit(repo, "pin", a[1])
    pit(repo, "unpin", a[1])  # the latest setting wins
    pit(repo, "forget", "--set", "a", a[2])  # tombstone
    digests.pop(a[2])
    pit(repo, "compact", "--threshold", "0")  # tombstones and settings are carried forward
    ids = snapshot_ids(repo)
    assert a[2] not in ids
    policy = settings_state(repo)

    shutil.rmtree(os.path.join(repo, "index"))
    pit(repo, "snapshots", expect=IndexMissing.exit_code)
    out, _ = pit_json(repo, "repair")
    assert out["snapshots"] == len(ids)
    assert out["quarantined"] == [] and out["damaged_snapshots"] == {}

    assert snapshot_ids(repo) == ids  # the dropped one did not come back
    for sid in ids:
        assert restore_digest(repo, sid) == digests[sid]
    assert get_snapmeta(repo, a[0]).get("pinned") is True
    assert not get_snapmeta(repo, a[1]).get("pinned")
    assert settings_state(repo) == policy
    assert_verify_clean(repo, deep=True)
    # the repository keeps working: snapshot, forget, compact, verify
    src = str(tmp_path / "more")
    write_file(os.path.join(src, "x.bin"), os.urandom(40_000))
    s = snap(repo, "a", [src])
    assert restore_digest(repo, s.hex) == source_digest(src)
    pit(repo, "forget", "--set", "a", a[3])
    pit(repo, "compact", "--threshold", "0")
    assert_verify_clean(repo, deep=True)
    assert a[0] in snapshot_ids(repo)


def test_dropped_snapshot_stays_dropped(env):
    repo, a, b, digests = env
    pit(repo, "forget", "--set", "a", a[1], a[4])
    ids = snapshot_ids(repo)
    shutil.rmtree(os.path.join(repo, "index"))
    out, _ = pit_json(repo, "repair")
    assert out["snapshots_dropped"] == 2
    assert snapshot_ids(repo) == ids
    assert_verify_clean(repo)


def test_repair_over_a_healthy_index_changes_nothing_visible(env):
    repo, a, b, digests = env
    refs = all_refs(repo)
    blobs = {k: (e.kind, refs[k]) for k, e in all_blobs(repo).items()}
    ids = snapshot_ids(repo)
    pit(repo, "repair")
    assert snapshot_ids(repo) == ids
    refs = all_refs(repo)
    assert {k: (e.kind, refs[k]) for k, e in all_blobs(repo).items()} == blobs
    assert_verify_clean(repo)
    assert not [n for n in os.listdir(repo) if n.startswith("index.")], "repair left an old or new index behind"


def test_repair_recounts_wrong_refcounts(env):
    repo, a, b, digests = env
    cid, n = next(iter(all_refs(repo).items()))
    set_refcount(repo, cid, n + 3)
    assert not structural_verify(repo).clean
    pit(repo, "repair")
    assert_verify_clean(repo)


def test_corrupt_children_record_is_found_and_repaired(env):
    """A filelist's `kids` record (what dropping it decrements) that no longer
    matches the object: structural verify names it, repair rebuilds it."""
    repo, a, b, digests = env
    lists = [e for e in all_blobs(repo).values() if e.kind == P.FILELIST]
    lmdb_put(repo, "kids", U64.pack(lists[0].seq), b"")
    out = structural_verify(repo)
    assert any("children record in the index does not match" in p for p in out.problems), out.problems
    pit(repo, "repair")
    assert_verify_clean(repo)


@pytest.mark.parametrize("bad", [None, b"xx", U64.pack(1)], ids=["absent", "corrupt", "too-low"])
def test_index_of_an_older_layout_or_a_bad_next_number_asks_for_repair(env, bad):
    """An index without sequence-numbered counts (layout 3's `next_seq`), or
    whose next number is unreadable or not above every number in use (new
    blobs would take live blobs' numbers, and a later drop would unindex the
    wrong ones), is refused with one line that says what to run; repair
    rebuilds it."""
    repo, a, b, digests = env
    lmdb_put(repo, "meta", b"next_seq", bad)
    p = pit(repo, "snapshots", expect=None)
    assert p.returncode != 0
    err = p.stderr.decode()
    assert "pit repair" in err and len(err.strip().splitlines()) == 1, err
    pit(repo, "repair")
    assert_verify_clean(repo)
    assert restore_digest(repo, a[-1]) == digests[a[-1]]


def test_repair_then_verify_agree_on_a_blob_stored_twice_in_one_pack(tmp_path):
    """Dropped, then stored again before its pack sealed: the pack holds two
    frames with one id; the rebuilt index may point at either (repair keeps the
    first), and verify must not call that a footer mismatch."""
    repo = init_repo(str(tmp_path / "repo"), pack_mib=1)
    src = str(tmp_path / "src")
    make_tree(src, random.Random(3), nfiles=3, size_range=(20_000, 40_000))
    first = snap(repo, "a", [src])
    pit(repo, "forget", "--set", "a", first.hex)
    snap(repo, "a", [src])
    write_file(os.path.join(src, "big.bin"), random.Random(4).randbytes(1_200_000))  # seals the pack
    s = snap(repo, "a", [src])
    pit(repo, "repair")
    assert_verify_clean(repo)
    assert restore_digest(repo, s.hex) == source_digest(src)


def test_repair_after_crash_in_index_swap(env):
    """The index renamed away, the new one not yet in place: `pit repair` fixes it."""
    repo, a, b, digests = env
    ids = snapshot_ids(repo)
    os.rename(os.path.join(repo, "index"), os.path.join(repo, "index.old-1"))
    os.makedirs(os.path.join(repo, "index.new"))
    with open(os.path.join(repo, "index.new", "data.mdb"), "wb") as f:
        f.write(b"half-built")
    pit(repo, "snapshots", expect=IndexMissing.exit_code)
    pit(repo, "repair")
    assert snapshot_ids(repo) == ids
    for sid in ids:
        assert restore_digest(repo, sid) == digests[sid]
    assert_verify_clean(repo)


def _victim(repo, a):
    cid = file_chunks(repo, a[3], VICTIM)[0]
    return cid, all_blobs(repo)[cid]


def victim_owners(a):
    """Snapshots a[3] and a[4] hold the victim file (added at i == 3)."""
    return a[3:5]


def test_repair_quarantines_corrupt_chunk_and_marks_snapshots(env):
    repo, a, b, digests = env
    cid, e = _victim(repo, a)
    owners = [s for s in victim_owners(a) if cid in file_chunks(repo, s, VICTIM)]
    assert owners
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 9)
    shutil.rmtree(os.path.join(repo, "index"))  # from packs alone

    out, p = pit_json(repo, "repair", expect=None)
    q = [x for x in out["quarantined"] if x["blob"] == cid.hex()]
    assert q and q[0]["pack"] == P.pack_name(e.pack) and q[0]["offset"] == e.offset
    assert cid in quarantine(repo)
    for s in owners:
        m = get_snapmeta(repo, s)
        assert m["verify"]["result"] == "damaged"
        assert VICTIM in m["lost"]
    damaged = out["damaged_snapshots"]
    assert len(damaged) == len(owners)
    for paths in damaged.values():
        assert VICTIM in paths
    # never silently dropped
    assert set(owners) <= set(snapshot_ids(repo))
    # unaffected snapshots restore identically
    for sid in a[:3] + [b]:
        assert restore_digest(repo, sid) == digests[sid]
    for s in owners:
        with pytest.raises(StoreError):
            restore_digest(repo, s)
    # verify names what is lost
    vout, _ = pit_json(repo, "verify", expect=DAMAGE)
    named = [d for d in vout["damage"] if d["blob"] == cid.hex()]
    assert named and any(VICTIM in p for p in named[0]["paths"])
    assert p.returncode == DAMAGE, f"`pit repair --json` exited {p.returncode} although it quarantined data"


def quarantine(repo) -> dict[bytes, dict]:
    import msgpack

    with opened(repo) as r, r.reading() as txn:
        with txn.cursor(db=r.index.db["quarantine"]) as cur:
            return {bytes(k): msgpack.unpackb(v) for k, v in cur}


def test_repair_corrupt_chunk_in_unsealed_pack(tmp_path):
    """No footer to go by: the frame walk skips the damaged frame; the chunk is still
    quarantined and the snapshot marked damaged with its path."""
    repo = init_repo(str(tmp_path / "repo"), pack_mib=8)
    rng = random.Random(62)
    src = str(tmp_path / "src")
    make_tree(src, rng, nfiles=6, size_range=(20_000, 60_000))
    s1 = snap(repo, "a", [src]).hex
    d1 = source_digest(src)
    write_file(os.path.join(src, "d1", "victim.bin"), rng.randbytes(50_000))
    s2 = snap(repo, "a", [src]).hex
    cid = file_chunks(repo, s2, VICTIM)[0]
    e = all_blobs(repo)[cid]
    assert not pack_entries(repo)[e.pack].sealed
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 4)
    shutil.rmtree(os.path.join(repo, "index"))
    p = pit(repo, "repair", expect=DAMAGE)
    assert VICTIM in p.stdout.decode()
    assert cid in quarantine(repo)
    m = get_snapmeta(repo, s2)
    assert m["verify"]["result"] == "damaged" and VICTIM in m["lost"]
    assert snapshot_ids(repo) == [s1, s2]
    assert restore_digest(repo, s1) == d1


def test_repair_text_mode_exit_code_on_damage(env):
    repo, a, b, digests = env
    cid, e = _victim(repo, a)
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 9)
    p = pit(repo, "repair", expect=DAMAGE)
    text = p.stdout.decode()
    assert "quarantined" in text and "DAMAGED" in text and VICTIM in text


@pytest.mark.parametrize("region", ["pack-header", "frame-crc", "footer", "payload"])
def test_repair_never_loses_a_snapshot_silently(env, region):
    """Whatever one flipped byte does to a sealed pack, after repair every snapshot
    either restores identically or is marked damaged (and repair says so)."""
    repo, a, b, digests = env
    sealed = [n for n, pe in pack_entries(repo).items() if pe.sealed]
    num = sealed[0]
    blobs = [(k, e) for k, e in all_blobs(repo).items() if e.pack == num and e.kind == 1]
    cid, e = blobs[len(blobs) // 2]
    path = pack_path(repo, num)
    size = os.path.getsize(path)
    off = {"pack-header": 1, "frame-crc": e.offset + P.FRAME_HEADER.size + e.stored_len,
           "footer": size - P.TRAILER.size - 5, "payload": e.offset + P.FRAME_HEADER.size + 2}[region]
    flip_byte(path, off)
    shutil.rmtree(os.path.join(repo, "index"))
    p = pit(repo, "repair", expect=(0, DAMAGE))
    for sid, d in digests.items():
        try:
            ok = restore_digest(repo, sid) == d
        except StoreError:
            ok = False
        if not ok:
            assert get_snapmeta(repo, sid).get("verify", {}).get("result") == "damaged", \
                f"{sid[:12]} no longer restores after repair of a flip in {region}, and is not marked damaged"
            assert p.returncode == DAMAGE


def test_repair_without_repository(tmp_path):
    pit(str(tmp_path / "nothing"), "repair", expect=10)


def test_leftover_old_index_from_a_killed_repair(env):
    """A repair killed after its swap but before removing the old index leaves
    `index.old-<seconds>` behind; the next repair (possibly within the same
    second) must still succeed."""
    import time

    repo, a, b, digests = env
    ids = snapshot_ids(repo)
    now = int(time.time())
    for t in range(now - 1, now + 30):
        d = os.path.join(repo, f"index.old-{t}")
        os.makedirs(d)
        with open(os.path.join(d, "data.mdb"), "wb") as f:
            f.write(b"old index")
    pit(repo, "repair")
    assert snapshot_ids(repo) == ids
    assert_verify_clean(repo)


def test_compaction_after_repairing_a_pack_with_a_torn_tail(tmp_path):
    """A crash mid-append leaves a partial frame past the open pack's committed
    size (not damage). A repair from the packs alone marks that pack sealed;
    it must end it before the partial frame, so compaction can still retire
    it (it refused the whole pack as damaged, and its garbage stayed)."""
    from store.compact import compact
    from store.prune import drop_snapshot
    from store.snapshots import get_snapshot

    repo = init_repo(str(tmp_path / "repo"), pack_mib=32)
    src = str(tmp_path / "src")
    rng = random.Random(63)
    write_file(os.path.join(src, "f"), rng.randbytes(50_000))
    s1 = snap(repo, "s", [src])
    write_file(os.path.join(src, "f"), rng.randbytes(50_000))
    s2 = snap(repo, "s", [src]).hex
    d2 = source_digest(src)
    with opened(repo, readonly=False) as r, r.writer() as w:
        drop_snapshot(w, get_snapshot(r, w.txn, s1.id))
    (num,) = pack_entries(repo)
    with open(pack_path(repo, num), "ab") as f:  # the torn frame of a crashed writer
        f.write(P.FRAME_HEADER.pack(P.FRAME_MAGIC, P.CHUNK, 0, 0, 5000, 5000, b"\1" * 32) + b"x" * 100)
    shutil.rmtree(os.path.join(repo, "index"))
    out, _ = pit_json(repo, "repair")
    assert out["damaged_snapshots"] == {} and out["quarantined"] == []
    assert any("partial frame" in d for d in out["packs_damaged"]), out["packs_damaged"]
    cout, _ = pit_json(repo, "compact", "--threshold", "0")
    assert cout["damaged"] == [] and cout["packs_compacted"] == 1, cout
    assert restore_digest(repo, s2) == d2
    assert_verify_clean(repo, deep=True)
