"""Unit tests of the replication protocol: frames, schemas, wire paths, deltas, error codes."""
from __future__ import annotations

import socket
import subprocess

import msgpack
import pytest
from hypothesis import given, strategies as st

from replicator import errors as E
from replicator.stream import protocol as W
from replicator.stream.chunklist import delta_ops
from test_repl_helpers import PIT


def test_roundtrip_and_schema():
    msg = {"t": "offer", "ids": [b"\1" * 32]}
    assert W.decode(W.encode(msg)[4:]) == msg
    for bad in ({"t": "nope"}, {"t": "offer"}, {"t": "offer", "ids": 3}, {"t": "offer", "ids": [], "x": 1},
                {"t": "ack", "seq": True, "applied": 0, "held": 0, "retry": []}, [1, 2], {"x": 1}):
        with pytest.raises(E.ProtocolError):
            W.decode(msgpack.packb(bad, use_bin_type=True))


@given(st.binary(max_size=200))
def test_garbage_is_only_ever_a_protocol_error(data):
    try:
        W.decode(data)
    except E.ProtocolError:
        pass


@pytest.mark.parametrize("p", [b"../x", b"a/../b", b"/etc/passwd", b"a\0b", b"", b"a//b", b"./a", b"a/.", "str"])
def test_unsafe_paths_refused(p):
    with pytest.raises(E.UnsafeWirePath):
        W.check_path(p)


def test_safe_paths():
    assert W.check_path(b"data/a b/c..d") == b"data/a b/c..d"
    assert W.check_dir_path(b"") == b""


def test_oversized_frame_closes():
    a, b = socket.socketpair()
    conn = W.Conn(b, "peer", heartbeat=False, dead_after=5)
    a.sendall(W.HEADER.pack(W.MAX_FRAME + 1))
    with pytest.raises(E.FrameTooLarge):
        conn.recv()
    assert conn.closed
    a.close()


def test_silent_peer_is_dead():
    a, b = socket.socketpair()
    conn = W.Conn(b, "peer", heartbeat=False, dead_after=0.3)
    with pytest.raises(E.ConnectionLost):
        conn.recv()
    a.close()


def test_pings_are_swallowed():
    a, b = socket.socketpair()
    conn = W.Conn(b, "peer", heartbeat=False, dead_after=5)
    a.sendall(W.encode({"t": "ping"}) + W.encode({"t": "need", "ids": []}))
    assert conn.recv("need") == {"t": "need", "ids": []}
    a.close()
    conn.close()


def test_delta_ops():
    A = [(bytes([i]) * 32, 10) for i in range(10)]
    B = A[:4] + [(b"\xff" * 32, 7)] + A[5:]
    assert delta_ops(A, B) == [[0, 0, 4], [1, [[b"\xff" * 32, 7]]], [0, 5, 5]]
    assert delta_ops(None, A[:2]) == [[1, [list(A[0]), list(A[1])]]]
    assert delta_ops(A, A) == [[0, 0, 10]]
    assert delta_ops(A, A[:7]) == [[0, 0, 7]]
    assert delta_ops(A, []) == []


def test_error_codes_distinct_and_one_line(tmp_path):
    codes = [c.exit_code for c in E.ALL]
    assert len(codes) == len(set(codes))
    r = subprocess.run([PIT, "join", "--state", str(tmp_path / "s"), "PIT1.garbage", "--node", "x",
                        "--address", "127.0.0.1:1"], capture_output=True, text=True)
    assert r.returncode == E.TokenInvalid.exit_code
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([PIT, "status", "--config", str(tmp_path / "none.toml")], capture_output=True, text=True)
    assert r.returncode == E.ConfigError.exit_code and r.stderr.count("\n") == 1
    r = subprocess.run([PIT, "cluster", "token", "--state", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == E.NotInCluster.exit_code and r.stderr.count("\n") == 1


def test_compact_chunk_lists_and_their_deltas():
    """Chunks (ids as one bytes, lengths as an array) behave as the list of pairs they replace, and
    delta_ops on them (block-wise prefix/suffix) rebuilds the new list from the old one."""
    import random
    from array import array

    from replicator.stream.chunklist import Chunks

    rng = random.Random(7)

    def mk(pairs):
        return Chunks(b"".join(c for c, _ in pairs), array("I", [n for _, n in pairs]))

    for trial in range(80):
        n = rng.choice([0, 1, 3, 100, 5000, 12000])
        old = [(rng.randbytes(32), rng.randint(1, 65536)) for _ in range(n)]
        new = list(old)
        for _ in range(rng.randint(0, 3)):
            pos = rng.randint(0, len(new))
            r = rng.random()
            if r < 0.4:
                new[pos:pos] = [(rng.randbytes(32), rng.randint(1, 9)) for _ in range(rng.randint(1, 5))]
            elif r < 0.7:
                del new[pos:pos + rng.randint(1, 6000)]
            elif new:
                i = min(pos, len(new) - 1)
                new[i] = (new[i][0], new[i][1] + 1)  # same id, another length: not the same chunk
        a, b = mk(old), mk(new)
        assert list(b) == new and len(b) == len(new) and b == new
        ops = delta_ops(a, b)
        assert ops == delta_ops(old, new), trial
        out = []
        for op in ops:
            out += old[op[1]:op[1] + op[2]] if op[0] == 0 else [tuple(x) for x in op[1]]
        assert out == new, trial
