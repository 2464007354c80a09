"""Alerts that reach a person: a command and/or an email, from the agent's own status.

The node's agent config has an optional table:

    [alerts]
    command = "/usr/local/bin/page-me"      # a shell line, or an argv list
    lag_seconds = 300          # a replica behind for longer than this
    wal_lag_seconds = 10       # a replica's streamed database log (WAL) behind by more than this
    repeat_minutes = 60        # the same alert again only after this long
    disconnect_seconds = 60    # a replica disconnected for longer than this
    disk_free_percent = 10     # the repository's / state directory's filesystem
    interval = 5               # seconds between looks at the status

    [alerts.smtp]              # (one line per key: TOML inline tables cannot span lines)
    host = "mail.example.com"
    port = 587                 # also: ssl = true (SMTPS), cafile = "/etc/pit/mail-ca.pem", timeout = 30
    from = "pit@example.com"
    to = ["it@example.com"]
    starttls = true
    user = "pit"
    password_file = "/etc/pit/smtp-password"

`Alerter.notify()` never blocks the caller: alerts go through a bounded
queue to one worker thread, which logs each one as one line, runs the
command (environment PIT_ALERT_KIND, PIT_ALERT_SEVERITY, PIT_ALERT_MESSAGE,
PIT_ALERT_NODE, PIT_ALERT_<FIELD> for each field; the message on stdin) and
sends the mail. The same (kind, key) is sent once per `repeat_minutes`.

`AlertWatcher` polls `agent.status()` every `interval` seconds and raises:
a promotion (failover happened), a failed takeover or point hook, the
mass-delete breaker holding deletions, another open set alert (a vanished
source), a replica disconnected or behind for too long, verify damage, a
set a promotion could not bring up, and a nearly full disk. Conditions that
clear send a short "resolved" notice when their alert had been sent.
"""
from __future__ import annotations

import email.utils
import logging
import os
import queue
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from email.message import EmailMessage

from ..settings import AlertsConfig, build
from .metrics import LagTracker, disk_usage, watched_paths

log = logging.getLogger("pit.alerts")

SEVERITIES = ("info", "warning", "critical")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ----------------------------------------------------------------------------- configuration
def validate_alerts(raw) -> AlertsConfig:
    """The [alerts] table checked and completed with defaults (replicator.settings); ConfigError naming the key."""
    return build(AlertsConfig, {} if raw is None else raw, ("alerts",), "table ([alerts])")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- the alerter
class Alerter:
    """Sends alerts (command, mail) from a worker thread; `notify` only queues them."""

    def __init__(self, cfg: AlertsConfig | None, node: str | None = None, queue_size: int = 100) -> None:
        self.cfg = cfg if cfg is not None else AlertsConfig()
        self.node = node or socket.gethostname()
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.lock = threading.Lock()
        self.sent: dict[tuple[str, str], float] = {}  # (kind, key) -> monotonic time last sent
        self.dropped = 0
        self.count = 0
        self.pending = 0
        self.idle = threading.Condition(self.lock)
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="pit-alerts")
        self.thread.start()

    # ------------------------------------------------------------- caller side
    def notify(self, kind: str, message: str, severity: str = "warning", key: str | None = None, **fields) -> bool:
        """Queue an alert; False when it was a repeat within `repeat_minutes` or the queue was full.
        `key` tells apart alerts of one kind (a set, a replica); by default the message itself."""
        if severity not in SEVERITIES:
            severity = "warning"
        key = str(key if key is not None else message)
        now = time.monotonic()
        with self.lock:
            last = self.sent.get((kind, key))
            if last is not None and now - last < self.cfg.repeat_minutes * 60:
                log.debug("alert %s (%s) repeated within repeat_minutes: not sent again", kind, key)
                return False
            if self.closed:
                return False
            self.sent[(kind, key)] = now
            self.pending += 1
        try:
            self.queue.put_nowait((kind, severity, str(message), fields))
        except queue.Full:
            with self.lock:
                self.pending -= 1
                self.dropped += 1
                self.sent.pop((kind, key), None)
            log.error("alert %s dropped: %d alerts already waiting to be sent: %s", kind, self.queue.qsize(),
                      one_line(message))
            return False
        return True

    def active(self, kind: str, key: str) -> bool:
        """Was (kind, key) sent and not resolved since?"""
        with self.lock:
            return (kind, str(key)) in self.sent

    def resolve(self, kind: str, key: str, message: str | None = None, **fields) -> bool:
        """The condition behind (kind, key) cleared: forget it (a recurrence alerts at once) and, when
        it had been sent and `message` is given, send an info notice `KIND_resolved`."""
        with self.lock:
            was = self.sent.pop((kind, str(key)), None) is not None
        if was and message:
            self.notify(f"{kind}_resolved", message, "info", key=key, **fields)
        return was

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued alert was handled (sent or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.idle.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        with self.lock:
            self.closed = True
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout)

    # ------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                self._deliver(*item)
            except Exception:  # never let one alert stop the others
                log.exception("alert delivery")
            finally:
                with self.idle:
                    self.pending -= 1
                    self.idle.notify_all()

    def _deliver(self, kind: str, severity: str, message: str, fields: dict) -> None:
        self.count += 1
        extra = " ".join(f"{k}={one_line(v)}" for k, v in sorted(fields.items()))
        level = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}[severity]
        log.log(level, "ALERT %s %s node=%s%s: %s", severity, kind, self.node, f" {extra}" if extra else "",
                one_line(message))
        if self.cfg.command:
            self._command(kind, severity, message, fields)
        if self.cfg.smtp:
            self._mail(kind, severity, message, fields)

    def _command(self, kind: str, severity: str, message: str, fields: dict) -> None:
        cmd = self.cfg.command
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        env = {**os.environ, "PIT_ALERT_KIND": kind, "PIT_ALERT_SEVERITY": severity, "PIT_ALERT_MESSAGE": message,
               "PIT_ALERT_NODE": self.node}
        for k, v in fields.items():
            if _FIELD.fullmatch(k):
                env[f"PIT_ALERT_{k.upper()}"] = str(v)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, text=True, start_new_session=True)
        except OSError as exc:
            log.error("alert command %r could not run: %s (alert %s)", _show(cmd), exc, kind)
            return
        try:
            out, err = proc.communicate(message + "\n", timeout=self.cfg.command_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and whatever it started
            except OSError:
                pass
            proc.communicate()
            log.error("alert command %r killed after %gs (alert %s)", _show(cmd), self.cfg.command_timeout, kind)
            return
        if proc.returncode != 0:
            lines = (err or out or "").strip().splitlines()
            tail = one_line(lines[-1]) if lines else ""
            log.error("alert command %r exited %d (alert %s)%s", _show(cmd), proc.returncode, kind,
                      f": {tail}" if tail else "")

    def _mail(self, kind: str, severity: str, message: str, fields: dict) -> None:
        s = self.cfg.smtp
        assert s is not None
        msg = EmailMessage()
        first = message.strip().splitlines()[0] if message.strip() else kind
        msg["Subject"] = one_line(f"[pit {severity}] {self.node}: {first}")[:200]
        msg["From"] = s.from_
        msg["To"] = ", ".join(s.to)
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=s.from_.rpartition("@")[2] or None)
        msg["X-Pit-Alert-Kind"] = kind
        msg["X-Pit-Node"] = self.node
        body = [message, "", f"node: {self.node}", f"kind: {kind}", f"severity: {severity}"]
        body += [f"{k}: {v}" for k, v in sorted(fields.items())]
        body += [f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}"]
        msg.set_content("\n".join(body) + "\n")
        try:
            password = None
            if s.password_file:
                with open(s.password_file) as f:
                    password = f.read().rstrip("\r\n")
            ctx = ssl.create_default_context(cafile=s.cafile) if (s.ssl or s.starttls) else None
            if s.ssl:
                smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=ctx)
            else:
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
            with smtp:
                if s.starttls:
                    smtp.starttls(context=ctx)
                if s.user:
                    smtp.login(s.user, password)
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as exc:
            log.error("alert mail to %s via %s:%s failed (alert %s): %s", ", ".join(s.to), s.host, s.port,
                      kind, one_line(exc))


def _show(cmd) -> str:
    return cmd if isinstance(cmd, str) else " ".join(cmd)


# ----------------------------------------------------------------------------- the watcher
class AlertWatcher:
    """Looks at `agent.status()` every `interval` seconds and raises alerts on what changed."""

    def __init__(self, agent, alerter: Alerter, interval: float | None = None, clock=time.monotonic) -> None:
        self.agent = agent
        self.alerter = alerter
        self.cfg = alerter.cfg
        self.interval = float(interval if interval is not None else self.cfg.interval)
        self.clock = clock
        self.lag = LagTracker(clock)
        self.started = time.time()
        self.first = True
        self.promotion = None  # (node, started, token) of the last promotion seen
        self.set_alerts: set[tuple[str, str]] = set()  # (set, alert text) open at the last look
        self.down_since: dict[tuple[str, str], float] = {}
        self.active: set[tuple[str, str]] = set()  # (kind, key) raised by a condition still present
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> "AlertWatcher":
        self.thread = threading.Thread(target=self._loop, daemon=True, name="pit-alert-watch")
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(10)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self.check()
            except Exception:
                log.exception("alert watcher")
            self.stopped.wait(self.interval)

    # ------------------------------------------------------------- one look
    def check(self, status: dict | None = None) -> None:
        st = self.agent.status() if status is None else status
        now = self.clock()
        present: set[tuple[str, str]] = set()
        raise_ = self._raiser(present)
        sets = st.get("sets") or {}
        open_alerts: set[tuple[str, str]] = set()
        for name, s in sorted(sets.items()):
            self._set(name, s, now, raise_, open_alerts)
        # set alert lines (breaker, vanished source, failed hook, files cache): each new one once
        for name, text in sorted(open_alerts - self.set_alerts):
            kind, sev = classify(text)
            if kind == "breaker":
                continue  # raised by _set with the numbers
            self.alerter.notify(kind, f"set {name}: {text}", sev, key=f"{name}:{text}", set=name)
        self.set_alerts = open_alerts
        if st.get("failover"):
            self._failover(st["failover"], raise_)
        for what, path in sorted(watched_paths(self.agent).items()):
            u = disk_usage(path)
            if u is None or not u[1]:
                continue
            pct = 100.0 * u[0] / u[1]
            if pct < self.cfg.disk_free_percent:
                raise_("disk_full", path, f"{what} filesystem nearly full: {pct:.1f} % free "
                       f"({u[0] // 2**20} MiB of {u[1] // 2**20} MiB) at {path}",
                       "critical" if pct < self.cfg.disk_free_percent / 3 else "warning", what=what, path=path)
        self._resolve(present)
        self.first = False

    def _raiser(self, present: set):
        def raise_(kind: str, key: str, message: str, severity: str = "warning", **fields) -> None:
            present.add((kind, key))
            self.active.add((kind, key))
            self.alerter.notify(kind, message, severity, key=key, **fields)
        return raise_

    def _resolve(self, present: set) -> None:
        for kind, key in sorted(self.active - present):
            self.active.discard((kind, key))
            self.alerter.resolve(kind, key, f"resolved: {kind.replace('_', ' ')} ({key})")

    def _set(self, name: str, s: dict, now: float, raise_, open_alerts: set) -> None:
        for text in s.get("alerts") or []:
            open_alerts.add((name, text))
        reps = s.get("replicas")
        if isinstance(reps, dict):  # master side: each replica's link and lag
            for r, rs in sorted(reps.items()):
                lag = self.lag.update((name, r), rs, now)
                key = f"{name}->{r}"
                scheduled_idle = "runs" in rs and not rs.get("due")
                if rs.get("connected") or scheduled_idle:
                    self.down_since.pop((name, r), None)
                else:
                    since = self.down_since.setdefault((name, r), now)
                    if now - since >= self.cfg.disconnect_seconds:
                        err = rs.get("last_error") or "no error recorded"
                        raise_("replica_disconnected", key, f"set {name}: replica {r} disconnected for "
                               f"{now - since:.0f} s (last error: {err})", "warning", set=name, replica=r)
                if lag > self.cfg.lag_seconds:
                    raise_("replica_lag", key, f"set {name}: replica {r} behind for {lag:.0f} s "
                           f"({rs.get('queued', 0)} paths queued{', catch-up pending' if rs.get('catchup') else ''})",
                           "warning", set=name, replica=r, lag_seconds=int(lag))
                # held deletions are alerted by the replica that holds them (one page, where to act)
        wal = (s.get("wal_replicas") or {}).get("replicas") or {}
        for r, w in sorted(wal.items()):  # master side: the database log streamed to each replica (RPO)
            if (w.get("lag_seconds") or 0) > self.cfg.wal_lag_seconds:
                how = (f"{w['lag_bytes']} bytes behind" if w.get("lag_bytes") is not None else "no slot yet")
                raise_("wal_lag", f"{name}->{r}", f"set {name}: replica {r}'s database log is "
                       + (f"{w['lag_seconds']:.0f} s behind ({how})" if w.get("streaming") else
                          f"not streaming for {w['lag_seconds']:.0f} s ({how}): a failover now loses what it "
                          "lacks"), "warning", set=name, replica=r, lag_seconds=int(w["lag_seconds"]))
        if s.get("role") == "replica" or "snapshots" in s:
            held = s.get("held_deletes") or 0
            texts = [a for a in s.get("alerts") or [] if classify(a)[0] == "breaker"]
            if held or texts:
                raise_("breaker", name, f"set {name}: the mass-delete breaker holds {held} deletions: "
                       + (texts[-1] if texts else f"check the master, then `pit release-deletes --set {name}` here"),
                       "critical", set=name)
            v = s.get("verified")
            if isinstance(v, dict) and v.get("result") == "damaged":
                raise_("verify_damaged", f"{name}@{s.get('latest')}",
                       f"set {name}: verification found damage in snapshot {s.get('latest')} "
                       f"({v.get('depth') or '?'} verify at {v.get('time') or '?'}); run `pit verify` for the "
                       "damaged files, `pit repair` if the index is at fault", "critical", set=name,
                       snapshot=s.get("latest"))

    def _failover(self, fo: dict, raise_) -> None:
        lp = fo.get("last_promotion")
        if isinstance(lp, dict):
            k = (lp.get("node"), lp.get("started"), lp.get("token"))
            new = k != self.promotion and (not self.first or (lp.get("started") or 0) >= self.started)
            self.promotion = k
            if new:
                self._promotion(lp)
        if fo.get("unpromoted"):
            raise_("unpromoted", ",".join(fo["unpromoted"]), "failover: no good image of set(s) "
                   f"{', '.join(fo['unpromoted'])}: not mastered by anyone (see `pit failover status`)",
                   "critical", sets=" ".join(fo["unpromoted"]))
        if fo.get("phase") == "demoted":
            raise_("demoted", fo.get("me") or "", f"this node stopped acting as primary: {fo.get('note') or ''}",
                   "critical")
        if fo.get("etcd_ok") is False:
            raise_("etcd_unreachable", "etcd", "failover: etcd does not answer (no failover is possible while it is "
                   "down; the leader keeps acting only while its lease lasts)", "warning")
        for c in fo.get("checks") or []:
            if isinstance(c, dict) and (c.get("failures") or 0) >= 3:
                raise_("check_failed", str(c.get("check")), f"failover check {c.get('check')} failing "
                       f"({c.get('failures')}x): {c.get('detail') or ''}", "warning", check=c.get("check"))

    def _promotion(self, lp: dict) -> None:
        node, token = lp.get("node"), lp.get("token")
        if lp.get("error"):
            self.alerter.notify("promotion_failed", f"failover: promotion of {node} failed: {lp['error']} "
                                f"(reason: {lp.get('reason')})", "critical", key=f"{node}:{lp.get('started')}",
                                promoted=node)
            return
        parts = []
        for name, r in sorted((lp.get("sets") or {}).items()):
            if not isinstance(r, dict):
                continue
            if "error" in r:
                parts.append(f"set {name}: NOT promoted ({r['error']})")
            else:
                skipped = r.get("skipped") or []
                parts.append(f"set {name}: image {r.get('snapshot')}"
                             + (f" ({len(skipped)} newer skipped: "
                                + "; ".join(f"{x.get('snapshot')}: {x.get('reason')}" for x in skipped) + ")"
                                if skipped else ""))
        self.alerter.notify("failover", f"failover: {node} is the primary master now (token {token}) after "
                            f"{lp.get('seconds', '?')} s; reason: {lp.get('reason')}\n" + "\n".join(parts),
                            "critical", key=f"{node}:{token}", promoted=node, token=token)
        bad = [h for h in lp.get("takeover_hooks") or [] if isinstance(h, dict) and not h.get("ok", True)]
        for h in bad:
            self.alerter.notify("hook_failed", f"failover: takeover hook {h.get('hook')} on {node} failed: "
                                f"{h.get('error')}", "critical", key=f"takeover:{token}:{h.get('hook')}",
                                hook=h.get("hook"))


def classify(text: str) -> tuple[str, str]:
    """(kind, severity) of a set's alert line in the status."""
    t = text.lower()
    if "mass delete" in t:
        return "breaker", "critical"
    if "hook" in t:
        return "hook_failed", "critical"
    if "vanished" in t or "is empty" in t:
        return "source_missing", "critical"
    return "set_alert", "warning"


def start_alerting(agent, cfg: AlertsConfig | None) -> tuple[Alerter, AlertWatcher] | None:
    """From the agent config's [alerts] table (None: no alerts): an Alerter named after the node and
    a started AlertWatcher. Stop with `watcher.stop(); alerter.close()`."""
    if cfg is None:
        return None
    node = getattr(getattr(agent, "state", None), "node", None)
    alerter = Alerter(cfg, node=node)
    watcher = AlertWatcher(agent, alerter).start()
    log.info("alerts: %s; watching the status every %gs",
             ", ".join(filter(None, ["command" if alerter.cfg.command else "",
                                     "mail to " + ", ".join(alerter.cfg.smtp.to) if alerter.cfg.smtp else ""]))
             or "log only", watcher.interval)
    return alerter, watcher
