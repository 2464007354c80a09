"""The failover harness with PostgreSQL as the application (tests/failover_harness_pg.py): the namespace
harness' nemesis and checker, PostgreSQL on the primary's live data directory started and stopped by the
takeover/demote hooks, pgbench and an appender of acknowledged ids as the workload, pg_amcheck and pgbench's
balance totals on the final primary.

CI runs the issue's hand scenario (issue 14): SIGKILL of the primary host (agent and PostgreSQL), its rejoin
and `pit failback` while writes continue, a partition of the primary from the secondary and its heal (no
failover), a `[failover]` push (no change of term). `-m slow` runs PIT_PG_HARNESS_RUNS random schedules
(default 5) from PIT_PG_HARNESS_SEED on (default 3000), PIT_PG_HARNESS_STEPS operations each (default 5);
a failing seed replays with PIT_PG_HARNESS_SEED=N PIT_PG_HARNESS_RUNS=1 (or `bench/failover_harness.py --pg
--seed N --runs 1 --keep`) and becomes a case at the end of this file.
Skipped (with the reason) when PostgreSQL's server binaries, etcd, network namespaces or nftables are missing."""
from __future__ import annotations

import os

import pytest

from failover_harness_pg import FIXED, LabUnavailable, pg_cluster, pg_plan, run_pg_schedule, why_not


@pytest.fixture
def pg_harness():
    why = why_not()
    if why:
        pytest.skip(why)

    def run(tmp, seed, steps: int = 0, schedule=None):
        try:
            with pg_cluster(str(tmp)) as c:
                return run_pg_schedule(c, seed, steps, schedule=schedule)
        except LabUnavailable as exc:
            pytest.skip(str(exc))

    return run


def test_the_issue_scenario_on_postgresql_holds_every_invariant(tmp_path, pg_harness):
    assert [op for op, _ in FIXED] == ["kill_primary", "partition_secondary", "push"]
    out = pg_harness(tmp_path, None, schedule=FIXED)
    assert out.acked > 0 and not out.problems, out.line()
    # one unplanned failover (the kill), none from the healed partition or the push; the failback under
    # writes and everything after it lost nothing (the checker: only the dead primary's ids after the point)
    assert [f.op for f in out.failovers] == ["kill_primary"], out.line()
    assert len(out.rto) == 1 and len(out.rpo) == 1, out.line()


_RUNS = int(os.environ.get("PIT_PG_HARNESS_RUNS", "5"))


@pytest.mark.slow
@pytest.mark.timeout(600 + 300 * _RUNS)  # a schedule takes one to three minutes; a stuck one still ends
def test_many_postgresql_schedules(tmp_path_factory, pg_harness):
    first = int(os.environ.get("PIT_PG_HARNESS_SEED", "3000"))
    steps = int(os.environ.get("PIT_PG_HARNESS_STEPS", "5"))
    lines, bad = [], []
    for seed in range(first, first + _RUNS):
        out = pg_harness(tmp_path_factory.mktemp(f"pgseed{seed}"), seed, steps)
        lines.append(out.line())
        if out.problems:
            bad.append(out.line())
    print("\n".join(lines))
    assert not bad, "\n".join(bad)


def test_a_seed_names_its_whole_plan():
    assert pg_plan(3001, 6) == pg_plan(3001, 6)
    ops = {op for s in range(3000, 3020) for op, _ in pg_plan(s, 5)}
    assert "kill_primary" in ops and "isolate_primary" in ops


# ------------------------------------------------------------------------------------------------ found cases
