"""Topologies on 127.0.0.1: 1 master -> 7 replicas (8 nodes), and many-to-many.

Real `pit agent` processes; small trees. After a consistent point (`pit point`
on the set's master) every replica's newest snapshot must equal the master's
tree byte for byte.
"""
from __future__ import annotations

import os
import shutil


from test_repl_helpers import cluster, read_tree, replica_snapshots, wait_for, write  # noqa: F401  (cluster: the fixture)


def assert_point(master, set_name, src, replicas):
    """A consistent point on every replica of the set, each snapshot equal to the master's tree."""
    out = master.ctl("point", "--set", set_name).stdout
    want = read_tree(src)
    for r in replicas:
        assert r.name in out, out
        snaps = replica_snapshots(r.repo, set_name)
        assert snaps, f"{r.name}: no snapshot of {set_name}"
        assert snaps[-1][1] == want, f"{r.name}: snapshot of {set_name} differs from the master"


def test_one_master_seven_replicas(cluster):
    """8 nodes: the primary masters one set into 7 replicas."""
    c = cluster(replicas=7)
    for i in range(24):
        write(f"{c.src}/d{i % 4}/f{i}", os.urandom(500 + 37 * i))
    write(f"{c.src}/shared.bin", os.urandom(100_000))
    c.start()
    for r in c.replicas:
        wait_for(lambda: c.converged(r), 60, f"{r.name} seeding")
    assert_point(c.primary, "web", c.src, c.replicas)

    # Changes fan out to all seven.
    write(f"{c.src}/d1/f1", b"edited")
    write(f"{c.src}/shared.bin", b"appended", "ab")
    os.rename(f"{c.src}/d2/f2", f"{c.src}/d3/moved")
    shutil.rmtree(f"{c.src}/d0")  # 6 of 25 files: under the breaker's 50 %
    write(f"{c.src}/new/deep/n.txt", b"new tree")
    for r in c.replicas:
        wait_for(lambda: c.converged(r), 60, f"{r.name} changes")
    assert_point(c.primary, "web", c.src, c.replicas)


def test_many_to_many(cluster, tmp_path):
    """Two masters: the primary masters `a`, r1 masters `b`; r2 and r3 receive both, r1 also receives `a`."""
    c = cluster(replicas=3)
    src_b = str(tmp_path / "src-r1" / "share")
    common = os.urandom(200_000)
    write(f"{c.src}/common.bin", common)
    write(f"{src_b}/common-copy.bin", common)
    for i in range(10):
        write(f"{c.src}/a{i}.txt", b"a%d\n" % i * (i + 1))
        write(f"{src_b}/sub/b{i}.txt", b"b%d\n" % i * (i + 2))
    c.sets = {
        "a": {"paths": [c.src], "replicas": ["r1", "r2", "r3"]},
        "b": {"paths": [src_b], "master": "r1", "replicas": ["r2", "r3"]},
    }
    c.start()
    r1, r2, r3 = c.replicas
    for r in (r1, r2, r3):
        wait_for(lambda: c.converged(r, "a"), 40, f"set a on {r.name}")
    for r in (r2, r3):
        wait_for(lambda: c.converged(r, "b", src_b), 40, f"set b on {r.name}")

    # Both masters change their sets at the same time.
    write(f"{c.src}/a3.txt", b"changed on the primary")
    os.remove(f"{c.src}/a4.txt")
    write(f"{src_b}/sub/b5.txt", b"changed on r1")
    write(f"{src_b}/more/b-new.txt", b"new on r1")
    for r in (r1, r2, r3):
        wait_for(lambda: c.converged(r, "a"), 40, f"set a changes on {r.name}")
    for r in (r2, r3):
        wait_for(lambda: c.converged(r, "b", src_b), 40, f"set b changes on {r.name}")

    assert_point(c.primary, "a", c.src, [r1, r2, r3])
    assert_point(r1, "b", src_b, [r2, r3])
    # r1 is master of b and replica of a only: it never received b.
    assert replica_snapshots(r1.repo, "b") == []


def test_four_masters_one_replica(cluster, tmp_path):
    """Many-to-one: the primary, r1, r2 and r3 each master a set, all four into r4; a file common to the
    four sets is stored once in r4's repository (cross-master dedup, visible in `pit stats`)."""
    import json

    from test_repl_helpers import pit

    c = cluster(replicas=4)
    common = os.urandom(400_000)
    srcs = {"a": c.src}
    for name, node in (("b", "r1"), ("c", "r2"), ("d", "r3")):
        srcs[name] = str(tmp_path / f"src-{node}" / f"share-{name}")
    for name, src in srcs.items():
        write(f"{src}/common.bin", common)
        for i in range(8):
            write(f"{src}/{name}{i % 2}/f{i}", os.urandom(3000 + 100 * i))
    c.sets = {"a": {"paths": [srcs["a"]], "replicas": ["r4"]}}
    for name, node in (("b", "r1"), ("c", "r2"), ("d", "r3")):
        c.sets[name] = {"paths": [srcs[name]], "master": node, "replicas": ["r4"]}
    c.start()
    masters = {"a": c.primary, "b": c.replicas[0], "c": c.replicas[1], "d": c.replicas[2]}
    r4 = c.replicas[3]
    for name, src in srcs.items():
        wait_for(lambda: c.converged(r4, name, src), 60, f"set {name} on r4")

    # All four masters change their sets at once; then a point per set.
    for name, src in srcs.items():
        write(f"{src}/{name}0/f0", b"changed on the master of " + name.encode())
        os.remove(f"{src}/{name}1/f1")
        write(f"{src}/new/{name}.txt", os.urandom(5000))
    for name, src in srcs.items():
        wait_for(lambda: c.converged(r4, name, src), 60, f"set {name} changes on r4")
    for name, src in srcs.items():
        assert_point(masters[name], name, src, [r4])
    # Each set has its own snapshots, and no other node received any.
    for name in srcs:
        for other in c.replicas[:3]:
            assert replica_snapshots(other.repo, name) == []

    st = json.loads(pit("--repo", r4.repo, "stats", "--json").stdout)
    # what the heads hold besides the common file (f0 rewritten and f1 deleted no longer count)
    unique = 4 * (8 * 3000 + 100 * 28 - 3000 - 3100 + 5000 + len(b"changed on the master of x"))
    # The 400 KB common file arrived from four masters but is stored once.
    assert 400_000 + unique * 0.9 <= st["blobs"]["chunk"]["raw"] < 2 * 400_000 + unique, st
