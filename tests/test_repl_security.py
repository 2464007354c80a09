"""Security and bad input against a running replica: who may connect, and what a
connected peer may send. Every refusal closes the connection and writes nothing."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess

import msgpack
import pytest
import zstandard

from replicator import errors as E
from replicator.stream import protocol as W
from replicator.stream.membership import NodeState, connect, init_cluster
from store.repository import Repository
from test_repl_helpers import PIT, Cluster, pit, read_tree, replica_head, wait_for


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    c = Cluster(str(tmp), replicas=2)
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"alpha")
    c.start()
    try:
        for r in c.replicas:
            wait_for(lambda: c.converged(r), 30, "seed")
        yield c
    finally:
        c.stop()


def blob_count(repo_path):
    repo = Repository(repo_path, readonly=True)
    try:
        with repo.reading() as txn:
            return txn.stat(repo.index.db["blobs"])["entries"]
    finally:
        repo.close()


def session(c, r):
    """A replication session to replica `r` with the primary's (legitimate) certificate."""
    sock, peer = connect(NodeState(c.primary.state), r.address)
    conn = W.Conn(sock, peer, heartbeat=False, dead_after=10)
    W.hello(conn, "primary", "repl", "web")
    return conn


def refused(conn) -> bool:
    try:
        conn.recv()
    except (E.ConnectionLost, E.ProtocolError):
        return True
    return False


def assert_nothing_written(c, r, before):
    assert blob_count(r.repo) == before
    assert replica_head(r.repo, "web") == read_tree(c.src)


BAD_FRAMES = {
    "garbage": W.HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1",
    "oversized": W.HEADER.pack(W.MAX_FRAME + 1),
    "unknown type": W.encode({"t": "format-disk"}) if False else
    W.HEADER.pack(len(b := msgpack.packb({"t": "format-disk"}))) + b,
    "dotdot path": W.encode({"t": "changes", "seq": 1, "changes": [
        {"p": b"data/../../evil", "e": [1, 0o644, 0, 0, 0], "base": None, "ops": [], "size": 0}]}),
    "absolute path": W.encode({"t": "changes", "seq": 1, "changes": [
        {"p": b"/etc/evil", "e": [1, 0o644, 0, 0, 0], "base": None, "ops": [], "size": 0}]}),
    "nul path": W.encode({"t": "changes", "seq": 1, "changes": [
        {"p": b"data/ev\0il", "e": [1, 0o644, 0, 0, 0], "base": None, "ops": [], "size": 0}]}),
    "list dotdot": W.encode({"t": "list", "paths": [b".."]}),
    "unasked chunk": W.encode({"t": "chunks", "chunks": [[b"\1" * 32, 0, 3, b"abc"]]}),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frames_close_and_write_nothing(running, name):
    c, r = running, running.replicas[0]
    before = blob_count(r.repo)
    conn = session(c, r)
    conn.send_raw(BAD_FRAMES[name])
    assert refused(conn)
    assert_nothing_written(c, r, before)


def test_chunk_not_matching_its_id_is_refused(running):
    c, r = running, running.replicas[0]
    before = blob_count(r.repo)
    conn = session(c, r)
    fake_id = b"\7" * 32
    conn.send({"t": "offer", "ids": [fake_id]})
    assert conn.recv("need")["ids"] == [fake_id]
    payload = zstandard.ZstdCompressor().compress(b"not what the id says" * 10)
    conn.send({"t": "chunks", "chunks": [[fake_id, 1, 200, payload]]})
    assert refused(conn)
    # and a change naming that chunk cannot be committed on a fresh session either
    conn = session(c, r)
    conn.send({"t": "changes", "seq": 1, "changes": [
        {"p": b"data/evil", "e": [1, 0o644, 0, 0, 0], "base": None, "ops": [[1, [[fake_id, 200]]]], "size": 200}]})
    assert refused(conn)
    assert_nothing_written(c, r, before)


def test_client_without_certificate_refused(running):
    r = running.replicas[0]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    with pytest.raises((ssl.SSLError, OSError, E.ConnectionLost, E.ProtocolError)):
        s = ctx.wrap_socket(raw)
        conn = W.Conn(s, "r", heartbeat=False, dead_after=10)
        W.hello(conn, "primary", "repl", "web")


def test_certificate_from_another_ca_refused(running, tmp_path):
    r = running.replicas[0]
    other = init_cluster(str(tmp_path / "other"), "primary", "127.0.0.1:1")
    raw = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    with pytest.raises((ssl.SSLError, OSError, E.ConnectionLost, E.ProtocolError)):
        s = other.client_context().wrap_socket(raw)
        conn = W.Conn(s, "r", heartbeat=False, dead_after=10)
        W.hello(conn, "primary", "repl", "web")


def test_only_the_sets_master_may_send(running):
    c, r1, r2 = running, *running.replicas
    # r2 is a member, but not the master of "web": r1 refuses it.
    sock, _ = connect(NodeState(r2.state), r1.address)
    conn = W.Conn(sock, "r1", heartbeat=False, dead_after=10)
    with pytest.raises(E.ProtocolError):
        W.hello(conn, "r2", "repl", "web")


def test_token_is_one_time(running, tmp_path):
    token = pit("cluster", "token", "--state", running.primary.state).stdout.strip()
    pit("join", "--state", str(tmp_path / "n1"), token, "--node", "n1", "--address", "127.0.0.1:2")
    r = subprocess.run([PIT, "join", "--state", str(tmp_path / "n2"), token, "--node", "n2",
                        "--address", "127.0.0.1:3"], capture_output=True, text=True)
    assert r.returncode == E.TokenInvalid.exit_code, r.stderr
    assert not os.path.exists(tmp_path / "n2" / "node.json")


def _join(c, tmp_path, token, node, port):
    return subprocess.run([PIT, "join", "--state", str(tmp_path / node), token, "--node", node,
                           "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)


def _roster(c):
    import json
    with open(os.path.join(c.primary.state, "roster.json")) as f:
        return json.load(f)["nodes"]


def test_token_with_uses_is_spent_once_per_join(running, tmp_path):
    """`--uses 2`: two nodes join with the same token, the third is refused (spent, typed error, one line)."""
    token = pit("cluster", "token", "--state", running.primary.state, "--uses", "2", "--ttl", "600").stdout.strip()
    for i, node in enumerate(("u1", "u2")):
        r = _join(running, tmp_path, token, node, 10 + i)
        assert r.returncode == 0, r.stderr
        assert os.path.exists(tmp_path / node / "node.json")
    r = _join(running, tmp_path, token, "u3", 12)
    assert r.returncode == E.TokenInvalid.exit_code, r.stderr
    assert "spent" in r.stderr and "u1, u2" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not os.path.exists(tmp_path / "u3" / "node.json")
    roster = _roster(running)
    assert {"u1", "u2"} <= set(roster) and "u3" not in roster


def test_token_for_named_nodes(running, tmp_path):
    """`--nodes v1,v2`: another node id is refused without spending a use; a member joining again
    is refused without spending one either; each named node joins once."""
    token = pit("cluster", "token", "--state", running.primary.state, "--nodes", "v1,v2").stdout.strip()
    r = _join(running, tmp_path, token, "intruder", 20)
    assert r.returncode == E.TokenInvalid.exit_code and "not 'intruder'" in r.stderr, r.stderr
    assert _join(running, tmp_path, token, "v1", 21).returncode == 0
    r = subprocess.run([PIT, "join", "--state", str(tmp_path / "v1-again"), token, "--node", "v1",
                        "--address", "127.0.0.1:22"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "already a member" in r.stderr, r.stderr
    assert _join(running, tmp_path, token, "v2", 23).returncode == 0, "v2's use must still be there"
    r = _join(running, tmp_path, token, "v3", 24)
    assert r.returncode == E.TokenInvalid.exit_code and "spent" in r.stderr, r.stderr
    roster = _roster(running)
    assert {"v1", "v2"} <= set(roster) and not {"intruder", "v3"} & set(roster)


def test_token_uses_hold_under_concurrent_joins(running, tmp_path):
    """Three nodes race for a two-use token: exactly two get in (the use is spent under the file lock)."""
    token = pit("cluster", "token", "--state", running.primary.state, "--uses", "2").stdout.strip()
    procs = [subprocess.Popen([PIT, "join", "--state", str(tmp_path / f"w{i}"), token, "--node", f"w{i}",
                               "--address", f"127.0.0.1:{30 + i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    codes = sorted(p.wait(60) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert codes == [0, 0, E.TokenInvalid.exit_code], codes
    assert len({"w0", "w1", "w2"} & set(_roster(running))) == 2


def test_join_makes_the_repository_and_writes_the_agent_config(running, tmp_path):
    """`pit join --repo DIR --agent-config FILE --metrics HOST:PORT`: the repository is created (as `pit --repo
    DIR init`), the agent file says state, repo and metrics, and `pit config check` passes it."""
    import tomllib

    token = pit("cluster", "token", "--state", running.primary.state, "--nodes", "j1").stdout.strip()
    cfg = tmp_path / "etc" / "pit" / "agent.toml"  # etc/pit does not exist yet: join makes it
    r = pit("join", "--state", str(tmp_path / "st"), token, "--node", "j1", "--address", "127.0.0.1:40",
            "--repo", str(tmp_path / "repo"), "--agent-config", str(cfg), "--metrics", "127.0.0.1:9474")
    assert "created repository" in r.stdout and "joined as j1" in r.stdout, r.stdout
    assert f"wrote agent configuration {cfg} (state, repo, metrics)" in r.stdout, r.stdout
    Repository(str(tmp_path / "repo"), readonly=True).close()
    assert tomllib.loads(cfg.read_text()) == {"state": str(tmp_path / "st"), "repo": str(tmp_path / "repo"),
                                              "metrics": "127.0.0.1:9474"}
    r = pit("config", "check", str(cfg))
    assert ": ok: agent configuration of a node" in r.stdout, r.stdout
    assert "j1" in _roster(running)


def test_join_refuses_a_bad_agent_config_before_spending_the_token(running, tmp_path):
    """A different file at --agent-config, a path under a file, a non-repository at --repo: refused with one
    typed line before anything is joined or created, and the token's one use is still there. --force replaces
    the file; an existing repository is kept."""
    token = pit("cluster", "token", "--state", running.primary.state, "--nodes", "k1").stdout.strip()
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state = "/somewhere/else"\n')
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-repo").mkdir()
    (tmp_path / "not-a-repo" / "data").write_text("x")

    def attempt(*extra):
        return subprocess.run([PIT, "join", "--state", str(tmp_path / "st"), token, "--node", "k1",
                               "--address", "127.0.0.1:41", *extra], capture_output=True, text=True, timeout=60)

    for extra, code, needle in (
            (["--agent-config", str(cfg)], E.ConfigError.exit_code, "a different file is already there (differs in "
                                                                    "state); give --force to replace it"),
            (["--agent-config", str(tmp_path / "a-file" / "agent.toml")], E.ConfigError.exit_code,
             f"{tmp_path / 'a-file'} is not a directory"),
            (["--agent-config", str(tmp_path)], E.ConfigError.exit_code, "is a directory"),
            (["--metrics", "127.0.0.1:9474"], E.ConfigError.exit_code, "give --agent-config FILE too"),
            (["--repo", str(tmp_path / "not-a-repo")], 11, "exists and is not empty")):
        r = attempt(*extra)
        assert r.returncode == code and needle in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
        assert r.stderr.startswith("pit: error: ") and "Traceback" not in r.stderr
        assert not (tmp_path / "st" / "node.json").exists()
    assert cfg.read_text() == 'state = "/somewhere/else"\n'
    assert "k1" not in _roster(running)
    pit("--repo", str(tmp_path / "repo"), "init")
    r = attempt("--repo", str(tmp_path / "repo"), "--agent-config", str(cfg), "--force")
    assert r.returncode == 0, r.stderr  # the use was not spent by the refusals
    assert "repository" in r.stdout and "already there: kept" in r.stdout, r.stdout
    assert f"replaced agent configuration {cfg} (state, repo)" in r.stdout, r.stdout
    assert "k1" in _roster(running)
    assert pit("config", "check", str(cfg)).returncode == 0


def test_token_arguments_and_expiry(running, tmp_path):
    """Bad --uses/--nodes are refused with one line; an entry past its expiry is refused on the primary
    even when the token's own expiry was forged; a tokens.json entry from before multi-use counts once."""
    import time

    from replicator.stream.membership import _spend, _uses_left

    state = running.primary.state
    for args in (["--uses", "0"], ["--nodes", "b,b"], ["--nodes", "b,c", "--uses", "3"], ["--nodes", "Bad!"],
                 ["--ttl", "0"]):
        r = pit("cluster", "token", "--state", state, *args, check=False)
        assert r.returncode == E.ClusterError.exit_code and r.stderr.count("\n") == 1, (args, r.stderr)
    with pytest.raises(E.TokenInvalid, match="expired"):
        _spend({"hash": "", "expires": int(time.time()) - 1, "uses": 3, "joined": [], "nodes": None}, "x")
    legacy = {"hash": "", "expires": int(time.time()) + 60, "used": False}
    assert _uses_left(legacy) == 1
    _spend(legacy, "x")
    assert legacy["used"] and _uses_left(legacy) == 0
    with pytest.raises(E.TokenInvalid, match="spent"):
        _spend(legacy, "y")
    assert _uses_left({"hash": "", "expires": 0, "used": True}) == 0


def test_removed_node_is_refused(running):
    c, r1, r2 = running, *running.replicas
    pit("cluster", "remove", "--state", c.primary.state, "r1")
    # r1's own connections to the primary are refused ...
    sock, _ = connect(NodeState(r1.state), c.primary.address)
    conn = W.Conn(sock, "primary", heartbeat=False, dead_after=10)
    with pytest.raises((E.ConnectionLost, E.ProtocolError)):
        W.hello(conn, "r1", "config")
    # ... and the master stops sending to it, while r2 carries on.
    import json
    wait_for(lambda: not json.loads(c.primary.ctl("status", "--local").stdout)["sets"]["web"]["replicas"]["r1"]["connected"],
             10, "the master to drop r1")
    with open(os.path.join(c.src, "after-removal.txt"), "wb") as f:
        f.write(b"r1 must not get this")
    wait_for(lambda: c.converged(r2), 30, "r2 gets the new file")
    assert "data/after-removal.txt" not in replica_head(r1.repo, "web")
