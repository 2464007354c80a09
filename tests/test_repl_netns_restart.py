"""A restart of either side in the middle of a transfer, between hosts made of network namespaces.

The master's link is slowed (nftables rate limit, tests/netns.py `throttle`) so that a 24 MiB
file is still on its way when the test SIGKILLs the master (and, separately, the replica). The
replica acknowledges only after a commit, so what it acknowledged before the kill is exactly its
head after it (nothing half-applied, nothing lost); after the restart the two converge by tree
comparison and a consistent point equals the master's tree. Polls with deadlines, no timings.
"""
from __future__ import annotations

import os
import signal

import pytest

from netns import netlab  # noqa: F401  (the fixture)
from test_repl_helpers import replica_head, wait_for
from test_repl_netns import make_cluster, point_equals_master, seed, sender, status, write  # noqa: F401

BIG = 24 * 1024 * 1024


def start_big_transfer(c, r):
    """Everything acknowledged, then a big file on a slow link: returns the acknowledged head once the
    file is partly sent (the master has written at least 2 MB of it) and not committed."""
    for i in range(5):
        write(f"{c.src}/acked/a{i}", os.urandom(4000))
    wait_for(lambda: c.converged(r), 60, "small changes acknowledged")
    acked = replica_head(r.repo, "web")
    before = sender(c, r)["bytes_sent"]
    c.lab.throttle(c.primary.host, 1024)  # ~1 MB/s: 24 MiB take ~25 s
    with open(f"{c.src}/big.img", "wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(os.urandom(1 << 20))
    wait_for(lambda: sender(c, r)["bytes_sent"] - before > 2_000_000, 60, "the big file under way")
    assert "data/big.img" not in replica_head(r.repo, "web") or replica_head(r.repo, "web")["data/big.img"] != \
        open(f"{c.src}/big.img", "rb").read(), "the transfer finished before the kill"
    return acked


def test_master_killed_mid_transfer(make_cluster):  # noqa: F811
    c = make_cluster(replicas=1, nft=True)
    seed(c, 10)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 60, "seeding")
    acked = start_big_transfer(c, r)

    c.primary.kill(signal.SIGKILL)
    # The replica committed nothing of the interrupted batch and lost nothing it had acknowledged.
    wait_for(lambda: not status(r)["sets"]["web"]["connected"], 30, "the replica to see the master gone")
    assert replica_head(r.repo, "web") == acked
    write(f"{c.src}/acked/a1", b"changed while the master was down")

    c.lab.clear_throttle(c.primary.host)
    c.primary.start()
    wait_for(lambda: c.converged(r), 120, "convergence after the master's restart")
    got = replica_head(r.repo, "web")
    assert all(k in got for k in acked)
    point_equals_master(c, [r])


@pytest.mark.slow  # CI runs the master's kill here; replica restarts are covered on loopback
def test_replica_killed_mid_transfer(make_cluster):  # noqa: F811
    c = make_cluster(replicas=1, nft=True)
    seed(c, 10)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 60, "seeding")
    acked = start_big_transfer(c, r)

    r.kill(signal.SIGKILL)
    assert replica_head(r.repo, "web") == acked
    write(f"{c.src}/acked/a2", b"changed while the replica was down")
    wait_for(lambda: not sender(c, r)["connected"], 60, "the master to see the replica gone")

    c.lab.clear_throttle(c.primary.host)
    r.start()
    wait_for(lambda: c.converged(r), 120, "convergence after the replica's restart")
    got = replica_head(r.repo, "web")
    assert all(k in got for k in acked)
    point_equals_master(c, [r])
