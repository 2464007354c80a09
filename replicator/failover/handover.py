"""The planned hand-over (`pit failback`): both sides of the conversation, in the order that loses nothing.

The asker is the returning old primary (a replica of the current holder); the
holder is the node that took over. Neither node is without the key while the
other could act, and the holder never stands down before the asker has the
final point in place:

1. asker -> holder `hello failback`; the holder freezes (demote hooks: its
   services stop, no new writes), makes a final consistent point on the asker
   and answers `frozen` with the point per set. It still holds the key.
2. The asker verifies those points and materialises them on its live paths
   (the same selection and restore sync as a promotion, pinned to the final
   points). On any error it sends `abort` and stops; the holder thaws.
3. The asker grants itself a lease and sends `take`. The holder moves the
   leader key onto that lease in one etcd transaction that succeeds only
   while the key still carries the holder's token (fenced: a holder that lost
   its lease meanwhile cannot hand anything over), revokes its own lease and
   answers `handed` with the new token.
4. The asker adopts the lease and the token and runs its takeover hooks.

A holder that hears nothing for `FROZEN_LIMIT` seconds, or whose connection
drops, or whose transaction fails, thaws: it runs its takeover hooks again
and stays the primary. A hand-over never leaves the cluster without a
primary for longer than the asker's takeover hooks.
"""
from __future__ import annotations

import logging
import time

from ..errors import FailoverRefused, ReplError

log = logging.getLogger("pit.failover")

FROZEN_LIMIT = 300.0  # seconds the holder stays frozen waiting for the asker's lease


def serve(fo, conn, to: str) -> None:
    """On the holder, for the session `conn` opened by `to` (already welcomed)."""
    with fo.lock:
        token = fo.lead.check()
        t0 = time.monotonic()
        fo.frozen = to
        handed = 0
        try:
            hooks = fo.run_hooks("demote", token)  # freeze: no new writes from here on
            points = _final_points(fo, to)
            conn.send({"t": "frozen", "points": points, "freeze_seconds": round(time.monotonic() - t0, 3),
                       "demote_hooks": hooks})
            conn.dead_after = FROZEN_LIMIT
            conn.sock.settimeout(FROZEN_LIMIT)
            msg = conn.recv(("take", "abort"))
            if msg["t"] == "abort":
                raise FailoverRefused(f"{to} could not take the final point: {msg['error']}")
            # a minute without taking over back on failing services (docs/failover.md); its evidence counts
            # only once the new holder says its takeover is done anyway, however long its hooks take
            fo.yield_until = time.monotonic() + 60
            fo._note_served(token, force=True)
            fo._reset_evidence()
            handed = fo.lead.hand_over(to, msg["lease"])
            try:
                conn.send({"t": "handed", "token": handed})
            finally:
                log.warning("handed the leader key to %s (token %d) after %.2f s frozen", to, handed,
                            time.monotonic() - t0)
                fo._lost(f"handed over to {to}")
        except (ReplError, OSError) as exc:
            if not handed:
                conn.fail("failback", str(exc))
            raise
        finally:
            fo.frozen = None
            if not handed:
                fo.yield_until = 0.0
                _thaw(fo, token)


def _final_points(fo, to: str) -> dict[str, str]:
    points = {}
    for name, ms in list(fo.agent.masters.items()):
        if name not in fo.protected(fo.agent.config.sets):
            continue
        ms.flush()
        deadline = time.monotonic() + 120
        slot = ms.senders[to].request_point(fo.agent.next_point_id(), deadline) if to in ms.senders else None
        if slot is None:
            raise FailoverRefused(f"{to} is not a replica of set {name!r} here")
        slot["done"].wait(max(0.0, deadline - time.monotonic()))
        res = slot["result"] or {"error": "timed out"}
        if "error" in res:
            raise FailoverRefused(f"final point on {to} for set {name!r} failed: {res['error']}")
        points[name] = res["snapshot"]
    return points


def _thaw(fo, token: int) -> None:
    """The hand-over did not happen: if this node still holds its key, its services come back."""
    if fo.lead.is_leader() and fo.lead.token == token:
        log.warning("hand-over abandoned: thawing (takeover hooks again), this node stays the primary")
        fo.run_hooks("takeover", token)


def ask(fo) -> dict:
    """On the returning old primary: the whole switch, as in the module docstring. Returns the takeover
    report (`pit failback` prints it)."""
    from ..stream import protocol
    from ..stream.membership import connect

    kv, _ = fo.etcd.get(fo.key)
    if kv is None:
        raise FailoverRefused("nobody holds the leader key: use `pit failover promote`")
    holder = kv.value.decode()
    addr = fo.agent.roster().get(holder, {}).get("address")
    if not addr:
        raise FailoverRefused(f"{holder} (the current primary) is not in the roster")
    t0 = time.monotonic()
    sock, _ = connect(fo.agent.state, addr, timeout=5)
    conn = protocol.Conn(sock, holder, heartbeat=True, dead_after=300)
    try:
        protocol.hello(conn, fo.me, "failback")
        frozen = conn.recv("frozen")
        pins = {name: f"{name}@{snap}" for name, snap in frozen["points"].items()}
        with fo.lock:
            report = fo.begin_report(f"failback from {holder}")
            try:
                fo.take_sets(pins, report)
            except BaseException as exc:
                fo._failed(report, exc)
                conn.send({"t": "abort", "error": str(exc)[:400]})
                raise
            sent = time.monotonic()
            lease = fo.etcd.grant(fo.lead.ttl)
            conn.send({"t": "take", "lease": lease})
            try:
                token = conn.recv("handed")["token"]
            except BaseException:
                fo.lead.revoke_quietly(lease)
                raise
            fo.lead.adopt(lease, token, sent)
            try:
                fo.finish_takeover(token, report)
            except BaseException as exc:
                fo._failed(report, exc)
                fo.lead.resign(f"takeover after the hand-over failed: {exc}")
                raise
    finally:
        conn.close()
    fo.agent.reconfigure()
    report["freeze_seconds"] = frozen["freeze_seconds"]
    report["switch_seconds"] = round(time.monotonic() - t0, 3)
    log.warning("%s is the primary master again (token %d) after a %.2f s switch", fo.me, token,
                report["switch_seconds"])
    fo.first_point(token)  # the old holder's own newest image predates what it handed over
    return report

