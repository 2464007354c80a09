"""A promotion leaves what the set's filter excludes alone (issue 19 with issue 14's promotion): the image has
no `postmaster.pid` or cache folder, and making the live paths equal to it must not delete the secondary's own."""
from __future__ import annotations

import os

from replicator.config import normalise_sets
from replicator.failover.controller import Failover, _selection
from store.ingest import create_snapshot
from store.objects import ObjectReader
from store.repository import Repository
from store.snapshots import list_snapshots


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_the_sync_of_a_promotion_keeps_excluded_files_and_removes_strays(tmp_path):
    src = str(tmp_path / "primary" / "main")
    _write(f"{src}/base/1", b"table")
    _write(f"{src}/postmaster.pid", b"primary's pid")
    sets = normalise_sets({"sets": {"db": {"master": "a", "replicas": ["b"], "paths": [src],
                                           "exclude": ["postmaster.pid", "pg_stat_tmp/"]}}})
    s = sets["db"]
    Repository.init(str(tmp_path / "repo")).close()
    repo = Repository(str(tmp_path / "repo"))
    try:
        create_snapshot(repo, "db", [src], retention=False, filters=s.filter_rules())
        live = str(tmp_path / "secondary" / "main")
        _write(f"{live}/postmaster.pid", b"secondary's own pid")
        _write(f"{live}/pg_stat_tmp/x", b"stats")
        _write(f"{live}/stray", b"not in the image")
        with repo.reading() as txn:
            snap = list_snapshots(repo, txn, "db")[-1]
            r = ObjectReader(repo, txn)
            names = {e.name: e for e in r.tree(snap.root)}
            assert b"postmaster.pid" not in {e.name for e in r.tree(names[b"main"].content)}
            Failover._sync(r, names[b"main"], live, _selection(s))
        assert open(f"{live}/postmaster.pid", "rb").read() == b"secondary's own pid"
        assert os.path.exists(f"{live}/pg_stat_tmp/x")
        assert not os.path.exists(f"{live}/stray")
        assert open(f"{live}/base/1", "rb").read() == b"table"
    finally:
        repo.close()
