"""PostgreSQL WAL streaming and replay (replicator/apps/pgwal.py, issue 16), on a real PostgreSQL 15.

A primary under writes, a base image made with pg_basebackup (as a point's image would be: a copy of the
data directory with the WAL it needs), a `WalReceiver` streaming into a directory, then the primary dies
(SIGKILL of the postmaster). `replay` must bring the image forward to every insert whose WAL the receiver
confirmed, promote it onto a new timeline and leave it cleanly stopped; a replay that cannot succeed must
say why and leave no server running. The failover path around it (the promotion report, the image put back
after a failed replay) is in tests/test_failover_pg.py.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from test_repl_helpers import wait_for
from replicator.apps import pgwal
from replicator.apps.templates import as_user, pg_bindir
from replicator.errors import WalReplayFailed
from replicator.settings import SetConfig

PG_BIN = pg_bindir("15") or pg_bindir()
ROOT = os.geteuid() == 0
USER = "postgres" if ROOT else None

pytestmark = pytest.mark.skipif(not PG_BIN or not os.path.exists(os.path.join(PG_BIN, "pg_receivewal")),
                                reason="PostgreSQL server binaries (Debian postgresql-15) not installed")


def run(argv, timeout=120, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(as_user(argv, USER), capture_output=True, text=True, timeout=timeout, cwd="/")
    if check:
        assert p.returncode == 0, f"{' '.join(argv)}: {p.stdout}{p.stderr}"
    return p


class Server:
    def __init__(self, base: str, name: str) -> None:
        self.data = os.path.join(base, name)
        self.sock = os.path.join(base, name + "-sock")
        os.makedirs(self.sock)
        if ROOT:
            shutil.chown(self.sock, "postgres", "postgres")

    def start(self) -> None:
        run([f"{PG_BIN}/pg_ctl", "start", "-w", "-t", "120", "-D", self.data, "-l", self.data + ".log",
             "-o", f"-c listen_addresses='' -c unix_socket_directories={self.sock} -c port=5432"], 180)

    def sql(self, q: str) -> str:
        return run([f"{PG_BIN}/psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.sock, "-U", "postgres",
                    "-d", "postgres", "-c", q]).stdout.strip()

    def kill(self) -> None:
        """The host dies: SIGKILL of the postmaster (its backends follow)."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            pid = int(f.readline())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: run([f"{PG_BIN}/pg_isready", "-q", "-h", self.sock], check=False).returncode != 0, 60,
                 "the server to be gone")

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            run([f"{PG_BIN}/pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data], 90, check=False)


@pytest.fixture
def lab():
    base = tempfile.mkdtemp(prefix="pit-pgwal-", dir="/tmp")  # reachable by the postgres user
    os.chmod(base, 0o755)
    prim, image = Server(base, "primary"), Server(base, "image")
    state = os.path.join(base, "state")
    os.makedirs(state)
    if ROOT:
        shutil.chown(base, "postgres", "postgres")
    run([f"{PG_BIN}/initdb", "-D", prim.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--wal-segsize=1"])
    prim.start()
    prim.sql("CREATE TABLE acks (n integer PRIMARY KEY)")
    src = pgwal.Source("primary", prim.sock, 5432, "postgres", PG_BIN)
    rec = pgwal.WalReceiver("db", "r1", state)
    try:
        yield prim, image, rec, src, base
    finally:
        rec.stop()
        prim.stop()
        image.stop()
        shutil.rmtree(base, ignore_errors=True)


def app() -> dict:
    return {"template": "postgresql", "wal": "stream", "os_user": "postgres", "superuser": "postgres",
            "bindir": PG_BIN}


def confirmed(prim: Server, slot: str) -> bool:
    lsn = prim.sql("SELECT pg_current_wal_lsn()")
    return prim.sql(f"SELECT coalesce(bool_and(write_lsn >= '{lsn}'), false) FROM pg_stat_replication "
                    f"WHERE application_name = '{slot}'") == "t"


def test_replay_brings_the_image_to_the_last_confirmed_insert(lab):
    prim, image, rec, src, base = lab
    rec.update(src)
    wait_for(lambda: rec.status()["running"] and prim.sql(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pit_r1' AND active") == "1", 60,
        "the receiver to stream on its slot")
    for n in range(1, 101):
        prim.sql(f"INSERT INTO acks VALUES ({n})")
    run([f"{PG_BIN}/pg_basebackup", "-D", image.data, "-X", "fetch", "-c", "fast", "-h", prim.sock, "-U",
         "postgres"], 300)
    for n in range(101, 1101):  # after the image: only the WAL has them (and 1 MB segments: several)
        prim.sql(f"INSERT INTO acks VALUES ({n})")
    prim.sql("SELECT pg_switch_wal()")
    for n in range(1101, 1201):  # in the open segment, received as NAME.partial
        prim.sql(f"INSERT INTO acks VALUES ({n})")
    wait_for(lambda: confirmed(prim, "pit_r1"), 60, "the receiver to confirm every insert")
    prim.kill()
    st = rec.status()
    assert st["newest_segment"].endswith(".partial") and st["master"] == "primary", st
    rec.stop()

    res = pgwal.replay(app(), image.data, rec.dir, timeout=300)
    assert res["segments"] >= 2 and res["timeline"] == 2, res
    assert not os.path.exists(os.path.join(image.data, "postmaster.pid"))  # stopped cleanly
    assert not os.path.exists(os.path.join(image.data, "recovery.signal"))  # promoted
    image.start()
    assert image.sql("SELECT count(*), min(n), max(n) FROM acks") == "1200|1|1200"
    image.sql("INSERT INTO acks VALUES (-1)")  # a primary: it takes writes


def test_a_failed_replay_says_why_and_leaves_no_server(lab):
    prim, image, rec, src, base = lab
    run([f"{PG_BIN}/pg_basebackup", "-D", image.data, "-X", "fetch", "-c", "fast", "-h", prim.sock, "-U",
         "postgres"], 300)
    redo = pgwal._redo_segment(PG_BIN, image.data)
    os.makedirs(rec.dir)
    with open(os.path.join(rec.dir, redo), "wb") as f:  # a truncated segment: the server refuses it
        f.write(b"\0" * 4096)
    with pytest.raises(WalReplayFailed, match="did not come up|not promoted"):
        pgwal.replay(app(), image.data, rec.dir, timeout=120)
    assert not os.path.exists(os.path.join(image.data, "postmaster.pid"))
    assert not os.path.exists(os.path.join(image.data, "recovery.signal"))


def test_nothing_received_means_the_image_alone(lab, tmp_path):
    prim, image, rec, src, base = lab
    run([f"{PG_BIN}/pg_basebackup", "-D", image.data, "-X", "fetch", "-c", "fast", "-h", prim.sock, "-U",
         "postgres"], 300)
    res = pgwal.replay(app(), image.data, str(tmp_path / "none"), timeout=120)
    assert res["segments"] == 0 and "image alone" in res["note"]
    assert not os.path.exists(os.path.join(image.data, "recovery.signal"))


def test_a_new_master_gets_a_fresh_directory(tmp_path):
    """WAL of another master's history is put aside, never mixed into the new term's directory."""
    rec = pgwal.WalReceiver("db", "r2", str(tmp_path))
    rec._prepare_dir("primary 7321 00000001")
    with open(os.path.join(rec.dir, "000000010000000000000003.partial"), "wb") as f:
        f.write(b"x")
    rec._prepare_dir("primary 7321 00000001")  # the same history (an agent restart): kept
    assert pgwal.newest_segment(rec.dir) == "000000010000000000000003.partial"
    rec._prepare_dir("primary 7321 00000002")  # the same master after a failback: a new timeline
    assert pgwal.newest_segment(rec.dir) is None
    assert pgwal.newest_segment(rec.dir + ".prev") == "000000010000000000000003.partial"
    with open(os.path.join(rec.dir, "000000020000000000000004.partial"), "wb") as f:
        f.write(b"x")
    rec._prepare_dir("r1 7321 00000003")  # another master
    assert pgwal.newest_segment(rec.dir) is None
    assert pgwal.newest_segment(rec.dir + ".prev") == "000000020000000000000004.partial"


def test_names_and_sources():
    assert pgwal.slot_name("Office-DB.2") == "pit_office_db_2"
    assert pgwal.host_of("10.0.0.5:7000") == "10.0.0.5" and pgwal.host_of("[::1]:7000") == "::1"
    s = SetConfig(master="primary", replicas=("r1",), paths=("/var/lib/postgresql/15/main",),
                  app={"template": "postgresql", "wal": "stream", "port": 5433})
    assert pgwal.streams_wal(s) and not pgwal.streams_wal(SetConfig(master="p", replicas=("r1",), paths=("/x",)))
    src = pgwal.source_of(s, {"primary": {"address": "192.0.2.1:7000"}})
    assert (src.host, src.port, src.user) == ("192.0.2.1", 5433, "postgres")
    assert pgwal.source_of(s, {}) is None  # the master is not in the roster yet


def test_the_master_sees_each_replicas_lag(lab):
    prim, image, rec, src, base = lab
    mon = pgwal.WalMonitor("db")
    mon.app = {**app(), "socket_dir": prim.sock, "port": 5432, "dbname": "postgres"}
    mon.replicas = ("r1", "r2")
    got = mon.poll()
    assert got["r1"]["streaming"] is False and got["r1"]["lag_bytes"] is None  # no slot yet
    rec.update(src)
    wait_for(lambda: mon.poll()["r1"]["streaming"], 60, "r1's receiver to stream")
    prim.sql("INSERT INTO acks VALUES (1)")
    wait_for(lambda: mon.poll()["r1"]["lag_bytes"] == 0, 60, "r1 to confirm the insert's WAL")
    rec.stop()
    for n in range(2, 200):
        prim.sql(f"INSERT INTO acks VALUES ({n})")
    got = mon.poll()
    assert got["r1"]["streaming"] is False and got["r1"]["lag_bytes"] > 0, got  # its slot holds the WAL back
    assert got["r2"] == {"slot": "pit_r2", "streaming": False, "lag_bytes": None,
                         "lag_seconds": got["r2"]["lag_seconds"]}


def test_a_killed_agent_leaves_no_receiver_holding_the_slot(lab):
    """Seed 5100 of the PostgreSQL harness: a receiver left behind by a SIGKILLed agent held the slot, so the
    next agent's receiver could not stream, and it died later at a segment switch (writing to the dead agent's
    pipe): the primary's death then lost 28 acknowledged ids. A receiver now ends with its agent."""
    import sys

    prim, image, rec, src, base = lab
    code = ("import sys, time; sys.path.insert(0, %r); from replicator.apps import pgwal; "
            "r = pgwal.WalReceiver('db', 'r1', %r); r.update(pgwal.Source('primary', %r, 5432, 'postgres', %r)); "
            "time.sleep(600)") % (os.getcwd(), os.path.join(base, "state"), prim.sock, PG_BIN)
    agent = subprocess.Popen([sys.executable, "-c", code])
    try:
        active = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pit_r1' AND active"
        wait_for(lambda: prim.sql(active) == "1", 60, "the agent's receiver to stream")
        agent.kill()
        agent.wait(30)
        wait_for(lambda: prim.sql(active) == "0", 30, "the slot to be free once the agent died")
        rec.update(src)  # the next agent's receiver streams at once
        wait_for(lambda: prim.sql(active) == "1" and rec.status()["running"], 60, "the next receiver to stream")
    finally:
        agent.kill()


def test_sync_loses_no_acknowledged_commit(lab):
    """`sync = true`: every acknowledged commit is on the replica when the primary dies, without waiting."""
    prim, image, rec, src, base = lab
    mon = pgwal.WalMonitor("db")
    mon.app = {**app(), "socket_dir": prim.sock, "port": 5432, "dbname": "postgres", "sync": True}
    mon.replicas = ("r1", "r2")
    assert mon.keep_sync() is None  # nobody streams yet: commits must not wait for anyone
    rec.update(dataclasses.replace(src, sync=True))  # the set's sync = true: each write confirmed
    wait_for(lambda: mon.poll()["r1"]["streaming"], 60, "r1's receiver to stream")
    assert mon.keep_sync() == 'FIRST 1 ("pit_r1", "pit_r2")'
    assert prim.sql("SHOW synchronous_standby_names") == 'FIRST 1 ("pit_r1", "pit_r2")'
    run([f"{PG_BIN}/pg_basebackup", "-D", image.data, "-X", "fetch", "-c", "fast", "-h", prim.sock, "-U",
         "postgres"], 300)
    for n in range(1, 301):
        prim.sql(f"INSERT INTO acks VALUES ({n})")
    prim.kill()  # at once: no wait for the receiver
    rec.stop()
    assert pgwal.clear_sync(image.data)  # the image carries the old master's setting: the promoted one must not
    res = pgwal.replay(app(), image.data, rec.dir, timeout=300)
    assert res["timeline"] == 2, res
    image.start()
    assert image.sql("SELECT count(*) FROM acks") == "300"
    assert image.sql("SHOW synchronous_standby_names") == ""
    image.sql("INSERT INTO acks VALUES (-1)")  # does not wait for a replica it does not have


def test_sync_stops_waiting_when_no_replica_streams(lab):
    prim, image, rec, src, base = lab
    mon = pgwal.WalMonitor("db")
    mon.app = {**app(), "socket_dir": prim.sock, "port": 5432, "dbname": "postgres", "sync": True}
    mon.replicas = ("r1",)
    rec.update(dataclasses.replace(src, sync=True))  # the set's sync = true: each write confirmed
    wait_for(lambda: mon.poll()["r1"]["streaming"], 60, "r1's receiver to stream")
    assert mon.keep_sync() == 'FIRST 1 ("pit_r1")' and mon.status()["sync"] == 'FIRST 1 ("pit_r1")'
    rec.stop()
    wait_for(lambda: not mon.poll()["r1"]["streaming"], 60, "the master to see r1 gone")
    assert mon.keep_sync() == ""
    prim.sql("INSERT INTO acks VALUES (1)")  # answered: commits no longer wait (a hang would time out)
    prim.sql("ALTER SYSTEM SET synchronous_standby_names = 'mine'")  # the operator's own value stays
    prim.sql("SELECT pg_reload_conf()")
    assert mon.keep_sync() is None and prim.sql("SHOW synchronous_standby_names") == "mine"


def test_only_our_setting_is_cleared(tmp_path):
    conf = tmp_path / "postgresql.auto.conf"
    conf.write_text("# Do not edit this file manually!\nwork_mem = '8MB'\n"
                    "synchronous_standby_names = 'FIRST 1 (\"pit_r1\", \"pit_r2\")'\n")
    assert pgwal.clear_sync(str(tmp_path))
    assert conf.read_text() == "# Do not edit this file manually!\nwork_mem = '8MB'\n"
    conf.write_text("synchronous_standby_names = 'ANY 1 (s1, s2)'\n")
    assert not pgwal.clear_sync(str(tmp_path)) and "s1" in conf.read_text()


def test_the_image_check_recovers_an_image_with_the_wal_received_after_it(lab, tmp_path):
    """Seed 5202 of the PostgreSQL harness: the only image's own pg_wal lacked its checkpoint record (PANIC:
    could not locate a valid checkpoint record), so no image passed and nothing was promoted, while the WAL
    the secondary had received held it. The check of a streamed set replays that WAL onto the image's copy:
    the unit a promotion brings up."""
    from replicator.apps.templates import check_image

    prim, image, rec, src, base = lab
    rec.update(src)
    wait_for(lambda: rec.status()["running"], 60, "the receiver to stream")
    prim.sql("INSERT INTO acks VALUES (1)")
    run([f"{PG_BIN}/pg_basebackup", "-D", image.data, "-X", "fetch", "-c", "fast", "-h", prim.sock, "-U",
         "postgres"], 300)
    for n in range(2, 50):
        prim.sql(f"INSERT INTO acks VALUES ({n})")
    wait_for(lambda: confirmed(prim, "pit_r1"), 60, "the receiver to confirm every insert")
    prim.kill()
    rec.stop()
    wal = os.path.join(image.data, "pg_wal")
    for n in os.listdir(wal):  # the image without its own WAL (nor its backup_label): what the harness had
        if pgwal.SEGMENT.match(n):
            os.unlink(os.path.join(wal, n))
    os.unlink(os.path.join(image.data, "backup_label"))
    os.rename(image.data, os.path.join(base, "images-main"))
    os.makedirs(os.path.join(base, "img"))
    os.rename(os.path.join(base, "images-main"), os.path.join(base, "img", "main"))
    s = SetConfig(master="primary", replicas=("r1",), paths=("/var/lib/postgresql/15/main",),
                  app={**app(), "data": "/var/lib/postgresql/15/main"})
    alone = check_image(s, os.path.join(base, "img"))
    assert not alone.ok and "checkpoint record" in alone.message, alone.message
    s = SetConfig(master="primary", replicas=("r1",), paths=s.paths, app={**s.app, "wal_received": rec.dir})
    res = check_image(s, os.path.join(base, "img"))
    assert res.ok, res.message
    assert any("WAL received after the image replayed" in d for d in res.details), res.details


def test_a_stale_segment_in_the_image_is_replaced_by_the_received_one(lab):
    """The image's pg_wal holds the checkpoint's segment, but as an old copy (captured before the record was
    written into it): the received complete segment replaces it, and the image recovers."""
    from replicator.apps.templates import check_image

    prim, image, rec, src, base = lab
    rec.update(src)
    wait_for(lambda: rec.status()["running"], 60, "the receiver to stream")
    run([f"{PG_BIN}/pg_basebackup", "-D", image.data, "-X", "fetch", "-c", "fast", "-h", prim.sock, "-U",
         "postgres"], 300)
    prim.sql("SELECT pg_switch_wal()")
    prim.sql("INSERT INTO acks VALUES (1)")
    wait_for(lambda: confirmed(prim, "pit_r1"), 60, "the receiver to confirm")
    rec.stop()
    redo = pgwal._redo_segment(PG_BIN, image.data)
    assert os.path.exists(os.path.join(rec.dir, redo))  # received whole
    with open(os.path.join(image.data, "pg_wal", redo), "r+b") as f:  # the image's copy: zeros (a stale file)
        f.write(b"\0" * os.path.getsize(os.path.join(rec.dir, redo)))
    os.unlink(os.path.join(image.data, "backup_label"))
    os.makedirs(os.path.join(base, "img"))
    os.rename(image.data, os.path.join(base, "img", "main"))
    s = SetConfig(master="primary", replicas=("r1",), paths=("/var/lib/postgresql/15/main",),
                  app={**app(), "data": "/var/lib/postgresql/15/main"})
    assert not check_image(s, os.path.join(base, "img")).ok
    s = SetConfig(master="primary", replicas=("r1",), paths=s.paths, app={**s.app, "wal_received": rec.dir})
    res = check_image(s, os.path.join(base, "img"))
    assert res.ok, res.message


def test_a_stalled_receiver_does_not_hold_up_the_masters_shutdown(lab):
    """Harness seed 5202: a receiver cut off by the network kept the master's WAL sender waiting at shutdown
    (for wal_sender_timeout, 60 s): the demote hook's `pg_ctl stop` timed out with the server still up. The
    agent ends those senders before its demote hooks run. Here the receiver is stopped (SIGSTOP) instead."""
    prim, image, rec, src, base = lab
    rec.update(src)
    wait_for(lambda: rec.status()["running"] and prim.sql(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pit_r1'") == "1", 60, "streaming")
    pid = rec._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        prim.sql("INSERT INTO acks VALUES (1)")  # its WAL fits the socket's buffer: the sender is not stuck in a send
        assert pgwal.release_senders({**app(), "socket_dir": prim.sock, "port": 5432, "dbname": "postgres"}) == 1
        run([f"{PG_BIN}/pg_ctl", "stop", "-m", "fast", "-w", "-t", "20", "-D", prim.data], 60)  # 60 s otherwise
    finally:
        os.kill(pid, signal.SIGCONT)
