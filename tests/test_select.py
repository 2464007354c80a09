"""Image selection for failover (replicator/failover/select.py, `pit failover select`).

Real repositories, corrupted the way test_corruption.py does it (bytes
flipped in the pack data of chunks only the newest snapshots reference);
SQLite images that fail their integrity check; and a real PostgreSQL 15
cluster under pgbench writes, pointed with the template's hooks, snapshotted
with the store's ingest, checked by a throwaway instance on the materialised
image."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile

import pytest

from maint_helpers import (
    all_blobs, flip_byte, get_snapmeta, init_repo, make_tree, opened, pack_path, reachable, snap, write_file,
)
from replicator.commands.failover import add_set
from replicator.errors import HookFailed, NoGoodImage, NoImages, PinnedImageBad
from replicator.apps.hooks import around_point, mark_point
from replicator.failover.select import image_status, select_image
from test_repl_helpers import set_config
from replicator.apps.templates import CheckResult, as_user, build_set, pg_bindir
from store import packs as P
from store.errors import InvalidArgument

PIT = os.path.join(os.path.dirname(sys.executable), "pit")
CURRENT = "src/d1/current.bin"


def pit(*args, expect=0) -> subprocess.CompletedProcess:
    p = subprocess.run([PIT, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert p.returncode == expect, f"exit {p.returncode}, wanted {expect}\n{p.stdout}\n{p.stderr}"
    return p


# ------------------------------------------------------------ a set of 5 images
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Set `a`: 5 snapshots of one tree; each rewrites d1/current.bin, so its chunks are the
    snapshot's own. Set `b`: one snapshot (another set in the same repository)."""
    d = tmp_path_factory.mktemp("select")
    repo = init_repo(str(d / "repo"), pack_mib=1)
    rng = random.Random(7)
    src = str(d / "src")
    make_tree(src, rng, nfiles=12, size_range=(5_000, 60_000))
    snaps = []
    for i in range(5):
        write_file(os.path.join(src, "d1", "current.bin"), rng.randbytes(60_000))
        write_file(os.path.join(src, "gen.txt"), f"generation {i}\n".encode())
        snaps.append(snap(repo, "a", [src]))
    other = str(d / "other")
    write_file(os.path.join(other, "x.bin"), rng.randbytes(20_000))
    b1 = snap(repo, "b", [other])
    return repo, snaps, b1


@pytest.fixture
def env(base, tmp_path):
    repo, snaps, b1 = base
    dst = str(tmp_path / "repo")
    shutil.copytree(repo, dst)
    return dst, snaps, b1


def own_chunks(repo: str, snaps, i: int) -> list[bytes]:
    """Chunks only snapshot i references (the newest rewrote them)."""
    mine = {b for b, k in reachable(repo, snaps[i].hex).items() if k == "chunk"}
    for j, s in enumerate(snaps):
        if j != i:
            mine -= set(reachable(repo, s.hex))
    assert mine, f"snapshot {i} should have chunks of its own"
    return sorted(mine)


def corrupt(repo: str, snaps, i: int) -> bytes:
    cid = own_chunks(repo, snaps, i)[0]
    e = all_blobs(repo)[cid]
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + e.stored_len // 2)
    return cid


def test_clean_set_chooses_the_newest(env):
    repo, snaps, _ = env
    sel = select_image(repo, "a")
    assert sel.chosen.id == snaps[-1].hex and sel.chosen.status == "chosen"
    assert [i.status for i in sel.images] == ["chosen"] + ["not examined"] * 4
    assert sel.images[0].verify["result"] == "good" and sel.images[0].verify["chunks_read"] > 0
    assert any("no application check" in n for n in sel.notes)


def test_newest_corrupt_picks_the_second_and_says_why(env):
    repo, snaps, _ = env
    cid = corrupt(repo, snaps, 4)
    sel = select_image(repo, "a")
    assert sel.chosen.id == snaps[3].hex
    top = sel.images[0]
    assert top.id == snaps[4].hex and top.status == "skipped"
    assert top.reason.startswith(f"damage found at {CURRENT} (chunk {cid.hex()[:16]} in pack ")
    assert [i.status for i in sel.images] == ["skipped", "chosen", "not examined", "not examined", "not examined"]
    meta = get_snapmeta(repo, snaps[4].hex)
    assert meta["verify"]["result"] == "damaged" and meta["image"]["status"] == "skipped"
    assert "damage found at" in meta["image"]["reason"]
    assert get_snapmeta(repo, snaps[3].hex)["image"]["status"] == "chosen"
    assert "image" not in get_snapmeta(repo, snaps[2].hex), "an image not examined gets no record"


def test_newest_two_corrupt_picks_the_third(env):
    repo, snaps, _ = env
    corrupt(repo, snaps, 4)
    corrupt(repo, snaps, 3)
    sel = select_image(repo, "a")
    assert sel.chosen.id == snaps[2].hex
    assert [(i.id, i.status) for i in sel.images] == [
        (snaps[4].hex, "skipped"), (snaps[3].hex, "skipped"), (snaps[2].hex, "chosen"),
        (snaps[1].hex, "not examined"), (snaps[0].hex, "not examined")]
    for i in sel.images[:2]:
        assert i.reason.startswith(f"damage found at {CURRENT} ")
    # chunks the newer images share with the third were read good a moment ago: not read again
    assert sel.images[2].verify["chunks_skipped_recent"] > 0
    assert sel.images[2].verify["chunks_read"] < sel.images[2].verify["chunks"]
    # with rechecks off, everything is read
    again = select_image(repo, "a", recheck_after=0)
    assert again.images[2].verify["chunks_skipped_recent"] == 0
    assert again.images[2].verify["chunks_read"] == again.images[2].verify["chunks"]


def test_cli_select_table_json_and_no_good_image(env):
    repo, snaps, _ = env
    corrupt(repo, snaps, 4)
    corrupt(repo, snaps, 3)
    p = pit("failover", "select", "--repo", repo, "--set", "a")
    rows = p.stdout.splitlines()
    assert rows[0].split() == ["SNAPSHOT", "NAME", "TIME", "STATUS"]
    assert rows[1].startswith(snaps[4].short) and f"skipped: damage found at {CURRENT}" in rows[1]
    assert rows[2].startswith(snaps[3].short) and "skipped: damage found at" in rows[2]
    assert rows[3].startswith(snaps[2].short) and rows[3].endswith("chosen")
    assert rows[4].endswith("not examined") and rows[5].endswith("not examined")
    assert rows[6] == f"chosen: a@{snaps[2].name} ({snaps[2].short})"
    out = json.loads(pit("failover", "select", "--repo", repo, "--set", "a", "--json").stdout)
    assert out["chosen"]["id"] == snaps[2].hex
    assert [i["status"] for i in out["images"]] == ["skipped", "skipped", "chosen", "not examined", "not examined"]
    # now every image is damaged
    for i in range(3):
        corrupt(repo, snaps, i)
    shared = sorted(b for b, k in reachable(repo, snaps[0].hex).items() if k == "chunk")
    for cid in shared:  # and the chunks they share
        if all(cid in reachable(repo, s.hex) for s in snaps):
            e = all_blobs(repo)[cid]
            flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 1)
            break
    # snapshot 2's chunks were read good moments ago and are inside the recheck window: read them again
    p = pit("failover", "select", "--repo", repo, "--set", "a", "--recheck-after", "0", expect=62)
    err = [ln for ln in p.stderr.splitlines() if not ln.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("pit: error: no image of set 'a' passed (5 examined)")
    assert all("skipped: damage found at" in r for r in p.stdout.splitlines()[1:6])
    out = json.loads(pit("failover", "select", "--repo", repo, "--set", "a", "--json", "--recheck-after", "0",
                         expect=62).stdout)
    assert out["chosen"] is None and {i["status"] for i in out["images"]} == {"skipped"}
    with pytest.raises(NoGoodImage) as ei:
        select_image(repo, "a", recheck_after=0)
    assert ei.value.selection.chosen is None and len(ei.value.selection.images) == 5


def test_pinned_image(env):
    repo, snaps, b1 = env
    corrupt(repo, snaps, 4)
    sel = select_image(repo, "a", pin=f"a@{snaps[1].name}")
    assert sel.pinned and sel.chosen.id == snaps[1].hex and sel.chosen.status == "pinned"
    assert [i.status for i in sel.images if i.id != snaps[1].hex] == ["not examined"] * 4
    with pytest.raises(PinnedImageBad) as ei:
        select_image(repo, "a", pin=snaps[4].hex[:12])
    assert "damage found at" in str(ei.value) and ei.value.exit_code == 63
    p = pit("failover", "select", "--repo", repo, "--set", "a", "--snapshot", "a@latest", expect=63)
    err = [ln for ln in p.stderr.splitlines() if not ln.startswith("note: ")]
    assert len(err) == 1 and "pinned image" in err[0]
    with pytest.raises(InvalidArgument, match="belongs to set 'b'"):
        select_image(repo, "a", pin=b1.hex)


def test_image_whose_point_hooks_failed_is_skipped(env):
    repo, snaps, _ = env
    with opened(repo, readonly=False) as r:
        rec = mark_point(r, snaps[4].id, {"ok": False, "error": "post hook failed: unlock: exit status 1"})
        mark_point(r, snaps[3].id, {"ok": True, "error": None})
    assert rec["ok"] is False
    sel = select_image(repo, "a")
    assert sel.chosen.id == snaps[3].hex
    assert sel.images[0].reason == "point hooks failed: post hook failed: unlock: exit status 1"
    assert sel.images[0].verify is None, "an image known to be inconsistent is not read"
    sel = select_image(repo, "a", pin=snaps[4].hex)
    assert sel.chosen.id == snaps[4].hex and any("point hooks failed" in n for n in sel.notes)


def test_open_read_only_repository_selects_without_recording(env):
    repo, snaps, _ = env
    corrupt(repo, snaps, 4)
    with opened(repo) as r:  # read-only, as a reader beside a running agent would hold it
        sel = select_image(r, "a")
    assert sel.chosen.id == snaps[3].hex and sel.images[0].reason.startswith("damage found at")
    assert get_snapmeta(repo, snaps[4].hex) == {}, "a read-only repository is not written"


def test_no_images_and_limits(env):
    repo, snaps, _ = env
    with pytest.raises(NoImages):
        select_image(repo, "nosuch")
    p = pit("failover", "select", "--repo", repo, "--set", "nosuch", expect=61)
    assert p.stderr.count("\n") == 1
    corrupt(repo, snaps, 4)
    with pytest.raises(NoGoodImage):
        select_image(repo, "a", max_images=1)
    sel = select_image(repo, "a", max_images=2)
    assert len(sel.images) == 2 and any("3 older images not considered" in n for n in sel.notes)


def test_callable_check_and_kept_image(env, tmp_path):
    repo, snaps, _ = env
    seen = []

    def check(image_dir, s):
        with open(os.path.join(image_dir, "src", "gen.txt")) as f:
            gen = f.read().strip()
        seen.append(gen)
        return CheckResult(gen != "generation 4", f"saw {gen}")

    sel = select_image(repo, "a", check, keep_image=True, scratch_dir=str(tmp_path / "scratch"))
    try:
        assert seen == ["generation 4", "generation 3"]
        assert sel.chosen.id == snaps[3].hex
        assert sel.images[0].reason == "app check failed: saw generation 4"
        with open(os.path.join(sel.image_dir, "src", "gen.txt")) as f:
            assert f.read() == "generation 3\n"
    finally:
        shutil.rmtree(sel.image_dir)
    assert os.listdir(tmp_path / "scratch") == [], "rejected images are removed"
    with opened(repo) as r, r.reading() as txn:
        st = image_status(r, txn, snaps[4].id)
    assert st["app_check"]["result"] == "failed" and st["image"]["status"] == "skipped"


# ------------------------------------------------------------ SQLite images
def _db(path: str, rows: int) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS t (a INTEGER PRIMARY KEY, b TEXT)")
    con.execute("CREATE INDEX IF NOT EXISTS tb ON t (b)")
    con.executemany("INSERT INTO t (b) VALUES (?)", [(f"row {i} " + "y" * 200,) for i in range(rows)])
    con.commit()
    con.close()


def test_sqlite_images_integrity_check_decides(tmp_path):
    repo = init_repo(str(tmp_path / "repo"))
    live = str(tmp_path / "live" / "shop.db")
    os.makedirs(os.path.dirname(live))
    side = str(tmp_path / "side" / "shop")
    cluster = str(tmp_path / "cluster.toml")
    table, _ = add_set(cluster, "shop", "sqlite", [live], ["r1"], "m", {"side_dir": side})
    cfg = set_config({"name": "shop", **table})
    sids = []
    for n in (500, 800):
        _db(live, n)
        with around_point(cfg, len(sids)):  # the hook makes the consistent copy, the point snapshots it
            sids.append(snap(repo, "shop", table["paths"]))
    # a bad copy: say the master's disk returned garbage for part of it
    copy = os.path.join(side, "shop.db")
    size = os.path.getsize(copy)
    with open(copy, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(8192))
    sids.append(snap(repo, "shop", table["paths"]))

    sel = select_image(repo, "shop", cfg)
    assert sel.chosen.id == sids[1].hex
    assert sel.images[0].reason.startswith("app check failed: shop.db: ")
    assert sel.chosen.check["details"] == ["shop.db: integrity_check ok"]
    assert get_snapmeta(repo, sids[2].hex)["app_check"]["result"] == "failed"
    assert get_snapmeta(repo, sids[1].hex)["app_check"] == {
        "time": get_snapmeta(repo, sids[1].hex)["app_check"]["time"], "template": "sqlite", "result": "good",
        "message": "sqlite check passed"}

    p = pit("failover", "select", "--repo", repo, "--set", "shop", "--cluster", cluster)
    rows = p.stdout.splitlines()
    assert "skipped: app check failed: shop.db: " in rows[1] and rows[2].endswith("chosen")
    # without the check, the newest image verifies and is chosen
    p = pit("failover", "select", "--repo", repo, "--set", "shop", "--no-check")
    assert p.stdout.splitlines()[1].endswith("chosen")
    # --check without any configuration: verify only, and the output says so
    p = pit("failover", "select", "--repo", repo, "--set", "shop")
    assert "no set configuration found" in p.stderr and p.stdout.splitlines()[1].endswith("chosen")


# ------------------------------------------------------------ PostgreSQL
PG_BIN = pg_bindir("15") or pg_bindir()
ROOT = os.geteuid() == 0
needs_pg = pytest.mark.skipif(not PG_BIN or not shutil.which("pgbench", path=PG_BIN),
                              reason="PostgreSQL server binaries (Debian postgresql-15) not installed")


class PgServer:
    """A throwaway PostgreSQL cluster in /tmp (reachable by the postgres user), on a private socket directory."""

    def __init__(self) -> None:
        self.user = "postgres" if ROOT else None
        self.base = tempfile.mkdtemp(prefix="pit-pgtest-", dir="/tmp")
        os.chmod(self.base, 0o755)
        self.data = os.path.join(self.base, "data")
        self.sock = os.path.join(self.base, "sock")
        os.mkdir(self.sock)
        if ROOT:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in (self.base, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.bench = None
        self.run([f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        self.run([f"{PG_BIN}/pg_ctl", "start", "-w", "-D", self.data, "-l", os.path.join(self.base, "log"),
                  "-o", f"-c listen_addresses='' -c unix_socket_directories={self.sock} -c port=5432"])

    def run(self, argv, timeout=300) -> str:
        p = subprocess.run(as_user(argv, self.user), capture_output=True, text=True, timeout=timeout, cwd=self.base)
        assert p.returncode == 0, f"{argv[0]} failed: {p.stdout}\n{p.stderr}"
        return p.stdout

    def sql(self, q: str) -> str:
        return self.run([f"{PG_BIN}/psql", "-X", "-At", "-h", self.sock, "-U", "postgres", "-d", "postgres",
                         "-c", q]).strip()

    def start_bench(self) -> None:
        self.run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", "2", "-h", self.sock, "-U", "postgres", "postgres"])
        self.bench = subprocess.Popen(as_user([f"{PG_BIN}/pgbench", "-n", "-c", "2", "-j", "1", "-T", "600", "-h",
                                               self.sock, "-U", "postgres", "postgres"], self.user),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.base,
                                      start_new_session=True)

    def wait_for_writes(self, n: int) -> int:
        """Block until pgbench has committed n more transactions (by polling the history table)."""
        start = int(self.sql("SELECT count(*) FROM pgbench_history"))
        while True:
            cur = int(self.sql("SELECT count(*) FROM pgbench_history"))
            if cur >= start + n:
                return cur
            assert self.bench.poll() is None, "pgbench died"

    def stop(self) -> None:
        if self.bench and self.bench.poll() is None:
            os.killpg(self.bench.pid, signal.SIGKILL)
            self.bench.wait()
        subprocess.run(as_user([f"{PG_BIN}/pg_ctl", "stop", "-m", "immediate", "-D", self.data], self.user),
                       capture_output=True, cwd=self.base, timeout=120)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def pg():
    s = PgServer()
    try:
        yield s
    finally:
        s.stop()


@needs_pg
@pytest.mark.slow  # CI runs PostgreSQL end to end in tests/test_failover_pg.py
def test_postgresql_images_under_writes(pg, tmp_path):
    repo = init_repo(str(tmp_path / "repo"), pack_mib=8, avg_chunk=16384)
    opts = {"socket_dir": pg.sock, "port": 5432, "amcheck": True, "check_timeout": 300, "bindir": PG_BIN}
    cfg = set_config({"name": "pg", **build_set("postgresql", "pg", [pg.data], ["r1"], "m", opts)})
    assert cfg.app["pre"] == ["builtin:postgresql.backup_start"]
    pg.start_bench()
    pg.wait_for_writes(200)

    # point 1: pg_backup_start/stop held on one session around the snapshot, while pgbench writes
    with around_point(cfg, 1) as ph:
        in_backup = pg.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                           "AND query LIKE 'SELECT ''pit-mark-%'")
        assert in_backup == "1", "the backup session stays open during the point"
        s1 = snap(repo, "pg", [pg.data])
        pg.wait_for_writes(50)
    assert ph.ok
    assert ph.pre.runs[0].output.startswith("backup started at ")
    assert "backup stopped at " in ph.post.runs[0].output and "START WAL LOCATION" in ph.post.runs[0].output

    # point 2: the checkpoint variant (a plain argv hook, as the OS user)
    cfg2 = set_config({"name": "pg", **build_set("postgresql", "pg", [pg.data], ["r1"], "m", {**opts, "point": "checkpoint"})})
    pg.wait_for_writes(200)
    with around_point(cfg2, 2) as ph2:
        s2 = snap(repo, "pg", [pg.data])
    assert ph2.ok and ph2.pre.runs[0].rc == 0

    sel = select_image(repo, "pg", cfg)
    assert sel.chosen.id == s2.hex, [(i.status, i.reason) for i in sel.images]
    det = sel.chosen.check["details"]
    assert det[0].startswith("pg_controldata: cluster state 'in production'")
    assert "throwaway instance started (recovery done)" in det
    assert any(d.startswith("SELECT 1 answered") for d in det)
    assert "pg_amcheck: no problems" in det
    pinned = select_image(repo, "pg", cfg, pin=s1.hex)
    assert pinned.chosen.id == s1.hex and pinned.chosen.check["ok"]

    # broken images, newer than the good ones
    bad = os.path.join(tmp_path, "bad")
    nowal = os.path.join(bad, "nowal", "data")  # same base name as the live data directory
    shutil.copytree(pg.data, nowal, symlinks=True)
    for f in os.listdir(os.path.join(nowal, "pg_wal")):
        if len(f) == 24:
            os.unlink(os.path.join(nowal, "pg_wal", f))
    s3 = snap(repo, "pg", [nowal])
    trunc = os.path.join(bad, "trunc", "data")
    shutil.copytree(pg.data, trunc, symlinks=True)
    with open(os.path.join(trunc, "global", "pg_control"), "r+b") as f:
        f.truncate(100)
    s4 = snap(repo, "pg", [trunc])

    before = {n for n in os.listdir("/tmp") if n.startswith("pit-pgcheck-")}
    sel = select_image(repo, "pg", cfg)
    assert [i.id for i in sel.images[:3]] == [s4.hex, s3.hex, s2.hex]
    assert sel.images[0].status == "skipped" and sel.images[0].reason.startswith("app check failed: pg_controldata: ")
    assert sel.images[1].status == "skipped"
    assert sel.images[1].reason.startswith("app check failed: throwaway instance did not start: ")
    assert sel.chosen.id == s2.hex
    assert get_snapmeta(repo, s4.hex)["app_check"]["result"] == "failed"
    after = {n for n in os.listdir("/tmp") if n.startswith("pit-pgcheck-")}
    assert not after - before, "the throwaway instances' directories are removed"

    # point 3: a base backup into a side directory (the image is that copy, WAL and backup_label included)
    side = os.path.join(pg.base, "side")
    os.mkdir(side)
    if ROOT:
        shutil.chown(side, "postgres", "postgres")
    cfg3 = set_config({"name": "pgbb", **build_set("postgresql", "pgbb", [pg.data], ["r1"], "m",
                                        {**opts, "point": "basebackup", "side_dir": side})})
    assert cfg3.paths == (side,) and cfg3.app["data"] == os.path.join(side, "base")
    for n in (1, 2):
        pg.wait_for_writes(100)
        with around_point(cfg3, n) as ph3:
            s5 = snap(repo, "pgbb", list(cfg3.paths))
        assert ph3.ok, ph3.pre.error
    assert os.path.exists(os.path.join(side, "base", "backup_label"))
    sel = select_image(repo, "pgbb", cfg3)
    assert sel.chosen.id == s5.hex and "throwaway instance started (recovery done)" in sel.chosen.check["details"]

    # a hook that cannot reach the server fails the point, with the server's one-line reason
    cfg4 = set_config({"name": "pg", **build_set("postgresql", "pg", [pg.data], ["r1"], "m", {**opts, "superuser": "nobody"})})
    with pytest.raises(HookFailed, match='role "nobody" does not exist'):
        with around_point(cfg4, 9):
            pytest.fail("the point must not be made")


def test_one_failover_image_per_set(env):
    """A later selection's choice supersedes the earlier one: the views show one failover image, not two."""
    repo, snaps, _ = env
    select_image(repo, "a", pin=f"a@{snaps[1].name}")
    select_image(repo, "a")
    with opened(repo) as r, r.reading() as txn:
        status = {s.hex: (image_status(r, txn, s.id)["image"] or {}).get("status") for s in snaps}
    assert status[snaps[-1].hex] == "chosen" and status[snaps[1].hex] == "superseded"
    assert list(status.values()).count("chosen") + list(status.values()).count("pinned") == 1
