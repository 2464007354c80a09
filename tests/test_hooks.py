"""Point hooks (replicator/apps/hooks.py): real commands through /bin/sh and argv lists,
environment, captured output, failures and timeouts that fail the point, and
post hooks that always run once a pre hook succeeded."""
from __future__ import annotations

import logging
import os
import signal
import sys

import pytest

from replicator.waiting import poll_until

from replicator.errors import HookFailed, HookTimeout
from replicator.apps.hooks import around_point, run_point_hooks
from test_repl_helpers import set_config


def cfg(pre=(), post=(), timeout=30.0):
    return set_config({"name": "web", "paths": ["/srv/www"],
            "app": {"template": "website", "pre": list(pre), "post": list(post), "hook_timeout": timeout}})


def lines(path) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_hooks_run_in_order_with_environment(tmp_path, caplog):
    trace = tmp_path / "trace"
    c = cfg(pre=[f'echo "pre1 $PIT_SET $PIT_PHASE $PIT_POINT_ID $PIT_HOOK_INDEX" >> {trace}; echo said-pre1',
                 [sys.executable, "-c", f"import os; open({str(trace)!r}, 'a').write('pre2 ' + os.environ['EXTRA'] + '\\n')"]],
            post=[f'echo "post $PIT_PHASE $PIT_POINT_RESULT" >> {trace}'])
    caplog.set_level(logging.INFO, logger="pit.hooks")
    with around_point(c, 7, env={"EXTRA": "x1"}) as ph:
        assert ph.pre.ok and len(ph.pre.runs) == 2
        with open(trace, "a") as f:
            f.write("point\n")
    assert ph.ok and ph.post.ok
    with open(trace) as f:
        assert f.read().splitlines() == ["pre1 web pre 7 0", "pre2 x1", "point", "post post ok"]
    assert ph.pre.runs[0].output.strip() == "said-pre1"
    assert ph.pre.runs[0].rc == 0
    assert any("said-pre1" in r.getMessage() for r in caplog.records), "hook output goes to the log"
    assert ph.to_json()["post"]["runs"][0]["ok"] is True


def test_failing_pre_hook_fails_the_point_and_runs_post_hooks(tmp_path):
    trace = tmp_path / "trace"
    c = cfg(pre=[f"echo pre1 >> {trace}", "echo broken >&2; exit 3", f"echo never >> {trace}"],
            post=[f'echo "post $PIT_POINT_RESULT" >> {trace}'])
    ran = []
    with pytest.raises(HookFailed) as ei:
        with around_point(c, "p1"):
            ran.append(True)
    assert not ran, "the point must not be made after a failing pre hook"
    assert lines(trace) == ["pre1", "post", "failed"]
    msg = str(ei.value)
    assert "\n" not in msg and "exit status 3" in msg and "broken" in msg
    assert ei.value.exit_code == 59
    res = ei.value.result
    assert not res.ok and res.phase == "pre" and len(res.runs) == 2


def test_first_pre_hook_failing_runs_no_post_hook(tmp_path):
    trace = tmp_path / "trace"
    c = cfg(pre=["exit 1"], post=[f"echo post >> {trace}"])
    with pytest.raises(HookFailed):
        with around_point(c, 1):
            pass
    assert lines(trace) == [], "nothing was set up, so there is nothing to undo"


def test_timed_out_hook_is_killed_with_its_children(tmp_path):
    pids = tmp_path / "pids"
    trace = tmp_path / "trace"
    c = cfg(pre=[f"sleep 600 & echo $! > {pids}; echo $$ >> {pids}; wait"], post=[f"echo post >> {trace}"],
            timeout=1.0)
    with pytest.raises(HookTimeout) as ei:
        with around_point(c, 2):
            pass
    assert "timed out" in str(ei.value) and ei.value.exit_code == 60
    assert ei.value.result.timed_out
    for pid in map(int, lines(pids)):  # SIGKILL is delivered at once, the process is gone a moment later
        poll_until(lambda: not alive(pid), 10, f"process {pid} of the timed-out hook to die")
    assert lines(trace) == []


def test_failing_point_still_runs_post_hooks(tmp_path):
    trace = tmp_path / "trace"
    c = cfg(pre=[f"echo pre >> {trace}"], post=[f'echo "post $PIT_POINT_RESULT" >> {trace}'])
    with pytest.raises(RuntimeError, match="replica gone"):
        with around_point(c, 3) as ph:
            raise RuntimeError("replica gone")
    assert lines(trace) == ["pre", "post", "failed"]
    assert not ph.ok and "replica gone" in ph.error


def test_failing_post_hook_fails_the_point(tmp_path):
    c = cfg(pre=["true"], post=["echo no-unlock; exit 2"])
    made = []
    with pytest.raises(HookFailed, match="post hook failed.*exit status 2: no-unlock"):
        with around_point(c, 4):
            made.append(1)
    assert made == [1]


def test_run_point_hooks_reports_instead_of_raising(tmp_path):
    res = run_point_hooks(cfg(pre=["true", [str(tmp_path / "no-such-program")]]), "pre", {"PIT_POINT_ID": "9"},
                          set_name="web")
    assert not res.ok and res.point_id == "9"
    assert res.runs[0].ok and not res.runs[1].ok
    assert "cannot run" in res.error
    with pytest.raises(HookFailed):
        res.raise_for_failure()
    ok = run_point_hooks(cfg(), "post", set_name="web", point_id=1)
    assert ok.ok and ok.runs == []


def test_killed_hook_and_bad_specs_fail(tmp_path):
    res = run_point_hooks(cfg(pre=["kill -9 $$"]), "pre", set_name="web", point_id=1)
    assert not res.ok and "signal 9" in res.error
    for bad in ([], [""], "   ", "builtin:no.such", 42):
        r = run_point_hooks(cfg(pre=[bad]), "pre", set_name="web", point_id=1)
        assert not r.ok, f"hook spec {bad!r} should fail the point"


def test_background_child_does_not_make_a_finished_hook_hang(tmp_path):
    pidf = tmp_path / "bg"
    c = cfg(pre=[f"sleep 600 & echo $! > {pidf}; echo started"], timeout=20.0)
    try:
        res = run_point_hooks(c, "pre", set_name="web", point_id=1)
        assert res.ok and res.runs[0].output.strip() == "started"
    finally:
        for pid in map(int, lines(pidf)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_builtin_state_carries_from_pre_to_post_calls(tmp_path):
    """A builtin post hook without its pre (a new process after a crash) fails loudly."""
    c = set_config({"name": "db", "paths": ["/var/lib/postgresql/15/main"],
         "app": {"template": "postgresql", "data": "/var/lib/postgresql/15/main", "port": 5432,
                 "socket_dir": str(tmp_path), "os_user": "postgres", "superuser": "postgres",
                 "pre": [], "post": ["builtin:postgresql.backup_stop"]}})
    res = run_point_hooks(c, "post", set_name="db", point_id=5)
    assert not res.ok and "no backup was started" in res.error


def test_run_command_for_other_hook_kinds(tmp_path):
    from replicator.apps.hooks import run_command

    r = run_command("echo $PIT_ROLE", env={**os.environ, "PIT_ROLE": "takeover"})
    assert r.ok and r.output.strip() == "takeover"
    r = run_command(["sh", "-c", "echo nope >&2; exit 4"])
    assert not r.ok and r.rc == 4 and r.error == "exit status 4: nope"
    r = run_command("sleep 600", timeout=0.5)
    assert not r.ok and r.timed_out
