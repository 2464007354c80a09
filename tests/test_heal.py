"""Issue 12, item 1: after `pit repair` quarantines a damaged or lost blob, the
next snapshot of the intact source heals it.

Reproduction (before the fix): init, snapshot a directory with a 3 MB random
file, flip a byte inside a chunk frame, `pit repair` (quarantines the chunk,
marks the snapshot damaged), `pit snapshot` of the same unchanged source
exits 0, but `pit restore` fails "chunk ... is not in the index": the chunk
was stored again, but the filelist naming it already existed (it was not
linked again), so the new chunk had no reference and was swept at commit.

Now repair reserves a sequence number for every referenced blob it lost
(`refs` count, parents' `kids`, a quarantine record with `seq`, no `blobs`
record), and a writer that stores such a blob again takes that number: the
damaged snapshots are whole again (docs/format.md, section 7 `quarantine`).
Real files, real LMDB, real `pit` processes where the CLI is the point."""
from __future__ import annotations

import os
import random
import shutil

import msgpack
import pytest

from maint_helpers import (
    all_blobs, all_refs, assert_verify_clean, file_chunks, flip_byte, get_snapmeta, init_repo, opened, pack_entries,
    pack_path, pit, pit_json, restore_digest, snap, snapshot_ids, snapshots, source_digest, structural_verify,
    write_file,
)
from store import packs as P
from store.repair import rebuild_index

DAMAGE = 3
BIG = "src/big.bin"


def quarantine(repo) -> dict[bytes, dict]:
    with opened(repo) as r, r.reading() as txn:
        with txn.cursor(db=r.index.db["quarantine"]) as cur:
            return {bytes(k): msgpack.unpackb(v) for k, v in cur}


def make_source(root: str, seed: int = 12) -> str:
    rng = random.Random(seed)
    src = os.path.join(root, "src")
    write_file(os.path.join(src, "sub", "a.bin"), rng.randbytes(30_000))
    write_file(os.path.join(src, "sub", "b.bin"), rng.randbytes(20_000))
    write_file(os.path.join(src, "big.bin"), rng.randbytes(3_000_000))
    write_file(os.path.join(src, "other.bin"), rng.randbytes(400_000))
    return src


def _tree_of(repo, sid: str, path: str) -> bytes:
    from store.objects import ObjectReader
    from store.snapshots import get_snapshot

    with opened(repo) as r, r.reading() as txn:
        s = get_snapshot(r, txn, bytes.fromhex(sid))
        return ObjectReader(r, txn).lookup(s.root, path).content


def damage(repo: str, sid: str, how: str) -> set[bytes]:
    """Damage the packs behind snapshot `sid`; returns blobs that are surely lost."""
    blobs = all_blobs(repo)
    if how in ("chunk-unsealed", "chunk-sealed"):
        cid = file_chunks(repo, sid, BIG)[len(file_chunks(repo, sid, BIG)) // 2]
        e = blobs[cid]
        assert pack_entries(repo)[e.pack].sealed == (how == "chunk-sealed")
        flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 100)
        return {cid}
    if how == "tree":  # a directory's tree: healing it must give it its children record
        tid = _tree_of(repo, sid, "src/sub")
        e = blobs[tid]
        flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 3)
        return {tid}
    # whole packs: one with chunks only (truncated), one with the big file's chunk lists (deleted)
    kinds: dict[int, set[int]] = {}
    for e in blobs.values():
        kinds.setdefault(e.pack, set()).add(e.kind)
    last = max(kinds)  # holds the snapshot frame: losing it would drop the snapshot, not damage it
    if how == "truncated-pack":
        num = min(n for n, k in kinds.items() if k == {P.CHUNK} and n != last)
        size = os.path.getsize(pack_path(repo, num))
        with open(pack_path(repo, num), "r+b") as f:
            f.truncate(size // 2)
        return {b for b, e in blobs.items() if e.pack == num and e.offset + P.FRAME_OVERHEAD + e.stored_len > size // 2}
    assert how == "deleted-pack"
    num = min(n for n, k in kinds.items() if P.FILELIST in k and n != last)
    os.unlink(pack_path(repo, num))
    return {b for b, e in blobs.items() if e.pack == num}


DAMAGES = ["chunk-unsealed", "chunk-sealed", "tree", "truncated-pack", "deleted-pack"]


@pytest.fixture(params=DAMAGES)
def damaged(request, tmp_path, monkeypatch):
    """A repaired repository whose one snapshot lost blobs: (repo, src, snapshot id, digest, lost ids)."""
    from store import ingest

    how = request.param
    # one file per read task: a file's chunk list is written right after its chunks, so the big
    # file's list lies in a pack before the last (whose loss would drop the snapshot itself)
    monkeypatch.setattr(ingest, "TASK_FILES", 1)
    repo = init_repo(str(tmp_path / "repo"), pack_mib=32 if how == "chunk-unsealed" else 1)
    src = make_source(str(tmp_path / "a"))
    s1 = snap(repo, "a", [src]).hex
    digest = source_digest(src)
    lost = damage(repo, s1, how)
    rep = rebuild_index(repo)
    assert rep.damaged_snapshots, f"{how}: repair found nothing damaged"
    q = quarantine(repo)
    for bid in lost & set(q):  # lost blobs under a lost tree or filelist are unknown to repair: no record
        assert isinstance(q[bid].get("seq"), int), q[bid]
    assert any(isinstance(r.get("seq"), int) for r in q.values())
    return repo, src, s1, digest, how


def _assert_healed(repo: str, old: str, digest: dict) -> None:
    assert restore_digest(repo, old) == digest
    assert_verify_clean(repo, deep=True)
    assert not [r for r in quarantine(repo).values() if "seq" in r], "a lost blob is still quarantined"


@pytest.mark.parametrize("healer", ["same-set", "new-set", "copy"])
def test_next_snapshot_of_intact_data_heals(damaged, healer, tmp_path):
    repo, src, s1, digest, how = damaged
    # before: verify names the loss as quarantined, with the snapshot and path it breaks,
    # and accepts the reserved numbers (no reference-count or children-record findings)
    rep = structural_verify(repo)
    assert not rep.problems, rep.problems
    assert rep.damage and all(d.reason.startswith("quarantined by repair: ") for d in rep.damage), \
        [(d.reason, d.where) for d in rep.damage]
    label = [f"{x.set}@{x.name}" for x in snapshots(repo) if x.hex == s1][0]
    assert all(d.snapshots == [label] and d.paths for d in rep.damage), [(d.snapshots, d.paths) for d in rep.damage]
    with pytest.raises(Exception):
        restore_digest(repo, s1)

    if healer == "copy":  # a fresh copy of the data elsewhere, in another set
        where = str(tmp_path / "elsewhere" / "copy")
        shutil.copytree(src, where)
        s2 = snap(repo, "c", [where]).hex
        want2 = source_digest(where)
    else:
        s2 = snap(repo, "a" if healer == "same-set" else "b", [src]).hex
        want2 = digest
    _assert_healed(repo, s1, digest)
    assert restore_digest(repo, s2) == want2
    # the damaged mark is superseded by the next recorded verify
    assert get_snapmeta(repo, s1)["verify"]["result"] == "damaged"
    out, _ = pit_json(repo, "verify", "--deep")
    assert out["result"] == "good" and out["recorded"]
    meta = get_snapmeta(repo, s1)
    assert meta["verify"]["result"] == "good" and "lost" not in meta
    # and the healed index behaves like any other: drop the old snapshot, then the new one
    pit(repo, "forget", "--set", "a", s1)
    assert_verify_clean(repo)
    assert restore_digest(repo, s2) == want2
    pit(repo, "forget", "--set", "a" if healer == "same-set" else "b" if healer == "new-set" else "c", s2)
    assert_verify_clean(repo)
    assert all_refs(repo) == {} and all_blobs(repo) == {}


def test_prune_before_healing_leaves_nothing_behind(damaged):
    """Dropping the damaged snapshot before any heal: the lost blobs' numbers and
    quarantine records go with their last reference; no leak, verify clean."""
    repo, src, s1, digest, how = damaged
    out, _ = pit_json(repo, "forget", "--set", "a", s1)
    assert out["dropped"]["leaked"] == [], out["dropped"]
    assert out["dropped"]["quarantine_released"] >= 1
    assert_verify_clean(repo)
    assert not [r for r in quarantine(repo).values() if "seq" in r]
    assert all_refs(repo) == {} and all_blobs(repo) == {}
    s2 = snap(repo, "a", [src]).hex
    assert restore_digest(repo, s2) == digest
    assert_verify_clean(repo, deep=True)


def test_cli_reproduction(tmp_path):
    """The issue's reproduction, step by step with `pit`."""
    repo = str(tmp_path / "repo")
    pit(repo, "init")
    src = str(tmp_path / "src")
    write_file(os.path.join(src, "f.bin"), random.Random(1).randbytes(3_000_000))
    pit(repo, "snapshot", "--set", "a", src)
    old = snapshot_ids(repo)[0]
    cids = file_chunks(repo, old, "src/f.bin")
    e = all_blobs(repo)[cids[len(cids) // 2]]
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 100)
    text = pit(repo, "repair", expect=DAMAGE).stdout.decode()
    assert "DAMAGED" in text and "src/f.bin" in text
    pit(repo, "snapshot", "--set", "a", src)
    new = snapshot_ids(repo)[1]
    for sid in (old, new):
        out = str(tmp_path / f"out-{sid[:8]}")
        pit(repo, "restore", sid, "--target", out)
        with open(os.path.join(out, "src", "f.bin"), "rb") as a, open(os.path.join(src, "f.bin"), "rb") as b:
            assert a.read() == b.read()
    out, _ = pit_json(repo, "verify", "--deep")
    assert out["result"] == "good", out
    assert quarantine(repo) == {}


def test_two_snapshots_share_a_lost_chunk(tmp_path):
    """A lost chunk two snapshots need is counted twice over its parents; one heal mends both."""
    repo = init_repo(str(tmp_path / "repo"), pack_mib=1)
    src = make_source(str(tmp_path / "a"))
    s1 = snap(repo, "a", [src]).hex
    write_file(os.path.join(src, "sub", "c.bin"), b"another file: a new src tree, the same big.bin")
    s2 = snap(repo, "a", [src]).hex
    d2 = source_digest(src)
    os.unlink(os.path.join(src, "sub", "c.bin"))
    d1 = source_digest(src)
    damage(repo, s1, "chunk-sealed")
    rep = rebuild_index(repo)
    assert len(rep.damaged_snapshots) == 2
    assert not structural_verify(repo).problems
    write_file(os.path.join(src, "sub", "c.bin"), b"another file: a new src tree, the same big.bin")
    # the files cache is empty after a repair: the file is read again
    s3 = snap(repo, "b", [src]).hex
    for sid, d in ((s1, d1), (s2, d2), (s3, d2)):
        assert restore_digest(repo, sid) == d
    assert_verify_clean(repo, deep=True)


def test_unreferenced_damaged_frame_record_goes_when_stored_again(tmp_path):
    """A damaged frame nothing references gets a quarantine record without `seq`;
    storing the blob again deletes the record (and verify never counted it)."""
    repo = init_repo(str(tmp_path / "repo"), pack_mib=1)
    src = make_source(str(tmp_path / "a"))
    s1 = snap(repo, "a", [src]).hex
    digest = source_digest(src)
    cids = file_chunks(repo, s1, BIG)
    cid = cids[len(cids) // 2]
    e = all_blobs(repo)[cid]
    pit(repo, "forget", "--set", "a", s1)  # its frames stay in the sealed packs, as garbage
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 100)
    rebuild_index(repo)
    q = quarantine(repo)
    assert cid in q and "seq" not in q[cid]
    assert_verify_clean(repo)
    s2 = snap(repo, "a", [src]).hex
    assert cid not in quarantine(repo)
    assert restore_digest(repo, s2) == digest
    assert_verify_clean(repo, deep=True)


def test_repair_report_names_each_lost_path_once(tmp_path):
    """A deleted pack costs a file hundreds of chunks: the file is named once per
    snapshot, in the report, in `snapmeta`, and in the text output."""
    repo = init_repo(str(tmp_path / "repo"), pack_mib=1)
    src = make_source(str(tmp_path / "a"))
    s1 = snap(repo, "a", [src]).hex
    damage(repo, s1, "truncated-pack")
    out, _ = pit_json(repo, "repair", expect=DAMAGE)
    for label, paths in out["damaged_snapshots"].items():
        assert len(paths) == len(set(paths)), paths
        assert BIG in paths
    assert len(out["packs_damaged"]) == len(set(out["packs_damaged"]))
    assert get_snapmeta(repo, s1)["lost"].count(BIG) == 1
    text = pit(repo, "repair", expect=DAMAGE).stdout.decode()
    line = [ln for ln in text.splitlines() if "DAMAGED" in ln][0]
    assert line.count(BIG) == 1, line
    assert len(text.splitlines()) < 40, text  # hundreds of lost chunks are summarised


def test_repair_after_healing_uses_the_healed_copy(tmp_path):
    """The damaged frame stays in its pack after the heal: a later repair takes
    the intact copy, loses nothing, and says the damaged one is only a copy."""
    repo = init_repo(str(tmp_path / "repo"), pack_mib=1)
    src = make_source(str(tmp_path / "a"))
    s1 = snap(repo, "a", [src]).hex
    digest = source_digest(src)
    (cid,) = damage(repo, s1, "chunk-sealed")
    rebuild_index(repo)
    s2 = snap(repo, "a", [src]).hex
    out, _ = pit_json(repo, "repair", expect=DAMAGE)  # the pack still holds a damaged frame
    assert out["damaged_snapshots"] == {} and out["blobs_quarantined"] == 0
    assert [q["intact_copy"] for q in out["quarantined"] if q["blob"] == cid.hex()] == [True]
    assert quarantine(repo) == {}
    text = pit(repo, "repair", expect=DAMAGE).stdout.decode()
    assert f"damaged copy of chunk {cid.hex()[:16]}" in text and "DAMAGED" not in text
    for sid in (s1, s2):
        assert restore_digest(repo, sid) == digest
    assert_verify_clean(repo, deep=True)
