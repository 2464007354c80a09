"""The leader key and fencing token against a real etcd (tests/etcdlab.py)."""
from __future__ import annotations

import json
import time

import pytest

from etcdlab import etcd  # noqa: F401  (the fixture)
from replicator.errors import EtcdError, Fenced
from replicator.failover.etcd import Etcd
from replicator.failover.fencing import Leadership, revoke_holder
from test_repl_helpers import wait_for

KEY = "/pit/test/leader"


def leader(etcd, node, tmp_path, ttl=2, **kw):
    return Leadership(Etcd([etcd.endpoint], timeout=0.5), KEY, node, ttl=ttl,
                      log_path=str(tmp_path / f"{node}.fencing.log"), **kw)


def events(tmp_path, node):
    with open(tmp_path / f"{node}.fencing.log") as f:
        return [json.loads(x) for x in f]


def test_one_holder_and_rising_tokens(etcd, tmp_path):
    a, b = leader(etcd, "a", tmp_path), leader(etcd, "b", tmp_path)
    ta = a.campaign()
    assert ta > 0 and a.is_leader() and a.check() == ta
    assert b.campaign() == 0 and not b.is_leader()
    with pytest.raises(Fenced):
        b.check()
    assert a.holder().value == b"a" and a.holder().mod_revision == ta
    time.sleep(2.5)  # longer than the TTL: renewals keep the key
    assert a.is_leader() and b.campaign() == 0
    a.resign("switchover")
    assert not a.is_leader()
    tb = b.campaign()
    assert tb > ta and b.holder().value == b"b"
    # a privileged write carrying the old token is refused, the new one passes
    e = Etcd([etcd.endpoint])
    assert not e.put_if("/pit/test/config", "from a", KEY, ta)
    assert e.put_if("/pit/test/config", "from b", KEY, tb)
    b.resign()


def test_holder_stops_on_its_own_clock_when_etcd_goes_silent(etcd, tmp_path):
    lost = []
    a = leader(etcd, "a", tmp_path, on_lost=lost.append)
    ta = a.campaign()
    etcd.pause()  # renewals hang: a black-holed coordination service
    try:
        wait_for(lambda: lost, 10, "the holder to demote itself")
        assert not a.is_leader()
        with pytest.raises(Fenced):
            a.check()
    finally:
        etcd.resume()
    # once etcd is back the key expires server-side; the next holder gets a higher token, and the
    # old holder's "inactive" comes before the new holder's "active" on the wall clock
    b = leader(etcd, "b", tmp_path)
    wait_for(lambda: b.campaign() > 0, 15, "b to win the key")
    assert b.token > ta
    ea, eb = events(tmp_path, "a"), events(tmp_path, "b")
    assert [e["event"] for e in ea] == ["active", "inactive"]
    assert ea[1]["t"] < eb[0]["t"]
    b.resign()


def test_revoking_the_holders_lease_demotes_it(etcd, tmp_path):
    lost = []
    a = leader(etcd, "a", tmp_path, on_lost=lost.append)
    a.campaign()
    kv = revoke_holder(Etcd([etcd.endpoint]), KEY)
    assert kv.value == b"a"
    wait_for(lambda: lost, 10, "the holder to notice the revoked lease")
    assert "revoked" in lost[0] or "not renewed" in lost[0]


def test_unreachable_etcd_is_a_typed_error(tmp_path):
    from test_repl_helpers import free_port

    e = Etcd([f"http://127.0.0.1:{free_port()}"], timeout=0.5)
    with pytest.raises(EtcdError, match="unreachable"):
        Leadership(e, KEY, "a").campaign()


def test_hand_over_moves_the_key_in_one_fenced_transaction(etcd, tmp_path):
    """A failback's hand-over: the key goes from b's lease to a's without ever being free; the new token
    is higher; b stands down without notifying (its caller answers a first), a renews its adopted lease;
    a holder whose lease was revoked cannot hand anything over."""
    lost = []
    a, b = leader(etcd, "a", tmp_path), leader(etcd, "b", tmp_path, on_lost=lost.append)
    tb = b.campaign()
    e = Etcd([etcd.endpoint])
    sent = time.monotonic()
    lease = e.grant(a.ttl)
    ta = b.hand_over("a", lease)
    assert ta > tb and not b.is_leader() and lost == []
    kv = a.holder()
    assert kv.value == b"a" and kv.mod_revision == ta and kv.lease == lease
    a.adopt(lease, ta, sent)
    time.sleep(2.5)  # longer than the TTL: a's renewals keep the adopted lease
    assert a.is_leader() and a.check() == ta and a.holder().mod_revision == ta
    assert [x["event"] for x in events(tmp_path, "b")] == ["active", "inactive"]
    assert "handed over to a" in events(tmp_path, "b")[-1]["reason"]

    c = leader(etcd, "c", tmp_path)
    revoke_holder(e, KEY)  # a's lease is gone; a still believes it leads for a moment
    other = e.grant(2)
    tc = c.campaign()
    with pytest.raises(Fenced):
        a.hand_over("b", other)  # fenced by its old token (or by its own clock): nothing moves
    assert c.holder().value == b"c" and c.holder().mod_revision == tc
    c.resign()
