"""Consistent points (issue 14): a point holds everything the master had when it was asked, and it never
waits on a replica that cannot be reached (after a failover the dead old primary is a replica of the new
one; its backup-mode hooks stayed open while the point waited for it)."""
from __future__ import annotations

import json
import os
import signal

from test_repl_helpers import cluster, read_tree, replica_snapshots, wait_for, write  # noqa: F401


def status(node) -> dict:
    return json.loads(node.ctl("status", "--local").stdout)


def test_a_point_right_after_a_tree_moved_in_holds_all_of_it(cluster, tmp_path):
    """Moving a tree in overflows the replica's send queue (`queue` paths): the sender falls back to a tree
    comparison, and the point must come after it (it was once served first: the previous, empty snapshot)."""
    c = cluster(replicas=1)
    c.sets["web"]["queue"] = 5
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "the empty set seeded")
    for round_ in range(3):
        staged = tmp_path / f"staged{round_}"
        for i in range(60):
            write(f"{staged}/d{i % 6}/f{i}", os.urandom(500) + b"%d" % i)
        os.rename(staged, f"{c.src}/tree{round_}")
        out = c.primary.ctl("point", "--set", "web").stdout
        assert r.name in out
        got, want = replica_snapshots(r.repo, "web")[-1][1], read_tree(c.src)
        assert got == want, f"round {round_}: the point holds {len(got)} of {len(want)} files"


def test_a_point_skips_a_replica_that_cannot_be_reached(cluster):
    c = cluster(replicas=2)
    write(f"{c.src}/a.txt", b"a")
    c.start()
    r1, r2 = c.replicas
    wait_for(lambda: c.converged(r1) and c.converged(r2), 30, "seeding")
    r2.kill(signal.SIGKILL)
    wait_for(lambda: status(c.primary)["sets"]["web"]["replicas"]["r2"]["last_error"], 30,
             "the sender to r2 to fail to reach it")
    write(f"{c.src}/b.txt", b"b")
    out = c.primary.ctl("point", "--set", "web", "--timeout", "120").stdout  # it used to fail after 120 s
    lines = dict(line.split("\t", 1) for line in out.splitlines())
    assert lines["r2"].startswith("skipped: not connected"), out
    assert replica_snapshots(r1.repo, "web")[-1][1] == read_tree(c.src)
    # with nobody reachable the point fails, it does not pass empty
    r1.kill(signal.SIGKILL)
    wait_for(lambda: status(c.primary)["sets"]["web"]["replicas"]["r1"]["last_error"], 30, "r1 unreachable")
    bad = c.primary.ctl("point", "--set", "web", check=False)
    assert bad.returncode != 0 and "no consistent point" in bad.stderr


def test_a_point_holds_a_file_written_on_while_it_is_sent(cluster):
    """A log written in place all the time (a database's redo log keeps being written by background
    threads under its point hook's lock): each point must hold a version at least as new as the one
    written before it was asked. Its batch may find a range changed since it was cut (then read as it is
    now), or the path re-cut meanwhile (left out for its next version, which the point waits for:
    `BatchSender.awaiting`; that branch is timing-dependent and not provoked every run)."""
    import random
    import struct
    import threading

    c = cluster(replicas=1)
    log = f"{c.src}/redo.log"
    write(log, bytes(24 * 1024 * 1024))
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 60, "seeding")
    stop = threading.Event()
    done = [0]
    rnd = random.Random(1713)

    def writer():
        fd = os.open(log, os.O_WRONLY)
        try:
            while not stop.is_set():
                n = done[0] + 1
                for _ in range(4):  # the counter at scattered places: every version differs all over
                    os.pwrite(fd, struct.pack("<Q", n) * 512, rnd.randrange(0, 24 * 1024 * 1024 - 4096, 4096))
                os.pwrite(fd, struct.pack("<Q", n), 0)  # the header last: n is whole once it says n
                done[0] = n
        finally:
            os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(5):
            wait_for(lambda: done[0] > 0, 10, "writes")
            before = done[0]
            c.primary.ctl("point", "--set", "web", "--timeout", "120")
            snap = replica_snapshots(r.repo, "web")[-1][1]
            held = struct.unpack("<Q", snap["data/redo.log"][:8])[0]
            assert held >= before, f"the point holds version {held}, {before} was written before it was asked"
    finally:
        stop.set()
        t.join(10)


def test_a_point_waits_for_paths_its_batch_just_left_out(tmp_path):
    """The MariaDB failover that lost every row since seeding: the sender decided to serve a point
    before sending the batch ahead of it; the batch left the database's redo log out (re-cut while it
    was sent, `BatchSender.awaiting`), and the point went out at once, holding the log of long before.
    A point is served only when nothing left out is still to come; the path's next version queued
    lets it through."""
    import time

    from test_repl_cache import _master
    from replicator.stream.sender import Sender

    src = str(tmp_path / "data")
    write(f"{src}/ib_logfile0", os.urandom(10_000))
    ms = _master(tmp_path, src)
    try:
        s = Sender(ms, "r")
        rel = b"data/ib_logfile0"
        s.batches.awaiting[rel] = time.monotonic() + 60
        slot = s.request_point(1)
        assert s._serve_slot(None, slot) is False  # no frame goes out: nothing is unacknowledged either
        assert not slot["done"].is_set() and slot["result"] is None
        s.need_catchup = False
        s.enqueue([rel])  # its next version is queued: the point follows it
        assert not s.batches.awaited()
        s.batches.awaiting[rel] = time.monotonic() - 1  # past settle_max and the margin: it goes ahead
        assert not s.batches.awaited()
    finally:
        ms.stop()
