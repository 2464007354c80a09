"""Restore a PostgreSQL set to any second: `pit restore SET --at TIME --target DIR` (issue 16).

A real PostgreSQL 15 primary takes numbered inserts, one at a time, each with the wall-clock time just
before it was sent and just after it was acknowledged. A replica-side WalReceiver streams its WAL and
archives it into a real repository as set `db.wal` (what a replica's agent does, apps/pgwal.archive_into);
two base images of set `db` are snapshots of pg_basebackup copies. Then `pit restore db --at T` for
sampled seconds T, each between one insert's acknowledgement and the next one's sending (so which rows
committed by T is not in doubt): the restored database must hold exactly the rows acknowledged by T. The
samples are drawn from a recorded seed.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import tempfile
import threading
import time

import pytest

from test_pgwal import PG_BIN, ROOT, Server, confirmed, run
from test_repl_helpers import pit, wait_for
from replicator.apps import pgwal
from replicator.settings import SetConfig

pytestmark = pytest.mark.skipif(not PG_BIN or not os.path.exists(os.path.join(PG_BIN, "pg_receivewal")),
                                reason="PostgreSQL server binaries (Debian postgresql-15) not installed")

SEED = 16016


def iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def insert(prim: Server, n: int, log: list) -> None:
    sent = time.time_ns()
    prim.sql(f"INSERT INTO acks VALUES ({n})")
    log.append((n, sent, time.time_ns()))
    time.sleep(0.02)


@pytest.fixture(scope="module")
def history():
    """A primary's numbered inserts around two base images, with its WAL archived in a repository."""
    from store.ingest import create_snapshot
    from store.repository import Repository

    base = tempfile.mkdtemp(prefix="pit-pitr-", dir="/tmp")
    os.chmod(base, 0o755)
    prim = Server(base, "primary")
    if ROOT:
        shutil.chown(base, "postgres", "postgres")
    run([f"{PG_BIN}/initdb", "-D", prim.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--wal-segsize=1"])
    prim.start()
    repo_path = os.path.join(base, "repo")
    pit("--repo", repo_path, "init")
    repo = Repository(repo_path)
    lock = threading.Lock()
    s = SetConfig(master="primary", replicas=("r1",), paths=(os.path.join(base, "images", "main"),),
                  app={"template": "postgresql", "wal": "stream", "data": os.path.join(base, "images", "main")})
    rec = pgwal.WalReceiver("db", "r1", os.path.join(base, "state"),
                            archive=lambda d, h: pgwal.archive_into(repo, lock, "db", s, d, h, "r1"))
    log: list[tuple[int, int, int]] = []
    try:
        prim.sql("CREATE TABLE acks (n integer PRIMARY KEY)")
        rec.update(pgwal.Source("primary", prim.sock, 5432, "postgres", PG_BIN))
        wait_for(lambda: rec.status()["running"], 60, "the receiver to stream")
        n = 0
        images = []
        for _ in range(2):
            for _ in range(40):
                n += 1
                insert(prim, n, log)
            # a base image: what a point's snapshot holds (here a pg_basebackup copy named like the set's path)
            img = os.path.join(base, "images", "main")
            shutil.rmtree(img, ignore_errors=True)
            run([f"{PG_BIN}/pg_basebackup", "-D", img, "-X", "fetch", "-c", "fast", "-h", prim.sock, "-U",
                 "postgres"], 300)
            with lock:
                images.append(create_snapshot(repo, "db", [img], host="r1", retention=False))
            for _ in range(60):
                n += 1
                insert(prim, n, log)
        wait_for(lambda: confirmed(prim, "pit_r1"), 60, "the receiver to confirm every insert")
        rec.archive_now()  # (the archive loop may have taken this state already: then there is nothing new)
        assert rec.archived.get("newest") == pgwal.newest_segment(rec.dir), rec.archived
        yield repo_path, log, images, base, repo
    finally:
        rec.stop()
        prim.stop()
        repo.close()
        shutil.rmtree(base, ignore_errors=True)


def restored_rows(base: str, target: str) -> set[int]:
    from replicator.apps.pitr import find_data_dir

    data = find_data_dir(target)
    srv = Server.__new__(Server)
    srv.data, srv.sock = data, target + "-sock"
    os.makedirs(srv.sock, exist_ok=True)
    if ROOT:
        shutil.chown(srv.sock, "postgres", "postgres")
        shutil.chown(target, "postgres", "postgres")  # made by `pit restore` (root): the server's log goes there
    srv.start()
    try:
        return {int(x) for x in srv.sql("SELECT n FROM acks").split()}
    finally:
        srv.stop()


def moments(log, k: int, rng: random.Random, after: int) -> list[tuple[int, set[int]]]:
    """k moments after `after` (the first image) inside the gaps between an acknowledgement and the next send,
    with the rows committed by then."""
    gaps = [(log[i][2], log[i + 1][1]) for i in range(len(log) - 1)
            if log[i + 1][1] - log[i][2] > 2_000_000 and log[i][2] > after]
    out = []
    for lo, hi in rng.sample(gaps, k):
        at = rng.randrange(lo + 500_000, hi - 500_000)
        out.append((at, {n for n, _, ack in log if ack <= at}))
    return out


@pytest.mark.parametrize("samples", [pytest.param(4, id="4-moments"),
                                     pytest.param(20, id="20-moments", marks=pytest.mark.slow)])
def test_restore_to_a_second_holds_exactly_what_was_committed_by_then(history, samples):
    repo_path, log, images, base, repo = history
    rng = random.Random(SEED)
    cases = moments(log, samples, rng, images[0].time_ns)
    for i, (at, want) in enumerate(cases):
        target = os.path.join(base, f"restore-{i}")
        res = pit("--repo", repo_path, "restore", "db", "--at", iso(at), "--target", target)
        assert "rolled" in res.stdout and "recovery stopping before commit" in res.stdout, res.stdout
        got = restored_rows(base, target)
        assert got == want, (f"seed {SEED}, --at {iso(at)}: {len(got)} rows, wanted {len(want)}; "
                             f"extra {sorted(got - want)[:5]}, missing {sorted(want - got)[:5]}")
        shutil.rmtree(target)


def test_a_moment_past_the_log_restores_everything_and_says_so(history):
    repo_path, log, images, base, repo = history
    target = os.path.join(base, "restore-end")
    res = pit("--repo", repo_path, "restore", "db", "--at", iso(time.time_ns() + 10**9), "--target", target,
              "--json")
    out = json.loads(res.stdout)
    assert out["snapshot"] == images[-1].hex and out["rolled_forward"]["wal"].startswith("db.wal@")
    assert "last completed transaction" in out["rolled_forward"]["stopped"], out
    assert restored_rows(base, target) == {n for n, _, _ in log}


def test_before_the_first_image_is_a_clear_error(history):
    repo_path, log, images, base, repo = history
    res = pit("--repo", repo_path, "restore", "db", "--at", iso(log[0][1]), "--target", os.path.join(base, "x"),
              check=False)
    assert res.returncode != 0 and "no snapshot at or before that time" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    res = pit("--repo", repo_path, "restore", "db@latest", "--at", iso(log[0][1]), "--target",
              os.path.join(base, "x"), check=False)
    assert res.returncode != 0 and "give the set alone" in res.stderr
    res = pit("--repo", repo_path, "restore", "db", "--at", "yesterday", "--target", os.path.join(base, "x"),
              check=False)
    assert res.returncode != 0 and "is not a time" in res.stderr
    assert not os.path.exists(os.path.join(base, "x"))


def test_the_wal_archive_keeps_one_snapshot_per_history_and_prunes_before_the_oldest_image(history):
    from store.snapshots import list_snapshots

    repo_path, log, images, base, repo = history
    with repo.reading() as txn:
        assert len(list_snapshots(repo, txn, "db.wal")) == 1  # each archive replaced the one before
    s = SetConfig(master="primary", replicas=("r1",), paths=(os.path.join(base, "images", "main"),),
                  app={"template": "postgresql", "data": os.path.join(base, "images", "main")})
    redo = pgwal.oldest_redo(repo, "db", s)
    kept = sorted(n for n in os.listdir(os.path.join(base, "state", "wal", "db")) if pgwal.SEGMENT.match(n))
    assert redo and redo > "000000010000000000000001"
    assert kept[0] == redo, (kept[:3], redo)  # what no image needs is gone; the first image's redo on is kept


def test_the_view_lists_the_window_a_database_set_can_be_restored_to(history):
    """The WebDAV listing of a database set says from when to when it can be restored to any second."""
    from davserver.provider import render_listing, restorable_window
    from store.view import View

    repo_path, log, images, base, repo = history
    window = restorable_window(repo, "db")
    first = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(images[0].time_ns // 10**9))
    assert window is not None and window[0] == first and window[1] >= first
    assert restorable_window(repo, "db.wal") is None  # the log's own set has no log of its own
    node = View(repo).resolve(["db"])
    page = render_listing(node, ["db"], [], "db", window)
    assert f"Restorable to any second from {first} to {window[1]}" in page
    assert "pit restore db --at TIME --target DIR" in page
