"""MariaDB binlog streaming (issue 16, apps/mybinlog.py) against real MariaDB servers started here.

Each master is a private mariadbd (`mariadb-install-db` into a temporary directory, `--log-bin
--server-id=1 --binlog-format=ROW` on 127.0.0.1 and a free port) with a `pit_repl` account; the replica side
is a BinlogReceiver into a directory, as an agent runs it. Skipped when MariaDB is not installed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

from replicator.apps import mybinlog
from replicator.apps.templates import SqlSession, _mysql_lock, _mysql_unlock, build_set, parse_options
from replicator.errors import TemplateError, WalReplayFailed
from replicator.settings import SetConfig

MARIADBD = mybinlog.tool("mariadbd")
NEEDED = ("mariadb-install-db", "mariadb", "mariadb-binlog", "mariadb-admin")
pytestmark = pytest.mark.skipif(MARIADBD is None or any(mybinlog.tool(n) is None for n in NEEDED),
                                reason="MariaDB (mariadb-server, mariadb-client) is not installed")
USER = "mysql" if os.geteuid() == 0 else None
PASSWORD = "pit-repl-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Master:
    """A private MariaDB master: its data directory, socket and TCP port under `base`."""

    base: str
    port: int
    proc: subprocess.Popen | None = None

    @property
    def data(self) -> str:
        return os.path.join(self.base, "data")

    @property
    def sock(self) -> str:
        return os.path.join(self.base, "mysqld.sock")

    def client(self) -> list[str]:
        return [mybinlog.tool("mariadb"), "--no-defaults", f"--socket={self.sock}", "--user=root"]

    def init(self) -> None:
        argv = [mybinlog.tool("mariadb-install-db"), "--no-defaults", f"--datadir={self.data}", "--skip-test-db",
                "--auth-root-authentication-method=socket"] + ([f"--user={USER}"] if USER else [])
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        argv = [MARIADBD, "--no-defaults", f"--datadir={self.data}", f"--socket={self.sock}", f"--port={self.port}",
                "--bind-address=127.0.0.1", "--log-bin=mysql-bin", "--server-id=1", "--binlog-format=ROW",
                f"--pid-file={self.base}/mysqld.pid", f"--log-error={self.base}/error.log",
                "--innodb-buffer-pool-size=64M"] + ([f"--user={USER}"] if USER else [])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        for _ in range(600):
            if subprocess.run([mybinlog.tool("mariadb-admin"), "--no-defaults", f"--socket={self.sock}",
                               "--user=root", "ping"], capture_output=True).returncode == 0:
                return
            assert self.proc.poll() is None, open(f"{self.base}/error.log").read()[-2000:]
            time.sleep(0.1)
        raise AssertionError("the master did not come up")

    def sql(self, q: str) -> str:
        p = subprocess.run(self.client() + ["--batch", "--skip-column-names", "-e", q], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout.strip()

    def position(self) -> tuple[str, int]:
        f, pos = self.sql("SHOW MASTER STATUS").split("\t")[:2]
        return f, int(pos)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run([mybinlog.tool("mariadb-admin"), "--no-defaults", f"--socket={self.sock}", "--user=root",
                            "shutdown"], capture_output=True, timeout=120)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def source(self) -> mybinlog.Source:
        pwfile = os.path.join(self.base, "repl.pw")
        with open(pwfile, "w") as f:
            f.write(PASSWORD + "\n")
        return mybinlog.Source("primary", "127.0.0.1", self.port, "pit_repl", password_file=pwfile)


def make_master() -> Master:
    base = tempfile.mkdtemp(prefix="pit-mybinlog-", dir="/tmp")
    os.chmod(base, 0o755)
    m = Master(base, free_port())
    if USER:
        shutil.chown(base, USER, USER)
    m.init()
    m.start()
    m.sql(f"CREATE USER pit_repl@'%' IDENTIFIED BY '{PASSWORD}'; "
          "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO pit_repl@'%'; "
          "CREATE DATABASE shop; CREATE TABLE shop.acks (n INT PRIMARY KEY, at TIMESTAMP(6) DEFAULT NOW(6)) "
          "ENGINE=InnoDB")
    return m


@pytest.fixture
def master():
    m = make_master()
    try:
        yield m
    finally:
        m.kill()
        shutil.rmtree(m.base, ignore_errors=True)


@pytest.fixture
def state_dir():
    d = tempfile.mkdtemp(prefix="pit-mybinlog-state-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def caught_up(rec: mybinlog.BinlogReceiver, m: Master, timeout: float = 60) -> None:
    """Wait until the receiver's newest file is as long as the master's binlog (bounded, not measured)."""
    want = m.position()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rec.status()
        if st["file"] == want[0] and st["bytes"] >= want[1]:
            return
        time.sleep(0.05)
    raise AssertionError(f"receiver not caught up with {want}: {rec.status()}")


def image_of(m: Master, dest: str) -> str:
    """A point as the template makes it: the data directory copied while mysql.lock holds the global read lock
    (which writes the binlog position into it)."""
    app = {"data": m.data, "client": m.client(), "binlog": "stream"}
    state: dict = {}
    said = _mysql_lock("shop", app, {}, state, 60)
    assert "binlog position mysql-bin." in said
    try:
        fresh_copy(m.data, dest, ignore=shutil.ignore_patterns("*.pid", "*.sock"))
    finally:
        _mysql_unlock("shop", app, {}, state, 60)
    return dest


def ids_in(data: str) -> list[int]:
    """The ids a replayed data directory holds, read by a private server started on it."""
    work = tempfile.mkdtemp(prefix="pit-mybinlog-read-", dir="/tmp")
    os.chmod(work, 0o755)
    if USER:
        shutil.chown(work, USER, USER)
    srv = mybinlog.PrivateServer(data, work, USER or mybinlog._owner(data))
    p = srv.start(120)
    try:
        out = subprocess.run(srv.client("mariadb", "--batch", "--skip-column-names", "-e",
                                        "SELECT n FROM shop.acks ORDER BY n"), capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return [int(x) for x in out.stdout.split()]
    finally:
        srv.shutdown(p)
        shutil.rmtree(work, ignore_errors=True)


def fresh_copy(image: str, dest: str, ignore=None) -> str:
    """A copy of a data directory owned as the original is (as `pit restore` keeps owners)."""
    shutil.copytree(image, dest, symlinks=True, ignore=ignore)
    st = os.stat(image)
    for dp, dns, fns in os.walk(dest):
        os.lchown(dp, st.st_uid, st.st_gid)
        for n in fns:
            os.lchown(os.path.join(dp, n), st.st_uid, st.st_gid)
    return dest


class Appender(threading.Thread):
    """Numbered inserts on one session; an id counts as acknowledged once its INSERT returned."""

    def __init__(self, m: Master, start: int) -> None:
        super().__init__(daemon=True)
        self.m, self.n = m, start
        self.acked: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        s = SqlSession(self.m.client() + ["--batch", "--skip-column-names", "--unbuffered"], "appender")
        try:
            while not self.halt.is_set():
                self.n += 1
                s.run(f"INSERT INTO shop.acks (n) VALUES ({self.n})", 30)
                self.acked.append(self.n)
        except Exception:
            pass  # the server died
        finally:
            s.kill()


# ------------------------------------------------------------------ tests
def test_receiver_streams_and_resumes_after_restart(master, state_dir):
    rec = mybinlog.BinlogReceiver("shop", "r1", state_dir)
    rec.update(master.source())
    try:
        master.sql("INSERT INTO shop.acks (n) VALUES (1), (2), (3)")
        caught_up(rec, master)
        st = rec.status()
        assert st["streaming"] and st["error"] is None and st["source"].startswith("primary")
        assert os.path.isdir(mybinlog.binlog_dir(state_dir, "shop"))
    finally:
        rec.stop()
    assert not rec.status()["streaming"]
    master.sql("INSERT INTO shop.acks (n) VALUES (4); FLUSH BINARY LOGS; INSERT INTO shop.acks (n) VALUES (5)")
    rec2 = mybinlog.BinlogReceiver("shop", "r1", state_dir)
    rec2.update(master.source())
    try:
        caught_up(rec2, master)
        files = mybinlog.binlog_files(rec2.dir)
        assert files[-1] == master.position()[0] and len(files) >= 2
        assert rec2.server_id == rec.server_id != mybinlog.connection_server_id("r2", "shop")
    finally:
        rec2.stop()
    # a new master puts the old one's files aside
    rec3 = mybinlog.BinlogReceiver("shop", "r1", state_dir)
    rec3.update(mybinlog.Source("secondary", "127.0.0.1", master.port, "pit_repl",
                                password_file=os.path.join(master.base, "repl.pw")))
    try:
        caught_up(rec3, master)
        assert os.path.isdir(rec3.dir + ".prev")
    finally:
        rec3.stop()


def test_receiver_reports_errors_without_dying(master, state_dir):
    rec = mybinlog.BinlogReceiver("shop", "r1", state_dir)
    rec.update(mybinlog.Source("primary", "127.0.0.1", master.port, "pit_repl"))  # no password
    try:
        deadline = time.monotonic() + 30
        while not rec.status()["error"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "denied" in rec.status()["error"]
        rec.update(master.source())  # the right account: it recovers
        caught_up(rec, master)
        assert rec.status()["error"] is None
    finally:
        rec.stop()


def test_kill_of_master_then_replay_holds_every_acknowledged_id(master, state_dir):
    rec = mybinlog.BinlogReceiver("shop", "r1", state_dir)
    rec.update(master.source())
    image = image_of(master, os.path.join(master.base, "image"))
    assert mybinlog.read_position(image).file.startswith("mysql-bin.")
    app = Appender(master, 0)
    master.sql("CREATE TABLE shop.noise (x INT)")
    writer = subprocess.Popen(master.client() + ["--delimiter=//", "-e", "BEGIN NOT ATOMIC DECLARE i INT DEFAULT 0; "
                                                 "WHILE i < 100000 DO INSERT INTO shop.noise VALUES (i); "
                                                 "SET i = i + 1; END WHILE; END"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        app.start()
        while len(app.acked) < 300:
            time.sleep(0.05)
        master.sql("FLUSH BINARY LOGS")  # the log after the image spans two files
        while len(app.acked) < 600:
            time.sleep(0.05)
        confirmed = len(app.acked)  # every id acknowledged before this is in the master's binlog now...
        caught_up(rec, master)      # ...and then in the replica's copy
        master.kill()
        app.join(30)
        writer.wait(30)
    finally:
        app.halt.set()
        rec.stop()
    acked = app.acked
    copy = fresh_copy(image, os.path.join(master.base, "promoted"))
    res = mybinlog.replay({}, copy, rec.dir)
    assert res["files"] >= 2 and res["from"] == str(mybinlog.read_position(image))
    have = ids_in(copy)
    assert set(acked[:confirmed]) <= set(have)
    assert have == list(range(1, len(have) + 1))  # a prefix: no hole, nothing made up
    assert len(have) <= len(acked) + 1            # at most the one in flight when the master died


def test_replay_to_a_target_time_stops_there(master, state_dir):
    rec = mybinlog.BinlogReceiver("shop", "r1", state_dir)
    rec.update(master.source())
    try:
        image = image_of(master, os.path.join(master.base, "image"))
        master.sql("INSERT INTO shop.acks (n) VALUES (1), (2)")
        target = int(time.time()) + 1
        while time.time() < target + 0.05:  # the next statements are stamped in the target's second or later
            time.sleep(0.05)
        master.sql("INSERT INTO shop.acks (n) VALUES (3), (4)")
        caught_up(rec, master)
    finally:
        rec.stop()
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(target))
    res = mybinlog.replay({}, fresh_copy(image, os.path.join(master.base, "a")), rec.dir, target_time=at)
    assert res["note"] == f"applied up to {at} UTC"
    assert ids_in(os.path.join(master.base, "a")) == [1, 2]
    assert ids_in_all(image, master, rec.dir) == [1, 2, 3, 4]


def ids_in_all(image: str, m: Master, received: str) -> list[int]:
    copy = fresh_copy(image, os.path.join(m.base, "all"))
    mybinlog.replay({}, copy, received)
    return ids_in(copy)


def test_nothing_received_keeps_the_image(master, state_dir):
    image = image_of(master, os.path.join(master.base, "image"))
    res = mybinlog.replay({}, fresh_copy(image, os.path.join(master.base, "p")), os.path.join(state_dir, "none"))
    assert res["files"] == 0 and "image alone" in res["note"]


def test_failed_replay_says_why_and_leaves_no_server(master, state_dir):
    rec = mybinlog.BinlogReceiver("shop", "r1", state_dir)
    rec.update(master.source())
    try:
        image = image_of(master, os.path.join(master.base, "image"))
        master.sql("INSERT INTO shop.acks (n) VALUES (1); FLUSH BINARY LOGS; INSERT INTO shop.acks (n) VALUES (2)")
        caught_up(rec, master)
    finally:
        rec.stop()
    first = os.path.join(rec.dir, mybinlog.read_position(image).file)
    size = os.path.getsize(first)
    with open(first, "r+b") as f:  # damage the middle of the first file's events after the image
        f.seek(size - 60)
        f.write(b"\xff" * 8)
    copy = fresh_copy(image, os.path.join(master.base, "p"))
    with pytest.raises(WalReplayFailed) as err:
        mybinlog.replay({}, copy, rec.dir)
    assert "cannot be read" in str(err.value) and "\n" not in str(err.value)
    out = subprocess.run(["pgrep", "-f", f"--datadir={copy}"], capture_output=True, text=True).stdout
    assert not out.strip()
    os.unlink(os.path.join(copy, mybinlog.POSITION_FILE))
    with pytest.raises(WalReplayFailed, match="pit-binlog-position"):
        mybinlog.replay({}, copy, rec.dir)


def test_restore_at_a_second_rolls_the_image_forward_from_the_archived_binlog(master, state_dir):
    """`pit restore SET --at TIME`: the image's snapshot, then the binlog archived as set SET.binlog (what a
    replica's agent does with archive_into), replayed up to TIME through the pit.restore_at entry point."""
    import datetime
    import json

    from store.ingest import create_snapshot
    from store.repository import Repository
    from test_repl_helpers import pit

    repo_path = os.path.join(state_dir, "repo")
    pit("--repo", repo_path, "init")
    repo = Repository(repo_path)
    lock = threading.Lock()
    img = os.path.join(master.base, "images", "data")
    s = SetConfig(master="primary", replicas=("r1",), paths=(img,),
                  app={"template": "mysql", "binlog": "stream", "data": img})
    rec = mybinlog.BinlogReceiver("shop", "r1", os.path.join(state_dir, "st"),
                                  archive=lambda d, h: mybinlog.archive_into(repo, lock, "shop", s, d, h, "r1"))
    rec.update(master.source())
    try:
        master.sql("INSERT INTO shop.acks (n) VALUES (1)")
        image_of(master, img)
        with lock:
            create_snapshot(repo, "shop", [img], host="r1", retention=False)
        master.sql("INSERT INTO shop.acks (n) VALUES (2); FLUSH BINARY LOGS; INSERT INTO shop.acks (n) VALUES (3)")
        target = int(time.time()) + 1
        while time.time() < target + 0.05:
            time.sleep(0.05)
        master.sql("INSERT INTO shop.acks (n) VALUES (4)")
        caught_up(rec, master)
        assert rec.archive_now()
        from davserver.provider import restorable_window
        window = restorable_window(repo, "shop")  # what the WebDAV view shows for the set
        assert window is not None and window[0] <= window[1], window
    finally:
        rec.stop()
        repo.close()
    at = datetime.datetime.fromtimestamp(target, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    dest = os.path.join(master.base, "restored")
    res = pit("--repo", repo_path, "restore", "shop", "--at", at, "--target", dest, "--json")
    rolled = json.loads(res.stdout)["rolled_forward"]
    assert rolled["binlog"].startswith("shop.binlog@") and rolled["files"] == 2, rolled
    assert ids_in(mybinlog.find_data_dir(dest)) == [1, 2, 3]


def test_template_options_and_source():
    t = build_set("mysql", "shop", ["/var/lib/mysql"], ["r1"], "primary")
    assert t["app"]["binlog"] == "stream"
    with pytest.raises(TemplateError, match="binlog must be one of"):
        build_set("mysql", "shop", ["/var/lib/mysql"], ["r1"], "primary", {"binlog": "sometimes"})
    with pytest.raises(TemplateError, match="binlog_port"):
        parse_options("mysql", ["binlog_port=many"])
    with pytest.raises(TemplateError, match="absolute"):
        build_set("mysql", "shop", ["/var/lib/mysql"], ["r1"], "primary", {"binlog_password_file": "pw"})
    t = build_set("mysql", "shop", ["/var/lib/mysql"], ["r1"], "primary",
                  ["binlog_port=3307", "binlog_user=repl", "binlog_password_file=/etc/pit/pw"])
    s = SetConfig(master="primary", replicas=("r1",), paths=("/var/lib/mysql",), app=t["app"])
    assert mybinlog.streams_binlog(s)
    src = mybinlog.source_of(s, {"primary": {"address": "10.0.0.1:7000"}})
    assert (src.host, src.port, src.user, src.password_file) == ("10.0.0.1", 3307, "repl", "/etc/pit/pw")
    assert mybinlog.source_of(s, {}) is None
    off = build_set("mysql", "shop", ["/var/lib/mysql"], ["r1"], "primary", {"binlog": "off"})
    assert not mybinlog.streams_binlog(SetConfig(master="primary", replicas=("r1",),
                                                 paths=("/var/lib/mysql",), app=off["app"]))
    assert mybinlog.binlog_dir("/st", "shop") == "/st/binlog/shop"


def test_log_offset_counts_across_files():
    sizes = [("mysql-bin.000001", 1000), ("mysql-bin.000002", 500), ("mysql-bin.000003", 20)]
    assert mybinlog.log_offset(sizes, "mysql-bin.000001", 400) == 400
    assert mybinlog.log_offset(sizes, "mysql-bin.000003", 20) == 1520
    assert mybinlog.log_offset(sizes, "mysql-bin.000000", 4) is None  # purged on the master: unknown
