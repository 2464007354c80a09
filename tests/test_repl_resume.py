"""The replica's chunk spool (replicator/stream/spool.py): kept across a kill, verified on reload, capped,
held by one connection at a time; and the batches that use it.

* Unit tests on real files: reopen, a torn tail, a flipped byte, the cap, the lock, truncation and
  compaction.
* A batch whose changes span several CHANGES frames: the master sends a batch's chunks in one
  OFFER/NEED/CHUNKS round and then its changes in as many CHANGES frames as their size needs
  (changes.py, `CHANGES_BYTES`). The replica used to empty its spool after every CHANGES frame, so the
  second frame's chunks were gone ("neither sent nor present"), the connection dropped, and the
  catch-up sent them again.
* A replica SIGKILLed in the middle of seeding: after its restart the master sends what it lacked, not
  the whole batch again, and a record damaged in the spool meanwhile is asked for again, never stored.
"""
from __future__ import annotations

import json
import os
import random
import signal

import blake3
import zstandard

from replicator.stream import spool as S
from store import packs as P
from test_repl_helpers import cluster, small_frames, wait_for  # noqa: F401  (fixtures)

MIB = 1024 * 1024


def chunk(rng: random.Random, n: int = 20000) -> tuple[bytes, int, int, bytes]:
    """(id, flags, raw length, payload) of a chunk as it comes off the wire: half random, so zstd keeps some."""
    data = rng.randbytes(n // 2) + bytes(n - n // 2)
    return blake3.blake3(data).digest(), P.ZSTD, n, zstandard.ZstdCompressor(level=3).compress(data)


def spool_at(d, **kw) -> S.Spool:
    return S.Spool.open(str(d), "web", zstandard.ZstdDecompressor(), **kw)


def test_records_survive_a_reopen(tmp_path):
    rng = random.Random(1)
    got = [chunk(rng) for _ in range(3)]
    sp = spool_at(tmp_path, cap=10 * MIB)
    assert sp.persistent
    for c in got:
        sp.add(*c)
    sp.close()  # as a SIGKILL leaves it: nothing else was written

    sp = spool_at(tmp_path, cap=10 * MIB)
    try:
        assert sorted(sp.ids()) == sorted(c[0] for c in got)
        for cid, flags, raw_len, payload in got:
            assert sp.get(cid) == (flags, payload, raw_len)
    finally:
        sp.close()


def test_the_last_payloads_are_served_from_memory_and_the_rest_from_the_file(tmp_path, monkeypatch):
    """The applier asks for chunks soon after they came: the last RECENT_BYTES of payloads are kept in
    memory too (no read back); older ones come from the file, byte for byte the same; a discarded
    chunk is gone from both."""
    monkeypatch.setattr(S, "RECENT_BYTES", 25_000)  # about two of these payloads
    rng = random.Random(11)
    got = [chunk(rng) for _ in range(5)]
    sp = spool_at(tmp_path, cap=10 * MIB)
    try:
        for c in got:
            sp.add(*c)
        assert list(sp.recent) == [c[0] for c in got[-len(sp.recent):]] and 0 < len(sp.recent) < 5
        assert sp.recent_bytes <= 25_000
        reads = []
        real = S._File.read
        monkeypatch.setattr(S._File, "read", lambda self, cid: reads.append(cid) or real(self, cid))
        for cid, flags, raw_len, payload in got:
            assert sp.get(cid) == (flags, payload, raw_len)
        assert reads == [c[0] for c in got[:5 - len(sp.recent)]]  # the older ones only
        last = got[-1][0]
        sp.discard([last])
        assert last not in sp.recent and last not in sp
    finally:
        sp.close()


def test_a_torn_or_garbled_tail_is_cut(tmp_path):
    rng = random.Random(2)
    got = [chunk(rng) for _ in range(3)]
    sp = spool_at(tmp_path, cap=10 * MIB)
    for c in got:
        sp.add(*c)
    two = sp.main.recs[got[2][0]][0]  # where the third record starts
    sp.close()
    path = tmp_path / "spool-web"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)  # the third record's payload cut short
    sp = spool_at(tmp_path, cap=10 * MIB)
    assert sorted(sp.ids()) == sorted(c[0] for c in got[:2])
    assert os.path.getsize(path) == two
    sp.add(*got[2])  # appended where the torn record was
    sp.close()
    with open(path, "ab") as f:
        f.write(b"PSP1" + rng.randbytes(200))  # a header that does not check out
    sp = spool_at(tmp_path, cap=10 * MIB)
    try:
        assert sorted(sp.ids()) == sorted(c[0] for c in got)
        assert os.path.getsize(path) == sp.main.end
    finally:
        sp.close()


def test_a_flipped_byte_drops_that_record_only(tmp_path):
    rng = random.Random(3)
    got = [chunk(rng) for _ in range(3)]
    sp = spool_at(tmp_path, cap=10 * MIB)
    for c in got:
        sp.add(*c)
    off, n = sp.main.recs[got[1][0]][:2]
    sp.close()
    with open(tmp_path / "spool-web", "r+b") as f:
        f.seek(off + S.REC.size + n // 2)
        b = f.read(1)
        f.seek(off + S.REC.size + n // 2)
        f.write(bytes([b[0] ^ 0x40]))
    sp = spool_at(tmp_path, cap=10 * MIB)
    try:
        assert got[1][0] not in sp  # so the OFFER handler NEEDs it again, and nothing can store these bytes
        assert sorted(sp.ids()) == sorted([got[0][0], got[2][0]])
        assert sp.get(got[2][0]) == (got[2][1], got[2][3], got[2][2])
    finally:
        sp.close()


def test_old_records_expire(tmp_path, monkeypatch):
    rng = random.Random(4)
    sp = spool_at(tmp_path, cap=10 * MIB)
    sp.add(*chunk(rng))
    sp.close()
    monkeypatch.setattr(S, "MAX_AGE", -10)
    sp = spool_at(tmp_path, cap=10 * MIB)
    try:
        assert len(sp) == 0 and os.path.getsize(tmp_path / "spool-web") == 0
    finally:
        sp.close()


def test_the_cap(tmp_path):
    """Past its cap the spool still takes every chunk (a private file), but keeps only what fits."""
    rng = random.Random(5)
    got = [chunk(rng) for _ in range(6)]
    one = S.REC.size + len(got[0][3])
    cap = 3 * one + one // 2
    sp = spool_at(tmp_path, cap=cap)
    for c in got:
        sp.add(*c)
    assert os.path.getsize(tmp_path / "spool-web") <= cap
    assert len(sp) == 6 and all(sp.get(c[0])[1] == c[3] for c in got)
    sp.close()
    assert sorted(os.listdir(tmp_path)) == ["spool-web"]  # the private file had no name
    sp = spool_at(tmp_path, cap=cap)
    assert len(sp) == 3
    sp.close()
    sp = spool_at(tmp_path, cap=one + 1)  # a lower cap (less free space): the records past it go
    try:
        assert len(sp) == 1 and os.path.getsize(tmp_path / "spool-web") == sp.main.end <= one + 1
    finally:
        sp.close()


def test_the_default_cap(tmp_path):
    """4 GiB, or a quarter of the free space (plus what the spool holds) when that is less."""
    import shutil

    sp = spool_at(tmp_path)
    try:
        free = shutil.disk_usage(tmp_path).free
        assert sp.cap <= S.CAP and sp.cap <= free * S.CAP_FREE_FRACTION + MIB
        assert sp.cap == S.CAP or sp.cap >= (free - 64 * MIB) * S.CAP_FREE_FRACTION
    finally:
        sp.close()


def test_one_connection_at_a_time(tmp_path):
    rng = random.Random(6)
    a, b = chunk(rng), chunk(rng)
    first = spool_at(tmp_path, cap=10 * MIB)
    first.add(*a)
    second = spool_at(tmp_path, cap=10 * MIB, wait=0.2)  # the set's file is held: a private spool
    try:
        assert not second.persistent and len(second) == 0
        second.add(*b)
        assert b[0] in second and b[0] not in first
    finally:
        second.close()
    first.close()
    third = spool_at(tmp_path, cap=10 * MIB, wait=0)
    try:
        assert third.persistent and third.ids() == [a[0]]  # nothing of the private spool's
    finally:
        third.close()


def test_stored_records_go_and_the_file_shrinks(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "COMPACT_MIN", 0)
    rng = random.Random(7)
    got = [chunk(rng) for _ in range(4)]
    sp = spool_at(tmp_path, cap=10 * MIB)
    for c in got:
        sp.add(*c)
    path = tmp_path / "spool-web"
    full = os.path.getsize(path)
    sp.discard([got[0][0]])  # a quarter dropped: kept as it is
    assert os.path.getsize(path) == full
    sp.discard([got[1][0], got[2][0]])  # most of the file dropped: the last record moves down
    assert os.path.getsize(path) == S.REC.size + len(got[3][3])
    assert sp.get(got[3][0]) == (got[3][1], got[3][3], got[3][2])
    sp.close()
    sp = spool_at(tmp_path, cap=10 * MIB)
    assert sp.ids() == [got[3][0]]
    sp.discard([got[3][0]])
    assert os.path.getsize(path) == 0
    sp.close()


def sender(c) -> dict:
    return json.loads(c.primary.ctl("status", "--local").stdout)["sets"]["web"]["replicas"]["r1"]


def test_a_batch_in_two_changes_frames_is_applied_without_a_resend(small_frames):  # noqa: F811
    c = small_frames(replicas=1)
    rng = random.Random(8117)
    total = 0
    # 400 files of 24 KiB with 100-byte names: ~270 bytes of change each, ~105 KB for the batch (one batch:
    # 512 paths), so its changes need two CHANGES frames of 64 KiB after one round of chunks.
    for i in range(400):
        data = rng.randbytes(24 * 1024)
        with open(os.path.join(c.src, f"{i:05d}-" + "n" * 94 + ".bin"), "wb") as f:
            f.write(data)
        total += len(data)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 120, "seeding")
    assert "neither sent nor present" not in open(r.log, errors="replace").read(), r.logtext()
    st = sender(c)
    assert st["acked_batches"] >= 2, st  # the batch did span two frames
    # Each file's chunks travelled once: the second frame's were not sent again after a dropped connection
    # (that would be ~150 files, 3.6 MB more). Metadata: names, ids, change records, listings (< 0.5 MB).
    assert st["bytes_sent"] < total + MIB, (st, total)


SEED = 20240917  # the random content of the seeding test


def test_a_replica_killed_mid_seeding_resumes_the_batch(cluster):  # noqa: F811
    """48 MiB of random files, one batch. The replica is frozen (SIGSTOP) once its spool holds half of it,
    then SIGKILLed: frozen first, so what it had is known and nothing more arrives or commits. A byte of
    one spooled chunk is flipped while it is down. After the restart the master sends what was not spooled
    (and that damaged chunk) plus metadata, not the batch again; the replica's files equal the source."""
    c = cluster(replicas=1)
    rng = random.Random(SEED)
    total = 0
    for i in range(24):
        data = rng.randbytes(2 * MIB)
        with open(os.path.join(c.src, f"f{i:02d}.bin"), "wb") as f:
            f.write(data)
        total += len(data)
    c.start()
    r = c.replicas[0]
    path = os.path.join(r.repo, "tmp-replication", "spool-web")
    wait_for(lambda: os.path.exists(path) and os.path.getsize(path) > total // 2, 120, "half of the batch spooled",
             interval=0.005)
    r.proc.send_signal(signal.SIGSTOP)
    spooled = os.path.getsize(path)
    assert total // 2 < spooled < total, "the batch was committed before the replica could be stopped"
    r.kill(signal.SIGKILL)
    wait_for(lambda: not sender(c)["connected"], 60, "the master to see the replica gone")
    before = sender(c)["bytes_sent"]

    with open(path, "r+b") as f:  # a byte of the first record's payload, as a power loss might leave it
        first_len = S.REC.unpack(f.read(S.REC.size))[4]
        b = f.read(1)
        f.seek(S.REC.size)
        f.write(bytes([b[0] ^ 0xFF]))

    r.start()
    wait_for(lambda: c.converged(r), 180, "convergence after the replica's restart")
    after = sender(c)["bytes_sent"] - before
    remained = total - spooled + first_len  # what the spool did not hold, and the damaged record
    print(f"{total} bytes seeded, {spooled} spooled at the kill, {after} sent after the restart")
    assert after < remained + 2 * MIB, (after, remained, total)
    assert after < total * 0.6, (after, total)
    assert "spool reopened" in r.logtext() and "1 damaged dropped" in r.logtext(), r.logtext()
    wait_for(lambda: os.path.getsize(path) == 0, 30, "the spool emptied (everything in it was stored)")
