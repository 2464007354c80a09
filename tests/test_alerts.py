"""Alerts (replicator/ops/alerts.py): a real command writing a file, real mail to an aiosmtpd server on
127.0.0.1 (plain, and STARTTLS with login against a certificate made here), de-duplication, a bounded
queue that never blocks the caller, the watcher over a changing status, and one-line config errors."""
from __future__ import annotations

import copy
import dataclasses
import datetime
import ipaddress
import os
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from replicator.ops.alerts import AlertWatcher, Alerter, classify, validate_alerts
from replicator.errors import ConfigError
from replicator.settings import AgentConfig
from test_repl_helpers import free_port, wait_for

LINE = '{ printf "%s|%s|%s|%s|%s|%s\\n" "$PIT_ALERT_KIND" "$PIT_ALERT_SEVERITY" "$PIT_ALERT_NODE" ' \
       '"$PIT_ALERT_SET" "$PIT_ALERT_REPLICA" "$(cat)"; } >> '


def recorded(path) -> list[list[str]]:
    """One [kind, severity, node, set, replica, message first line] per alert the command saw."""
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path).read().splitlines():
        if line.count("|") >= 5:
            out.append(line.split("|", 5))
    return out


def kinds(path) -> list[str]:
    return [r[0] for r in recorded(path)]


@pytest.fixture
def alerter_file(tmp_path):
    out = tmp_path / "alerts.txt"
    al = Alerter(validate_alerts({"command": LINE + str(out)}), node="r1")
    yield al, out
    al.close()


def test_command_gets_the_alert_in_its_environment_and_on_stdin(tmp_path):
    out = tmp_path / "page.txt"
    script = tmp_path / "page-me"
    script.write_text("#!/bin/sh\n"
                      f"{{ echo \"kind=$PIT_ALERT_KIND severity=$PIT_ALERT_SEVERITY node=$PIT_ALERT_NODE "
                      f"set=$PIT_ALERT_SET\"; echo \"env message=$PIT_ALERT_MESSAGE\"; echo stdin:; cat; }} > {out}\n")
    script.chmod(0o755)
    al = Alerter(validate_alerts({"command": [str(script)]}), node="station-2")
    try:
        assert al.notify("breaker", "set web: mass delete held", "critical", key="web", set="web")
        assert al.flush()
    finally:
        al.close()
    text = out.read_text()
    assert "kind=breaker severity=critical node=station-2 set=web" in text
    assert "env message=set web: mass delete held" in text
    assert text.split("stdin:\n", 1)[1] == "set web: mass delete held\n"


def test_a_failing_command_is_logged_in_one_line_and_the_next_alert_still_goes(tmp_path, caplog):
    out = tmp_path / "after.txt"
    al = Alerter(validate_alerts({"command": f'test "$PIT_ALERT_KIND" != broken || {{ echo "no pager" >&2; exit 3; }}; '
                             f'echo "$PIT_ALERT_KIND" >> {out}'}), node="n")
    try:
        with caplog.at_level("INFO", logger="pit.alerts"):
            al.notify("broken", "first")
            al.notify("fine", "second")
            assert al.flush()
    finally:
        al.close()
    assert out.read_text() == "fine\n"
    lines = [r.getMessage() for r in caplog.records]
    assert any("exited 3" in m and "no pager" in m for m in lines)
    alerts = [m for m in lines if m.startswith("ALERT ")]
    assert len(alerts) == 2 and all("\n" not in m for m in alerts)
    assert alerts[0] == "ALERT warning broken node=n: first"


class Inbox:
    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content.decode()))
        return "250 OK"


@pytest.fixture
def smtpd():
    inbox = Inbox()
    ctl = Controller(inbox, hostname="127.0.0.1", port=free_port())
    ctl.start()
    yield ctl, inbox
    ctl.stop()


def test_mail_reaches_a_real_smtp_server(smtpd):
    ctl, inbox = smtpd
    al = Alerter(validate_alerts({"smtp": {"host": "127.0.0.1", "port": ctl.port, "from": "pit@shop.example",
                           "to": ["owner@shop.example", "it@shop.example"]}}), node="r1")
    try:
        al.notify("failover", "failover: r1 is the primary master now (token 57)\nset web: image X", "critical",
                  key="r1:57", promoted="r1", token=57)
        assert al.flush()
    finally:
        al.close()
    wait_for(lambda: inbox.messages, 10, "the mail")
    sender, rcpts, content = inbox.messages[0]
    assert sender == "pit@shop.example" and rcpts == ["owner@shop.example", "it@shop.example"]
    assert "Subject: [pit critical] r1: failover: r1 is the primary master now (token 57)" in content
    assert "X-Pit-Alert-Kind: failover" in content
    assert "set web: image X" in content and "token: 57" in content and "promoted: r1" in content


def _certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 (the client checks it against it as its CA file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "mail.crt", tmp_path / "mail.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return str(crt), str(pem)


def test_mail_with_starttls_and_login(tmp_path):
    import ssl

    crt, key = _certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(crt, key)
    logins = []

    def authenticator(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and data.login == b"pit" and data.password == b"s3cret pass"
        logins.append((mechanism, ok))
        return AuthResult(success=ok)

    inbox = Inbox()
    ctl = Controller(inbox, hostname="127.0.0.1", port=free_port(), tls_context=tls, require_starttls=True,
                     auth_required=True, authenticator=authenticator)
    ctl.start()
    pw = tmp_path / "smtp-password"
    pw.write_text("s3cret pass\n")
    try:
        al = Alerter(validate_alerts({"smtp": {"host": "127.0.0.1", "port": ctl.port, "from": "pit@shop.example",
                               "to": "owner@shop.example", "starttls": True, "user": "pit",
                               "password_file": str(pw), "cafile": crt}}), node="r1")
        try:
            al.notify("verify_damaged", "set db: verification found damage", "critical", key="db")
            assert al.flush()
        finally:
            al.close()
        wait_for(lambda: inbox.messages, 10, "the mail over STARTTLS")
    finally:
        ctl.stop()
    assert logins and all(ok for _, ok in logins)
    assert "set db: verification found damage" in inbox.messages[0][2]


def test_the_same_alert_is_sent_once_per_repeat_window(alerter_file):
    al, out = alerter_file
    assert al.notify("replica_lag", "set web: r2 behind for 400 s", key="web->r2", set="web", replica="r2")
    assert not al.notify("replica_lag", "set web: r2 behind for 405 s", key="web->r2", set="web", replica="r2")
    assert al.notify("replica_lag", "set web: r3 behind for 401 s", key="web->r3", set="web", replica="r3")
    assert al.notify("replica_disconnected", "set web: r2 disconnected", key="web->r2")
    assert not al.notify("replica_disconnected", "set web: r2 disconnected", key="web->r2")
    # resolved: forgotten (a recurrence alerts at once), with a notice since it had been sent
    assert al.resolve("replica_lag", "web->r2", "resolved: replica lag (web->r2)")
    assert al.notify("replica_lag", "set web: r2 behind for 900 s", key="web->r2", set="web", replica="r2")
    assert not al.resolve("never_sent", "x", "resolved: nothing")
    assert al.flush()
    got = [(r[0], r[4]) for r in recorded(out)]
    assert got == [("replica_lag", "r2"), ("replica_lag", "r3"), ("replica_disconnected", ""),
                   ("replica_lag_resolved", ""), ("replica_lag", "r2")]
    # without a key the message itself is the key
    assert al.notify("set_alert", "source path /srv vanished")
    assert not al.notify("set_alert", "source path /srv vanished")


def test_repeat_minutes_zero_sends_every_time(tmp_path):
    out = tmp_path / "a.txt"
    al = Alerter(validate_alerts({"command": LINE + str(out), "repeat_minutes": 0}), node="n")
    try:
        assert al.notify("k", "m", key="x") and al.notify("k", "m", key="x")
        assert al.flush()
    finally:
        al.close()
    assert kinds(out) == ["k", "k"]


def test_notify_never_blocks_a_full_queue_drops(tmp_path):
    started, release, out = tmp_path / "started", tmp_path / "release", tmp_path / "done"
    cmd = f'touch {started}; while [ ! -e {release} ]; do sleep 0.05; done; echo "$PIT_ALERT_KIND" >> {out}'
    al = Alerter(validate_alerts({"command": cmd}), node="n", queue_size=1)
    try:
        assert al.notify("one", "1")
        wait_for(lambda: started.exists(), 20, "the command to start")  # the worker is busy with "one"
        assert al.notify("two", "2")  # waits in the queue
        assert not al.notify("three", "3")  # the queue is full: dropped, the caller goes on
        assert al.dropped == 1
        release.touch()
        assert al.flush()
        assert al.notify("three", "3")  # a dropped alert was not remembered as sent
        assert al.flush()
    finally:
        release.touch()
        al.close()
    assert out.read_text().split() == ["one", "two", "three"]


# ----------------------------------------------------------------------------- the watcher
HEALTHY = {
    "node": "r1", "primary": "primary", "config_version": 3, "roles": ["secondary station", "replica of db"],
    "sets": {
        "web": {"role": "master", "set": "web", "mode": "mirror", "alerts": [], "stats": {},
                "replicas": {"r2": {"connected": True, "queued": 0, "catchup": False, "acked_batches": 3,
                                    "held_deletes": 0, "bytes_sent": 100, "ops_frames": 0, "last_error": ""}}},
        "db": {"role": "replica", "snapshots": 3, "latest": "2026-11-25T10.00.00Z",
               "latest_time": "2026-11-25T10:00:00Z", "head_pending": False, "alerts": [], "held_deletes": 0,
               "applied": 10, "connected": True,
               "verified": {"result": "good", "time": "2026-11-25T10:01:00Z", "depth": "structural"}},
    },
    "failover": {"phase": "standby", "me": "r1", "primary": "primary", "secondary": "r1", "leader": "primary",
                 "token": 40, "holding": False, "etcd_ok": True, "checks": [], "link": [],
                 "last_promotion": None, "unpromoted": []},
}


class Agent:
    def __init__(self, st: dict, cfg: dict | None = None) -> None:
        self.st = st
        self.cfg = AgentConfig(**cfg) if cfg else None

    def status(self) -> dict:
        return copy.deepcopy(self.st)


class Clock:
    t = 5000.0

    def __call__(self) -> float:
        return self.t


def test_watcher_raises_alerts_as_the_status_changes(tmp_path):
    out = tmp_path / "alerts.txt"
    al = Alerter(validate_alerts({"command": LINE + str(out), "lag_seconds": 300, "disconnect_seconds": 60}), node="r1")
    agent = Agent(copy.deepcopy(HEALTHY))
    clock = Clock()
    w = AlertWatcher(agent, al, clock=clock)
    st = agent.st

    def look() -> list[list[str]]:
        n = len(recorded(out))
        w.check()
        assert al.flush()
        return recorded(out)[n:]

    try:
        assert look() == []  # healthy: nothing
        # r2 disconnected: not at once, after disconnect_seconds; behind: after lag_seconds
        st["sets"]["web"]["replicas"]["r2"].update(connected=False, queued=12, last_error="connection refused")
        assert look() == []
        clock.t += 61
        got = look()
        assert [(r[0], r[3], r[4]) for r in got] == [("replica_disconnected", "web", "r2")]
        assert "connection refused" in got[0][5]
        clock.t += 250
        got = look()
        assert [(r[0], r[4]) for r in got] == [("replica_lag", "r2")]  # 311 s behind; disconnect not repeated
        assert look() == []  # still both: within repeat_minutes
        # r2 back and caught up: both resolved
        st["sets"]["web"]["replicas"]["r2"].update(connected=True, queued=0, acked_batches=9)
        assert sorted(r[0] for r in look()) == ["replica_disconnected_resolved", "replica_lag_resolved"]

        # the breaker on this replica, verify damage, a set alert naming a failed point hook
        st["sets"]["db"].update(held_deletes=400, alerts=["mass delete held: 400 of 500 files (80 %) would be "
                                                          "deleted; `pit release-deletes` lets them through"])
        st["sets"]["db"]["verified"] = {"result": "damaged", "time": "2026-11-25T11:00:00Z", "depth": "deep"}
        st["sets"]["web"]["alerts"] = ["point hook failed: pg_backup_start: exit 2"]
        got = look()
        assert sorted((r[0], r[1], r[3]) for r in got) == [("breaker", "critical", "db"),
                                                          ("hook_failed", "critical", "web"),
                                                          ("verify_damaged", "critical", "db")]
        assert "400" in next(r for r in got if r[0] == "breaker")[5]
        assert look() == []  # the same conditions: nothing new

        # a promotion: who, token, image; a takeover hook that failed
        st["failover"].update(phase="active", leader="r1", token=57, holding=True, last_promotion={
            "reason": "primary's agent silent", "node": "r1", "started": time.time(), "token": 57, "seconds": 3.2,
            "sets": {"web": {"snapshot": "2026-11-25T10.59.00Z", "skipped": [
                {"snapshot": "2026-11-25T11.00.00Z", "reason": "verify: damaged"}]}},
            "takeover_hooks": [{"hook": "systemctl start nginx", "ok": False, "error": "exit 5"}]})
        got = look()
        assert sorted(r[0] for r in got) == ["failover", "hook_failed"]
        msg = open(out).read()
        assert "r1 is the primary master now (token 57)" in msg
        assert "set web: image 2026-11-25T10.59.00Z (1 newer skipped: 2026-11-25T11.00.00Z: verify: damaged)" in msg
        assert look() == []  # the same promotion is not announced twice

        # the disk: a threshold of 100 % free is always crossed
        w.cfg = dataclasses.replace(w.cfg, disk_free_percent=100.0)
        agent.cfg = AgentConfig(state=str(tmp_path))
        got = look()
        assert [r[0] for r in got] == ["disk_full"] and str(tmp_path) in got[0][5]
    finally:
        al.close()


def test_watcher_ignores_the_promotion_it_finds_from_before_it_started(tmp_path):
    out = tmp_path / "alerts.txt"
    al = Alerter(validate_alerts({"command": LINE + str(out)}), node="r1")
    st = copy.deepcopy(HEALTHY)
    st["failover"]["last_promotion"] = {"node": "r1", "started": time.time() - 86400, "token": 12, "sets": {},
                                        "reason": "yesterday"}
    w = AlertWatcher(Agent(st), al, clock=Clock())
    try:
        w.check()
        assert al.flush() and kinds(out) == []
    finally:
        al.close()


def test_watcher_thread_polls_until_stopped(tmp_path):
    out = tmp_path / "alerts.txt"
    al = Alerter(validate_alerts({"command": LINE + str(out), "interval": 0.05}), node="r1")
    agent = Agent(copy.deepcopy(HEALTHY))
    w = AlertWatcher(agent, al).start()
    try:
        agent.st["sets"]["db"]["verified"]["result"] = "damaged"
        wait_for(lambda: "verify_damaged" in kinds(out), 20, "the watcher's alert")
    finally:
        w.stop()
        al.close()
    assert not w.thread.is_alive()
    assert kinds(out).count("verify_damaged") == 1


def test_set_alert_lines_are_classified():
    assert classify("mass delete held: 3 of 4 files")[0] == "breaker"
    assert classify("source path /srv/share vanished: deletions held")[0] == "source_missing"
    assert classify("point hook failed: exit 1") == ("hook_failed", "critical")
    assert classify("cannot save the files cache: disk full")[0] == "set_alert"


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("raw, key", [
    ({"pager": "x"}, "`alerts.pager`"),
    ({"lag_seconds": "soon"}, "`alerts.lag_seconds`"),
    ({"lag_seconds": 0}, "`alerts.lag_seconds`"),
    ({"repeat_minutes": -1}, "`alerts.repeat_minutes`"),
    ({"disk_free_percent": 150}, "`alerts.disk_free_percent`"),
    ({"command": ""}, "`alerts.command`"),
    ({"command": [1, 2]}, "`alerts.command`"),
    ({"smtp": "mail.example.com"}, "`alerts.smtp`"),
    ({"smtp": {"host": "m", "from": "a@b", "to": ["c@d"], "prot": 25}}, "`alerts.smtp.prot`"),
    ({"smtp": {"host": "m", "from": "a@b", "to": ["c@d"], "port": "x"}}, "`alerts.smtp.port`"),
    ({"smtp": {"host": "m", "from": "a@b"}}, "`alerts.smtp.to`"),
    ({"smtp": {"host": "m", "from": "a@b", "to": ["nobody"]}}, "`alerts.smtp.to`"),
    ({"smtp": {"host": "m", "from": "a@b", "to": ["c@d"], "starttls": "yes"}}, "`alerts.smtp.starttls`"),
    ({"smtp": {"host": "m", "from": "a@b", "to": ["c@d"], "user": "u", "password_file": "pw"}},
     "`alerts.smtp.password_file`"),
])
def test_a_bad_key_is_one_line_naming_it(raw, key):
    with pytest.raises(ConfigError) as e:
        validate_alerts(raw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key), msg


def test_validation_fills_defaults():
    cfg = validate_alerts({"command": "/usr/local/bin/page-me",
                           "smtp": {"host": "mail", "from": "pit@x.example", "to": "it@x.example",
                                    "starttls": True}})
    assert cfg.lag_seconds == 300 and cfg.repeat_minutes == 60 and cfg.disk_free_percent == 10
    assert cfg.smtp.port == 587 and cfg.smtp.to == ("it@x.example",)
    assert validate_alerts(None).command is None
    assert validate_alerts({"smtp": {"host": "m", "from": "a@b", "to": ["c@d"], "ssl": True}}).smtp.port == 465


def test_start_alerting_from_the_config_table(tmp_path):
    from replicator.ops.alerts import start_alerting

    out = tmp_path / "alerts.txt"

    class State:
        node = "archive-1"

    agent = Agent(copy.deepcopy(HEALTHY))
    agent.state = State()
    assert start_alerting(agent, None) is None
    al, w = start_alerting(agent, validate_alerts({"command": LINE + str(out), "interval": 0.05}))
    try:
        agent.st["sets"]["db"]["held_deletes"] = 7
        wait_for(lambda: recorded(out), 20, "the breaker alert")
        assert recorded(out)[0][:4] == ["breaker", "critical", "archive-1", "db"]
    finally:
        w.stop()
        al.close()


def test_a_hanging_command_is_killed_with_its_children(tmp_path, caplog):
    pidfile = tmp_path / "child.pid"
    al = Alerter(validate_alerts({"command": f"sleep 600 & echo $! > {pidfile}; wait", "command_timeout": 0.5}), node="n")
    try:
        with caplog.at_level("INFO", logger="pit.alerts"):
            al.notify("k", "m")
            assert al.flush(60)
    finally:
        al.close()
    assert any("killed after" in r.getMessage() for r in caplog.records)
    pid = int(pidfile.read_text())

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ", 1)[1].startswith("Z")  # a zombie until init reaps it
        except FileNotFoundError:
            return True

    wait_for(gone, 10, "the hook's child to be killed")


def test_a_database_log_behind_or_away_is_alerted_and_resolved(tmp_path):
    """wal_lag: a replica's streamed WAL behind by more than `wal_lag_seconds` (the RPO a failover would have)."""
    out = tmp_path / "alerts.txt"
    al = Alerter(validate_alerts({"command": LINE + str(out), "wal_lag_seconds": 10}), node="primary")
    st = {"node": "primary", "primary": "primary", "sets": {"pg": {"wal_replicas": {"error": None, "replicas": {
        "r1": {"slot": "pit_r1", "streaming": True, "lag_bytes": 0, "lag_seconds": 0.01}}}}}}
    agent = Agent(st)
    w = AlertWatcher(agent, al, clock=Clock())

    def look() -> list[list[str]]:
        n = len(recorded(out))
        w.check()
        assert al.flush()
        return recorded(out)[n:]

    try:
        assert look() == []
        st["sets"]["pg"]["wal_replicas"]["replicas"]["r1"].update(streaming=False, lag_bytes=5_000_000,
                                                                   lag_seconds=42.0)
        got = look()
        assert [(r[0], r[3], r[4]) for r in got] == [("wal_lag", "pg", "r1")]
        assert "not streaming for 42 s (5000000 bytes behind)" in got[0][5]
        st["sets"]["pg"]["wal_replicas"]["replicas"]["r1"].update(streaming=True, lag_bytes=0, lag_seconds=0.0)
        assert [r[0] for r in look()] == ["wal_lag_resolved"]
    finally:
        al.close()
