"""Pre/post hooks around a consistent point.

A set's hooks live in its `app` table (written by a template, adjusted by the
operator):

    [sets.db.app]
    pre = ["builtin:postgresql.backup_start", ["/usr/local/bin/flush-cache", "--now"]]
    post = ["builtin:postgresql.backup_stop", "logger -t pit point $PIT_POINT_ID done"]
    hook_timeout = 120

Each hook is a shell command (string, run with /bin/sh -c), an argv list, or
`builtin:NAME` (in-process, see `replicator/apps/templates.py`). Commands get the
environment of the agent plus PIT_SET, PIT_PHASE (`pre`/`post`),
PIT_POINT_ID, PIT_HOOK_INDEX and, for post hooks, PIT_POINT_RESULT (`ok` or
`failed`). Their output (stdout and stderr together) goes to the log
(`pit.hooks`) and, its last 8 KiB, into the result.

Rules:

* hooks of a phase run in order; the first failure stops the phase;
* a hook that exits non-zero, cannot start, or runs past `hook_timeout`
  (its whole process group is killed) fails the point: `around_point`
  raises `HookFailed` / `HookTimeout` and `run_point_hooks` returns a result
  with `ok = False`; a failure never passes silently;
* once any pre hook succeeded, the post hooks always run, even when a later
  pre hook, the point itself, or the caller failed (a database must not be
  left in backup mode or locked).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import HookFailed, HookTimeout
from ..settings import SetConfig

log = logging.getLogger("pit.hooks")

DEFAULT_TIMEOUT = 300.0
OUTPUT_TAIL = 8192
_states: dict[tuple[str, str], dict] = {}   # builtin hooks' state between separate pre and post calls
_states_lock = threading.Lock()


@dataclass
class HookRun:
    hook: str            # how it is shown: the command line or builtin:NAME
    index: int
    ok: bool
    rc: int | None       # exit status (None for builtins; -9 when killed)
    seconds: float
    output: str = ""
    error: str | None = None
    timed_out: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class HookResult:
    set: str
    phase: str
    point_id: str
    ok: bool = True
    runs: list[HookRun] = field(default_factory=list)
    error: str | None = None       # the first failure, one line
    timed_out: bool = False

    @property
    def any_succeeded(self) -> bool:
        return any(r.ok for r in self.runs)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["runs"] = [r.to_json() for r in self.runs]
        return d

    def raise_for_failure(self) -> None:
        if not self.ok:
            cls = HookTimeout if self.timed_out else HookFailed
            raise cls(f"set {self.set} point {self.point_id}: {self.phase} hook failed: {self.error}", result=self)


@dataclass
class PointHooks:
    """What `around_point` yields: the pre result now, the post result after the block."""

    set: str
    point_id: str
    pre: HookResult | None = None
    post: HookResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(r is None or r.ok for r in (self.pre, self.post))

    def to_json(self) -> dict:
        return {"set": self.set, "point_id": self.point_id, "ok": self.ok, "error": self.error,
                "pre": self.pre.to_json() if self.pre else None, "post": self.post.to_json() if self.post else None}


def hooks_of(set_cfg: SetConfig, phase: str) -> list:
    if phase not in ("pre", "post"):
        raise ValueError(f"phase must be 'pre' or 'post', not {phase!r}")
    app = set_cfg.app or {}
    return list(app.get(phase) or [])


def _show(h) -> str:
    import shlex

    return shlex.join(h) if isinstance(h, list) else str(h)


def run_point_hooks(set_cfg: SetConfig, phase: str, env: dict | None = None, *, set_name: str | None = None,
                    point_id: str | None = None, state: dict | None = None) -> HookResult:
    """Run the set's `phase` hooks in order; stop at the first failure.

    Never raises for a failing hook: the result says `ok = False` (use
    `result.raise_for_failure()`). `state` carries builtin hooks' sessions from
    pre to post; without it, a per-(set, point) registry in this process does."""
    from .templates import BUILTIN_HOOKS, check_hook

    env = dict(env or {})
    name = set_name or env.get("PIT_SET") or set_cfg.name or "?"
    pid = str(point_id if point_id is not None else env.get("PIT_POINT_ID", "?"))
    res = HookResult(name, phase, pid)
    hooks = hooks_of(set_cfg, phase)
    app = set_cfg.app or {}
    timeout = float(app.get("hook_timeout", DEFAULT_TIMEOUT))
    if state is None:
        with _states_lock:
            state = _states.setdefault((name, pid), {})
    base_env = {**os.environ, **{k: str(v) for k, v in env.items()}, "PIT_SET": name, "PIT_PHASE": phase,
                "PIT_POINT_ID": pid}
    for i, h in enumerate(hooks):
        t0 = time.monotonic()
        shown = _show(h)
        try:
            check_hook(h, f"{phase}[{i}]")
        except Exception as exc:
            run = HookRun(shown, i, False, None, 0.0, error=str(exc))
        else:
            if isinstance(h, str) and h.startswith("builtin:"):
                run = _builtin(BUILTIN_HOOKS[h[8:]], shown, i, name, app, {**base_env, "PIT_HOOK_INDEX": str(i)},
                               state, timeout)
            else:
                argv = ["/bin/sh", "-c", h] if isinstance(h, str) else list(h)
                run = _command(argv, shown, i, {**base_env, "PIT_HOOK_INDEX": str(i)}, timeout)
        run.seconds = round(time.monotonic() - t0, 3)
        res.runs.append(run)
        _log(res, run, len(hooks))
        if not run.ok:
            res.ok, res.error, res.timed_out = False, f"{shown}: {run.error}", run.timed_out
            break
    if phase == "post":
        with _states_lock:
            _states.pop((name, pid), None)
    return res


def _log(res: HookResult, run: HookRun, n: int) -> None:
    what = f"set {res.set} point {res.point_id} {res.phase} hook {run.index + 1}/{n} {run.hook!r}"
    if run.ok:
        log.info("%s: ok in %.2f s", what, run.seconds)
    else:
        log.error("%s: FAILED in %.2f s: %s", what, run.seconds, run.error)
    for line in run.output.splitlines()[-200:]:
        log.info("%s| %s", res.phase, line)


def _builtin(fn, shown: str, i: int, set_name: str, app: dict, env: dict, state: dict, timeout: float) -> HookRun:
    try:
        out = fn(set_name, app, env, state, timeout) or ""
        return HookRun(shown, i, True, None, 0.0, output=out[-OUTPUT_TAIL:])
    except HookFailed as exc:
        return HookRun(shown, i, False, None, 0.0, error=str(exc), timed_out="no answer within" in str(exc))
    except Exception as exc:  # a builtin's own failure (OS, database driver): still a failed hook
        return HookRun(shown, i, False, None, 0.0, error=f"{type(exc).__name__}: {exc}")


def _command(argv: list[str], shown: str, i: int, env: dict, timeout: float) -> HookRun:
    """Output goes to a temporary file, not a pipe, so a background child that keeps
    it open cannot make a finished hook look hung."""
    with tempfile.TemporaryFile() as out:
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        except OSError as exc:
            return HookRun(shown, i, False, None, 0.0, error=f"cannot run {argv[0]}: {exc.strerror}")
        timed_out = False
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = p.returncode if p.returncode is not None else -9
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - OUTPUT_TAIL))
        text = out.read().decode(errors="replace")
    if timed_out:
        return HookRun(shown, i, False, rc, 0.0, text, f"timed out after {timeout:g} s (killed)", True)
    if rc != 0:
        last = [ln for ln in text.splitlines() if ln.strip()]
        why = f"exit status {rc}" if rc > 0 else f"killed by signal {-rc}"
        return HookRun(shown, i, False, rc, 0.0, text, why + (f": {last[-1].strip()}" if last else ""))
    return HookRun(shown, i, True, rc, 0.0, text)


@contextmanager
def around_point(set_cfg: SetConfig, point_id, *, set_name: str | None = None, env: dict | None = None):
    """Run pre hooks, the block (making the point), then post hooks.

        with around_point(cfg, seq, set_name="db") as ph:
            make_the_point()
        # ph.pre, ph.post: HookResult; raised HookFailed/HookTimeout if a hook failed

    A failing pre hook: post hooks run (if any pre hook had succeeded), the block
    is skipped, HookFailed is raised. An exception in the block: post hooks run with
    PIT_POINT_RESULT=failed, the exception propagates. A failing post hook:
    HookFailed is raised after the block (the point exists but is marked failed by
    the caller)."""
    name = set_name or set_cfg.name or "?"
    pid = str(point_id)
    ph = PointHooks(name, pid)
    state: dict = {}
    ph.pre = run_point_hooks(set_cfg, "pre", env, set_name=name, point_id=pid, state=state)

    def post(result: str) -> HookResult:
        ph.post = run_point_hooks(set_cfg, "post", {**(env or {}), "PIT_POINT_RESULT": result}, set_name=name,
                                  point_id=pid, state=state)
        return ph.post

    if not ph.pre.ok:
        ph.error = f"pre hook failed: {ph.pre.error}"
        if ph.pre.any_succeeded:
            post("failed")
        ph.pre.raise_for_failure()
    try:
        yield ph
    except BaseException as exc:
        ph.error = f"point failed: {exc}"
        try:
            post("failed")
        except Exception:  # never mask the point's own error
            log.exception("set %s point %s: post hooks raised", name, pid)
        raise
    res = post("ok")
    if not res.ok:
        ph.error = f"post hook failed: {res.error}"
        res.raise_for_failure()


def mark_point(repo, sid: bytes, ph, lock_wait: float = 10.0) -> dict:
    """Record a point's hook outcome on its snapshot (snapmeta `point` = {ok, error, time}), so
    image selection skips an image whose hooks failed ("point hooks failed: ...").

    `ph`: a PointHooks (from `around_point`, also the one carried by HookFailed.result's
    caller), a HookResult, or a dict {"ok": bool, "error": str | None} (e.g. received
    from the master with the point)."""
    from store.snapmeta import update_meta

    if isinstance(ph, dict):
        rec = {"ok": bool(ph.get("ok")), "error": ph.get("error")}
    else:
        rec = {"ok": bool(ph.ok), "error": ph.error}
    rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with repo.writer(lock_wait=lock_wait) as w:
        update_meta(w, sid, point=rec)
    return rec


def run_command(hook, timeout: float = DEFAULT_TIMEOUT, env: dict | None = None, index: int = 0) -> HookRun:
    """Run one command hook (a shell string or an argv list) the way point hooks run:
    output to a temporary file, whole process group killed on timeout. `env` is the
    complete environment (default: this process's)."""
    argv = ["/bin/sh", "-c", hook] if isinstance(hook, str) else list(hook)
    t0 = time.monotonic()
    run = _command(argv, _show(hook), index, dict(os.environ) if env is None else env, timeout)
    run.seconds = round(time.monotonic() - t0, 3)
    return run
