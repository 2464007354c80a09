"""One sender per (set, replica): the path queue, consistent points, sessions.

A sender holds a *bounded* ordered set of paths, never data: it reads the
current state of each path when it sends (changes.py), so bursts coalesce
and a slow replica costs memory proportional to the paths it lags, up to
the bound; past it the queue is dropped and the sender catches up by
comparing trees (catchup.py), which sends only differing subtrees. Every
(re)connect starts with a catch-up. Consistent points (and marks of a
point's hook outcome) are queued behind the paths before them, so a point
follows every change made before it was asked for.

A scheduled set's sender connects only when a run is due (or a point is
asked for): it catches up, makes a consistent point and disconnects.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..errors import ConnectionLost, NotAuthorised, ProtocolError, ReplError
from . import protocol
from .catchup import differing_paths
from .changes import AWAIT_MARGIN, BATCH_PATHS, BatchSender

if TYPE_CHECKING:
    from .master import MasterSet

log = logging.getLogger("pit.master")


class Sender:
    """Streams one set to one replica: bounded path queue, catch-up on (re)connect."""

    def __init__(self, ms: MasterSet, replica: str) -> None:
        self.ms = ms
        self.replica = replica
        self.queue: OrderedDict[bytes, None] = OrderedDict()
        self.points: list = []
        self.inflight: list = []  # points sent on the current session, not yet answered
        self.cond = threading.Condition()
        self.need_catchup = True
        self.connected = False
        self.stopped = False
        self.conn: protocol.Conn | None = None
        self.batches = BatchSender(ms, replica)  # numbers, counts and sends the batches of paths
        self.last_error = ""
        self.bytes_sent = 0
        self.due = False  # scheduled sets: a reconcile is due
        self.runs = 0
        self.last_run: float | None = None
        self.thread = threading.Thread(target=self.run_scheduled if ms.schedule else self.run, daemon=True,
                                       name=f"pit-send-{ms.name}-{replica}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        with self.cond:
            self.cond.notify_all()
        if self.conn:
            self.conn.close()

    def status(self) -> dict:
        out = {"connected": self.connected, "queued": len(self.queue), "catchup": self.need_catchup,
               "acked_batches": self.batches.acked, "held_deletes": self.batches.held,
               "bytes_sent": self.bytes_sent + (self.conn.bytes_sent if self.conn else 0),
               "ops_frames": self.batches.ops_frames, "last_error": self.last_error}
        if self.ms.schedule:
            out.update(due=self.due, runs=self.runs, last_run=(
                time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_run)) if self.last_run else None))
        return out

    def trigger(self) -> None:
        """Scheduled sets: reconcile now (and end with a consistent point)."""
        with self.cond:
            self.due = True
            self.cond.notify()

    def enqueue(self, rels: list[bytes]) -> None:
        if self.ms.schedule:
            return  # scheduled: nothing streams; the next run compares trees
        with self.cond:
            if self.need_catchup:
                return  # the catch-up will compare whole trees anyway
            for r in rels:
                self.queue[r] = None
                self.queue.move_to_end(r)
                self.batches.awaiting.pop(r, None)  # its next version is queued: a point follows it
            if len(self.queue) > self.ms.cfg.queue:
                # A slow replica: stop queueing, compare trees when it is ready again.
                self.queue.clear()
                self.need_catchup = True
            self.cond.notify()

    def request_mark(self, snapshot: str, ok: bool, error: str | None, deadline: float) -> dict:
        """Record a point's hook outcome on the replica's snapshot (a failed post hook: image selection
        then skips that image). Queued like a point, so it follows it on the same stream."""
        slot = self.request_point(0, deadline)
        slot["mark"] = {"snapshot": snapshot, "ok": ok, "error": error or ""}
        return slot

    def _serve_slot(self, conn: protocol.Conn, slot: dict) -> bool:
        """Serve a point or a mark; False (nothing sent) for a point while paths the batches just sent
        left out, changed while sent, are still to come: the point must wait for their next version.
        (It was decided before those batches went out: a point served right after one that left a
        database's log out held the log of long before, and the takeover lost every row since.)"""
        self.batches.drain(conn)  # a point follows every change sent before it, acknowledged
        if "mark" not in slot and self.batches.awaited():
            return False
        if "mark" in slot:
            conn.send({"t": "mark", **slot["mark"]})
            conn.recv("marked")
            slot["result"] = {"marked": slot["mark"]["snapshot"]}
        else:
            conn.send({"t": "point", "id": slot["id"]})
            try:
                slot["result"] = {"snapshot": conn.recv("pointed")["snapshot"]}
            except ProtocolError as exc:
                if ": held: " not in str(exc):
                    raise
                slot["result"] = {"error": str(exc)}  # a refusal, not a transient failure: not retried
                slot["done"].set()
                raise
        slot["done"].set()
        return True

    def request_point(self, pid: int, deadline: float | None = None) -> dict:
        """Ask for a consistent point; `deadline` (monotonic) is when whoever asked stops waiting, so a
        scheduled sender keeps retrying a transient failure (replica restarting, configuration not yet
        pushed) until then instead of failing the point on the first refusal."""
        slot = {"id": pid, "done": threading.Event(), "result": None,
                "deadline": deadline if deadline is not None else time.monotonic()}
        with self.cond:
            self.points.append(slot)
            self.cond.notify()
        return slot

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        backoff = 0.2
        while not self.stopped:
            try:
                self._session()
                backoff = 0.2
            except (ReplError, OSError) as exc:
                self.last_error = str(exc)
                log.info("set %s -> %s: %s", self.ms.name, self.replica, exc)
            except Exception as exc:  # keep the sender alive; the next session catches up
                self.last_error = f"internal error: {exc!r}"
                log.exception("set %s -> %s", self.ms.name, self.replica)
            finally:
                self.connected = False
                if self.conn:
                    self.conn.close()
                    self.bytes_sent += self.conn.bytes_sent
                    self.conn = None
                with self.cond:
                    self.need_catchup = True
                    self.queue.clear()
                    # a point taken by the session that just died is asked again on the next one
                    self.points[:0] = [p for p in self.inflight if not p["done"].is_set()]
                    self.inflight = []
            # fail only the points whose asker gives up before the next try; the rest wait for it
            self._fail_points(time.monotonic() + backoff + (0 if not self.stopped else 1e9))
            if self.stopped:
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _connect(self) -> protocol.Conn:
        agent = self.ms.agent
        addr = agent.roster().get(self.replica, {}).get("address")
        if not addr:
            raise ReplError(f"replica {self.replica} is not in the roster")
        from .membership import connect

        sock, peer = connect(agent.state, addr)
        if peer != self.replica:
            sock.close()
            raise ProtocolError(f"{addr} is node {peer}, not {self.replica}")
        self.conn = conn = protocol.Conn(sock, self.replica)
        self.batches.reset()
        token = getattr(agent, "fencing_token", None)  # failover (agent.py) may not provide it yet
        protocol.hello(conn, agent.state.node, "repl", self.ms.name, token=token() if token else 0)
        self.connected = True
        self.last_error = ""
        return conn

    def _end_session(self) -> None:
        self.connected = False
        if self.conn:
            self.conn.close()
            self.bytes_sent += self.conn.bytes_sent
            self.conn = None

    def _fail_points(self, horizon: float) -> None:
        """Fail the points whose asker gives up before `horizon` (monotonic); keep the rest for a retry."""
        with self.cond:
            keep = []
            for slot in self.points:
                if slot["deadline"] <= horizon:  # unreachable until then: tell whoever waits
                    slot["result"] = {"error": self.last_error or "replica not connected"}
                    slot["done"].set()
                else:
                    keep.append(slot)
            self.points[:] = keep

    def run_scheduled(self) -> None:
        """Scheduled sets: connect only when a run is due (or a point is asked for), reconcile by tree
        comparison, make a consistent point, disconnect. A failed run is retried until it succeeds."""
        backoff = 0.2
        while not self.stopped:
            with self.cond:
                while not self.due and not self.points and not self.stopped:
                    self.cond.wait(1.0)
            if self.stopped:
                return
            try:
                conn = self._connect()
                with self.cond:
                    scheduled, self.due = self.due, False
                    points = list(self.points)
                    self.points.clear()
                try:
                    self._catchup(conn)
                    self._settle_left_out(conn)
                    if scheduled and not points:
                        conn.send({"t": "point", "id": self.ms.agent.next_point_id()})
                        try:
                            conn.recv("pointed")
                        except ProtocolError as exc:
                            if ": held: " not in str(exc):
                                raise
                            scheduled = False  # the replica alerted; the next schedule asks again
                            raise
                    for slot in points:
                        if not self._serve_slot(conn, slot):  # _settle_left_out's bound is awaited's
                            raise ReplError("paths left out of the comparison's batches did not settle")
                except BaseException:
                    with self.cond:
                        self.due = self.due or scheduled
                        self.points[:0] = [p for p in points if not p["done"].is_set()]
                    raise
                self.runs += 1
                self.last_run = time.time()
                backoff = 0.2
            except (ReplError, OSError) as exc:
                self.last_error = str(exc)
                log.info("set %s -> %s (scheduled): %s", self.ms.name, self.replica, exc)
            except Exception as exc:
                self.last_error = f"internal error: {exc!r}"
                log.exception("set %s -> %s (scheduled)", self.ms.name, self.replica)
            finally:
                self._end_session()
            if self.last_error and (self.due or self.points):
                self._fail_points(time.monotonic() + backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _session(self) -> None:
        agent = self.ms.agent
        conn = self._connect()
        while not self.stopped:
            with self.cond:
                if self.need_catchup:
                    self.need_catchup = False
                    self.queue.clear()
                    catchup = True
                else:
                    catchup = False
                    if not self.queue and self.batches.pending:
                        self.cond.release()  # nothing to send: take the acknowledgements (network: unlocked)
                        try:
                            self.batches.drain(conn)
                        finally:
                            self.cond.acquire()
                    ahead = False
                    while not self.queue and not (self.points and not self.batches.awaited()) \
                            and not self.need_catchup and not self.stopped:
                        if self.ms.payloads.fresh:  # chunks of files still being read: send them ahead
                            ahead = True
                            break
                        self.cond.wait(0.1 if self.points else 1.0)
                        if conn.closed:
                            raise ConnectionLost("connection closed")
                        if self.replica not in agent.roster():  # removed: stop at once
                            raise NotAuthorised(f"replica {self.replica} was removed from the roster")
                    batch = []
                    while self.queue and len(batch) < BATCH_PATHS:
                        batch.append(self.queue.popitem(last=False)[0])
                    # a point follows everything queued before it, and a tree comparison the queue's
                    # overflow asked for (served first, it would miss all that the overflow dropped)
                    points = list(self.points) if not self.queue and not self.need_catchup \
                        and not self.batches.awaited() else []
                    if points:
                        self.points.clear()
            if self.replica not in agent.roster():
                raise NotAuthorised(f"replica {self.replica} was removed from the roster")
            if catchup:
                self._catchup(conn)
                continue
            if batch:
                self.batches.send_paths(conn, batch)
            elif ahead and not points:
                self.batches.send_ahead(conn)
            self.inflight = points
            for i, slot in enumerate(points):
                if not self._serve_slot(conn, slot):
                    with self.cond:  # back to the front: served once the left-out paths are sent again
                        self.points[:0] = [p for p in points[i:] if not p["done"].is_set()]
                        self.inflight = []
                    break
            self.inflight = []

    def _settle_left_out(self, conn: protocol.Conn) -> None:
        """A scheduled run: files a comparison's batches left out (changed while sent) are looked at
        again and the trees compared again, until none is left out or `settle_max` and a margin have
        passed (then the point goes ahead without their latest version, as `awaited` warns). A
        scheduled set does not stream, so nothing else would bring their next version before its point."""
        deadline = time.monotonic() + self.ms.cfg.settle_max + AWAIT_MARGIN
        while self.batches.awaiting and time.monotonic() < deadline:
            rels = list(self.batches.awaiting)
            time.sleep(0.2)
            self.ms.refresh({self.ms.tree.abs_path(r): False for r in rels})
            self._catchup(conn)
        self.batches.give_up(list(self.batches.awaiting))

    def _catchup(self, conn: protocol.Conn) -> None:
        """Compare trees with the replica (catchup.py) and send what differs, in batches."""
        ms = self.ms
        self.batches.drain(conn)  # the listing must show what was sent before
        self.batches.awaiting.clear()  # the comparison sends what the tree holds now
        send = differing_paths(conn, ms.tree, ms.cfg.mode == "mirror", ms.alert)
        for i in range(0, len(send), BATCH_PATHS):
            self.batches.send_paths(conn, send[i:i + BATCH_PATHS])
        self.batches.drain(conn)
