"""The randomized failover harness in network namespaces (tests/failover_harness_netns.py): partitions,
isolation, link flaps, etcd and agent kills, configuration pushes, failback; a checker of single service
windows, acknowledged writes (nothing lost beyond the RPO of an unplanned failover, nothing rolled back), the
per-operation expectations and convergence.

CI runs one short schedule (a partition of the primary from the secondary with its heal, a configuration
push, an isolation of the primary with its failback); `-m slow` runs PIT_HARNESS_RUNS schedules (default
10) from PIT_HARNESS_SEED on (default 2000), PIT_HARNESS_STEPS operations each (default 6). A failing seed
replays with PIT_HARNESS_SEED=N PIT_HARNESS_RUNS=1 and becomes a case here (the found cases at the end; the
takeover-write case is deterministic and short, so CI runs it too).
Skipped (with the reason) when network namespaces, nftables or etcd are not available."""
from __future__ import annotations

import os

import pytest

from failover_harness import _caught_up, _fo
from failover_harness_netns import netns_cluster, plan, run_netns_schedule, settled, why_not
from test_repl_helpers import wait_for

CI_SEED, CI_STEPS = 2, 3  # partition_secondary + heal, push, isolate_primary (cable pulled) + failback


@pytest.fixture
def harness():
    why = why_not()
    if why:
        pytest.skip(why)

    def run(tmp, seed: int, steps: int, body=None, **kw):
        try:
            with netns_cluster(str(tmp), **kw) as c:
                return body(c) if body else run_netns_schedule(c, seed, steps)
        except RuntimeError as exc:  # the lab could not be built here (ip netns / veth refused)
            if "ip " in str(exc) or "netns" in str(exc):
                pytest.skip(f"cannot build network namespaces here: {exc}")
            raise

    return run


# about 45 s: under -m slow (CI keeps this harness's takeover-write schedule below and the loopback harness's
# short schedule; tests/test_failover_netns.py covers partition, isolation and failed services one by one)
@pytest.mark.slow
def test_a_short_schedule_in_namespaces_holds_every_invariant(tmp_path, harness):
    ops = [op for op, _ in plan(CI_SEED, CI_STEPS)]
    assert "partition_secondary" in ops and "isolate_primary" in ops
    out = harness(tmp_path, CI_SEED, CI_STEPS)
    assert out.acked > 0 and not out.problems, out.line()
    assert len(out.failovers) == 1 and out.failovers[0].op == "isolate_primary", out.line()


_RUNS = int(os.environ.get("PIT_HARNESS_RUNS", "10"))


@pytest.mark.slow
@pytest.mark.timeout(600 + 400 * _RUNS)  # a schedule takes one to two minutes; a stuck one still ends
def test_many_schedules_in_namespaces(tmp_path_factory, harness):
    first = int(os.environ.get("PIT_HARNESS_SEED", "2000"))
    runs = _RUNS
    steps = int(os.environ.get("PIT_HARNESS_STEPS", "6"))
    lines, bad = [], []
    for seed in range(first, first + runs):
        out = harness(tmp_path_factory.mktemp(f"seed{seed}"), seed, steps)
        lines.append(out.line())
        if out.problems:
            bad.append(out.line())
    print("\n".join(lines))
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------------ found cases
# Seeds the harness found failing, replayed: 2007 (a point on a replica whose mass-delete breaker held the
# catch-up; fixed: such a point is refused), 2006 (no failover for a minute after a failback; fixed: the
# hand-over moves the key, so a free key is a failure), and a write made at takeover (fixed: a full scan's
# deferred files are looked at again as they settle).

@pytest.mark.slow
def test_seed_2007_failback_soon_after_an_early_isolation(tmp_path, harness):
    out = harness(tmp_path, 2007, 6)
    assert not out.problems, out.line()


@pytest.mark.slow
def test_seed_2006_isolation_soon_after_a_failback_fails_over(tmp_path, harness):
    out = harness(tmp_path, 2006, 6)
    assert not out.problems, out.line()


def test_a_write_made_at_takeover_survives_the_failback(tmp_path, harness):
    def body(c):
        p, r1, r2 = c.primary, c.replicas[0], c.replicas[1]
        wait_for(lambda: (settled(c) or ("",))[0] == "primary", 60, "the primary to serve")
        wait_for(lambda: c.converged(r1) and c.converged(r2), 90, "seeding")
        p.ctl("point", "--set", "web")
        c.lab.cut(1)
        node, token = wait_for(lambda: settled(c) if (settled(c) or ("",))[0] == "r1" else None, 60,
                               "r1 to take over")
        name = f"first-write-r1-{token}"
        assert os.path.exists(os.path.join(c.live, name))  # the service's first write, made by the hook
        c.lab.restore(1)
        wait_for(lambda: _fo(p).get("phase") == "fenced", 60, "the old primary fenced")
        wait_for(lambda: _caught_up(r1, "primary"), 120, "the old primary to catch up")
        p.ctl("failback", "--json")
        wait_for(lambda: (settled(c) or ("",))[0] == "primary", 60, "the failback")
        assert name in os.listdir(c.src), "a write r1 made as primary is lost by the failback"
        wait_for(lambda: c.converged(r2), 60, "r2 to follow")

    harness(tmp_path, 0, 0, body=body, first_write=True, rescan=300, settle=0.2)
