"""`pit agent`: one node of the cluster, master side, replica side, or both.

Threads: an accept loop on the mTLS listener (one thread per connection),
on the primary a join listener and a config loop (re-reads the cluster file
and roster, versions them and pushes them to every node until each
acknowledges), per mastered set a debounce/scan loop plus one sender per
replica, a consistent-point loop on the replica side, and a local control
socket (`pit point`, `pit status`, `pit release-deletes`).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import threading
import time

from . import config as C
from .errors import ConfigError, NotAuthorised, ReplError
from .failover import handover
from .settings import ClusterConfig, SetConfig
from .stream import protocol
from .stream.master import MasterSet
from .names import parse_address
from .stream.membership import NodeState, connect, peer_identity, serve_join
from .stream.readers import ReaderPool
from .stream.sender import Sender
from .stream.watcher import Watcher

log = logging.getLogger("pit.agent")
POINT_GRACE = 10.0  # seconds a point waits for a replica that was not connected when it was asked


def _create_replica_repo(cfg) -> bool:
    """A replica repository whose agent config names a `backend` (s3://...) is created on first
    use, in its bucket, as `pit init --backend` would (encrypted with the file's `key_file` unless
    `encrypt = false`; a local one is made by `pit join --repo`). False, logged, when it cannot be:
    the replica side waits for the next configuration."""
    if not cfg.backend or os.path.exists(os.path.join(cfg.repo, "config")):
        return True
    from store.errors import StoreError

    from . import repos

    try:
        repos.create(cfg.repo, cfg.backend, cfg.s3_endpoint, cfg.key_file, cfg.encrypt).close()
    except StoreError as exc:
        log.error("cannot create the replica repository %s in %s: %s", cfg.repo, cfg.backend, exc)
        return False
    log.info("created the replica repository %s with its packs in %s", cfg.repo, cfg.backend)
    return True


class Agent:
    def __init__(self, cfg_path: str) -> None:
        self.cfg = C.load_agent_config(cfg_path)
        self.state = NodeState(self.cfg.state)
        self.listen = self.cfg.listen or self.state.address
        self.cluster_file = self.cfg.cluster
        if self.state.is_primary and not self.cluster_file:
            raise ConfigError("the primary's agent config needs `cluster` (the sets file)")
        self.config = C.load_pushed(self.state.path) if not self.state.is_primary else ClusterConfig()
        self.masters: dict[str, MasterSet] = {}
        self.replica = None
        self.watcher = Watcher()
        self.readers = ReaderPool()  # worker processes reading the mastered sets' files (stream/readers.py)
        self.conns: dict[protocol.Conn, tuple[str, str]] = {}
        self.conns_lock = threading.Lock()
        self.apply_lock = threading.RLock()
        self.stopped = threading.Event()
        self.pushed: dict[str, int] = {}
        self.pushing: set[str] = set()
        self.next_push: dict[str, float] = {}
        self.point_seq = 0
        self._point_seq_lock = threading.Lock()
        self._roster_cache = (0.0, {})
        self.failover = None  # failover.Failover when the cluster file has [failover]
        self.metrics_server = None
        self.alerting = None  # (Alerter, AlertWatcher)
        self._applied: dict[str, SetConfig] = {}  # the effective sets last applied
        # set -> the database log streamed here between points: apps.pgwal.WalReceiver (PostgreSQL) or
        # stream.logship.LogReceiver (SQLite, shipped by the master's agent)
        self.wal: dict = {}
        # set -> on the master, each replica's lag: apps.pgwal.WalMonitor or stream.logship.LogShipping
        self.wal_lag: dict = {}

    # ----------------------------------------------------------------- cluster view
    def roster(self) -> dict:
        if self.state.is_primary:
            now = time.monotonic()
            if now - self._roster_cache[0] > 0.2:
                self._roster_cache = (now, self.state.roster())
            return self._roster_cache[1]
        return self.config.roster

    def configured_sets(self) -> dict[str, SetConfig]:
        """The cluster's sets with this node's own application settings (its `app`) over theirs."""
        return C.with_local_app(self.config.sets, self.cfg.app)

    def sets(self) -> dict[str, SetConfig]:
        """The sets as they stand now (after a failover the protected sets have another master)."""
        sets = self.configured_sets()
        return self.failover.effective(sets) if self.failover is not None else sets

    def fencing_token(self) -> int:
        return self.failover.token() if self.failover is not None else 0

    def reconfigure(self) -> None:
        """Leadership changed: start or stop masters and the replica side to match."""
        if self.config:
            self.apply_config(self.config)

    def ping(self, node: str, timeout: float = 1.0) -> bool:
        """Is `node`'s agent answering here (TCP, mTLS handshake and HELLO)?"""
        addr = self.roster().get(node, {}).get("address")
        if not addr:
            return False
        try:
            sock, peer = connect(self.state, addr, timeout=timeout)
        except (OSError, ReplError, ssl.SSLError):
            return False
        conn = protocol.Conn(sock, node, heartbeat=False, dead_after=timeout * 2)
        try:
            protocol.hello(conn, self.state.node, "ping")
            return peer == node
        except (OSError, ReplError, ssl.SSLError):
            return False
        finally:
            conn.close()

    def authorise(self, node: str, fp: str) -> None:
        r = self.roster() if (self.state.is_primary or self.config.roster) else None
        self.state.authorise(node, fp, r)

    # ----------------------------------------------------------------- config
    def apply_config(self, cfg: ClusterConfig) -> None:
        with self.apply_lock:
            old_sets = self._applied
            self.config = cfg
            self._failover_config(cfg)
            me = self.state.node
            sets = self._applied = self.sets()
            # master side
            for name, ms in list(self.masters.items()):
                if name not in sets or sets[name] != old_sets.get(name) or sets[name].master != me:
                    ms.stop()
                    self.watcher.unwatch(name)
                    del self.masters[name]
            for name, s in sets.items():
                if s.master == me and name not in self.masters:
                    ms = MasterSet(self, name, s)
                    self.masters[name] = ms
                    threading.Thread(target=self._start_master, args=(ms,), daemon=True,
                                     name=f"pit-master-{name}").start()
            # replica side
            if any(me in s.replicas for s in sets.values()) and self.replica is None:
                if not self.cfg.repo:
                    log.error("this node replicates sets but its agent config names no `repo`")
                elif _create_replica_repo(self.cfg):
                    from .stream.replica import ReplicaSide

                    self.replica = ReplicaSide(self, self.cfg.repo, key_file=self.cfg.key_file)
            self._wal_receivers(sets)
            self._drop_unauthorised()
            log.info("configuration version %s applied (%d sets)", cfg.version, len(sets))

    def _wal_receivers(self, sets: dict[str, SetConfig]) -> None:
        """For each set whose app streams its database log: on its master, the lag monitor (PostgreSQL, MariaDB)
        or the shippers (SQLite); on its replicas, a receiver following the set's current master. Each stops when the
        set stops streaming or this node's role in it changes."""
        from .apps import mybinlog, pgwal, sqlitewal
        from .stream.logship import LogReceiver, LogShipping

        me = self.state.node

        def streams(s: SetConfig) -> str | None:
            return "pg" if pgwal.streams_wal(s) else "sqlite" if sqlitewal.streams_sqlite(s) else \
                "mysql" if mybinlog.streams_binlog(s) else None

        mastered = {n: s for n, s in sets.items() if s.master == me and streams(s)}
        monitors = {"pg": pgwal.WalMonitor, "sqlite": LogShipping, "mysql": mybinlog.BinlogMonitor}
        for name in [n for n, m in self.wal_lag.items() if n not in mastered
                     or not isinstance(m, monitors[streams(mastered[n])])]:
            self.wal_lag.pop(name).stop()
        for name, s in mastered.items():
            if streams(s) == "pg":
                self.wal_lag.setdefault(name, pgwal.WalMonitor(name)).update(s.app or {}, s.replicas)
            elif streams(s) == "mysql":
                self.wal_lag.setdefault(name, mybinlog.BinlogMonitor(name, self.remote_status)).update(
                    s.app or {}, s.replicas)
            else:
                self.wal_lag.setdefault(name, LogShipping(name, self.state.path)).update(s)
        want = {n: s for n, s in sets.items() if me in s.replicas and s.master and streams(s)}
        kinds = {"pg": pgwal.WalReceiver, "sqlite": LogReceiver, "mysql": mybinlog.BinlogReceiver}
        for name in [n for n, r in self.wal.items() if n not in want or not isinstance(r, kinds[streams(want[n])])]:
            self.wal.pop(name).stop()
        roster = self.roster() if want else {}
        for name, s in want.items():
            rec = self.wal.get(name)
            if streams(s) == "sqlite":
                if rec is None:
                    archive = (lambda d, n=name: self._archive_log(n, d)) if self.replica is not None else None
                    rec = self.wal[name] = LogReceiver(name, self.state.path, self._log_connect(name), archive)
                rec.update(s.master)
                continue
            mod = mybinlog if streams(s) == "mysql" else pgwal
            if rec is None:
                archive = (lambda d, h, n=name, m=mod: self._archive_wal(n, d, h, m)) if self.replica is not None \
                    else None
                rec = self.wal[name] = (mybinlog.BinlogReceiver if mod is mybinlog else pgwal.WalReceiver)(
                    name, me, self.state.path, archive=archive)
            rec.update(mod.source_of(s, roster))

    def _log_connect(self, set_name: str):
        """How a SQLite set's receiver reaches the master's agent (HELLO kind `logship`)."""
        def connect_to(master: str) -> protocol.Conn:
            addr = self.roster().get(master, {}).get("address")
            if not addr:
                raise ReplError(f"{master} is not in the roster")
            sock, peer = connect(self.state, addr, timeout=10)
            conn = protocol.Conn(sock, master)
            try:
                protocol.hello(conn, self.state.node, "logship", set_name, self.fencing_token())
            except BaseException:
                conn.close()
                raise
            return conn
        return connect_to

    def _archive_log(self, name: str, directory: str) -> None:
        from .apps import sqlitewal

        rep = self.replica
        sqlitewal.archive_into(rep.repo, rep.lock, name, self._applied.get(name), directory, self.state.node)

    def _archive_wal(self, name: str, directory: str, history: str, mod) -> None:
        """A received log (apps/pgwal.py or apps/mybinlog.py: the same archive_into) into the repository."""
        rep = self.replica
        mod.archive_into(rep.repo, rep.lock, name, self._applied.get(name), directory, history, self.state.node)

    def stop_wal(self, name: str, kind: str = "pg"):
        """Stop the set's log receiver (a promotion is about to replay what it received) -> its directory."""
        from .apps import mybinlog, pgwal, sqlitewal

        with self.apply_lock:
            rec = self.wal.pop(name, None)
        if rec is not None:
            rec.stop()
        return {"pg": pgwal.wal_dir, "sqlite": sqlitewal.ship_dir, "mysql": mybinlog.binlog_dir}[kind](
            self.state.path, name)

    def _failover_config(self, cfg: ClusterConfig) -> None:
        fcfg = cfg.failover
        fo = self.failover
        if fo is not None and fcfg is not None and fcfg != fo.cfg and cfg.primary == fo.primary \
                and fcfg.key == fo.cfg.key:
            fo.update(fcfg)  # applied in place: a primary keeps its lease, a secondary its watch
        elif fo is not None and (fcfg is None or fcfg != fo.cfg or cfg.primary != fo.primary):
            if fo.lead.is_leader():
                log.error("failover configuration changed its primary, leader key or removed [failover] while "
                          "this node holds the leader key: kept the running controller (hand over first)")
                return
            log.warning("failover configuration changed: restarting the failover controller")
            fo.stop()
            self.failover = None
        if fcfg is not None and self.failover is None:
            from .failover.controller import Failover

            self.failover = Failover(self, fcfg, cfg.primary or self.state.primary)
            self.failover.start()

    def _start_master(self, ms: MasterSet) -> None:
        # The first full scan completes before any sender starts: a catch-up
        # against a half-built tree would look like mass deletion.
        try:
            ms.load()
            if not ms.schedule:  # scheduled sets are scanned at their times, not watched
                self.watcher.watch(ms)
            ms.full_scan()
        except Exception:
            log.exception("set %s: initial scan failed", ms.name)
        if ms.stopped:
            return
        for r in ms.cfg.replicas:
            s = Sender(ms, r)
            ms.senders[r] = s
            s.start()
        ms.run()

    def _drop_unauthorised(self) -> None:
        with self.conns_lock:
            items = list(self.conns.items())
        for conn, (node, fp) in items:
            try:
                self.authorise(node, fp)
            except NotAuthorised:
                log.warning("closing the connection of %s: no longer in the roster", node)
                conn.close()

    def _config_loop(self) -> None:
        """Primary: notice changes of the sets file or roster, version them, push to every node."""
        last = None
        while not self.stopped.is_set():
            try:
                cluster = C.load_cluster(self.cluster_file)
                self._roster_cache = (0.0, {})
                cfg = C.versioned(self.state.path, cluster.sets, self.roster(), self.state.node, cluster.failover)
                if last is None or cfg.version != last:
                    last = cfg.version
                    self.apply_config(cfg)
                self._push(cfg)
            except ReplError as exc:
                log.error("cluster configuration: %s (keeping version %s)", exc, last)
            except Exception:
                log.exception("config loop")
            self.stopped.wait(0.5)

    def _push(self, cfg: ClusterConfig) -> None:
        now = time.monotonic()
        for node, ent in cfg.roster.items():
            if node == self.state.node or self.pushed.get(node) == cfg.version or node in self.pushing:
                continue
            if self.next_push.get(node, 0) > now:
                continue
            self.pushing.add(node)
            threading.Thread(target=self._push_one, args=(node, ent["address"], cfg), daemon=True).start()

    def _push_one(self, node: str, address: str, cfg: ClusterConfig) -> None:
        try:
            sock, peer = connect(self.state, address, timeout=3)
            conn = protocol.Conn(sock, node, heartbeat=False, dead_after=10)
            try:
                if peer != node:
                    raise NotAuthorised(f"{address} is {peer}, not {node}")
                protocol.hello(conn, self.state.node, "config")
                conn.send({"t": "config", "cfg": cfg.to_wire()})
                ack = conn.recv("config_ack")
                self.pushed[node] = ack["version"]
            finally:
                conn.close()
        except Exception as exc:
            log.debug("config push to %s: %s", node, exc)
            self.next_push[node] = time.monotonic() + 2.0
        finally:
            self.pushing.discard(node)

    # ----------------------------------------------------------------- listeners
    def _listen_socket(self, address: str) -> socket.socket:
        host, port = parse_address(address)
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
        return s

    def _accept_loop(self, lsock: socket.socket, handler) -> None:
        while not self.stopped.is_set():
            try:
                raw, addr = lsock.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(raw, addr), daemon=True).start()

    def _handle(self, raw: socket.socket, addr) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            protocol.tune_socket(raw)
            raw.settimeout(10)
            sock = self.server_ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.info("refused %s: TLS: %s", peer, exc)
            raw.close()
            return
        conn = None
        try:
            node, fp = peer_identity(sock)
            self.authorise(node, fp)
            conn = protocol.Conn(sock, node)
            with self.conns_lock:
                self.conns[conn] = (node, fp)
            msg = protocol.accept_hello(conn, self.state.node)
            if msg["node"] != node:
                conn.fail("identity", "HELLO names another node than the certificate")
                raise NotAuthorised(f"{node} claimed to be {msg['node']!r}")
            if msg["kind"] == "ping":
                protocol.welcome(conn, self.state.node)
            elif msg["kind"] == "status":
                protocol.welcome(conn, self.state.node)
                conn.send({"t": "status_reply", "status": self.status()})
            elif msg["kind"] == "repl":
                fo = self.failover
                if fo is not None and msg["set"] in fo.protected(self.config.sets):
                    try:
                        fo.admit(node, int(msg.get("token") or 0), msg["set"])
                    except NotAuthorised as exc:
                        conn.fail("fenced", str(exc))
                        raise
                if self.replica is None:
                    conn.fail("role", "this node replicates no set")
                    return
                self.replica.serve(conn, node, fp, msg["set"])
            elif msg["kind"] == "logship":
                self._serve_log(conn, node, msg["set"])
            elif msg["kind"] == "failback":
                fo = self.failover
                if fo is None or node != fo.primary:
                    conn.fail("role", "only the configured primary may ask for a failback")
                    raise NotAuthorised(f"{node} asked for a failback")
                protocol.welcome(conn, self.state.node)
                try:
                    handover.serve(fo, conn, node)
                except ReplError as exc:
                    log.error("failback to %s: %s", node, exc)
            elif msg["kind"] == "config":
                if node != self.state.primary:
                    conn.fail("role", "only the primary pushes configuration")
                    raise NotAuthorised(f"{node} tried to push configuration")
                protocol.welcome(conn, self.state.node)
                cfg = C.check_pushed(conn.recv("config")["cfg"])
                if cfg.version >= self.config.version:
                    C.save_pushed(self.state.path, cfg)
                    self.apply_config(cfg)
                conn.send({"t": "config_ack", "version": cfg.version})
            else:
                conn.fail("kind", f"{msg['kind']} is not served on this port")
        except (ReplError, ssl.SSLError, OSError) as exc:
            log.info("connection from %s ended: %s", peer, exc)
        except Exception:
            log.exception("connection from %s", peer)
        finally:
            if conn is not None:
                with self.conns_lock:
                    self.conns.pop(conn, None)
                conn.close()
            else:
                try:
                    sock.close()
                except OSError:
                    pass

    def _serve_log(self, conn: protocol.Conn, node: str, set_name) -> None:
        """A replica pulls a SQLite set's shipped log (stream/logship.py): only a replica of a set this node
        masters now."""
        s = self.sets().get(set_name) if isinstance(set_name, str) else None
        ship = self.wal_lag.get(set_name) if s is not None else None
        if s is None or node not in s.replicas or not hasattr(ship, "serve"):
            conn.fail("role", f"this node ships no database log of set {set_name!r} to {node}")
            raise NotAuthorised(f"{node} asked for the log of set {set_name!r}")
        protocol.welcome(conn, self.state.node)
        ship.serve(conn, node)

    def _handle_join(self, raw: socket.socket, addr) -> None:
        try:
            protocol.tune_socket(raw)
            raw.settimeout(15)
            sock = self.join_ctx.wrap_socket(raw, server_side=True)
            conn = protocol.Conn(sock, f"{addr[0]}:{addr[1]}", heartbeat=False, dead_after=15)
            try:
                node = serve_join(conn, self.state, sock)
                log.info("node %s joined", node)
            finally:
                conn.close()
        except Exception as exc:
            log.info("join from %s refused: %s", addr[0], exc)
            try:
                raw.close()
            except OSError:
                pass

    # ----------------------------------------------------------------- control socket
    def _control_loop(self, lsock: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                raw, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._control, args=(raw,), daemon=True).start()

    def _control(self, raw: socket.socket) -> None:
        conn = protocol.Conn(raw, "control", heartbeat=False, dead_after=120)
        try:
            msg = conn.recv("ctl")
            try:
                result = self.control(msg["cmd"], msg["args"])
                conn.send({"t": "ctl_reply", "ok": True, "result": result, "code": 0})
            except ReplError as exc:
                conn.send({"t": "ctl_reply", "ok": False, "result": str(exc), "code": exc.exit_code})
        except Exception as exc:
            log.info("control: %s", exc)
        finally:
            conn.close()

    def control(self, cmd: str, args: dict):
        if cmd == "status":
            return self.status()
        name = args.get("set")
        if cmd == "point":
            if name in self.masters:
                return self.master_point(self.masters[name], float(args.get("timeout", 60)))
            if self.replica is not None and name in self.sets() and self.state.node in self.sets()[name].replicas:
                return {self.state.node: {"snapshot": self.replica.point(name, self.sets()[name])}}
            raise ConfigError(f"this node neither masters nor replicates set {name!r}")
        if cmd == "cluster-status":
            return self.cluster_status()
        if cmd in ("failover", "promote", "failback"):
            fo = self.failover
            if fo is None:
                raise ConfigError("this cluster has no [failover] configuration")
            if cmd == "failover":
                return fo.status()
            if cmd == "promote":
                return fo.promote("asked by the operator", force=bool(args.get("force")),
                                  pins=args.get("pins") or None, at=args.get("at"))
            return fo.failback()
        if cmd == "release-deletes":
            if self.replica is None or name not in self.sets():
                raise ConfigError(f"this node does not replicate set {name!r}")
            self.replica.release(name)
            return "released"
        raise ConfigError(f"unknown control command {cmd!r}")

    def next_point_id(self) -> int:
        """A point id unique in this agent's life (points are asked from several threads: `pit point`, a
        schedule, a term's first point, a failback's final point)."""
        with self._point_seq_lock:
            self.point_seq += 1
            return self.point_seq

    def master_point(self, ms: MasterSet, timeout: float, scheduled: bool = False) -> dict:
        """A consistent point on every replica, inside the set's point hooks (`app.pre`/`app.post`:
        e.g. pg_backup_start/stop); a failing hook fails the point, it never passes silently. A
        scheduled point whose pre hook fails is still made, and marked failed on every replica (the
        schedule keeps its rhythm; image selection skips that image)."""
        from .errors import HookFailed, PointFailed
        from .apps.hooks import around_point

        seq = self.next_point_id()
        out: dict = {}

        def make_points() -> None:
            ms.flush()
            now = time.monotonic()
            # A replica its sender cannot reach when the point is asked (not connected, and its last try
            # failed: a dead old primary after a failover, a replica rebooting) gets a short grace to come
            # back, then is skipped: the point, and the application's backup mode around it, never waits
            # on an unreachable node. (A scheduled sender between runs is idle, not failing: it connects.)
            absent = {r for r, s in ms.senders.items() if not s.connected and s.last_error}
            deadlines = {r: now + (min(timeout, POINT_GRACE) if r in absent else timeout) for r in ms.senders}
            slots = {r: s.request_point(seq, deadlines[r] - 1.0) for r, s in ms.senders.items()}
            for r, slot in slots.items():
                slot["done"].wait(max(0.0, deadlines[r] - time.monotonic()))
                last = ms.senders[r].last_error
                res = slot["result"] or {"error": "timed out" + (f"; last error: {last}" if last else "")}
                if "error" in res and r in absent:
                    res = {"skipped": f"not connected: {res['error']}"}
                out[r] = res
            bad = {r: v["error"] for r, v in out.items() if "error" in v}
            if bad or (out and not any("snapshot" in v for v in out.values())):
                raise PointFailed("no consistent point on " + ", ".join(
                    f"{r} ({v.get('error') or v.get('skipped')})" for r, v in out.items() if "snapshot" not in v))
            for r, v in out.items():
                if "skipped" in v:
                    log.warning("set %s: point %d skipped %s (%s)", ms.name, seq, r, v["skipped"])

        try:
            with around_point(ms.cfg, seq, set_name=ms.name):
                make_points()
        except HookFailed as exc:
            from .ops import metrics

            metrics.inc("point_hook_failures", set=ms.name)
            if self.alerting is not None:
                self.alerting[0].notify("hook_failed", f"set {ms.name}: {exc}", "critical",
                                        key=f"{ms.name}:point", set=ms.name)
            if scheduled and not out:
                make_points()
            marks = [ms.senders[r].request_mark(v["snapshot"], False, str(exc), time.monotonic() + 60)
                     for r, v in out.items() if v.get("snapshot") and r in ms.senders]
            for slot in marks:  # the images are marked failed before the command returns
                slot["done"].wait(65)
            made = ", ".join(f"{r}: {v['snapshot']}" for r, v in out.items() if v.get("snapshot"))
            raise PointFailed(f"set {ms.name}: {exc}" + (f" (snapshots made: {made}; marked failed, do not "
                                                           "trust them as consistent)" if made else "")) from None
        return out

    def remote_status(self, node: str, timeout: float = 3.0) -> dict:
        addr = self.roster().get(node, {}).get("address")
        if not addr:
            return {"error": "not in the roster"}
        try:
            sock, peer = connect(self.state, addr, timeout=timeout)
        except (OSError, ReplError, ssl.SSLError) as exc:
            return {"error": f"unreachable: {exc}"}
        conn = protocol.Conn(sock, node, heartbeat=False, dead_after=timeout * 3)
        try:
            protocol.hello(conn, self.state.node, "status")
            return conn.recv("status_reply")["status"]
        except (OSError, ReplError, ssl.SSLError) as exc:
            return {"error": f"no status: {exc}"}
        finally:
            conn.close()

    def cluster_status(self) -> dict:
        """Every node's own status, asked over mTLS in parallel (a dead node costs one timeout)."""
        nodes = sorted(set(self.roster()) | {self.state.node})
        out: dict = {}

        def ask(n: str) -> None:
            out[n] = self.status() if n == self.state.node else self.remote_status(n)

        threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        fo = self.failover.status() if self.failover is not None else None
        return {"asked_by": self.state.node, "time": time.time(), "primary": self.state.primary,
                "leader": fo["leader"] if fo else self.state.primary, "token": fo["token"] if fo else None,
                "nodes": {n: out.get(n, {"error": "no answer"}) for n in nodes}}

    def status(self) -> dict:
        out = {"node": self.state.node, "primary": self.state.primary, "config_version": self.config.version or None,
               "sets": {}}
        for name, ms in list(self.masters.items()):  # a scrape may race with apply_config
            out["sets"][name] = ms.status()
        if self.replica is not None:
            for name, st in self.replica.status().items():
                out["sets"].setdefault(name, {}).update(st)
            self._verification(out["sets"])
        for name, rec in list(self.wal.items()):
            st = rec.status()
            if "streaming" in st and "running" not in st:  # the binlog receiver: in the shape every receiver has
                st = {**st, "running": st["streaming"], "master": rec.source.master if rec.source else None,
                      "newest_segment": st.get("file")}
            out["sets"].setdefault(name, {})["wal"] = st
        for name, mon in list(self.wal_lag.items()):
            out["sets"].setdefault(name, {})["wal_replicas"] = mon.status()
        if self.state.is_primary:
            out["pushed"] = dict(self.pushed)
        roles = []
        if self.failover is not None:
            out["failover"] = fo = self.failover.status()
            roles.append({"active": "primary master", "fenced": "fenced (old primary)",
                          "standby": "secondary station"}.get(fo["phase"], fo["phase"]))
        if self.masters and not roles[:1] == ["primary master"]:
            roles.append("master of " + ", ".join(sorted(self.masters)))
        if self.replica is not None:
            reps = sorted(n for n, s in self.sets().items() if self.state.node in s.replicas)
            if reps:
                roles.append("replica of " + ", ".join(reps))
        out["roles"] = roles
        return out

    def _verification(self, sets: dict) -> None:
        """The latest snapshot's verification record per replicated set (from `pit verify` or selection)."""
        from store.snapmeta import get_meta
        from store.snapshots import list_snapshots

        repo = self.replica.repo
        try:
            with repo.reading() as txn:
                for name, st in sets.items():
                    snaps = list_snapshots(repo, txn, name)
                    if not snaps:
                        continue
                    meta = get_meta(repo, txn, snaps[-1].id)
                    v = meta.get("verify") or {}
                    st["latest_time"] = snaps[-1].time_iso
                    st["verified"] = {"result": v.get("result", "never"), "time": v.get("time"),
                                      "depth": v.get("depth")}
        except Exception as exc:  # status must answer even when the index is busy or damaged
            log.info("status: verification state unavailable: %s", exc)

    # ----------------------------------------------------------------- run
    def run(self) -> None:
        self.server_ctx = self.state.server_context()
        lsock = self._listen_socket(self.listen)
        socks = [lsock]
        threading.Thread(target=self._accept_loop, args=(lsock, self._handle), daemon=True).start()
        if self.state.is_primary:
            self.join_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.join_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            self.join_ctx.load_cert_chain(self.state.file("node.crt"), self.state.file("node.key"))
            jsock = self._listen_socket(self.state.info["join_address"])
            socks.append(jsock)
            threading.Thread(target=self._accept_loop, args=(jsock, self._handle_join), daemon=True).start()
        ctl_path = self.cfg.control or self.state.file("agent.sock")
        try:
            os.unlink(ctl_path)
        except FileNotFoundError:
            pass
        csock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            csock.bind(ctl_path)
        finally:
            os.umask(old)
        csock.listen(8)
        socks.append(csock)
        threading.Thread(target=self._control_loop, args=(csock,), daemon=True).start()
        if self.state.is_primary:
            threading.Thread(target=self._config_loop, daemon=True, name="pit-config").start()
        elif self.config:
            self.apply_config(self.config)
        if self.cfg.metrics:
            from .ops.metrics import start_metrics_server

            self.metrics_server = start_metrics_server(self, self.cfg.metrics)
        from .ops.alerts import start_alerting

        self.alerting = start_alerting(self, self.cfg.alerts)
        log.info("node %s listening on %s", self.state.node, self.listen)
        print(f"pit agent: node {self.state.node} listening on {self.listen}", flush=True)
        try:
            self.stopped.wait()
        finally:
            for s in socks:
                s.close()
            if self.failover is not None:
                self.failover.stop()
            for ms in self.masters.values():
                ms.stop()
            for rec in [*self.wal.values(), *self.wal_lag.values()]:
                rec.stop()
            self.watcher.stop()
            self.readers.close()
            if self.alerting is not None:
                self.alerting[1].stop()
                self.alerting[0].close(timeout=10)
            if self.metrics_server is not None:
                self.metrics_server.stop()
            try:
                os.unlink(ctl_path)
            except OSError:
                pass

    def stop(self, *_a) -> None:
        self.stopped.set()


DEFAULT_AGENT_CONFIG = "/etc/pit/agent.toml"


def control_request(state_dir: str | None, cfg_path: str | None, cmd: str, args: dict, timeout: float = 120):
    from .errors import AgentUnreachable

    if not cfg_path and not state_dir and os.path.exists(DEFAULT_AGENT_CONFIG):
        cfg_path = DEFAULT_AGENT_CONFIG  # the file `pit install-service` runs the agent with
    if cfg_path:
        cfg = C.load_agent_config(cfg_path)
        path = cfg.control or os.path.join(cfg.state, "agent.sock")
    elif state_dir:
        path = os.path.join(state_dir, "agent.sock")
    else:
        raise ConfigError(f"give --config FILE (the agent's) or --state DIR (there is no {DEFAULT_AGENT_CONFIG})")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise AgentUnreachable(f"no agent is running for {path} (start `pit agent`)") from None
    conn = protocol.Conn(s, "agent", heartbeat=False, dead_after=timeout)
    try:
        conn.send({"t": "ctl", "cmd": cmd, "args": args})
        reply = conn.recv("ctl_reply")
    finally:
        conn.close()
    if not reply["ok"]:
        err = ReplError(reply["result"])
        err.exit_code = reply["code"]
        raise err
    return reply["result"]


def run_agent(cfg_path: str) -> None:
    from store.logsetup import setup_logging

    setup_logging(os.environ.get("PIT_LOG", "INFO"))
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack to the log
    agent = Agent(cfg_path)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.run()
