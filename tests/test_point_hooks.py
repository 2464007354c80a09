"""`pit point` runs the set's point hooks (its `app.pre` / `app.post`) around the consistent point:
real agents on 127.0.0.1; a failing pre hook means no point, a failing post hook fails the command."""
from __future__ import annotations

import os

import pytest

from test_repl_helpers import Cluster, pit, replica_snapshots, wait_for


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path), replicas=1)
    yield c
    c.stop()


def test_point_hooks_wrap_the_point_and_a_failure_is_never_silent(cluster, tmp_path):
    c = cluster
    trace = tmp_path / "trace"
    gate = tmp_path / "pre-fails"
    c.sets["web"]["app"] = {
        "pre": [f"test ! -e {gate} && echo pre $PIT_POINT_ID >> {trace}"],
        "post": [f"echo post $PIT_POINT_ID $PIT_POINT_RESULT >> {trace}"],
        "hook_timeout": 10,
    }
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"one")
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seeding")
    c.primary.ctl("point", "--set", "web")
    lines = trace.read_text().split("\n")
    assert lines[0].startswith("pre ") and lines[1].startswith("post ") and lines[1].endswith(" ok")
    assert lines[0].split()[1] == lines[1].split()[1]  # the same point id
    assert len(replica_snapshots(r.repo, "web")) == 1

    gate.write_text("")  # the pre hook now fails: no point is made, and the command says so
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"two")
    wait_for(lambda: c.converged(r), 30, "the change")
    res = pit("point", "--set", "web", "--config", c.primary.config, check=False)
    assert res.returncode == 55 and "pre hook failed" in res.stderr, res.stderr
    assert len(replica_snapshots(r.repo, "web")) == 1


def test_scheduled_points_of_an_application_set_run_its_hooks(cluster, tmp_path):
    """A database set is scheduled (its template says so): every scheduled point runs pre/post hooks."""
    c = cluster
    trace = tmp_path / "trace"
    c.sets["web"]["schedule"] = {"every": "2s"}
    c.sets["web"]["app"] = {"pre": [f"echo pre $PIT_POINT_ID >> {trace}"],
                            "post": [f"echo post $PIT_POINT_ID $PIT_POINT_RESULT >> {trace}"]}
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"one")
    c.start()
    r = c.replicas[0]
    wait_for(lambda: trace.exists() and trace.read_text().count("post ") >= 2, 60, "two scheduled points")
    lines = trace.read_text().split("\n")
    assert lines[0].startswith("pre ") and lines[1].startswith("post ") and lines[1].endswith(" ok")
    wait_for(lambda: replica_snapshots(r.repo, "web"), 30, "the scheduled point's snapshot")


def test_failed_post_hook_marks_the_replicas_image_and_selection_skips_it(cluster, tmp_path):
    from replicator.failover.select import select_image

    c = cluster
    gate = tmp_path / "post-fails"
    c.sets["web"]["app"] = {"post": [f"test ! -e {gate}"]}
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"one")
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seeding")
    c.primary.ctl("point", "--set", "web")  # a good point
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"two")
    wait_for(lambda: c.converged(r), 30, "the change")
    gate.write_text("")
    res = pit("point", "--set", "web", "--config", c.primary.config, check=False)
    assert res.returncode == 55 and "post hook failed" in res.stderr and "marked failed" in res.stderr
    snaps = replica_snapshots(r.repo, "web")
    assert len(snaps) == 2
    c.stop()  # the replica's repository to ourselves
    sel = select_image(r.repo, "web")
    assert sel.images[0].status == "skipped" and "hooks failed" in sel.images[0].reason
    assert sel.chosen.name == snaps[0][0].name


def test_a_nodes_own_app_settings_override_the_sets(cluster, tmp_path):
    """The cluster file's hooks name the configured primary's database; a node
    whose database differs (after a failover: another socket or port) gives
    its own in its agent file (`[app.NAME]`), and its points use those."""
    from test_repl_helpers import Node

    c = cluster
    trace = tmp_path / "trace"
    c.sets["web"]["app"] = {"pre": ["false"], "post": [f"echo post-cluster >> {trace}"], "hook_timeout": 10}
    n = c.primary
    block = f'[app.web]\npre = ["echo pre-here $PIT_POINT_ID >> {trace}"]\n'
    n.write_config = lambda extra="": Node.write_config(n, extra + "\n" + block)
    with open(os.path.join(c.src, "a.txt"), "wb") as f:
        f.write(b"one")
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 30, "seeding")
    c.primary.ctl("point", "--set", "web")  # the cluster's `false` would refuse the point
    lines = trace.read_text().split("\n")
    assert lines[0].startswith("pre-here ") and lines[1] == "post-cluster", lines
    assert len(replica_snapshots(r.repo, "web")) == 1
