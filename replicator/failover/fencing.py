"""The split-brain guard: one leader key in etcd, held under a lease; its revision is the fencing token.

The recipe (../shared/notes/infra.md, measured with etcd 3.4):

1. grant a lease (TTL seconds) and create the leader key with it only if it
   does not exist; the revision of that write is the fencing token;
2. renew every TTL/6 (at once again after a failed try); the holder stops acting as primary *on its own clock*
   once `TTL - margin` has passed since the last renewal that succeeded (the
   server's expiry alone would not stop a partitioned old primary, and the
   server can only expire the key later than that: it counts from when it
   received the renewal, we count from when we sent it);
3. everyone else reads the key; when it is gone (lease expired or revoked)
   another node may campaign, and gets a higher token;
4. replicas remember the highest token they have seen and refuse a master
   carrying a lower one, so fencing holds at the storage side too.

Every change of role is appended to `fencing.log` (JSON lines, wall clock)
in the node's state directory, so a test or an operator can check that two
primaries were never active at once.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable

from ..errors import EtcdError, Fenced
from .etcd import Etcd, KeyValue

log = logging.getLogger("pit.fencing")


class Leadership:
    def __init__(self, etcd: Etcd, key: str, node: str, ttl: int = 3, margin: float | None = None,
                 on_lost: Callable[[str], None] | None = None, log_path: str | None = None) -> None:
        self.etcd = etcd
        self.key = key
        self.node = node
        self.ttl = max(2, int(ttl))  # etcd grants at least 2 s with the default election timeout
        self.margin = margin if margin is not None else min(1.0, self.ttl / 3)
        self.on_lost = on_lost
        self.log_path = log_path
        self.lock = threading.Lock()
        self.token = 0
        self.lease = 0
        self.deadline = 0.0  # monotonic: act as leader only before this
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.next_ttl: int | None = None  # a changed TTL: granted from the next campaign (this lease keeps its own)

    # ------------------------------------------------------------------ state
    def is_leader(self) -> bool:
        with self.lock:
            return bool(self.token) and time.monotonic() < self.deadline

    def check(self) -> int:
        """The token, or Fenced: call before every privileged act."""
        with self.lock:
            if self.token and time.monotonic() < self.deadline:
                return self.token
        raise Fenced(f"{self.node} does not hold the leader key")

    def holder(self) -> KeyValue | None:
        return self.etcd.get(self.key)[0]

    def record(self, event: str, **extra) -> None:
        if not self.log_path:
            return
        line = json.dumps({"t": time.time(), "node": self.node, "event": event, **extra})
        with open(self.log_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ acquire / release
    def campaign(self) -> int:
        """Try once to become leader: the token (> 0) on success, 0 if another node holds the key."""
        with self.lock:
            if self.token and time.monotonic() < self.deadline:
                return self.token
            if self.next_ttl is not None:
                self.ttl, self.next_ttl = max(2, int(self.next_ttl)), None
                self.margin = min(1.0, self.ttl / 3)
        sent = time.monotonic()
        lease = self.etcd.grant(self.ttl)
        try:
            won, rev, _ = self.etcd.create(self.key, self.node, lease)
        except EtcdError:
            self.revoke_quietly(lease)
            raise
        if not won:
            self.revoke_quietly(lease)
            return 0
        with self.lock:
            self.token, self.lease = rev, lease
            self.deadline = sent + self.ttl - self.margin
        self.record("active", token=rev)
        log.info("%s holds the leader key, fencing token %d", self.node, rev)
        self._stop = stop = threading.Event()  # one per term: an old renewer never revives
        self._thread = threading.Thread(target=self._renew_loop, args=(stop,), daemon=True, name="pit-lease")
        self._thread.start()
        return rev

    def adopt(self, lease: int, token: int, sent: float) -> int:
        """Hold the key a hand-over moved onto `lease` (granted here at monotonic `sent`) as token `token`."""
        with self.lock:
            self.token, self.lease = token, lease
            self.deadline = sent + self.ttl - self.margin
        self.record("active", token=token, handover=True)
        log.info("%s holds the leader key by hand-over, fencing token %d", self.node, token)
        self._stop = stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, args=(stop,), daemon=True, name="pit-lease")
        self._thread.start()
        return token

    def hand_over(self, node: str, lease: int) -> int:
        """Move the key onto `node`'s lease in one transaction fenced by our token; then stand down
        (without `on_lost`: the new holder's lease runs unrenewed until it hears the token, so the caller
        answers first and demotes after). The new token, or Fenced when the key is no longer ours."""
        token = self.check()
        with self.lock:
            own = self.lease
        done, rev = self.etcd.transfer(self.key, token, node, lease)
        if not done:
            raise Fenced(f"{self.node} no longer holds the leader key (token {token}): nothing handed over")
        self._lose(f"handed over to {node} (token {rev})", notify=False)  # the caller demotes after answering
        self.revoke_quietly(own)
        return rev

    def resign(self, reason: str = "resigned") -> None:
        """Give the key up at once (planned switchover, or a failing public link)."""
        with self.lock:
            token, lease = self.token, self.lease
        if not token:
            return
        self._lose(reason)
        try:
            self.etcd.delete_if(self.key, token)
        except EtcdError as exc:
            log.warning("could not delete the leader key: %s (it expires with the lease)", exc)
        self.revoke_quietly(lease)

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ internals
    def revoke_quietly(self, lease: int) -> None:
        try:
            self.etcd.revoke(lease)
        except EtcdError:
            pass

    def _lose(self, reason: str, notify: bool = True) -> None:
        with self.lock:
            if not self.token:
                return
            token = self.token
            self.token = 0
            self.deadline = 0.0
        self._stop.set()
        self.record("inactive", token=token, reason=reason)
        log.warning("%s stops acting as primary (token %d): %s", self.node, token, reason)
        if self.on_lost and notify:
            try:
                self.on_lost(reason)
            except Exception:
                log.exception("demotion failed")

    def _renew_loop(self, stop: threading.Event) -> None:
        # Renewed six times per TTL, and at once again after a failed try: the holder demotes itself when
        # nothing succeeded for TTL - margin (2/3 of the TTL), so one slow or lost renewal must leave room for
        # several more. At a third of the TTL one late answer on a busy machine (etcd or this agent waiting
        # for a core) cost the lease; the failover harness saw a primary lose it four times in a row.
        period = self.ttl / 6
        guard = threading.Thread(target=self._guard_loop, daemon=True, name="pit-lease-guard")
        guard.start()
        wait = period
        while not stop.wait(wait):
            wait = period
            with self.lock:
                lease = self.lease
            sent = time.monotonic()
            try:
                left = self.etcd.keepalive(lease)
            except EtcdError as exc:
                self.last_error = str(exc)
                wait = min(period, 0.05)
                continue
            if left <= 0:
                self._lose("the lease was revoked or expired")
                return
            with self.lock:
                if self.token:
                    self.deadline = max(self.deadline, sent + self.ttl - self.margin)
            self.last_error = ""

    def _guard_loop(self) -> None:
        """Demote on our own clock, even while a renewal is stuck in a black-holed connection."""
        while True:
            with self.lock:
                if not self.token:
                    return
                left = self.deadline - time.monotonic()
            if left <= 0:
                self._lose(f"lease not renewed within {self.ttl - self.margin:.1f} s"
                           + (f" ({self.last_error})" if self.last_error else ""))
                return
            time.sleep(min(left, 0.05) if left < 0.05 else min(left, 0.2))


def revoke_holder(etcd: Etcd, key: str) -> KeyValue | None:
    """Force the current holder out (a confirmed service failure on a primary that still renews):
    revoke its lease. The holder notices at its next renewal; until then it may still believe it
    leads for up to TTL - margin, so the caller must wait a full TTL before acting."""
    kv, _ = etcd.get(key)
    if kv is not None and kv.lease:
        try:
            etcd.revoke(kv.lease)
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise
    return kv
