"""The rollback guard (issue 14): a node never promotes an image older than data it served itself as primary.

Its own state (when it last served, from failover.json) against the newest image in a real repository. The
whole cluster cannot show this state for long any more: after a failback the new term's first point reaches
the old holder at once (tests/test_failover.py), so the guard is checked here on the controller itself."""
from __future__ import annotations

import os
import time

import pytest

from replicator.config import normalise_failover, normalise_sets
from replicator.errors import FailoverRefused
from replicator.failover.controller import Failover
from store.ingest import create_snapshot
from store.repository import Repository


class _State:
    def __init__(self, d: str) -> None:
        self.node, self.dir = "r1", d

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)


class _Agent:
    """What the controller reads of its agent for the guard: its node state, sets and repository."""

    def __init__(self, d: str, repo: Repository, sets) -> None:
        self.state = _State(d)
        self.replica = type("R", (), {"repo": repo})()
        self._sets = sets

    def configured_sets(self):
        return self._sets


@pytest.fixture
def guard(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    sets = normalise_sets({"sets": {"web": {"master": "primary", "replicas": ["r1"], "paths": [str(src)]}}})
    cfg = normalise_failover({"secondary": "r1", "etcd": ["http://127.0.0.1:9"], "key": "/pit/test/leader"},
                             sets, ("failover",))
    Repository.init(str(tmp_path / "repo")).close()
    repo = Repository(str(tmp_path / "repo"))
    fo = Failover(_Agent(str(tmp_path), repo, sets), cfg, "primary")
    yield fo, repo, str(src)
    repo.close()


def test_an_image_older_than_what_this_node_served_is_refused(guard):
    fo, repo, src = guard
    create_snapshot(repo, "web", [src], host="r1", retention=False)
    fo.saved["served"] = {"6": {"started": time.time() - 60, "until": time.time() + 1}}  # served after it
    assert fo.rollback_sets() == ["web"]
    with pytest.raises(FailoverRefused, match="roll back writes acknowledged here"):
        fo._check_rollback(None)
    assert fo.rollback_sets({"web": "web@pinned"}) == []  # a pin keeps the live data first, then takes it


def test_an_image_newer_than_what_this_node_served_is_promotable(guard):
    fo, repo, src = guard
    fo.saved["served"] = {"6": {"started": time.time() - 60, "until": time.time() - 30}}
    assert fo.rollback_sets() == ["web"]  # no image at all is older than anything served
    create_snapshot(repo, "web", [src], host="r1", retention=False)  # the new term's first point
    assert fo.rollback_sets() == []
    fo._check_rollback(None)


def test_a_node_that_never_served_has_nothing_to_roll_back(guard):
    fo, _, _ = guard
    assert fo.served_until() == 0 and fo.rollback_sets() == []


def test_a_revocation_counts_as_served_for_the_primary_only(guard):
    """Namespace harness, the replay of seed 2013: a secondary whose take-over failed (no image yet) read its
    own revocation record as a term it had served, took the key on a live copy no point had made consistent,
    and fenced the primary. The record carries who really served; only the primary is held off by it."""
    fo, _, _ = guard
    revoking = {"node": "r1", "token": 0, "revoking": 5, "served": {"node": "primary", "token": 2}}
    assert fo._served_view(revoking) == "primary"  # r1 itself: the primary served last
    fo.me = "primary"
    assert fo._served_view(revoking) == "r1"  # the primary: another node is taking over, do not campaign back
    assert fo._served_view({"node": "r1", "token": 7, "served": {"node": "primary", "token": 2}}) == "primary"
