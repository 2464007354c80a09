"""Failover and failback: who is the primary master of the protected sets, and the switch.

The *protected* sets are those the cluster's configured primary masters. Who
actually masters them is decided by one leader key in etcd (fencing.py),
never by a node's own opinion:

* the configured primary campaigns at start and masters only while it holds
  the key; it resigns when its public link fails (`failover.link`) and stops
  on its own clock when it cannot renew;
* the secondary station watches: when the key is gone (the primary died or
  lost etcd) it promotes; when the primary's services fail (`failover.checks`,
  confirmed N times) while its agent still answers here, it revokes the
  primary's lease, waits one TTL and promotes; when the primary holds its
  lease but neither it nor its services answer *from here*, that is a
  partition between the two, and nothing happens;
* promotion = win the key, choose for each set the newest image that
  verifies and passes its application check (select.py), make the live paths
  equal to it touching only what differs (restore sync), run the takeover
  hooks, then master the sets with the other replicas following;
* every replica checks the fencing token a master presents against etcd and
  refuses tokens lower than the highest it has seen;
* a returning old primary finds another holder: it is fenced, snapshots what
  it still has into its own repository (kept, and the base for a delta),
  and receives from the new primary as a replica; `pit failback` switches
  back with a short freeze and no lost writes.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace

from ..apps.pgwal import clear_sync, streams_wal, wal_dir
from ..apps.mybinlog import streams_binlog
from ..apps.sqlitewal import streams_sqlite
from ..errors import EtcdError, FailoverRefused, NoGoodImage, NotAuthorised, ReplError, WalReplayFailed
from ..settings import FailoverConfig, SetConfig
from .decide import CAMPAIGN, PROMOTE, RESIGN, SERVE, TAKE_OVER, Inputs, Probe, decide
from .detect import Confirmer
from .etcd import Etcd
from .fencing import Leadership, revoke_holder

log = logging.getLogger("pit.failover")


def _selection(s: SetConfig):
    """The set's exclusions as a restore selection (None: nothing excluded)."""
    if not (s.exclude or s.iexclude):
        return None
    from store.restore import Selection

    return Selection(exclude=s.exclude, iexclude=s.iexclude, sources=s.paths)


def _served_node(last: dict) -> str | None:
    """The node of the newest term that served, from a `-last` record (before `served` was recorded: the
    last leader, whether it served or not)."""
    if "served" in last:
        return (last["served"] or {}).get("node")
    return last.get("node")


class Failover:
    def __init__(self, agent, cfg: FailoverConfig, primary: str) -> None:
        from ..stream.membership import ca_fingerprint

        self.agent = agent
        self.cfg = cfg
        self.me = agent.state.node
        self.primary = primary
        self.secondary = cfg.secondary
        self.ttl = cfg.ttl
        self.etcd = Etcd(list(cfg.etcd), timeout=min(1.0, self.ttl / 4))
        self.key = cfg.key or f"/pit/{ca_fingerprint(agent.state)[:16]}/leader"
        self.lead = Leadership(self.etcd, self.key, self.me, ttl=self.ttl, on_lost=self._lost,
                               log_path=agent.state.file("fencing.log"))
        self.path = agent.state.file("failover.json")
        try:
            with open(self.path) as f:
                self.saved = json.load(f)
        except (OSError, ValueError):
            self.saved = {}
        self.highest = int(self.saved.get("highest_token", 0))
        self.leader: tuple[str, int] | None = None  # the holder last seen in etcd (node, token)
        self.checks = Confirmer(list(cfg.checks), cfg.confirm)
        self.link = Confirmer(list(cfg.link), cfg.confirm)
        self.primary_reachable: bool | None = None
        self.etcd_ok: bool | None = None
        self.phase = "starting"
        self.note = ""
        self.last_promotion: dict | None = self.saved.get("last_promotion")
        self.lock = threading.RLock()       # one promotion / demotion / failback at a time
        self.yield_until = 0.0              # after handing over (failback): do not promote until then
        self.frozen: str | None = None      # frozen for a hand-over to this node (failback in progress)
        self._mirror_next = 0.0
        self.retry_after = 0.0              # after a failed promotion
        self.failed_sets: set[str] = set()  # protected sets a promotion could not bring up
        self.services_stopped = False       # this agent ran the demote hooks last (not the takeover hooks)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        # The secondary's probes of the primary run in their own thread (see _probe_loop).
        # Failure evidence belongs to one term: probes are stamped with the (holder, token) they were
        # made for and when they started; a new term, a role change or an unreachable agent starts afresh.
        self._probe_want: tuple[str, int, float] | None = None  # (holder, token, when the loop last asked)
        self._probed: tuple[str, int, float, bool, list[str]] | None = None  # (..., started, answers, failing)
        self._evidence_for: tuple[str, int] | None = None
        self._evidence_since = 0.0
        self._probe_thread: threading.Thread | None = None
        self._served_saved = 0.0

    # ------------------------------------------------------------------ persistence and status
    def _save(self) -> None:
        self.saved.update(highest_token=self.highest, last_promotion=self.last_promotion)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.saved, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def status(self) -> dict:
        return {"key": self.key, "phase": self.phase, "note": self.note, "me": self.me, "primary": self.primary,
                "secondary": self.secondary, "leader": self.leader[0] if self.leader else None,
                "token": self.leader[1] if self.leader else None, "holding": self.lead.is_leader(),
                "highest_token": self.highest, "etcd_ok": self.etcd_ok, "primary_reachable": self.primary_reachable,
                "checks": self.checks.status(), "link": self.link.status(), "last_promotion": self.last_promotion,
                "unpromoted": sorted(self.failed_sets)}

    def _set_note(self, note: str) -> None:
        if note != self.note:
            log.warning("%s", note) if note else None
            self.note = note

    # ------------------------------------------------------------------ who masters what
    def protected(self, sets: dict[str, SetConfig]) -> list[str]:
        return [n for n, s in sets.items() if s.master == self.primary]

    def effective(self, sets: dict[str, SetConfig]) -> dict[str, SetConfig]:
        """The sets as they stand now: after a failover the protected sets are mastered by the
        token holder (on its live paths), and a returning old primary becomes one of their replicas."""
        out = dict(sets)
        holding = self.lead.is_leader()
        lead = (self.me, self.lead.token) if holding else self.leader
        for name in self.protected(sets):
            s = sets[name]
            if lead is None or lead[0] == self.primary:
                if self.me == self.primary and not holding:
                    out[name] = replace(s, master="")  # the configured primary masters only with the key
                continue
            new = lead[0]
            reps = [r for r in s.replicas if r != new]
            if self.cfg.rejoin and self.primary not in reps:
                reps.append(self.primary)
            out[name] = replace(s, master=new, replicas=tuple(reps))
            if new == self.me:
                out[name] = replace(out[name], paths=self.live_paths(name, s),
                                    # promoted without a good image: nobody masters it
                                    master="" if name in self.failed_sets else new)
        return out

    def live_paths(self, name: str, s: SetConfig) -> tuple[str, ...]:
        live = self.agent.cfg.live.get(name)
        return tuple(os.path.normpath(p) for p in live) if live else s.paths

    def token(self) -> int:
        return self.lead.token if self.lead.is_leader() else 0

    # ------------------------------------------------------------------ replica side: admit a master
    def admit(self, node: str, token: int, set_name: str) -> None:
        """A master offers a protected set: it must present the current token (checked in etcd)."""
        if not token:
            raise NotAuthorised(f"{node} offered protected set {set_name!r} without a fencing token")
        if token < self.highest:
            raise NotAuthorised(f"{node} presented fencing token {token}, older than {self.highest}: refused")
        try:
            kv, _ = self.etcd.get(self.key)
        except EtcdError:
            kv = None
            if self.leader != (node, token):
                raise NotAuthorised(f"{node}'s token {token} cannot be checked (etcd unreachable)") from None
        if kv is not None and (kv.value.decode() != node or kv.mod_revision != token):
            raise NotAuthorised(f"{node}'s token {token} is not the leader key's "
                                f"({kv.value.decode()} holds {kv.mod_revision})")
        if kv is None and self.leader != (node, token):
            raise NotAuthorised(f"{node}'s token {token}: nobody holds the leader key")
        self._saw(node, token)

    def _saw(self, node: str, token: int) -> None:
        changed = False
        with self.lock:
            if token > self.highest:
                self.highest = token
                self._save()
            if self.leader != (node, token) and token >= self.highest:
                self.leader = (node, token)
                self._reset_evidence()
                changed = True
        if changed:
            log.info("leader of the protected sets: %s (token %d)", node, token)
            if node != self.me and self.me == self.primary:
                if not self.services_stopped:
                    # fenced by a node that took over while this agent was not running (only the agent died:
                    # a crash, an OOM kill): its services may still run beside the new primary's. Stopped
                    # before anything else, so the snapshot below is of data nobody writes.
                    log.warning("another node leads (%s, token %d): running the demote hooks (this node's "
                                "services must not run beside the primary's)", node, token)
                    self.run_hooks("demote", 0)
                kept = self._fenced_old_primary()
            else:
                kept = []
            self.agent.reconfigure()
            if kept and self.agent.replica is not None:
                for name in kept:
                    # the first catch-up deletes what this node wrote after the last point: kept just now
                    # as a snapshot, so the mass-delete breaker lets it through once (else every point, and
                    # the failback's final point, would be refused until an operator released it)
                    self.agent.replica.arm_release(name)
                    log.warning("set %s: the rejoin's catch-up may delete this node's writes after the last "
                                "point; they are kept in the snapshot above", name)

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, daemon=True, name="pit-failover")
        self.thread.start()

    def update(self, cfg: FailoverConfig) -> None:
        """A pushed [failover] change with the same primary and leader key, applied in place: the lease,
        the fencing token and the phase stay; new checks start counting afresh; a new TTL applies from the
        next campaign. Not under `self.lock`: the agent calls this holding its apply lock, and a
        demotion holding `self.lock` calls back into the agent (each assignment here is atomic)."""
        old, self.cfg = self.cfg, cfg
        self.secondary = cfg.secondary
        if (old.checks, old.link, old.confirm) != (cfg.checks, cfg.link, cfg.confirm):
            self.checks = Confirmer(list(cfg.checks), cfg.confirm)
            self.link = Confirmer(list(cfg.link), cfg.confirm)
            self._reset_evidence()
        if old.etcd != cfg.etcd:
            self.etcd.endpoints = Etcd(list(cfg.etcd)).endpoints
        if old.ttl != cfg.ttl:
            self.ttl = cfg.ttl
            self.lead.next_ttl = cfg.ttl
        log.info("failover configuration applied in place (lease kept)")

    def stop(self) -> None:
        self.stopped.set()
        self.lead.stop()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self._tick()
            except Exception:
                log.exception("failover loop")
            self.stopped.wait(self.cfg.heartbeat)

    def _tick(self) -> None:
        """One cycle: gather the inputs, let `decide` choose, carry the action out."""
        act = decide(self._gather())
        if act.kind not in (PROMOTE, TAKE_OVER):
            self.phase = act.phase
        if act.forget:
            self._reset_evidence()
        if act.kind == SERVE:
            self._note_served(self.lead.token)
        elif act.kind == RESIGN:
            self.lead.resign(act.reason)
        elif act.kind == CAMPAIGN:
            self._campaign_as_primary()
        elif act.kind in (PROMOTE, TAKE_OVER):
            self.promote(act.reason, force=act.kind == TAKE_OVER)
            return
        if act.kind != RESIGN:
            self._set_note(act.note)
        if act.mirror:
            with self.lock:  # never while a promotion writes the same paths
                self._refresh_mirror()

    def _gather(self) -> Inputs:
        """Everything `decide` looks at, read now. The leader key first (a new holder or token resets
        the evidence before anything counts), then what matters for this node's place."""
        base = dict(me=self.me, primary=self.primary, secondary=self.secondary, auto=self.cfg.auto,
                    mirror=bool(self.cfg.mirror), frozen=self.frozen is not None,
                    yielding=time.monotonic() < self.yield_until, retry_wait=time.monotonic() < self.retry_after)
        try:
            kv, _ = self.etcd.get(self.key)
            self.etcd_ok = True
        except EtcdError as exc:
            self.etcd_ok = False
            leader = self.leader or (None, 0)
            return Inputs(**base, etcd_ok=False, etcd_error=str(exc), holding=self.lead.is_leader(),
                          holder=leader[0], token=leader[1])
        if kv is not None:
            self._saw(kv.value.decode(), kv.mod_revision)
        holding = self.lead.is_leader()
        holder, token = (kv.value.decode(), kv.mod_revision) if kv is not None else (None, 0)
        inputs = Inputs(**base, etcd_ok=True, holding=holding, holder=holder, token=token,
                        my_token=int(self.saved.get("my_token", 0)), highest=self.highest)
        if holding:
            self._probe_want = None
            failing = tuple(self.link.run()) if self.cfg.link else ()
            return replace(inputs, link_failing=failing)
        probe = None
        if holder is not None and holder != self.me and self.me == self.secondary:
            probe = self._evidence(holder, token)
        if holder is not None and probe is None:
            return inputs  # nothing below matters for this node now
        try:
            last = self._last_leader()
        except (EtcdError, ValueError):
            last = {}
        could_promote = self.me == self.secondary and (holder is None or (probe is not None and probe.failing))
        lease = None
        if probe is not None and not probe.reachable and kv.lease:
            try:
                lease = self.etcd.time_to_live(kv.lease)
            except EtcdError:
                pass
        return replace(inputs, probe=probe, holder_lease=lease, last_node=last.get("node"),
                       last_token=int(last.get("token") or 0), last_ready=bool(last.get("ready")),
                       last_served=self._served_view(last),
                       rollback=tuple(self.rollback_sets()) if could_promote else ())

    def _served_view(self, last: dict) -> str | None:
        """Who served last, as this node must see it: another node revoking the holder to take over counts
        for the primary (it must not campaign back while that node takes over), never for the revoker itself
        (namespace harness, the replay of seed 2013: a secondary whose take-over failed read its own
        revocation as a term it had served, took the key on a live copy nobody had made consistent, and
        fenced the primary)."""
        if last.get("revoking") and last.get("node") not in (None, self.me) and self.me == self.primary:
            return last["node"]
        return _served_node(last)

    def _evidence(self, holder: str, token: int) -> Probe | None:
        """The probes of `holder` in term `token` (the probe thread runs them; a new term starts afresh)."""
        if self._evidence_for != (holder, token):
            self._reset_evidence()
            self._evidence_for = (holder, token)
        self._probe_want = (holder, token, time.monotonic())
        if self._probe_thread is None:
            self._probe_thread = threading.Thread(target=self._probe_loop, daemon=True, name="pit-probe")
            self._probe_thread.start()
        probed = self._probed
        if probed is None or probed[:2] != (holder, token) or probed[2] < self._evidence_since:
            return None  # nothing probed of this term yet
        return Probe(reachable=probed[3], failing=tuple(probed[4]))

    def _last_leader(self) -> dict:
        kv, _ = self.etcd.get(self.key + "-last")
        return json.loads(kv.value) if kv is not None else {}

    def _carried_served(self) -> dict | None:
        """The `served` of the current `-last` record, for a record of a term (or a revocation) that has not
        served yet."""
        try:
            prev = self._last_leader()
        except (EtcdError, ValueError):
            prev = {}
        if "served" in prev:
            return prev["served"]
        node = prev.get("node") if not prev.get("revoking") else None
        return {"node": node, "token": prev.get("token")} if node else None

    def _record_leader(self, token: int, ready: bool = False, serving: bool = False) -> None:
        """Kept beyond the lease: a returning primary must know whether anyone led after it. `ready`: the
        takeover is done (image in place, hooks run); until then the secondary does not count this term's
        failing services, which are still starting."""
        if ready or serving:  # `serving`: written before the takeover hooks start any service
            served = {"node": self.me, "token": token}
        else:  # a term that has not served yet keeps the record of the last one that did
            served = self._carried_served()
        body = {"node": self.me, "token": token, "served": served, **({"ready": True} if ready else {})}
        self.etcd.put_if(self.key + "-last", json.dumps(body), self.key, token)

    def _reset_evidence(self) -> None:
        self.checks.reset()
        self._probed = None
        self._evidence_for = None
        self._evidence_since = time.monotonic()

    def _note_served(self, token: int, force: bool = False) -> None:
        """While holding the key: this node serves writes in term `token` until now (kept every few
        seconds, and at every hand-over, so a later promotion knows which images are older than data
        served here)."""
        now = time.time()
        if not token or (not force and now - self._served_saved < 5.0):
            return
        self._served_saved = now
        served = self.saved.setdefault("served", {})
        served[str(token)] = {"until": now, "started": served.get(str(token), {}).get("started", now)}
        for old in sorted(served, key=int)[:-8]:
            del served[old]
        self._save()

    def rollback_sets(self, pins: dict[str, str] | None = None) -> list[str]:
        """The protected sets whose newest image here is older than data this node served itself as
        primary (its live paths hold writes acknowledged after that image: promoting it would roll them
        back). Sets pinned by an operator are not counted: a pin takes its image after the live data is
        kept as a snapshot."""
        until = self.served_until()
        if not until or self.agent.replica is None:
            return []
        from store.snapshots import list_snapshots

        repo = self.agent.replica.repo
        older = []
        with repo.reading() as txn:
            for name in self.protected(self.agent.configured_sets()):
                if (pins or {}).get(name):
                    continue
                snaps = list_snapshots(repo, txn, name)
                if not snaps or snaps[-1].time_ns / 1e9 < until:
                    older.append(name)
        return older

    def _check_rollback(self, pins: dict[str, str] | None) -> None:
        """The same invariant on an operator's or a hand-over's promotion, before the key is touched."""
        older = self.rollback_sets(pins)
        if older:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.served_until()))
            raise FailoverRefused(
                f"this node served as primary until {when} and its newest image of set(s) {', '.join(older)} is "
                "older: promoting it would roll back writes acknowledged here; to take it anyway pin an image "
                "(pit failover promote --snapshot SET@SNAP), the live data is kept as a snapshot first")

    def _keep_live(self, name: str, s: SetConfig) -> str | None:
        """A snapshot of this node's live paths of set `name` in its repository (before an older image
        replaces them); its name, or None when there is nothing live."""
        from store.ingest import create_snapshot

        paths = [p for p in self.live_paths(name, s) if os.path.exists(p)]
        if not paths:
            return None
        with self.agent.replica.lock:
            snap = create_snapshot(self.agent.replica.repo, name, paths, host=self.me, retention=False,
                                   filters=s.filter_rules())
        log.warning("set %s: kept this node's live data as snapshot %s before promoting an older image",
                    name, snap.name)
        return snap.name

    def served_until(self) -> float:
        """When this node last served as primary (0: never)."""
        return max((t["until"] for t in self.saved.get("served", {}).values()), default=0.0)

    def _campaign_as_primary(self) -> None:
        with self.lock:
            token = self.lead.campaign()
            if not token:
                return
            again = bool(self.saved.get("my_token"))  # not this node's first term (that one seeds instead)
            self.highest = max(self.highest, token)
            self.saved["my_token"] = token
            self.leader = (self.me, token)
            self._save()
            self._record_leader(token, serving=True)
        self.phase = "active"
        self._set_note("")
        self.agent.reconfigure()
        self.run_hooks("takeover", token)  # idempotent: services start, or are confirmed running
        self._note_served(token, force=True)
        if again:  # a term taken back (after an etcd outage, an agent restart) begins with a point too
            self.first_point(token)
        try:
            self._record_leader(token, ready=True)
        except EtcdError as exc:
            log.error("cannot say the takeover is done in etcd: %s", exc)

    def _probe_loop(self) -> None:
        """Probe the primary every heartbeat while the loop wants it: first its agent's ping, then, only
        when the agent answers, the service checks. A failure counts only when the node itself is
        reachable from here: checks that fail while the agent does not answer (a partition) are not
        evidence, and an unanswered ping clears what was counted, so a healed partition starts from zero.
        In their own thread: against a dead primary each probe waits out its timeout (seconds), and the
        loop that sees the lease expire must not wait behind them."""
        while not self.stopped.is_set():
            want = self._probe_want
            if want is not None and time.monotonic() - want[2] < max(5.0, 4 * self.cfg.heartbeat):
                holder, token, _ = want
                started = time.monotonic()
                try:
                    reachable = bool(self.agent.ping(holder, max(1.0, self.ttl / 2)))
                    self.primary_reachable = reachable
                    if not reachable:
                        self.checks.reset()
                        failed: list[str] = []
                    else:
                        failed = self.checks.run() if self.cfg.checks else []
                    if self._evidence_for == (holder, token) and started >= self._evidence_since:
                        self._probed = (holder, token, started, reachable, failed)
                except Exception:
                    log.exception("probing %s", holder)
            self.stopped.wait(self.cfg.heartbeat)

    # ------------------------------------------------------------------ promotion
    def promote(self, reason: str, force: bool = False, pins: dict[str, str] | None = None,
                at: int | None = None) -> dict:
        """Take over the protected sets. `force`: revoke the current holder's lease first (it stops on
        its own clock within a TTL; we wait that long before acting). `pins`: set -> snapshot to use. `at`
        (Unix ns): every set as it was then: its newest image taken by then, pinned, and a database set's
        log replayed up to that second (the operator undoing a bad change)."""
        with self.lock:
            report = self.begin_report(reason)
            if at is not None:
                pins = self._pins_at(at)
                report["at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at / 1e9))
            self._check_rollback(pins)
            token = self._acquire(force, report)
            try:
                self.take_sets(pins, report, at)
                self.finish_takeover(token, report)
            except BaseException as exc:
                self._failed(report, exc)
                self.retry_after = time.monotonic() + 30  # a failed promotion is not retried at once
                self.lead.resign(f"promotion failed: {exc}")
                raise
        self.agent.reconfigure()
        log.warning("%s is the primary master now (token %d) in %.2f s", self.me, token, report["seconds"])
        self.first_point(token)
        return report

    def first_point(self, token: int) -> None:
        """A consistent point on every replica as soon as a new term's masters stream (after a failover or
        a failback), in its own thread. Until a replica has an image newer than what it served itself as
        primary, the rollback guard keeps it from promoting (rightly: its own newest image predates the
        writes it handed over), and under steady writes `point_quiet` never comes: without this point a
        crash soon after a failback would leave no node able to take over."""
        threading.Thread(target=self._first_point, args=(token,), daemon=True, name="pit-first-point").start()

    def _first_point(self, token: int) -> None:
        deadline = time.monotonic() + 120
        for name in self.protected(self.agent.configured_sets()):
            ms = None
            # the set's master streams once its first scan is done; each sender has tried its replica once
            # (a dead old primary is then known to be absent and skipped after a short grace, not waited on)
            while time.monotonic() < deadline and self.token() == token:
                ms = self.agent.masters.get(name)
                if ms is not None and ms.senders and all(s.connected or s.last_error for s in ms.senders.values()):
                    break
                ms = None
                time.sleep(0.2)
            if ms is None or self.token() != token:
                log.warning("set %s: no first point of term %d (%s)", name, token,
                            "the term ended" if self.token() != token else "its master did not start streaming")
                continue
            try:
                out = self.agent.master_point(ms, 600.0)  # after a catch-up that may take a while
                log.info("set %s: first point of term %d: %s", name, token, ", ".join(
                    f"{r}: {v.get('snapshot') or 'skipped'}" for r, v in out.items()))
            except ReplError as exc:
                ms.alert(f"first point of term {token} failed: {exc}")

    def begin_report(self, reason: str) -> dict:
        self._t0 = time.monotonic()
        self.phase = "promoting"
        log.warning("promoting %s: %s", self.me, reason)
        self._reset_evidence()
        return {"reason": reason, "node": self.me, "started": time.time(), "sets": {}}

    def _acquire(self, force: bool, report: dict) -> int:
        """Win the leader key (revoking the holder's lease first when `force`); the new token."""
        kv, _ = self.etcd.get(self.key)
        if kv is not None and kv.value.decode() != self.me:
            if not force:
                raise FailoverRefused(f"{kv.value.decode()} holds the leader key (token {kv.mod_revision}); "
                                      "use --force to revoke its lease and take over")
            # first say who takes over (a revoked holder reads this and does not campaign back), then revoke
            self.etcd.put(self.key + "-last", json.dumps({"node": self.me, "token": 0, "revoking": kv.mod_revision,
                                                          "served": self._carried_served()}))
            revoke_holder(self.etcd, self.key)
            report["revoked"] = {"node": kv.value.decode(), "token": kv.mod_revision}
            self.stopped.wait(self.ttl)  # the old holder may believe it leads for up to TTL - margin
        token = self.lead.campaign()
        if not token:
            kv, _ = self.etcd.get(self.key)
            self.phase = "standby"
            raise FailoverRefused(f"another node won the leader key first "
                                  f"({kv.value.decode() if kv else 'nobody'}); not promoting")
        self._took_key(token, report)
        return token

    def _took_key(self, token: int, report: dict) -> None:
        self.highest = max(self.highest, token)
        self.saved["my_token"] = token
        self._save()
        self._record_leader(token)
        report["token"] = token
        report["detect_to_key"] = round(time.monotonic() - self._t0, 3)

    def _pins_at(self, at: int) -> dict[str, str]:
        """Each protected set's newest image taken at or before `at`, as a pin."""
        from store.snapshots import list_snapshots

        repo = self.agent.replica.repo if self.agent.replica is not None else None
        if repo is None:
            raise FailoverRefused("this node has no repository to promote from (`repo` in its agent config)")
        pins = {}
        with repo.reading() as txn:
            for name in self.protected(self.agent.configured_sets()):
                before = [x for x in list_snapshots(repo, txn, name) if x.time_ns <= at]
                if not before:
                    raise FailoverRefused(f"set {name!r} has no image taken at or before that time")
                pins[name] = f"{name}@{before[-1].name}"
        return pins

    def take_sets(self, pins: dict[str, str] | None, report: dict, at: int | None = None) -> None:
        """Choose and materialise each protected set's image on the live paths. Holding the key, each
        set is followed by a check that it is still ours; in a hand-over the key comes after this."""
        t1 = time.monotonic()
        sets = self.agent.configured_sets()
        failed = set()
        for name in self.protected(sets):
            try:
                report["sets"][name] = self._take_set(name, sets[name], (pins or {}).get(name), at)
            except ReplError as exc:
                # no good image of this set here: the others still come up; this one is not mastered (its
                # live paths would replicate as deletions), and the report says why
                report["sets"][name] = {"error": str(exc)}
                failed.add(name)
                log.error("set %s: not promoted: %s", name, exc)
            if self.lead.token:
                self.lead.check()  # still ours? (a lost lease aborts before anything else acts)
        if failed and len(failed) == len(report["sets"]):
            raise FailoverRefused("no set could be promoted: " + "; ".join(
                f"{n}: {report['sets'][n]['error']}" for n in sorted(failed)))
        self.failed_sets = failed
        report["selection_and_materialise"] = round(time.monotonic() - t1, 3)

    def finish_takeover(self, token: int, report: dict) -> None:
        """Holding the key with the images in place: the takeover hooks, then say so in etcd."""
        if "token" not in report:
            self._took_key(token, report)
        # who serves is in etcd before any service starts: if this term ends before it says it is ready, a
        # returning primary still knows a write may have been taken here (decide: the node that served last)
        self._record_leader(token, serving=True)
        self._note_served(token, force=True)
        t2 = time.monotonic()
        report["takeover_hooks"] = self.run_hooks("takeover", token)
        report["hooks_seconds"] = round(time.monotonic() - t2, 3)
        self.lead.check()
        self._note_served(token, force=True)
        self._record_leader(token, ready=True)
        self.leader = (self.me, token)
        report["seconds"] = round(time.monotonic() - self._t0, 3)
        self.last_promotion = report
        self._save()
        self.phase = "active"
        self._set_note("")

    def _failed(self, report: dict, exc: BaseException) -> None:
        report["error"] = str(exc)
        self.last_promotion = report
        self._save()

    def _take_set(self, name: str, s: SetConfig, pin: str | None, at: int | None = None) -> dict:
        from store.objects import ObjectReader
        from store.restore import RestoreStats
        from store.snapshots import resolve

        from .select import select_image

        repo = self.agent.replica.repo if self.agent.replica is not None else None
        if repo is None:
            raise FailoverRefused("this node has no repository to promote from (`repo` in its agent config)")
        from ..errors import CheckUnavailable

        check = s if (self.cfg.app_check and s.app) else None
        notes = []
        if check is not None and streams_wal(s) and (not pin or at is not None):
            # a database's image is checked with the WAL received after it, the unit a promotion brings up
            # (an image whose own WAL lacks its checkpoint record still recovers from the received WAL)
            check = replace(s, app={**s.app, "wal_received": wal_dir(self.agent.state.path, name)})
        with self.agent.replica.lock:
            try:
                try:
                    sel = select_image(repo, name, check=check, pin=pin)
                except NoGoodImage:
                    if check is None or check is s:
                        raise
                    notes.append("no image recovered with the WAL received after it: each checked alone")
                    log.error("set %s: %s", name, notes[-1])
                    sel = select_image(repo, name, check=s, pin=pin)
            except CheckUnavailable as exc:
                # a missing tool on this node must not keep the business down: choose by verification
                # alone, and say so in the report, the log and the status
                notes.append(f"application check unavailable here ({exc}): chosen by verification alone")
                log.error("set %s: %s", name, notes[-1])
                sel = select_image(repo, name, check=None, pin=pin)
        chosen = sel.chosen
        out = {"snapshot": chosen.name, "id": chosen.id, "time": chosen.time,
               "skipped": [{"snapshot": o.name, "reason": o.reason} for o in sel.images if o.status == "skipped"],
               "selection_seconds": sel.seconds, "notes": notes + sel.notes}
        live = self.live_paths(name, s)
        until = self.served_until()
        if until:
            with repo.reading() as txn:
                older = resolve(repo, txn, chosen.id).time_ns / 1e9 < until
            if older and not pin:
                raise FailoverRefused(f"image {chosen.name} is older than the data this node served as primary "
                                      "(until " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until))
                                      + "): not rolling it back")
            if older:
                out["kept_live"] = self._keep_live(name, s)
        total = RestoreStats()
        with repo.reading() as txn:
            r = ObjectReader(repo, txn)
            snap = resolve(repo, txn, chosen.id)
            by_name = {e.name: e for e in r.tree(snap.root)}
            for path in live:
                base = os.fsencode(os.path.basename(path))
                e = by_name.get(base)
                if e is None:
                    raise FailoverRefused(f"image {chosen.name} of set {name!r} has no {base.decode()!r} "
                                          f"for live path {path}")
                st = self._sync(r, e, path, _selection(s))
                for k in ("files", "dirs", "bytes", "unchanged", "removed"):
                    setattr(total, k, getattr(total, k) + getattr(st, k))
            if streams_wal(s):
                if not pin or at is not None:  # a pinned image is the operator's choice of a moment: no replay
                    out["wal"] = self._replay_wal(name, s, live, r, by_name, at)
                data = self._live_data(s, live)[0]
                if data and clear_sync(data):  # `sync = true` of the old master named its replicas, this one too
                    out.setdefault("notes", []).append("synchronous_standby_names of the old master cleared")
            if streams_sqlite(s) and (not pin or at is not None):
                out["wal"] = self._replay_sqlite(name, s, live, r, by_name, at)
            if streams_binlog(s) and (not pin or at is not None):
                out["wal"] = self._replay_wal(name, s, live, r, by_name, at, "mysql")
        out["materialised"] = {"files_written": total.files, "bytes_written": total.bytes,
                               "files_unchanged": total.unchanged, "removed": total.removed}
        log.warning("set %s: promoting image %s (%s); %d newer skipped; %d files written, %d unchanged",
                    name, chosen.name, chosen.short, len(out["skipped"]), total.files, total.unchanged)
        return out

    def _replay_wal(self, name: str, s: SetConfig, live: tuple[str, ...], reader, by_name: dict,
                    at: int | None = None, kind: str = "pg") -> dict:
        """The log received since the image, replayed onto it (apps/pgwal.py, or apps/mybinlog.py for `kind`
        "mysql": the same replay signature); when that fails, the image goes back in place alone and the
        report, the log and an alert say so."""
        from ..apps import mybinlog, pgwal

        replay, at_time = (mybinlog.replay, mybinlog.utc_second) if kind == "mysql" else (pgwal.replay, pgwal.pg_time)
        received = self.agent.stop_wal(name, kind)
        app = s.app or {}
        data, src, top = self._live_data(s, live)
        if data is None:
            return {"error": f"the data directory {app.get('data')} is not under the set's paths"}
        entry = by_name[os.fsencode(os.path.basename(src))]
        try:
            res = replay(app, data, received, timeout=float(app.get("check_timeout", 600)),
                         target_time=None if at is None else at_time(at))
        except (WalReplayFailed, OSError) as exc:
            log.error("set %s: WAL not replayed, the image alone is promoted: %s", name, exc)
            if self.agent.alerting is not None:
                self.agent.alerting[0].notify("wal_replay_failed", f"set {name}: {exc}", "critical",
                                              key=f"{name}:wal", set=name)
            self._sync(reader, entry, top, _selection(s))
            return {"error": str(exc)}
        if res.get("segments"):
            log.warning("set %s: WAL replayed from %s to %s (%d segments), promoted at %s on timeline %s in %.1f s",
                        name, res["from"], res["to"], res["segments"], res["promoted_at"], res["timeline"],
                        res["seconds"])
        elif res.get("files"):
            log.warning("set %s: binlog replayed from %s to %s (%d files) in %.1f s: %s", name, res["from"], res["to"],
                        res["files"], res["seconds"], res["note"])
        else:
            log.warning("set %s: %s", name, res["note"])
        return res

    def _replay_sqlite(self, name: str, s: SetConfig, live: tuple[str, ...], reader, by_name: dict,
                       at: int | None = None) -> dict:
        """The WAL frames shipped since each copy of the image, applied onto it (apps/sqlitewal.py); when that
        fails, the image goes back in place alone and the report, the log and an alert say so."""
        from ..apps.sqlitewal import replay

        received = self.agent.stop_wal(name, "sqlite")
        app = s.app or {}
        side = app.get("side_dir", "")
        lp = next((lp for src, lp in zip(s.paths, live) if src == side), None)
        if lp is None:
            return {"error": f"the side directory {side} is not one of the set's paths"}
        done = {}
        try:
            for db in app.get("databases", []):
                base = os.path.basename(db)
                done[base] = replay(os.path.join(lp, base), os.path.join(received, base), target_ns=at)
                log.warning("set %s: %s", name, done[base]["note"])
        except (WalReplayFailed, OSError) as exc:
            log.error("set %s: WAL frames not applied, the image alone is promoted: %s", name, exc)
            if self.agent.alerting is not None:
                self.agent.alerting[0].notify("wal_replay_failed", f"set {name}: {exc}", "critical",
                                              key=f"{name}:wal", set=name)
            self._sync(reader, by_name[os.fsencode(os.path.basename(side))], lp, _selection(s))
            return {"error": str(exc)}
        return {"databases": done, "frames": sum(d["frames"] for d in done.values()),
                "note": "; ".join(d["note"] for d in done.values())}

    @staticmethod
    def _live_data(s: SetConfig, live: tuple[str, ...]) -> tuple[str | None, str | None, str | None]:
        """Where the set's data directory is on this node's live paths -> (it, its set path, that live path)."""
        data = str((s.app or {}).get("data", ""))
        for src, lp in zip(s.paths, live):
            if data == src or data.startswith(src.rstrip("/") + "/"):
                return os.path.normpath(os.path.join(lp, os.path.relpath(data, src))), src, lp
        return None, None, None

    def _refresh_mirror(self) -> None:
        """Mirror mode on the secondary station: its live paths follow what it has received (the set's
        head), each file replaced atomically and deletions applied, so a promotion only rewrites what
        differs between that and the chosen consistent image (and services could start at once)."""
        from store.apply import head_root
        from store.objects import ObjectReader

        if self.agent.replica is None or time.monotonic() < self._mirror_next:
            return
        self._mirror_next = time.monotonic() + max(2.0, self.cfg.heartbeat)
        repo = self.agent.replica.repo
        mirrored = self.saved.setdefault("mirrored", {})
        sets = self.agent.config.sets
        for name in self.protected(sets):
            with repo.reading() as txn:
                root = head_root(repo, txn, name)
                if root is None or mirrored.get(name) == root.hex():
                    continue
                r = ObjectReader(repo, txn)
                by_name = {e.name: e for e in r.tree(root)}
                try:
                    for path in self.live_paths(name, sets[name]):
                        e = by_name.get(os.fsencode(os.path.basename(path)))
                        if e is not None:
                            self._sync(r, e, path, _selection(sets[name]))
                except Exception as exc:  # a damaged chunk, a full disk: promotion will choose anew
                    log.error("set %s: live mirror not refreshed: %s", name, exc)
                    continue
            mirrored[name] = root.hex()
            self._save()
            log.debug("set %s: live mirror at head %s", name, root.hex()[:12])

    @staticmethod
    def _sync(reader, entry, path: str, selection=None):
        """Make `path` equal to `entry`; what the set's filter excludes is left alone (a secondary's own
        `postmaster.pid` or cache folder is not in the image, and is not deleted for it)."""
        import dataclasses

        from store.restore import Restorer
        from store.trees import DIR

        if entry.type == DIR:
            return Restorer(reader, sync=True, selection=selection).restore(dataclasses.replace(entry, name=b""),
                                                                            path, own_meta=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return Restorer(reader, sync=True, selection=selection).restore(entry, os.path.dirname(path))

    def run_hooks(self, which: str, token: int) -> list[dict]:
        """Takeover or demotion hooks, in order; a failure is reported and alerted, the rest still run
        (a service that fails to start must not keep the others down)."""
        from ..apps.hooks import run_command

        self.services_stopped = which == "demote"
        if which == "demote":
            self._release_wal_senders()
        out = []
        env = {**os.environ, "PIT_NODE": self.me, "PIT_ROLE": which, "PIT_TOKEN": str(token),
               "PIT_SETS": " ".join(self.protected(self.agent.config.sets))}
        for i, h in enumerate(getattr(self.cfg, which)):
            run = run_command(h if isinstance(h, str) else list(h), self.cfg.hook_timeout, env, i)
            (log.info if run.ok else log.error)("%s hook %r: %s", which, run.hook,
                                                 "ok" if run.ok else run.error)
            out.append(run.to_json())
        return out

    def _release_wal_senders(self) -> None:
        """Before the services stop: end the database's connections to our WAL receivers. PostgreSQL's shutdown
        waits for its WAL senders to send the last WAL, and a receiver cut off by the network keeps one waiting
        for `wal_sender_timeout` (60 s): the demote hook's `pg_ctl stop` timed out and the server was still up
        when this node took over again (harness seed 5202)."""
        from ..apps.pgwal import release_senders

        for name, s in self.agent.configured_sets().items():
            if name in self.protected(self.agent.configured_sets()) and streams_wal(s):
                n = release_senders(s.app or {})
                if n:
                    log.warning("set %s: ended %d WAL sender(s) to the replicas before stopping services", name, n)

    # ------------------------------------------------------------------ demotion and the old primary
    def _lost(self, reason: str) -> None:
        """Leadership lost (own clock, revoked lease, resignation): stop acting at once."""
        self.phase = "demoted"
        self._set_note(f"stopped acting as primary: {reason}")
        token = int(self.saved.get("my_token", 0))
        if str(token) in self.saved.get("served", {}):  # a term that served (a failed promotion never did)
            self._note_served(token, force=True)
        self._reset_evidence()
        try:
            self.agent.reconfigure()  # stops the masters of the protected sets
        finally:
            self.run_hooks("demote", 0)

    def _fenced_old_primary(self) -> list[str]:
        """Another node leads: keep what we still have as a snapshot in our repository (never lost,
        and the base the new primary's catch-up compares against: a delta, not a re-seed). The sets kept."""
        repo_path = self.agent.cfg.repo
        kept: list[str] = []
        if not repo_path or not self.cfg.rejoin:
            return kept
        sets = self.agent.config.sets
        if self.agent.replica is not None:
            return kept  # already receiving
        from store.ingest import create_snapshot
        from store.keys import KeySource
        from store.repository import Repository

        key_file = self.agent.cfg.key_file  # an encrypted repository: the agent file names its key
        repo = Repository(repo_path, keys=KeySource(key_file=key_file) if key_file else None)
        try:
            for name in self.protected(sets):
                paths = [p for p in sets[name].paths if os.path.exists(p)]
                if paths:
                    snap = create_snapshot(repo, name, paths, host=self.me, retention=False,
                                           filters=sets[name].filter_rules())
                    log.warning("set %s: kept this node's own state as snapshot %s before rejoining as a replica",
                                name, snap.name)
                    kept.append(name)
        finally:
            repo.close()
        return kept

    # ------------------------------------------------------------------ failback (planned switchback)
    def failback(self) -> dict:
        """On the returning old primary: the planned switch back (handover.py), which loses no write."""
        from . import handover

        if self.me != self.primary:
            raise FailoverRefused(f"run `pit failback` on the configured primary ({self.primary})")
        if self.lead.is_leader():
            raise FailoverRefused("this node already is the primary master")
        if self.agent.replica is None:
            raise FailoverRefused("this node receives nothing yet (it needs `repo` in its agent config and "
                                  "`failover.rejoin`): wait until it has caught up with the current primary")
        return handover.ask(self)
