"""SIGKILL of `pit snapshot` at random moments.

Each trial changes the source tree (new big file, many new small files, an
in-place edit, deletions), starts `pit snapshot` as a real process and kills
it with SIGKILL at a random moment: mostly while it holds the writer lock
(chunking, writing and sealing 1 MiB packs, committing), sometimes during
start-up. After every kill:

- the repository opens, and `pit snapshots` works;
- no snapshot was lost and none appeared that we did not take (a snapshot
  whose commit landed just before the kill is accepted, and checked like
  the others: it must be exactly the tree it was taken of);
- every earlier snapshot restores byte-identically (names, content, modes,
  mtimes, owners, symlink targets);
- the next snapshot succeeds and restores identically.

20 trials by default; 200 under `-m slow`, where the full check of every
snapshot runs every 10th trial and at the end (in between: the newest three
and three random ones), which keeps the loop linear instead of quadratic.
The kill moments are random, but nothing asserts on elapsed time.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from conftest import (PIT, init_repo, list_snaps, make_tree, opened, pit_env, rand_bytes, remove, restore,
                      run_pit, tree_digest)
from store.repository import Repository


def mutate(src, t: int, rnd: random.Random) -> None:
    """Generation t of the tree: ~1 MiB of new data in ~40 files plus edits and deletions."""
    spec = {
        f"big-{t:03}.bin": rand_bytes(rnd.randint(600_000, 1_000_000), f"big{t}"),
        f"small-{t:03}": {f"f{i:03}": rand_bytes(rnd.randint(0, 6000), f"s{t}-{i}") for i in range(40)},
        "gen.txt": b"generation %d\n" % t,
    }
    if t % 3 == 0:
        spec[f"link-{t}"] = os.fsencode(f"small-{t:03}/f001")  # a file named like a path: plain bytes
    make_tree(src, spec, mtime=None)
    os.symlink(f"big-{t:03}.bin", os.path.join(src, f"ln-{t:03}"))
    for old in (f"big-{t - 2:03}.bin", f"small-{t - 2:03}", f"ln-{t - 2:03}"):
        p = os.path.join(src, old)
        if os.path.lexists(p):
            remove(p)
    stable = os.path.join(src, "stable.bin")
    with open(stable, "r+b") as f:  # an in-place edit of a file most snapshots share
        f.seek(rnd.randrange(0, 1_400_000))
        f.write(rand_bytes(3000, f"edit{t}"))


def wait_for_lock(repo, proc, deadline_s: float = 30.0) -> bool:
    """Until `proc` holds the writer lock (the lock file names its pid); False if it exited first."""
    needle = f"pid {proc.pid} ".encode()
    lock = os.path.join(repo, "lock")
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with open(lock, "rb") as f:
                if f.read(100).startswith(needle):
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    return False


class CrashLoop:
    def __init__(self, tmp_path, seed: int) -> None:
        self.tmp = tmp_path
        self.rnd = random.Random(seed)
        self.repo = init_repo(tmp_path / "repo", pack_size=1024 * 1024)  # small packs: seals mid-snapshot
        self.src = tmp_path / "src"
        make_tree(self.src, {"stable.bin": rand_bytes(1_500_000, "stable"), "keep": {"k": b"k"}})
        self.expected: dict[str, dict] = {}  # snapshot id -> tree digest of its source
        self.order: list[str] = []
        self.windows: list[float] = []  # seconds from taking the lock to exit, uninterrupted runs
        self.outcomes = {"killed": 0, "committed before the kill": 0, "finished": 0, "killed before the lock": 0}
        run_pit(self.repo, "policy", "--set", "c", "--max", "1000")  # keep every snapshot we take
        self.snapshot_ok()

    def snapshot_ok(self) -> str:
        proc = subprocess.Popen([PIT, "--repo", self.repo, "snapshot", "--set", "c", "--json", str(self.src)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pit_env())
        locked = wait_for_lock(self.repo, proc)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"snapshot after a crash failed ({proc.returncode}): {err.decode()}"
        assert b"Traceback" not in err
        if locked:
            self.windows.append(time.monotonic() - t0)
        sid = json.loads(out)["id"]
        self.record(sid)
        return sid

    def record(self, sid: str) -> None:
        assert sid not in self.expected
        self.expected[sid] = tree_digest(self.src)
        self.order.append(sid)

    def kill_one(self) -> None:
        before = {s.hex for s in list_snaps(self.repo)}
        proc = subprocess.Popen([PIT, "--repo", self.repo, "snapshot", "--set", "c", str(self.src)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=pit_env())
        window = sorted(self.windows)[len(self.windows) // 2] if self.windows else 0.2
        early = self.rnd.random() < 0.1
        if early:
            time.sleep(self.rnd.uniform(0, 0.15))
        elif wait_for_lock(self.repo, proc):
            time.sleep(self.rnd.uniform(0, window))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err, err.decode()
        after = {s.hex for s in list_snaps(self.repo)}
        assert before <= after, f"snapshots lost after a SIGKILL: {sorted(before - after)}"
        new = after - before
        assert len(new) <= 1, f"one snapshot run made {len(new)} snapshots"
        if proc.returncode == 0:
            self.outcomes["finished"] += 1
            assert new, "pit snapshot exited 0 but no snapshot was committed"
        elif new:
            self.outcomes["committed before the kill"] += 1
        else:
            self.outcomes["killed before the lock" if early else "killed"] += 1
        for sid in new:
            self.record(sid)

    def check(self, sids) -> None:
        listed = [s.hex for s in list_snaps(self.repo, "c")]
        assert sorted(listed) == sorted(self.order), "the snapshot catalogue differs from what was taken"
        out = self.tmp / "out"
        for sid in sids:
            shutil.rmtree(out, ignore_errors=True)
            restore(self.repo, sid, out)
            got = tree_digest(out / "src")
            want = self.expected[sid]
            if got != want:
                diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
                raise AssertionError(f"snapshot {sid[:12]} no longer restores identically: {diff[:10]}")
        shutil.rmtree(out, ignore_errors=True)

    def repo_opens(self) -> None:
        with opened(self.repo) as repo:  # read-write open, as a writer would
            assert repo.id
        assert len(json.loads(run_pit(self.repo, "snapshots", "--json").stdout)) == len(self.order)

    def run(self, trials: int, full_every: int = 1) -> None:
        for t in range(1, trials + 1):
            mutate(self.src, t, self.rnd)
            self.kill_one()
            self.repo_opens()
            if t % full_every == 0 or t == trials:
                self.check(self.order)
            else:
                self.check(list(dict.fromkeys(self.order[-3:] + self.rnd.sample(self.order, min(3, len(self.order))))))
            sid = self.snapshot_ok()
            self.check([sid])
        print(f"crash trials: {self.outcomes}, {len(self.order)} snapshots")
        assert self.outcomes["killed"] >= 1, f"no kill landed while a snapshot was in progress: {self.outcomes}"
        # the repository's own consistency check agrees (reference counts, packs, catalogue)
        p = run_pit(self.repo, "verify", "--json", expect=None)
        assert p.returncode == 0, f"pit verify after the crash loop: {p.stdout[-3000:]!r} {p.stderr[-2000:]!r}"


def test_sigkill_during_snapshot(tmp_path):
    CrashLoop(tmp_path, seed=20).run(trials=20)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_during_snapshot_many(tmp_path):
    CrashLoop(tmp_path, seed=200).run(trials=200, full_every=10)


def test_kill_while_holding_an_open_write_session(tmp_path):
    """A writer process killed mid-session (lock held, packs half written,
    nothing committed): the lock dies with it and the next writer cleans up."""
    repo = init_repo(tmp_path / "repo", pack_size=1024 * 1024)
    make_tree(tmp_path / "src", {"a": rand_bytes(300_000, "a")})
    first = json.loads(run_pit(repo, "snapshot", "--set", "s", tmp_path / "src", "--json").stdout)
    holder = subprocess.Popen(
        ["python3" if not os.path.exists(PIT) else os.path.join(os.path.dirname(PIT), "python"), "-c",
         "import sys, os\nfrom store.repository import Repository\nfrom store import packs as P\n"
         "from store.repository import blob_id\n"
         "w = Repository(sys.argv[1]).writer()\n"
         "for i in range(300):\n"
         "    d = os.urandom(20000)\n"
         "    w.put(P.CHUNK, blob_id(d), d)\n"
         "w.pack.flush() if w.pack else None\n"
         "print('written', flush=True)\nsys.stdin.read()\n", repo],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=pit_env())
    try:
        assert holder.stdout.readline() == b"written\n"
    finally:
        holder.kill()
        holder.wait()
    packs_dir = os.path.join(repo, "packs")
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(packs_dir) for f in fs)
    assert on_disk > 5_000_000  # the dead session really left uncommitted pack bytes behind
    restore(repo, first["id"], tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(tmp_path / "src")
    make_tree(tmp_path / "src", {"b": rand_bytes(200_000, "b")})
    second = json.loads(run_pit(repo, "snapshot", "--set", "s", "--lock-wait", "5", tmp_path / "src",
                                "--json").stdout)
    shutil.rmtree(tmp_path / "out")
    restore(repo, second["id"], tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(tmp_path / "src")
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(packs_dir) for f in fs)
    assert on_disk < 2_000_000, "the dead session's pack bytes were not reclaimed"
    with opened(repo, readonly=True) as r:
        assert isinstance(r, Repository)
