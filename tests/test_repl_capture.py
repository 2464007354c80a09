"""Byte-range capture in the master (`capture = "reflink"`): a big changed file's written ranges come
from reflink clones compared with FIEMAP (store/capture.py), and only the chunks around them are cut
again (store/rechunk.py). On real btrfs and ext4 loop mounts; the chunk list must always equal a full
read's, whatever the ranges say, and the counters say how much was read."""
from __future__ import annotations

import json
import os
import random

import blake3

import test_range_capture as rc
from replicator.stream.scan import Scanner
from replicator.stream.tree import Tree
from store.chunker import ChunkerParams, chunk_stream
from test_repl_helpers import Cluster, read_tree, replica_head, set_config, wait_for

MiB = 1024 * 1024
SEED = 1707


def _scanner(src, **cfg):
    c = set_config({"paths": [str(src)], "settle": 0, "capture": "reflink", "capture_min": MiB, **cfg}, "web")
    tree = Tree([os.fsencode(str(src))])
    stats = {"files_read": 0, "bytes_read": 0, "changes": 0, "unchanged": 0, "scans": 0}
    alerts: list[str] = []
    return Scanner(tree, c, stats, alerts.append, lambda rels: None), tree, alerts


def _full_list(path) -> list[tuple[bytes, int]]:
    with open(path, "rb") as f:
        return [(blake3.blake3(v).digest(), len(v)) for v in chunk_stream(f, ChunkerParams.for_average(16384))]


def _same(src, rep) -> bool:
    """The replica's head is the source, less the clone directory (never replicated)."""
    want = {k: v for k, v in read_tree(str(src)).items() if "/.pit-clones" not in k}
    return replica_head(rep.repo, "web") == want


def _source(mnt, name: str, seed: int, size: int):
    """A source directory on the mount holding one random file `db.bin`: (dir, file, its Random)."""
    src = mnt / name
    src.mkdir()
    big = src / "db.bin"
    r = random.Random(seed)
    big.write_bytes(r.randbytes(size))
    return src, big, r


def _refresh(sc, src):
    sc.refresh({os.fsencode(str(src)): True})


def test_a_few_pages_cost_their_chunks_not_the_file(tmp_path):
    with rc.mounted(tmp_path, "btrfs") as mnt:
        src, big, r = _source(mnt, "www", SEED, 24 * MiB)
        sc, tree, alerts = _scanner(src)
        _refresh(sc, src)
        assert sc.stats["bytes_read"] == 24 * MiB  # no baseline yet: read whole, from the first clone
        assert "no baseline" in json.dumps(sc.capture_mode)
        written = rc._write_pages(str(big), r, 6)
        _refresh(sc, src)
        node = tree.lookup(b"www/db.bin")
        assert list(node.chunks) == _full_list(big)  # what a full read would have cut
        assert sc.stats["bytes_read"] - 24 * MiB < 3 * MiB, (sc.stats, written)
        assert "ranges" in json.dumps(sc.capture_mode) and not alerts
        assert tree.lookup(b"www/.pit-clones") is None  # the clones are never the set's
        assert sc.ignores(os.fsencode(str(src / ".pit-clones" / "web" / "x.tmp")))


def test_a_files_cache_behind_its_clones_reads_whole(tmp_path):
    """The tree's list is of an older version than the last clone (the agent died between keeping the
    clones and saving its files cache): ranges relative to the clone would build a wrong list."""
    with rc.mounted(tmp_path, "btrfs") as mnt:
        src, big, r = _source(mnt, "www", SEED + 1, 8 * MiB)
        sc, tree, _ = _scanner(src)
        _refresh(sc, src)
        old = tree.lookup(b"www/db.bin")
        rc._write_pages(str(big), r, 3)
        _refresh(sc, src)  # the clone now is this version ...
        tree.lookup(b"www/db.bin").skey = old.skey  # ... but the tree says the one before
        tree.lookup(b"www/db.bin").chunks = old.chunks
        rc._write_pages(str(big), r, 3)
        before = sc.stats["bytes_read"]
        _refresh(sc, src)
        assert sc.stats["bytes_read"] - before == 8 * MiB  # whole
        assert list(tree.lookup(b"www/db.bin").chunks) == _full_list(big)


def test_without_reflink_the_file_is_read_whole_and_status_says_why(tmp_path):
    with rc.mounted(tmp_path, "ext4") as mnt:
        src, big, r = _source(mnt, "www", SEED + 2, 4 * MiB)
        sc, tree, _ = _scanner(src)
        _refresh(sc, src)
        rc._write_pages(str(big), r, 2)
        _refresh(sc, src)
        assert sc.stats["bytes_read"] == 8 * MiB
        assert "reflink unsupported" in json.dumps(sc.capture_mode)
        assert list(tree.lookup(b"www/db.bin").chunks) == _full_list(big)


def test_agents_replicate_a_page_change_by_its_ranges(tmp_path):
    with rc.mounted(tmp_path, "btrfs") as mnt:
        src, big, r = _source(mnt, "data", SEED + 3, 32 * MiB)
        c = Cluster(str(tmp_path / "cl"), replicas=1, src=str(src),
                    sets={"web": {"paths": [str(src)], "mode": "mirror", "capture": "reflink", "capture_min": MiB}})
        try:
            c.start()
            rep = c.replicas[0]
            wait_for(lambda: _same(src, rep), 120, "seeding")

            def master():
                return json.loads(c.primary.ctl("status", "--local").stdout)["sets"]["web"]

            before = master()["stats"]["bytes_read"]
            rc._write_pages(str(big), r, 8)
            wait_for(lambda: _same(src, rep), 120, "the page change")
            st = master()
            assert st["stats"]["bytes_read"] - before < 4 * MiB, st["stats"]
            assert st["capture"]["mechanism"] == "reflink" and "ranges" in json.dumps(st["capture"])
            assert not [k for k in replica_head(rep.repo, "web") if ".pit-clones" in k]
            assert "web: byte-range capture (reflink): last look 1 file(s) by ranges, 0 whole" in \
                c.primary.ctl("status").stdout
        finally:
            c.stop()
