"""The master's reading path: files cut, hashed and compressed once (readers.py), the payloads handed
to the senders (payloads.py), in real worker processes; a worker killed under a scan; seeding and a
catch-up through real agents, with the counters that say which path the bytes took."""
from __future__ import annotations

import json
import os
import random
import signal
import threading

import pytest
import zstandard

from store import packs as P
from store.chunker import ChunkerParams, chunk_stream
from store.segments import SEGMENT_BYTES
from replicator.stream import readers
from replicator.stream.payloads import Payloads
from replicator.stream.readers import Cutter, FileReads, ReaderPool, ReadJob

from test_repl_helpers import cluster, wait_for, write  # noqa: F401  (cluster: the fixture)

PARAMS = ChunkerParams.for_average(16384)
SEED = 1701


def _files(root, sizes: list[int], seed: int = SEED) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    for i, n in enumerate(sizes):
        p = os.path.join(str(root), f"f{i:03d}")
        with open(p, "wb") as f:
            f.write(rnd.randbytes(n // 2) + bytes(n - n // 2))  # half random, half zeros: both payload kinds
        out.append(os.fsencode(p))
    return out


def _expected(path: bytes) -> tuple[bytes, list[int]]:
    with open(path, "rb") as f:
        views = list(chunk_stream(f, PARAMS))
    import blake3
    return b"".join(blake3.blake3(v).digest() for v in views), [len(v) for v in views]


def _check_payloads(path: bytes, job: ReadJob, got: dict) -> None:
    """Every chunk of the file has a payload that decompresses to its bytes."""
    d = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    for i, n in enumerate(job.lens):
        cid = bytes(job.ids[i * 32:i * 32 + 32])
        flags, payload = got[cid]
        raw = d.decompress(payload, max_output_size=n) if flags & P.ZSTD else payload
        assert raw == data[off:off + n]
        off += n


def _read_all(reads: FileReads, paths: list[bytes], done: list) -> None:
    for p in paths:
        reads.add(ReadJob(p, os.path.getsize(p), True, None))
    reads.drain()
    assert sorted(j.path for j in done) == sorted(paths)


@pytest.fixture
def pool():
    rp = ReaderPool(workers=2)
    yield rp
    rp.close()


def test_worker_reads_equal_one_pass_and_payloads_decode(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(readers, "POOL_AFTER", 0)  # everything through the workers
    paths = _files(tmp_path, [0, 1, 5000, 70_000] * 20 + [2 * SEGMENT_BYTES + 12345, SEGMENT_BYTES])
    done, got = [], {}
    reads = FileReads(pool, PARAMS, Cutter(), done.append, lambda cid, v, n: got.__setitem__(cid, v))
    _read_all(reads, paths, done)
    assert reads.local == 0 and pool.running  # nothing was read on this thread
    for job in done:
        assert not job.failed and job.after is not None
        assert (bytes(job.ids), job.lens.tolist()) == _expected(job.path)
        _check_payloads(job.path, job, got)
    assert pool.users == 0


def test_reads_start_on_the_thread_then_go_to_the_workers(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(readers, "POOL_AFTER", 300_000)
    paths = _files(tmp_path, [100_000] * 10)
    done = []
    reads = FileReads(pool, PARAMS, Cutter(), done.append, lambda cid, v, n: None)
    _read_all(reads, paths, done)
    assert 300_000 <= reads.local < 1_000_000 and pool.running
    for job in done:
        assert (bytes(job.ids), job.lens.tolist()) == _expected(job.path)


def test_a_killed_worker_costs_a_reread_not_a_wrong_list(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(readers, "POOL_AFTER", 0)
    paths = _files(tmp_path, [3 * SEGMENT_BYTES] + [200_000] * 30)
    done, got = [], {}
    reads = FileReads(pool, PARAMS, Cutter(), done.append, lambda cid, v, n: got.__setitem__(cid, v))
    reads.add(ReadJob(paths[0], os.path.getsize(paths[0]), True, None))
    for pid in list(pool.pool._processes):  # a worker killed (the OOM killer, an operator) mid-read
        os.kill(pid, signal.SIGKILL)
    for p in paths[1:]:
        reads.add(ReadJob(p, os.path.getsize(p), True, None))
    reads.drain()
    assert sorted(j.path for j in done) == sorted(paths)
    for job in done:
        assert not job.failed
        assert (bytes(job.ids), job.lens.tolist()) == _expected(job.path)
        _check_payloads(job.path, job, got)
    assert not pool.running and pool.users == 0  # the broken pool was stopped; the next acquire starts one
    pool.release(pool.acquire())
    assert pool.running


def test_a_vanished_or_replaced_file_is_failed(tmp_path, pool):
    p = _files(tmp_path, [50_000])[0]
    done = []
    reads = FileReads(None, PARAMS, Cutter(), done.append, lambda cid, v, n: None)
    job = ReadJob(p, 50_000, False, None)
    os.unlink(p)
    reads.add(job)
    assert done == [job] and job.failed


def test_range_reads_check_the_id(tmp_path):
    p = _files(tmp_path, [40_000])[0]
    ids, lens = _expected(p)
    c = Cutter()
    flags, payload = c.read_range(p, 0, lens[0], ids[:32])
    assert flags in (0, P.ZSTD) and payload
    assert c.read_range(p, 0, lens[0], bytes(32)) is None          # not that chunk any more
    assert c.read_range(p, 10**9, 100, ids[:32]) is None            # past the end
    assert c.read_range(p + b"-gone", 0, 10, ids[:32]) is None      # vanished


def test_idle_readers_stop_and_start_again(pool):
    pool.idle_stop = 0.0
    used = pool.acquire()
    pids = list(pool.pool._processes)
    assert len(pids) == 2
    pool.tick()
    assert pool.running  # in use: never stopped under its user
    pool.release(used)
    pool.tick()
    assert not pool.running

    def gone():
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        return False
            except (ProcessLookupError, FileNotFoundError):
                continue
        return True
    wait_for(gone, 30, "the idle reader processes to exit")


# ----------------------------------------------------------------- the fresh payloads


def test_fresh_payloads_are_taken_once_then_shared():
    pl = Payloads()
    pl.put_fresh(b"a" * 32, (0, b"x" * 100), 100)
    pl.put_fresh(b"a" * 32, (0, b"x" * 100), 100)  # a second file with the same chunk
    assert pl.fresh_bytes == 100
    assert pl.cached(b"a" * 32) == (0, b"x" * 100)
    assert pl.fresh_bytes == 0 and pl.taken == 1
    assert pl.cached(b"a" * 32) == (0, b"x" * 100)  # the next sender finds it in the shared cache
    pl.put_fresh(b"b" * 32, (0, b"y" * 10), 10)
    pl.forget([b"b" * 32, b"c" * 32])  # the replica had it
    assert pl.fresh_bytes == 0 and pl.cached(b"b" * 32) is None
    pl.put_fresh(b"d" * 32, (0, b"z" * 10), 10)
    pl.expire(age=0.0)
    assert pl.fresh_bytes == 0 and not pl.fresh


def test_fresh_payloads_are_capped(monkeypatch):
    from replicator.stream import payloads
    monkeypatch.setattr(payloads, "FRESH_MAX", 1000)
    pl = Payloads()
    for i in range(30):
        pl.put_fresh(bytes([i]) * 32, (0, b"p" * 100), 100)
    assert pl.fresh_bytes <= 1000 and bytes([29]) * 32 in pl.fresh and bytes([0]) * 32 not in pl.fresh


def test_the_scan_waits_for_a_sender_that_takes():
    pl = Payloads()
    ids = [i.to_bytes(32, "big") for i in range(50)]
    for cid in ids:
        pl.put_fresh(cid, (0, b"q" * 1000), 1000)
    taken = []

    def sender():
        for cid in ids:
            taken.append(pl.cached(cid))
            threading.Event().wait(0.002)

    t = threading.Thread(target=sender)
    t.start()
    pl.wait_room(lambda: True, high=10_000, patience=30.0)
    assert pl.fresh_bytes <= 10_000
    t.join()
    assert all(v is not None for v in taken)  # nothing was dropped: the sender kept up


def test_payloads_are_taken_ahead_oldest_first():
    pl = Payloads()
    for i in range(10):
        pl.put_fresh(i.to_bytes(32, "big"), (0, b"a" * 1000), 1000 + i)
    got = pl.take_ahead(2500, 100)
    assert [(cid[-1], n) for cid, _, n in got] == [(0, 1000), (1, 1001), (2, 1002)]
    assert pl.fresh_bytes == 7000 and len(pl.take_ahead(10**9, 4)) == 4
    assert pl.cached((0).to_bytes(32, "big")) is not None  # taken ahead: still shared with later senders


def test_the_scan_drops_the_oldest_when_nobody_streams():
    pl = Payloads()
    for i in range(50):
        pl.put_fresh(i.to_bytes(32, "big"), (0, b"q" * 1000), 1000)
    pl.wait_room(lambda: False, high=10_000)
    assert pl.fresh_bytes <= 5_000 and 49 .to_bytes(32, "big") in pl.fresh


# ----------------------------------------------------------------- through real agents


def _stats(node) -> dict:
    return json.loads(node.ctl("status", "--local").stdout)["sets"]["web"]["stats"]


def test_seeding_sends_what_the_scan_compressed(cluster):
    """Files moved into a watched source while the replica streams are sent as the scan read them, a
    big file's chunks ahead of its end: the counters say (next to) none was read again, and the replica
    holds the same bytes."""
    c = cluster(replicas=1)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 60, "the empty set")
    wait_for(lambda: json.loads(c.primary.ctl("status", "--local").stdout)["sets"]["web"]["replicas"]["r1"]
             ["connected"], 30, "the sender to connect")
    stage = os.path.join(os.path.dirname(c.src), "stage")
    rnd = random.Random(SEED)
    for i in range(40):  # 48 MiB of small and middling files, past POOL_AFTER: the workers read most
        write(f"{stage}/d{i % 4}/f{i:02d}", rnd.randbytes(rnd.choice([4096, 300_000, 2_400_000])))
    write(f"{stage}/big.bin", rnd.randbytes(40 * 1024 * 1024))  # five segments: its chunks go out ahead of it
    os.rename(stage, os.path.join(c.src, "data"))
    wait_for(lambda: c.converged(r), 180, "the seeded data")
    st = _stats(c.primary)
    # all but what a stalled sender made the scan drop (PATIENCE, on a loaded machine): none, on an idle one
    assert st["chunks_from_scan"] > 4000 and st["chunks_read_again"] < st["chunks_from_scan"] / 4


def test_catch_up_reads_through_the_workers(cluster):
    """A replica that joins with data already there gets it by a catch-up: no scan holds the payloads,
    so the sender reads them (in the reader processes past READ_HERE_UP_TO); the result is the same."""
    c = cluster(replicas=1)
    rnd = random.Random(SEED + 1)
    for i in range(12):
        write(f"{c.src}/d/f{i:02d}", rnd.randbytes(2_000_000))
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 180, "the catch-up")
    st = _stats(c.primary)
    assert st["chunks_read_again"] > 1000 and st["chunks_from_scan"] == 0
