"""SIGKILL at random points of `pit snapshot`, `pit forget`, `pit prune`,
`pit compact --threshold 0` and `pit repair`.

After each kill: the repository opens (after a killed repair, one more
`pit repair` may be needed and must fix it), every snapshot committed before
the kill restores byte-identically (minus those the killed forget/prune or
the retention of the killed snapshot may legitimately have dropped), at most
the one expected snapshot is new and it restores to the source, structural
verify is clean (reference counts equal a recount, packs and index agree),
and the next run of the operation succeeds and leaves exactly the expected
snapshots.

The default run does 6 trials per operation (30 in all); `-m slow` runs 40
per operation (200). Seeds are printed; set PIT_CRASH_SEED to replay one.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from maint_helpers import (
    init_repo, make_tree, mutate_tree, opened, pit, pit_cmd, pit_env, restore_digest, snapshots,
    source_digest, structural_verify,
)
from store.errors import IndexMissing
from store.retention import Policy, decide
from store.snapshots import Snapshot

CAP = 6
OPS = ["snapshot", "forget", "prune", "compact", "repair"]
DEFAULT_TRIALS = 6
SLOW_TRIALS = 40


class World:
    def __init__(self, tmp_path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tmp = str(tmp_path)
        self.repo = init_repo(os.path.join(self.tmp, "repo"), pack_mib=1)
        self.src = os.path.join(self.tmp, "src")
        make_tree(self.src, self.rng, nfiles=20, size_range=(20_000, 120_000))
        self.digests: dict[str, dict] = {}  # the truth: live snapshot -> digest of its content
        self.pinned: set[str] = set()
        self.est: dict[str, float] = {}
        self.killed = 0
        self.killed_after_commit = 0  # killed, yet the operation's effect was committed
        self.completed = 0
        pit(self.repo, "policy", "--set", "s", "--max", str(CAP))
        # the cost of starting pit and opening the repository, before any real work
        self.startup = min(self.run(["snapshots", "--set", "nothing"], None)[2] for _ in range(2))
        for _ in range(4):
            self.snapshot_uncut()
        first = min(self.digests, key=lambda s: self.snap_times()[s])
        pit(self.repo, "pin", first)
        self.pinned.add(first)

    # ------------------------------------------------------------ helpers
    def snap_times(self) -> dict[str, int]:
        return {s.hex: s.time_ns for s in snapshots(self.repo)}

    def live(self) -> list[Snapshot]:
        return snapshots(self.repo, "s")

    def run(self, args: list[str], kill_after: float | None) -> tuple[int, bool, float]:
        t0 = time.monotonic()
        p = subprocess.Popen(pit_cmd(self.repo, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=pit_env())
        killed = False
        if kill_after is not None:
            try:
                p.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                killed = True
        _, err = p.communicate(timeout=120)
        self.last_err = err.decode(errors="replace")
        if not killed:
            assert b"Traceback" not in err and b"internal error" not in err, err.decode()
        return p.returncode, killed, time.monotonic() - t0

    def snapshot_uncut(self) -> str:
        before = {s.hex for s in self.live()}
        rc, _, dt = self.run(["snapshot", "--set", "s", self.src], None)
        assert rc == 0
        self.est["snapshot"] = dt
        new = [s for s in self.live() if s.hex not in before]
        assert len(new) == 1
        self.digests[new[0].hex] = source_digest(self.src)
        for gone in before - {s.hex for s in self.live()}:
            self.digests.pop(gone)
        return new[0].hex

    def would_drop(self, snaps: list[Snapshot], policy: Policy, with_new: bool) -> set[str]:
        snaps = list(snaps)
        if with_new:
            t = max((s.time_ns for s in snaps), default=0) + 1
            snaps.append(Snapshot("s", "new", t, "h", [], b"\0" * 32, None, {}, b"\xff" * 32))
        pinned = {bytes.fromhex(s) for s in self.pinned}
        return {d.snapshot.hex for d in decide(snaps, policy, pinned) if not d.keep} - {"ff" * 32}

    # ------------------------------------------------------------ checks
    def open_after_kill(self, op: str) -> None:
        try:
            with opened(self.repo):
                pass
        except IndexMissing:
            # only a killed repair may leave no index (between its two renames)
            assert op == "repair", f"the index is gone after a killed {op}"
            rc, _, _ = self.run(["repair"], None)
            assert rc == 0, f"a second `pit repair` did not fix a repair killed mid-swap: {self.last_err}"
            with opened(self.repo):
                pass

    def check(self, allowed_drop: set[str], new_digest: dict | None, what: str) -> set[str]:
        """Check the repository against the truth; returns the snapshots that appeared."""
        after = {s.hex for s in self.live()}
        before = set(self.digests)
        lost = before - after - allowed_drop
        assert not lost, f"{what}: committed snapshots lost: {sorted(x[:12] for x in lost)}"
        new = after - before
        assert len(new) <= (1 if new_digest is not None else 0), f"{what}: unexpected new snapshots {new}"
        for sid in after & before:
            assert restore_digest(self.repo, sid, self.tmp) == self.digests[sid], f"{what}: {sid[:12]} differs"
        for sid in new:
            assert restore_digest(self.repo, sid, self.tmp) == new_digest, f"{what}: new snapshot differs"
        rep = structural_verify(self.repo)
        assert rep.clean, f"{what}: structural verify after the kill:\n" + "\n".join(
            rep.problems[:10] + [f"{d.kind} {d.blob[:16]} {d.where}: {d.reason}" for d in rep.damage[:10]])
        for sid in before - after:
            self.digests.pop(sid)
        for sid in new:
            self.digests[sid] = new_digest
        return new

    # ------------------------------------------------------------ trials
    def delay(self, op: str) -> float:
        """Mostly inside the operation's work, after interpreter start-up; sometimes before."""
        end = max(self.est.get(op, 0.4), self.startup + 0.02) * 1.05
        start = 0.0 if self.rng.random() < 0.15 else self.startup * 0.8
        return self.rng.uniform(start, end)

    def trial(self, op: str, n: int) -> None:
        what = f"trial {n} ({op})"
        live = self.live()
        policy = Policy(max=CAP)
        new_digest = None
        allowed: set[str] = set()
        next_expect_drop: set[str] = set()
        if op == "snapshot":
            mutate_tree(self.src, self.rng, self.rng.randint(1, 5))
            args = ["snapshot", "--set", "s", self.src]
            new_digest = source_digest(self.src)
            allowed = self.would_drop(live, policy, True)
        elif op == "forget":
            if len(live) < 4:
                mutate_tree(self.src, self.rng, 2)
                self.snapshot_uncut()
                live = self.live()
            victims = [s.hex for s in live if s.hex not in self.pinned]
            victim = self.rng.choice(victims)
            args = ["forget", "--set", "s", victim]
            allowed = next_expect_drop = {victim}
        elif op == "prune":
            while len(live) < 5:
                mutate_tree(self.src, self.rng, 3)
                self.snapshot_uncut()
                live = self.live()
            lower = Policy(max=max(2, len(live) - 2))
            pit(self.repo, "policy", "--set", "s", "--max", str(lower.max))
            args = ["prune", "--threshold", "0"]
            allowed = next_expect_drop = self.would_drop(live, lower, False)
        elif op == "compact":
            # make garbage first: drop the oldest unpinned, snapshot a changed tree
            victims = [s.hex for s in live if s.hex not in self.pinned]
            pit(self.repo, "forget", "--set", "s", victims[0])
            self.digests.pop(victims[0])
            mutate_tree(self.src, self.rng, 3)
            self.snapshot_uncut()
            args = ["compact", "--threshold", "0"]
        else:
            args = ["repair"]

        rc, killed, dt = self.run(args, self.delay(op))
        if killed:
            self.killed += 1
        else:
            self.completed += 1
            self.est[op] = max(self.est.get(op, 0), dt)
            assert rc == 0, f"{what}: finished with exit {rc} before the kill: {self.last_err}"
        self.open_after_kill(op)
        before = set(self.digests)
        appeared = self.check(allowed, new_digest, what + (" killed" if killed else " completed"))
        if killed and (appeared or before - set(self.digests)):
            self.killed_after_commit += 1

        # the next operation succeeds, and ends where the uncut operation would have
        if op == "snapshot":
            if not appeared:
                allowed2 = self.would_drop(self.live(), policy, True)
                self.snapshot_uncut()
                assert not (allowed2 & set(self.digests))
            else:
                self.snapshot_uncut()
        elif op == "forget":
            victim = next(iter(next_expect_drop))
            if victim in self.digests:
                rc, _, dt = self.run(["forget", "--set", "s", victim], None)
                assert rc == 0
                self.est["forget"] = dt
                self.digests.pop(victim)
            assert victim not in {s.hex for s in self.live()}
        elif op == "prune":
            rc, _, dt = self.run(["prune", "--threshold", "0"], None)
            assert rc == 0
            self.est["prune"] = dt
            for sid in next_expect_drop:
                self.digests.pop(sid, None)
            assert {s.hex for s in self.live()} == set(self.digests), f"{what}: prune left the wrong snapshots"
            pit(self.repo, "policy", "--set", "s", "--max", str(CAP))
        else:
            rc, _, dt = self.run(args, None)
            assert rc == 0, f"{what}: the next {op} failed with exit {rc}: {self.last_err}"
            self.est[op] = max(dt, self.est.get(op, 0))
        self.check(set(), None, what + " after the next operation")


def run_trials(tmp_path, op: str, trials: int) -> None:
    seed = int(os.environ.get("PIT_CRASH_SEED", "0")) or (20240 + OPS.index(op) + (1000 if trials > 10 else 0))
    print(f"crash test {op}: seed {seed} (PIT_CRASH_SEED={seed} replays it)")
    w = World(tmp_path, seed)
    # calibrate the kill window on one uncut run of the operation
    if op != "snapshot":
        rc, _, dt = w.run(["compact", "--threshold", "0"] if op in ("compact", "prune") else
                          ["repair"] if op == "repair" else ["forget", "--set", "s", "--dry-run"], None)
        assert rc == 0
        w.est[op] = dt
    for n in range(trials):
        w.trial(op, n)
    print(f"crash test {op}: {w.killed} killed mid-run ({w.killed_after_commit} of them after the commit), "
          f"{w.completed} finished before the kill")
    assert set(w.digests) == {s.hex for s in w.live()}


@pytest.mark.parametrize("op", OPS)
def test_sigkill(tmp_path, op):
    run_trials(tmp_path, op, DEFAULT_TRIALS)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_sigkill_long(tmp_path, op):
    run_trials(tmp_path, op, SLOW_TRIALS)


# ------------------------------------------------- kills at chosen points
# A real writer process, killed by SIGKILL at a chosen point of its session
# (no mocks: the process runs the store's own code and dies mid-session).

KILL_WRITER_MID_SESSION = r"""
import os, signal, sys
from store import packs as P
from store.repository import Repository, blob_id
repo = Repository(sys.argv[1])
w = repo.writer()
for i in range(int(sys.argv[2])):
    data = os.urandom(64 * 1024)
    w.put(P.CHUNK, blob_id(data), data)
if sys.argv[3] == "synced":
    w.pack.sync()
os.kill(os.getpid(), signal.SIGKILL)
"""

KILL_COMPACT_BEFORE_DELETE = r"""
import os, signal, sys
from store.compact import CompactStats, candidates, compact_pack
from store.repository import Repository
repo = Repository(sys.argv[1])
st = CompactStats()
with repo.reading() as txn:
    todo = [n for n, _ in candidates(repo, txn, 0.0)]
for num in todo:
    with repo.writer() as w:
        compact_pack(w, num, st)
print(len(todo), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # retired packs listed as doomed, not deleted yet
"""


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    import sys

    p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, env=pit_env(), timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    return p


@pytest.mark.parametrize("blobs,when", [(4, "unsynced"), (40, "unsynced"), (40, "synced")])
def test_writer_killed_mid_session(tmp_path, blobs, when):
    """40 x 64 KiB seals the open 1 MiB pack and starts a new one before the kill:
    the uncommitted bytes and the uncommitted pack are crash debris, not damage."""
    w = World(tmp_path, 7)
    _run_script(KILL_WRITER_MID_SESSION, w.repo, str(blobs), when)
    w.open_after_kill("snapshot")
    w.check(set(), None, f"writer killed after {blobs} blobs ({when})")
    w.snapshot_uncut()
    w.check(set(), None, "the next snapshot")


def test_compact_killed_before_deleting_retired_packs(tmp_path):
    w = World(tmp_path, 8)
    mutate_tree(w.src, w.rng, 25)  # rewrite much of the tree: the old packs become mostly garbage
    w.snapshot_uncut()
    for sid in w.pinned:
        pit(w.repo, "unpin", sid)
    w.pinned.clear()
    victims = [s.hex for s in w.live()][:-1]
    pit(w.repo, "forget", "--set", "s", *victims)
    for v in victims:
        w.digests.pop(v)
    p = _run_script(KILL_COMPACT_BEFORE_DELETE, w.repo)
    assert int(p.stdout) >= 1
    w.open_after_kill("compact")
    w.check(set(), None, "compact killed before deleting retired packs")
    out = pit(w.repo, "compact", "--threshold", "0", "--json").stdout
    import json

    assert json.loads(out)["packs_deleted"] >= 1
    w.check(set(), None, "the next compact")
