"""End to end: real `pit agent` processes on 127.0.0.1, a master and its replicas.

Each step changes the master's files and polls (with a deadline) until the
replica's head equals the master's tree byte for byte; consistent points are
compared the same way.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time


from test_repl_helpers import cluster, pit, read_tree, replica_head, replica_snapshots, wait_for, write  # noqa: F401  (cluster: the fixture)


def status(node):
    return json.loads(node.ctl("status", "--local").stdout)


def test_mirror_end_to_end(cluster):
    c = cluster(replicas=1)
    s = c.src
    write(f"{s}/a.txt", b"alpha\n")
    write(f"{s}/docs/b.txt", b"beta\n" * 1000)
    write(f"{s}/docs/old/c.bin", os.urandom(200_000))
    os.symlink("a.txt", f"{s}/link")
    c.start()
    r = c.replicas[0]
    conv = lambda: c.converged(r)  # noqa: E731
    wait_for(conv, 30, "initial seeding")

    write(f"{s}/a.txt", b"alpha, edited\n")                    # edit
    write(f"{s}/docs/b.txt", b"more\n", "ab")                  # append
    with open(f"{s}/docs/old/c.bin", "r+b") as f:              # truncate
        f.truncate(50_000)
    os.rename(f"{s}/docs/b.txt", f"{s}/docs/b-renamed.txt")    # rename
    os.makedirs(f"{s}/new/tree/deep")                          # new tree
    for i in range(20):
        write(f"{s}/new/tree/deep/f{i}", os.urandom(3000) + bytes([i]))
    wait_for(conv, 30, "edits, appends, truncation, rename, new tree")

    shutil.rmtree(f"{s}/new/tree/deep")                         # deletes (20 of ~25 files would trip 50 %)
    os.remove(f"{s}/link")
    wait_for(lambda: c.converged(r) or status(r)["sets"]["web"]["alerts"], 30, "deletes")
    st = status(r)["sets"]["web"]
    if st["alerts"]:  # the breaker held them (20 of 25 files): release, then they go through
        r.ctl("release-deletes", "--set", "web")
    wait_for(conv, 30, "deletes applied")

    out = c.primary.ctl("point", "--set", "web").stdout
    assert "r1" in out
    snaps = replica_snapshots(r.repo, "web")
    assert snaps and snaps[-1][1] == read_tree(s)


def test_big_file_small_change_sends_only_changed_chunks(cluster):
    c = cluster(replicas=1)
    big = f"{c.src}/vm.img"
    size = 32 * 1024 * 1024
    with open(big, "wb") as f:
        f.write(os.urandom(size))
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 60, "seeding the big file")
    before = status(c.primary)["sets"]["web"]["replicas"]["r1"]["bytes_sent"]
    assert before > size * 0.9
    old = chunks_of(big)
    with open(big, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(64 * 1024))
    wait_for(lambda: c.converged(r), 60, "the small change")
    wait_for(lambda: status(c.primary)["sets"]["web"]["replicas"]["r1"]["bytes_sent"] > before, 10, "counter")
    sent = status(c.primary)["sets"]["web"]["replicas"]["r1"]["bytes_sent"] - before
    # Only the chunks the change touched travel (the 64 KiB and the two chunks
    # it cuts into, whose sizes vary with the random data), plus metadata.
    changed = sum(n for h, n in chunks_of(big).items() if h not in old)
    assert 64 * 1024 <= changed <= 64 * 1024 + 2 * 64 * 1024
    assert sent < changed + 32 * 1024, (sent, changed)


def chunks_of(path: str) -> dict[bytes, int]:
    """The file's chunks as the master cuts them (default 16 KiB average): id -> length."""
    import blake3

    from store.chunker import ChunkerParams, chunk_stream

    with open(path, "rb") as f:
        return {blake3.blake3(v).digest(): len(v) for v in chunk_stream(f, ChunkerParams.for_average(16 * 1024))}


def test_one_master_three_replicas_and_points(cluster):
    c = cluster(replicas=3)
    for i in range(50):
        write(f"{c.src}/d{i % 5}/f{i}", os.urandom(1000 + i))
    c.start()
    for r in c.replicas:
        wait_for(lambda: c.converged(r), 40, f"{r.name} seeding")
    write(f"{c.src}/d1/f1", b"changed")
    for r in c.replicas:
        wait_for(lambda: c.converged(r), 30, f"{r.name} change")
    out = c.primary.ctl("point", "--set", "web").stdout
    for r in c.replicas:
        assert r.name in out
        assert replica_snapshots(r.repo, "web")[-1][1] == read_tree(c.src)


def test_replica_killed_mid_stream_converges(cluster):
    c = cluster(replicas=1)
    write(f"{c.src}/seed", b"x")
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seed")
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            write(f"{c.src}/stream/f{i % 40}", os.urandom(20_000) + str(i).encode())
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            time.sleep(0.7)
            r.kill(signal.SIGKILL)
            time.sleep(0.3)
            r.start()
    finally:
        stop.set()
        t.join()
    wait_for(lambda: c.converged(r), 60, "convergence after SIGKILLs")


def test_archive_mode_never_deletes(cluster):
    c = cluster(replicas=1, sets=None)
    c.sets["web"]["mode"] = "archive"
    write(f"{c.src}/keep.txt", b"keep")
    write(f"{c.src}/gone.txt", b"to be deleted")
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seed")
    os.remove(f"{c.src}/gone.txt")
    write(f"{c.src}/later.txt", b"later")
    want = dict(read_tree(c.src), **{"data/gone.txt": b"to be deleted"})
    wait_for(lambda: replica_head(r.repo, "web") == want, 30, "archive view")


def test_mass_delete_breaker_and_vanished_source(cluster):
    c = cluster(replicas=1)
    c.sets["web"]["delete_count"] = 5
    for i in range(30):
        write(f"{c.src}/f{i}", b"%d" % i)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seed")
    seeded = replica_head(r.repo, "web")
    for i in range(20):
        os.remove(f"{c.src}/f{i}")
    wait_for(lambda: status(r)["sets"]["web"]["alerts"], 30, "breaker alert")
    assert replica_head(r.repo, "web") == seeded  # nothing deleted
    # An emptied source root (an unmounted share) never wipes the mirror either.
    for i in range(20, 30):
        os.remove(f"{c.src}/f{i}")
    wait_for(lambda: any("empty" in a for a in status(c.primary)["sets"]["web"]["alerts"]), 30, "empty-source alert")
    assert replica_head(r.repo, "web") == seeded


def test_the_breaker_counts_what_deletions_take_from_the_newest_point(cluster):
    """Failover harness seed 1024: after a failover the new primary's first catch-up deletes, on every replica,
    the old primary's writes after its last point (the promotion rolled them back). They were never in an
    image; the breaker held them anyway, so no point reached the archive replica or the node that had handed
    over, and the latter could never take over again. Files that arrived after the newest point pass; the
    point's own files are still guarded."""
    c = cluster(replicas=1)
    c.sets["web"]["delete_count"] = 5
    for i in range(10):
        write(f"{c.src}/pointed/f{i}", b"%d" % i)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seeding")
    c.primary.ctl("point", "--set", "web")
    for i in range(20):
        write(f"{c.src}/after/f{i}", b"%d" % i)
    wait_for(lambda: c.converged(r), 30, "the files after the point")
    shutil.rmtree(f"{c.src}/after")
    wait_for(lambda: c.converged(r), 30, "20 deletions of files no point holds")
    assert not status(r)["sets"]["web"]["alerts"] and status(r)["sets"]["web"]["held_deletes"] == 0
    for i in range(8):
        os.remove(f"{c.src}/pointed/f{i}")
    wait_for(lambda: status(r)["sets"]["web"]["held_deletes"], 30, "the breaker on 8 of the point's files")
    assert "data/pointed/f0" in replica_head(r.repo, "web")


def test_master_restart_catches_up_by_tree_comparison(cluster):
    c = cluster(replicas=1)
    for i in range(200):
        write(f"{c.src}/d{i % 10}/f{i}", os.urandom(4000))
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 40, "seed")
    c.primary.kill(signal.SIGTERM)
    write(f"{c.src}/d3/f3", b"changed while the master was down")
    os.remove(f"{c.src}/d4/f4")
    c.primary.start()
    wait_for(lambda: c.converged(r), 40, "catch-up after the master's restart")
    sent = status(c.primary)["sets"]["web"]["replicas"]["r1"]["bytes_sent"]
    # 200 files of 4 KB were not sent again: only the differing subtrees' listings and one file.
    assert sent < 100_000, sent
    # nor read again: the saved files cache vouches for unchanged (size, mtime, ctime, inode)
    assert status(c.primary)["sets"]["web"]["stats"]["files_read"] <= 3


def test_new_set_pushed_without_restart(cluster, tmp_path):
    c = cluster(replicas=2)
    write(f"{c.src}/a", b"a")
    c.start()
    other = str(tmp_path / "src2" / "files")
    write(f"{other}/x/y.txt", b"second set")
    c.sets["files"] = {"paths": [other], "mode": "archive", "replicas": ["r2"]}
    c.write_sets()
    r2 = c.replicas[1]
    wait_for(lambda: c.converged(r2, "files", other), 30, "the new set on r2")
    assert replica_head(c.replicas[0].repo, "files") == {}


def test_two_masters_into_one_replica_dedup(cluster, tmp_path):
    """Many-to-one and many-to-many: r2 masters a set of its own into r1, while also being a replica."""
    c = cluster(replicas=2)
    same = os.urandom(300_000)
    write(f"{c.src}/big.bin", same)
    other = str(tmp_path / "src-r2" / "share")
    write(f"{other}/copy.bin", same)
    c.sets["share"] = {"paths": [other], "master": "r2", "replicas": ["r1"]}
    c.start()
    r1, r2 = c.replicas
    wait_for(lambda: c.converged(r1, "web") and c.converged(r2, "web"), 30, "web on both")
    wait_for(lambda: c.converged(r1, "share", other), 30, "share from r2 on r1")
    repo_stats = json.loads(pit("--repo", r1.repo, "stats", "--json").stdout)
    # the 300 KB file arrived twice (from two masters) but its chunks are stored once
    assert 300_000 <= repo_stats["blobs"]["chunk"]["raw"] < 450_000, repo_stats


def test_no_point_while_the_breaker_holds_deletions(cluster):
    """Harness seed 2007: a replica whose mass-delete breaker holds a batch has a head the master never had
    (the deleted files still in it); a point there would be an image of that, and a failback that promotes
    it would bring deleted files back on every node. The point is refused with the reason, not retried,
    and works again once the deletions are released."""
    c = cluster(replicas=1)
    for i in range(30):
        write(f"{c.src}/f{i:02d}", b"x%d" % i)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seeding")
    before = replica_snapshots(r.repo, "web")
    for i in range(1, 30):
        os.remove(f"{c.src}/f{i:02d}")
    wait_for(lambda: status(r)["sets"]["web"]["held_deletes"], 30, "the breaker to hold the deletions")
    out = c.primary.ctl("point", "--set", "web", check=False)
    assert out.returncode != 0 and "held by the mass-delete breaker" in out.stdout + out.stderr, out
    assert replica_snapshots(r.repo, "web") == before
    r.ctl("release-deletes", "--set", "web")
    wait_for(lambda: c.converged(r), 30, "deletions released")
    c.primary.ctl("point", "--set", "web")
    assert replica_snapshots(r.repo, "web")[-1][1] == read_tree(c.src)
