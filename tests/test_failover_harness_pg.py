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


# about 50 s: CI runs the scenario on files (tests/test_failover.py) and PostgreSQL failover (test_failover_pg.py)
@pytest.mark.slow
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
# Seeds run so far (`bench/failover_harness.py --pg`, 5 or 6 operations each): 3000-3013, 3014-3019. Found,
# each a case below (fixed):
# - 3011: a promoted secondary whose lease ran out at once never took the key back (the node that served last
#   now takes it back on its live data; a promotion that failed before serving is not counted as served);
# - 3012: 2 ids the checker did not count in the RPO: the primary had taken its own key again after an etcd
#   outage (a term with no first point; such a term now begins with one too), counted (PgState.after); its
#   replay: a point hung 61 s after both replicas dropped the master with "data/pg_wal/...: chunk lengths do
#   not add up to the file size" (replicator/stream: a WAL segment written while it was sent; timing-dependent,
#   no test yet);
# - dc59917: the postgresql template's absolute excludes stopped a promoted secondary from mastering the set
#   (fixed in d8f9aa6: patterns kept in their stored form);
# - kill_primary_agent: a fenced old primary whose agent died alone kept its services running (the returning
#   agent now runs the demote hooks first).


def _first_point_of(node, token: int) -> str:
    """`done`, `missed` (the term ended first) or `` (not begun: the promotion itself failed), from its log."""
    with open(node.log, errors="replace") as f:
        text = f.read()
    if f"no first point of term {token} " in text:
        return "missed"
    return "done" if f"first point of term {token}: " in text else ""


@pytest.mark.slow
def test_a_promoted_secondary_that_loses_its_lease_at_once_takes_it_back(tmp_path):
    from failover_harness_netns import fencing, open_term, settled
    from failover_harness_pg import SET
    from test_repl_helpers import wait_for

    why = why_not()
    if why:
        pytest.skip(why)
    try:
        with pg_cluster(str(tmp_path), keep_failed=False) as c:
            p, r1, r2 = c.primary, c.replicas[0], c.replicas[1]
            wait_for(lambda: (settled(c) or ("",))[0] == "primary", 60, "the primary to serve")
            wait_for(lambda: c.converged(r1) and c.converged(r2), 90, "seeding")
            p.ctl("point", "--set", SET)
            _kill_primary_host(c)  # the primary host dies
            wait_for(lambda: c.serving("r1"), 60, "r1 to take over and start PostgreSQL", interval=0.02)
            c.etcd.pause()  # at once: r1's term ends on its own clock before its first point
            try:
                wait_for(lambda: open_term(r1) is None, 30, "r1 to stop acting on its own clock", interval=0.05)
            finally:
                c.etcd.resume()
            token = max(e["token"] for e in fencing(r1))
            if _first_point_of(r1, token) == "done":
                pytest.skip("r1's first point was made before its lease ran out: not the case of seed 3011")
            p.start()  # the old primary's host comes back: fenced, it rejoins
            # r1 served last, on its own live data: it (and nobody else) must hold the key and serve again
            wait_for(lambda: settled(c) == ("r1", open_term(r1)) if open_term(r1) else False, 60,
                     "r1 to take the key back and serve")
    except LabUnavailable as exc:
        pytest.skip(str(exc))


def _kill_primary_host(c) -> None:
    from failover_harness_netns import NetOutcome
    from failover_harness_pg import PRIMARY, PgState

    PgState(c, NetOutcome(0), print, 0).host_dies(PRIMARY)
    c.primary.proc.wait(10)
    for gone in (os.path.join(c.primary.state, "agent.sock"), c.web_pid("primary")):
        if os.path.exists(gone):
            os.unlink(gone)


@pytest.mark.slow  # about 50 s; tests/test_filters_repl.py covers the stored form in CI
def test_a_promoted_secondary_masters_a_template_set_with_its_default_excludes(tmp_path):
    from failover_harness import _status
    from failover_harness_netns import settled
    from failover_harness_pg import SET
    from test_repl_helpers import wait_for

    why = why_not()
    if why:
        pytest.skip(why)
    try:
        with pg_cluster(str(tmp_path), template_excludes=True, keep_failed=False) as c:
            p, r1, r2 = c.primary, c.replicas[0], c.replicas[1]
            assert any(x.startswith(c.src + "/") for x in c.sets[SET]["exclude"])  # the template's own form
            wait_for(lambda: (settled(c) or ("",))[0] == "primary", 60, "the primary to serve")
            wait_for(lambda: c.converged(r1) and c.converged(r2), 90, "seeding")
            p.ctl("point", "--set", SET)
            _kill_primary_host(c)
            wait_for(lambda: (settled(c) or ("",))[0] == "r1", 60, "r1 to take over")
            wait_for(lambda: _status(r1).get("sets", {}).get(SET, {}).get("replicas", {}).get("r2", {})
                     .get("connected"), 30, "r1 to master the set and stream to r2")
    except LabUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.slow  # about 60 s
def test_a_fenced_old_primary_whose_agent_died_alone_stops_its_services(tmp_path):
    from failover_harness import _fo
    from failover_harness_netns import NetOutcome, settled
    from failover_harness_pg import SET, PgState
    from test_repl_helpers import wait_for

    why = why_not()
    if why:
        pytest.skip(why)
    try:
        with pg_cluster(str(tmp_path), keep_failed=False) as c:
            p, r1, r2 = c.primary, c.replicas[0], c.replicas[1]
            st = PgState(c, NetOutcome(0), print, 0)
            wait_for(lambda: (settled(c) or ("",))[0] == "primary", 60, "the primary to serve")
            wait_for(lambda: c.converged(r1) and c.converged(r2), 90, "seeding")
            p.ctl("point", "--set", SET)
            p.kill()  # SIGKILL of the agent alone: PostgreSQL runs on
            wait_for(lambda: (settled(c) or ("",))[0] == "r1", 60, "r1 to take over when the lease runs out")
            assert st.pg_running("primary")
            p.start()
            wait_for(lambda: _fo(p).get("phase") == "fenced", 60, "the returning primary to be fenced")
            wait_for(lambda: not st.pg_running("primary"), 30, "the fenced old primary's PostgreSQL to stop")
    except LabUnavailable as exc:
        pytest.skip(str(exc))
