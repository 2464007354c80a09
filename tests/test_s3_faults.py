"""An S3-backed repository under faults: a proxy in front of `rclone serve s3`
that answers 500, cuts uploads half-way and delays responses, and SIGKILL of
`pit snapshot` in the middle of its uploads.

What must hold after each: nothing committed is lost (every listed snapshot
restores byte-exactly), nothing half-uploaded is referenced (`verify --deep`
is clean), and the next backup works. The random choices come from
`random.Random(seed)` with the seeds listed in the parametrization, so a
failure names the seed that reproduces its sequence of faults and kill
moments; nothing asserts on elapsed time.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from conftest import PIT, cli, cli_json, list_snaps, make_tree, pit_env, rand_bytes, restore, tree_digest
from s3helpers import Chaos, FaultProxy, Rule, aws_env, rclone  # noqa: F401  (fixtures)
from test_crash import wait_for_lock


@pytest.fixture
def proxy(rclone):
    p = FaultProxy(rclone.endpoint)
    yield p
    p.stop()


def init_behind(proxy, rclone, tmp_path) -> str:
    bucket = rclone.make_bucket(f"f{uuid.uuid4().hex[:12]}")
    repo = str(tmp_path / "repo")
    cli(repo, "init", "--backend", f"s3://{bucket}/r", "--s3-endpoint", proxy.endpoint, "--pack-size", "1",
        "--no-encrypt")
    return repo


def generation(src, t: int, rnd: random.Random) -> None:
    """~1.5 MiB of new data per generation, edits and deletions of older ones."""
    make_tree(src, {
        f"big-{t}.bin": rand_bytes(rnd.randint(900_000, 1_400_000), f"big{t}"),
        f"small-{t}": {f"f{i}": rand_bytes(rnd.randint(0, 5000), f"s{t}-{i}") for i in range(15)},
        "gen.txt": b"generation %d\n" % t,
    }, mtime=None)
    for old in (f"big-{t - 2}.bin", f"small-{t - 2}"):
        p = os.path.join(src, old)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def check_all(repo, tmp_path, expected: dict[str, dict]) -> None:
    listed = sorted(s.hex for s in list_snaps(repo))
    assert listed == sorted(expected), "the snapshots listed are not the ones taken"
    for sid, want in expected.items():
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        restore(repo, sid, out)
        assert tree_digest(out / "src") == want, f"snapshot {sid[:12]} does not restore byte-exactly"
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    v = cli_json(repo, "verify", "--deep")
    assert v["result"] == "good", v


@pytest.mark.parametrize("seed", [11, 29])
def test_random_500s_cuts_and_delays_are_retried(seed, proxy, rclone, tmp_path):
    rnd = random.Random(seed)
    repo = init_behind(proxy, rclone, tmp_path)
    src = tmp_path / "src"
    expected: dict[str, dict] = {}
    # one of each for sure, then at random
    proxy.add(Rule("cut", method="PUT", path="/packs/"))
    proxy.add(Rule("500", method="PUT", path="/packs/"))
    proxy.chaos = Chaos(rnd, p500=0.1, pcut=0.1, pdelay=0.1, delay=0.05)
    for t in range(2):
        generation(src, t, rnd)
        expected[cli_json(repo, "snapshot", "--set", "s", str(src))["id"]] = tree_digest(src)
    # reads retried through the same faults
    out = tmp_path / "chaos-out"
    restore(repo, list(expected)[-1], out)
    assert tree_digest(out / "src") == list(expected.values())[-1]
    injected = dict(proxy.log.counts)
    proxy.clear()
    print(f"seed {seed}: {injected}")
    assert injected.get("cut PUT") and injected.get("500 PUT"), f"seed {seed}: {injected}"
    check_all(repo, tmp_path, expected)


def test_an_upload_that_keeps_failing_commits_nothing(proxy, rclone, tmp_path, monkeypatch):
    repo = init_behind(proxy, rclone, tmp_path)
    src = tmp_path / "src"
    rnd = random.Random(5)
    expected: dict[str, dict] = {}
    generation(src, 0, rnd)
    expected[cli_json(repo, "snapshot", "--set", "s", str(src))["id"]] = tree_digest(src)
    generation(src, 1, rnd)
    monkeypatch.setenv("PIT_S3_MAX_ATTEMPTS", "2")  # botocore's retries per request: keep the test short
    proxy.add(Rule("500", method="PUT", path="/packs/", times=10_000))
    res = cli(repo, "snapshot", "--set", "s", str(src), expect=36)
    assert res.output.startswith("pit: error: ") and res.output.count("\n") == 1, res.output
    assert "uploading pack" in res.output
    proxy.clear()
    # the aborted session left nothing behind: no staged pack, nothing new listed
    assert not [f for _, _, fs in os.walk(os.path.join(repo, "staging")) for f in fs if f.endswith(".pack")]
    check_all(repo, tmp_path, expected)
    # cut mid-body a few times, then let through: the snapshot goes in
    proxy.add(Rule("cut", method="PUT", path="/packs/", times=3))
    expected[cli_json(repo, "snapshot", "--set", "s", str(src))["id"]] = tree_digest(src)
    assert proxy.log.counts.get("cut PUT") == 3
    check_all(repo, tmp_path, expected)


def test_unreachable_endpoint_is_one_line_and_its_own_exit_code(rclone, tmp_path, monkeypatch):
    p = FaultProxy(rclone.endpoint)
    repo = init_behind(p, rclone, tmp_path)
    src = tmp_path / "src"
    generation(src, 0, random.Random(1))
    p.stop()  # the endpoint goes away
    monkeypatch.setenv("PIT_S3_MAX_ATTEMPTS", "1")
    res = cli(repo, "snapshot", "--set", "s", str(src), expect=37)
    assert "cannot reach the object store" in res.output and res.output.count("\n") == 1
    assert list_snaps(repo) == []


def kill_trial(repo, src, rnd: random.Random, window: float, proxy: FaultProxy, in_upload: bool
               ) -> tuple[set[str], str]:
    """One `pit snapshot` killed: with `in_upload` just after a pack upload started arriving at the proxy
    (which delays most PUTs, so the kill lands mid-upload), else at a random moment of its run."""
    before = {s.hex for s in list_snaps(repo)}
    proxy.pack_put.clear()
    proc = subprocess.Popen([PIT, "--repo", repo, "snapshot", "--set", "s", str(src)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=pit_env())
    how = "random moment"
    if in_upload:
        if proxy.pack_put.wait(timeout=60):
            time.sleep(rnd.uniform(0, 0.04))
            how = "mid-upload"
    elif wait_for_lock(repo, proc):
        time.sleep(rnd.uniform(0, window))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    after = {s.hex for s in list_snaps(repo)}
    assert before <= after, f"snapshots lost after a SIGKILL: {sorted(before - after)}"
    assert len(after - before) <= 1
    return after - before, how


def assert_no_orphans(repo) -> None:
    """Every pack in the bucket or staged is one the index names (or retired, waiting for old readers):
    what killed sessions uploaded was deleted by the next writer."""
    import msgpack

    from conftest import opened
    from store import packs as P
    from store.index import U64

    with opened(repo, readonly=True) as r, r.reading() as txn:
        indexed = {U64.unpack(k)[0] for k, _ in txn.cursor(db=r.index.db["packs"])}
        raw = txn.get(b"doomed", db=r.index.db["meta"])
        doomed = {d[0] for d in msgpack.unpackb(raw)} if raw else set()
        present = {P.pack_number(n) for n in r.backend.list()}
    assert present <= indexed | doomed, f"packs nothing names: {sorted(present - indexed - doomed)}"
    assert indexed <= present


@pytest.mark.parametrize("seed", [3, 17])
def test_sigkill_mid_upload(seed, proxy, rclone, tmp_path):
    rnd = random.Random(seed)
    repo = init_behind(proxy, rclone, tmp_path)
    src = tmp_path / "src"
    expected: dict[str, dict] = {}
    # slow uploads: a kill just after a pack upload started lands in it
    proxy.chaos = Chaos(rnd, pdelay=0.9, delay=0.05, methods=("PUT",))
    generation(src, 0, rnd)
    t0 = time.monotonic()
    expected[cli_json(repo, "snapshot", "--set", "s", str(src))["id"]] = tree_digest(src)
    window = time.monotonic() - t0
    outcomes = []
    for t in range(1, 3):  # the first kill lands in an upload, the second where the seed says
        generation(src, t, rnd)
        new, how = kill_trial(repo, str(src), rnd, window, proxy, in_upload=t == 1 or rnd.random() < 0.5)
        outcomes.append(f"{'committed' if new else 'killed'} ({how})")
        for sid in new:
            expected[sid] = tree_digest(src)
        check_all(repo, tmp_path, expected)
        # the next backup works, and leaves no staged pack behind
        expected[cli_json(repo, "snapshot", "--set", "s", str(src))["id"]] = tree_digest(src)
        assert not [f for _, _, fs in os.walk(os.path.join(repo, "staging")) for f in fs if f.endswith(".pack")]
    proxy.clear()
    check_all(repo, tmp_path, expected)
    assert_no_orphans(repo)
    print(f"seed {seed}: {outcomes}")
    assert "killed (mid-upload)" in outcomes, f"seed {seed}: no kill landed in an upload: {outcomes}"


def test_a_pack_damaged_on_the_way_up_is_sent_again(proxy, rclone, tmp_path):
    """A bit flipped in the PUT body: the server refuses it (Content-MD5), or stores it and the check
    after the upload (ETag, SHA-256 metadata, re-read) catches it; either way the pack is sent again
    and what the index names is intact."""
    repo = init_behind(proxy, rclone, tmp_path)
    src = tmp_path / "src"
    generation(src, 0, random.Random(2))
    proxy.add(Rule("corrupt", method="PUT", path="/packs/", times=2))
    expected = {cli_json(repo, "snapshot", "--set", "s", str(src))["id"]: tree_digest(src)}
    assert proxy.log.counts.get("corrupt PUT") == 2
    check_all(repo, tmp_path, expected)
