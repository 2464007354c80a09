"""Prune by reference counting: dropping a snapshot frees exactly what only it
referenced, keeps every count equal to a recount (structural verify recounts),
and leaves every other snapshot restoring byte-identically."""
from __future__ import annotations

import os
import random

import pytest

from store import packs as P

from maint_helpers import (
    all_blobs, all_refs, assert_verify_clean, init_repo, make_tree, mutate_tree, pit, pit_json, reachable,
    restore_digest, snap, snapshot_ids, source_digest, write_file,
)


@pytest.fixture
def repo(tmp_path):
    return init_repo(str(tmp_path / "repo"))


def build_history(repo, tmp_path, n=5, seed=11, set_name="s"):
    rng = random.Random(seed)
    src = str(tmp_path / "src")
    make_tree(src, rng, nfiles=14, size_range=(2000, 40_000))
    ids, digests = [], {}
    for i in range(n):
        if i:
            mutate_tree(src, rng, 3)
        s = snap(repo, set_name, [src])
        ids.append(s.hex)
        digests[s.hex] = source_digest(src)
    return src, ids, digests


def check_refcounts_against_own_recount(repo):
    """Our own recount, independent of verify: each distinct tree/filelist counts its
    children once, each snapshot counts its root."""
    from collections import Counter

    from maint_helpers import opened
    from store.files import decode_filelist_level
    from store.snapshots import list_snapshots
    from store.trees import decode_tree

    want: Counter = Counter()
    with opened(repo) as r, r.reading() as txn:
        seen = set()
        for s in list_snapshots(r, txn):
            want[s.root] += 1
            stack = [s.root]
            while stack:
                t = stack.pop()
                if t in seen:
                    continue
                seen.add(t)
                for e in decode_tree(r.read_blob(txn, t)):
                    c = e.refs()
                    if c is None:
                        continue
                    want[c] += 1
                    if e.type == 2:
                        stack.append(c)
                    elif e.nchunks > 1:
                        lists = [c]  # a leaf, or an index whose entries are leaves
                        while lists:
                            fl = lists.pop()
                            if fl in seen:
                                continue
                            seen.add(fl)
                            level, kids, _ = decode_filelist_level(r.read_blob(txn, fl))
                            for ch in kids:
                                want[ch] += 1
                                if level == 2:
                                    lists.append(ch)
    have = all_refs(repo)
    assert have == dict(want)


def test_drop_oldest_frees_only_what_only_it_referenced(repo, tmp_path):
    _, ids, digests = build_history(repo, tmp_path)
    reach = {sid: reachable(repo, sid) for sid in ids}
    others = set().union(*(reach[s] for s in ids[1:]))
    unique = set(reach[ids[0]]) - others
    assert unique, "the oldest snapshot should own something"
    before = all_blobs(repo)

    out, _ = pit_json(repo, "forget", "--set", "s", ids[0])
    assert out["dropped"]["snapshots"] == 1
    assert out["dropped"]["blobs_freed"] == len(unique)
    assert out["dropped"]["bytes_freed"] == sum(before[b].stored_len + P.FRAME_OVERHEAD for b in unique)
    assert out["dropped"]["leaked"] == []

    after = all_blobs(repo)
    assert set(after) == set(before) - unique
    assert set(after) == others
    check_refcounts_against_own_recount(repo)
    assert_verify_clean(repo)
    for sid in ids[1:]:
        assert restore_digest(repo, sid) == digests[sid]


def test_drop_middle_snapshot(repo, tmp_path):
    _, ids, digests = build_history(repo, tmp_path, seed=12)
    reach = {sid: set(reachable(repo, sid)) for sid in ids}
    keep = [s for s in ids if s != ids[2]]
    unique = reach[ids[2]] - set().union(*(reach[s] for s in keep))
    out, _ = pit_json(repo, "forget", "--set", "s", ids[2])
    assert out["dropped"]["blobs_freed"] == len(unique)
    assert set(all_blobs(repo)) == set().union(*(reach[s] for s in keep))
    assert_verify_clean(repo)
    for sid in keep:
        assert restore_digest(repo, sid) == digests[sid]


def test_drop_snapshot_fully_shared_frees_nothing(repo, tmp_path):
    rng = random.Random(5)
    src = str(tmp_path / "src")
    make_tree(src, rng, nfiles=6)
    a = snap(repo, "s", [src])
    b = snap(repo, "s", [src])  # nothing changed: the same root tree
    assert a.root == b.root
    n = len(all_blobs(repo))
    out, _ = pit_json(repo, "forget", "--set", "s", a.hex)
    assert out["dropped"]["blobs_freed"] == 0
    assert len(all_blobs(repo)) == n
    assert_verify_clean(repo)
    assert restore_digest(repo, b.hex) == source_digest(src)


def test_shared_content_across_sets_survives_drop(repo, tmp_path):
    rng = random.Random(6)
    src = str(tmp_path / "src")
    make_tree(src, rng, nfiles=8)
    a = snap(repo, "a", [src])
    write_file(os.path.join(src, "only-b.bin"), rng.randbytes(30_000))
    b = snap(repo, "b", [src])
    out, _ = pit_json(repo, "forget", "--set", "a", a.hex)
    # a's files are all in b (dedup across sets): only a's own root tree(s) go
    assert set(all_blobs(repo)) == set(reachable(repo, b.hex))
    assert out["dropped"]["blobs_freed"] >= 1
    assert_verify_clean(repo)
    assert restore_digest(repo, b.hex) == source_digest(src)


def test_drop_everything_leaves_no_blob(repo, tmp_path):
    _, ids, _ = build_history(repo, tmp_path, n=4, seed=13)
    pit(repo, "forget", "--set", "s", *ids)
    assert snapshot_ids(repo) == []
    assert all_blobs(repo) == {}  # no leaked reference anywhere
    assert_verify_clean(repo)


def test_random_snapshots_and_drops_keep_counts_exact(repo, tmp_path):
    rng = random.Random(21)
    src = str(tmp_path / "src")
    make_tree(src, rng, nfiles=10, size_range=(500, 30_000))
    digests = {}
    for step in range(14):
        live = snapshot_ids(repo)
        if live and rng.random() < 0.35:
            victim = rng.choice(live)
            pit(repo, "forget", "--set", "s", victim)
            digests.pop(victim)
        else:
            mutate_tree(src, rng, rng.randint(1, 3))
            s = snap(repo, "s", [src])
            digests[s.hex] = source_digest(src)
        check_refcounts_against_own_recount(repo)
    assert_verify_clean(repo)
    assert set(snapshot_ids(repo)) == set(digests)
    for sid, d in digests.items():
        assert restore_digest(repo, sid) == d


def test_prune_applies_stored_policies_then_compacts(repo, tmp_path):
    _, ids, digests = build_history(repo, tmp_path, n=5, seed=14)
    pit(repo, "policy", "--set", "s", "--max", "2")
    assert snapshot_ids(repo) == ids  # setting a policy drops nothing by itself
    out, _ = pit_json(repo, "prune", "--threshold", "0")
    assert out["snapshots_dropped"] == 3
    assert "packs_compacted" in out["compact"]
    assert snapshot_ids(repo) == ids[-2:]
    assert_verify_clean(repo, deep=True)
    for sid in ids[-2:]:
        assert restore_digest(repo, sid) == digests[sid]
    out, _ = pit_json(repo, "prune")
    assert out["snapshots_dropped"] == 0
    text = pit(repo, "prune").stdout.decode()
    assert "retention dropped 0 snapshots" in text


def test_big_file_drops_of_oldest_and_middle_keep_counts_exact(repo, tmp_path):
    """A file with a two-level chunk list changing in a few scattered pages per
    snapshot (the benchmark's db): dropping the oldest, then a middle snapshot,
    frees exactly what only they held and leaves every count equal to a recount
    from scratch (ours and verify's)."""
    from maint_helpers import MiB, opened
    from store.objects import ObjectReader

    rng = random.Random(31)
    src = str(tmp_path / "src")
    make_tree(src, rng, nfiles=6)
    big = os.path.join(src, "db.bin")
    # a zeroed region: the same chunk many times in one leaf (n decrements at once)
    write_file(big, rng.randbytes(2 * MiB) + bytes(MiB) + rng.randbytes(MiB))
    ids, digests = [], {}
    for i in range(6):
        if i:
            with open(big, "r+b") as f:
                for lo, hi in ((0, 2 * MiB), (2 * MiB, 3 * MiB), (3 * MiB, 4 * MiB)):
                    f.seek(rng.randrange(lo, hi - 4096) & ~4095)
                    f.write(rng.randbytes(4096))
            mutate_tree(src, rng, 1)
        s = snap(repo, "s", [src])
        ids.append(s.hex)
        digests[s.hex] = source_digest(src)
    with opened(repo) as r, r.reading() as txn:
        s0 = [s for s in snapshots_of(r, txn) if s.hex == ids[0]][0]
        entry = dict(ObjectReader(r, txn).walk(s0.root))[os.path.basename(src).encode() + b"/db.bin"]
        assert entry.nchunks > 256  # two-level: an index over leaves
    check_refcounts_against_own_recount(repo)

    live = list(ids)
    for victim in (ids[0], ids[3]):  # the oldest, then one in the middle
        reach = {sid: set(reachable(repo, sid)) for sid in live}
        live.remove(victim)
        unique = reach[victim] - set().union(*(reach[s] for s in live))
        before = all_blobs(repo)
        out, _ = pit_json(repo, "forget", "--set", "s", victim)
        assert out["dropped"]["blobs_freed"] == len(unique)
        assert out["dropped"]["bytes_freed"] == sum(before[b].stored_len + P.FRAME_OVERHEAD for b in unique)
        assert set(all_blobs(repo)) == set(before) - unique
        check_refcounts_against_own_recount(repo)
        assert_verify_clean(repo)
    for sid in live:
        assert restore_digest(repo, sid) == digests[sid]


def snapshots_of(r, txn):
    from store.snapshots import list_snapshots

    return list_snapshots(r, txn)


@pytest.mark.parametrize("flush_early", [False, True])
def test_blobs_nothing_referenced_are_swept_and_release_their_children(repo, tmp_path, monkeypatch, flush_early):
    """A chunk list written in a session but referenced by nothing at its end
    (the file vanished before its tree entry was made) is not indexed, and
    the chunks it linked lose that reference: counts still equal a recount."""
    from maint_helpers import opened, pack_entries
    from store.repository import Writer, object_id, write_filelist

    src = str(tmp_path / "src")
    make_tree(src, random.Random(5), nfiles=4, size_range=(30_000, 90_000))
    s = snap(repo, "s", [src])
    refs_before, dead_before = all_refs(repo), sum(p.dead for p in pack_entries(repo).values())
    if flush_early:  # the pending entries reach LMDB before the sweep
        monkeypatch.setattr(Writer, "PENDING_MAX", 1)
    old_chunk, old = next((k, e) for k, e in all_blobs(repo).items() if e.kind == P.CHUNK)
    with opened(repo, readonly=False) as r, r.writer() as w:
        new_chunks = []
        for i in range(3):
            data = random.Random(i).randbytes(5000)
            cid = object_id(P.CHUNK, data)
            w.put(P.CHUNK, cid, data)
            new_chunks.append(cid)
        orphan = write_filelist(w, new_chunks + [old_chunk], [5000, 5000, 5000, old.raw_len])
    assert orphan not in all_blobs(repo)
    assert not set(new_chunks) & set(all_blobs(repo))
    assert all_refs(repo) == refs_before  # the old chunk's extra reference went with the orphan list
    assert sum(p.dead for p in pack_entries(repo).values()) > dead_before
    assert_verify_clean(repo)
    assert restore_digest(repo, s.hex) == source_digest(src)


def test_a_corrupt_children_record_leaks_space_but_never_blocks_a_drop(repo, tmp_path):
    """Dropping a snapshot whose root's `kids` record is damaged: the drop (and
    so the retention of the next backup) goes through, the children the record
    named keep a reference too many (reported as leaked, never data lost), and
    repair recounts."""
    from maint_helpers import lmdb_put
    from store.index import U64

    src, ids, digests = build_history(repo, tmp_path, n=3)
    root = all_blobs(repo)[_root_of(repo, ids[0])]
    lmdb_put(repo, "kids", U64.pack(root.seq), b"\x01\x02\x03")
    out, _ = pit_json(repo, "forget", "--set", "s", ids[0])
    assert out["dropped"]["snapshots"] == 1 and out["dropped"]["leaked"], out
    pit(repo, "repair")
    assert_verify_clean(repo)
    for sid in ids[1:]:
        assert restore_digest(repo, sid) == digests[sid]


def _root_of(repo, sid_hex):
    from maint_helpers import opened
    from store.snapshots import resolve

    with opened(repo) as r, r.reading() as txn:
        return resolve(r, txn, sid_hex).root
