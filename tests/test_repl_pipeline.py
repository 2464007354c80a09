"""Batches in flight: the replica commits a CHANGES frame on its applier thread while it receives the
next batch (replica.py `Applier`), and the master sends on without waiting for each acknowledgement
(changes.py `WINDOW`). What must still hold, spoken frame by frame as the master would: every ACK
comes after its commit and in order, a point follows every batch sent before it, and a frame that
cannot be applied ends the session without what it named, the batches before it kept."""
from __future__ import annotations

import random

import blake3
import pytest
import zstandard

from replicator import errors as E
from replicator.stream import protocol as W
from replicator.stream.membership import NodeState, connect
from test_repl_helpers import Cluster, replica_head, replica_snapshots, wait_for, write

SEED = 2201


@pytest.fixture
def alone(tmp_path):
    """A replica whose master agent is stopped after seeding: the test speaks for the master."""
    c = Cluster(str(tmp_path), replicas=1)
    write(f"{c.src}/a.txt", b"alpha")
    c.start()
    try:
        r = c.replicas[0]
        wait_for(lambda: c.converged(r), 30, "seed")
        c.primary.kill()
        yield c, r
    finally:
        c.stop()


def session(c, r) -> W.Conn:
    sock, peer = connect(NodeState(c.primary.state), r.address)
    conn = W.Conn(sock, peer, heartbeat=False, dead_after=20)
    W.hello(conn, "primary", "repl", "web")
    return conn


def chunk(data: bytes) -> tuple[bytes, list]:
    cid = blake3.blake3(data).digest()
    return cid, [cid, 1, len(data), zstandard.ZstdCompressor().compress(data)]


def new_file(path: bytes, cid: bytes, n: int) -> dict:
    return {"p": path, "e": [1, 0o644, 0, 0, 1_700_000_000_000_000_000], "base": None, "ops": [[1, [[cid, n]]]],
            "size": n}


def recv_all(conn: W.Conn, n: int) -> list[dict]:
    return [conn.recv() for _ in range(n)]


def test_batches_in_flight_are_acknowledged_in_order_and_a_point_follows_them(alone):
    c, r = alone
    rnd = random.Random(SEED)
    conn = session(c, r)
    data = [rnd.randbytes(50_000 + i) for i in range(3)]
    ids = [chunk(d) for d in data]
    # batch 1, then batches 2 and 3 offered and sent before any acknowledgement is read
    for i, (cid, wire) in enumerate(ids):
        conn.send({"t": "offer", "ids": [cid]})
        got = conn.recv(("need", "ack"))
        while got["t"] == "ack":  # an earlier batch's, whenever its commit is done
            got = conn.recv(("need", "ack"))
        assert got["ids"] == [cid]
        conn.send({"t": "chunks", "chunks": [wire]})
        conn.send({"t": "changes", "seq": i + 1, "changes": [new_file(b"data/p%d" % i, cid, len(data[i]))]})
    conn.send({"t": "point", "id": 7})
    msgs = []
    while not msgs or msgs[-1]["t"] != "pointed":
        msgs.append(conn.recv(("ack", "pointed")))
    acks = [m["seq"] for m in msgs if m["t"] == "ack"]
    assert acks == sorted(acks) and set(acks) <= {1, 2, 3}
    head = replica_snapshots(r.repo, "web")[-1][1]  # the point's image holds all three
    for i, d in enumerate(data):
        assert head["data/p%d" % i] == d


def test_a_frame_that_cannot_be_applied_ends_the_session_after_the_ones_before(alone):
    c, r = alone
    rnd = random.Random(SEED + 1)
    conn = session(c, r)
    good = rnd.randbytes(40_000)
    cid, wire = chunk(good)
    conn.send({"t": "offer", "ids": [cid]})
    assert conn.recv("need")["ids"] == [cid]
    conn.send({"t": "chunks", "chunks": [wire]})
    conn.send({"t": "changes", "seq": 1, "changes": [new_file(b"data/good", cid, len(good))]})
    absent = b"\x09" * 32  # neither sent nor present
    conn.send({"t": "changes", "seq": 2, "changes": [new_file(b"data/bad", absent, 1000)]})
    assert conn.recv("ack")["seq"] == 1
    with pytest.raises((E.ConnectionLost, E.ProtocolError)):
        conn.recv()
    head = replica_head(r.repo, "web")
    assert head["data/good"] == good and "data/bad" not in head
