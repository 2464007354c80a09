"""The one decision of each failover cycle: what this node does now, from what it observed.

Like Patroni's `Ha.run_cycle`: the controller gathers its inputs (the leader
key and its token, the `-last` record, this node's own lease on its own
clock, the probes of the current holder stamped with the term they belong
to, the clocks of a hand-over) into an `Inputs`, calls `decide`, and carries
out the one `Action` it returns. Nothing else chooses; `decide` does no I/O,
so its whole input space is tested (tests/test_decide.py) and a stale counter
or a half-read state cannot promote over live data without showing up there.

The rules, in the order they apply (docs/failover.md, "Invariants"):

1. without etcd nobody changes role: a holder keeps serving on its own clock
   until its lease runs out; everyone else waits;
2. a holder serves; it resigns only when its public link is confirmed down;
   while it is frozen for a hand-over it keeps the key and serves nothing;
3. with no holder, the configured primary takes the key back only if nobody
   led after it; the secondary promotes if automatic failover is on, a
   failed promotion is not being waited out, and its newest image is not
   older than data it served itself as primary (a hand-over moves the key
   in one transaction, so a free key after one means the new holder failed);
4. with another holder, the secondary promotes only on evidence of *this*
   term: probes of that holder and token, which reached its agent, after the
   holder said its takeover is done, failing `confirm` times in a row;
5. a key that still carries this node's previous lease is waited out.
"""
from __future__ import annotations

from dataclasses import dataclass

#: what `decide` may ask for
SERVE, RESIGN, CAMPAIGN, PROMOTE, TAKE_OVER, NOTHING = (
    "serve", "resign", "campaign", "promote", "take-over", "nothing")


@dataclass(frozen=True)
class Probe:
    """What the probes of the current holder found in its term (None in `Inputs.probe`: nothing yet)."""

    reachable: bool               # its agent answered here
    failing: tuple[str, ...] = ()  # checks failing `confirm` times in a row, with their details


@dataclass(frozen=True)
class Inputs:
    me: str
    primary: str                   # the configured primary master
    secondary: str                 # the secondary station
    etcd_ok: bool
    holding: bool                  # this node's lease is live, on its own clock
    holder: str | None = None      # the leader key's value (None: nobody holds it)
    token: int = 0                 # the leader key's mod revision: the holder's fencing token
    my_token: int = 0              # the last token this node held
    highest: int = 0               # the highest token this node has seen
    last_node: str | None = None   # the `-last` record: who led (or is taking over) most recently
    last_token: int = 0
    last_ready: bool = False       # that leader said its takeover is done
    # the node of the newest term that served (said its takeover was done), from the same record; a term
    # whose promotion failed before serving does not change it. Without a record: the last leader.
    last_served: str | None = None
    link_failing: tuple[str, ...] = ()  # the holder's own public-link checks, confirmed failing
    frozen: bool = False           # the holder is frozen for a hand-over (failback in progress)
    probe: Probe | None = None     # evidence about the holder, for (holder, token) only
    auto: bool = True              # [failover] auto
    yielding: bool = False         # this node just handed over: its failing services are not counted yet
    retry_wait: bool = False       # a promotion failed a moment ago
    rollback: tuple[str, ...] = ()  # sets whose newest image here is older than data this node served
    mirror: bool = False           # [failover] mirror
    etcd_error: str = ""           # why etcd did not answer (for the note)
    holder_lease: tuple[int, int] | None = None  # (seconds left, granted) of the holder's lease, when read


@dataclass(frozen=True)
class Action:
    kind: str
    phase: str
    note: str = ""
    reason: str = ""               # for RESIGN, PROMOTE and TAKE_OVER: why (logged and reported)
    forget: bool = False           # clear the evidence counted so far (it belongs to no finished term)
    mirror: bool = False           # refresh the standby's live mirror


def decide(i: Inputs) -> Action:
    if not i.etcd_ok:
        if i.holding:
            return Action(SERVE, "active", f"etcd unreachable ({i.etcd_error}): serving until the lease runs out "
                          "on this node's clock")
        return Action(NOTHING, _role_phase(i), f"etcd unreachable ({i.etcd_error}): no change of role without it")
    if i.holding:
        if i.link_failing:
            return Action(RESIGN, "active", reason="public link down: " + "; ".join(i.link_failing))
        if i.frozen:
            return Action(SERVE, "active", "frozen for a hand-over: services stopped, the key kept")
        return Action(SERVE, "active")
    if i.holder is None:
        return _no_holder(i)
    if i.holder == i.me:
        return Action(NOTHING, "waiting",
                      "the leader key still carries this node's previous lease; waiting for it to expire")
    if i.me == i.secondary:
        return _watch(i)
    return Action(NOTHING, "fenced" if i.me == i.primary else "replica")


def _role_phase(i: Inputs) -> str:
    if i.holder is not None and i.holder != i.me:
        return "fenced" if i.me == i.primary else "standby" if i.me == i.secondary else "replica"
    return "waiting"


def _no_holder(i: Inputs) -> Action:
    if i.me == i.primary:
        if i.last_served in (None, i.me) and (i.last_node is not None or i.highest <= i.my_token):
            # nobody has served since this node did (or ever): its data is the newest. A later term whose
            # promotion failed before it served (no image there, say) took no write, and does not fence it.
            return Action(CAMPAIGN, "waiting", reason="nobody served after this node")
        return Action(NOTHING, "fenced",
                      f"{i.last_served or 'another node'} served after this node (token {i.last_token or i.highest}): "
                      "this node's data may be older; take over only with `pit failback` or `pit failover promote`")
    if i.me != i.secondary:
        return Action(NOTHING, "waiting")
    if i.last_served == i.me and i.last_node is not None:
        # this node served last and its term ended without anyone after it (etcd away longer than a TTL):
        # its live data is the newest, newer than any image here. It takes the key back on that data, as the
        # primary does, instead of promoting an older image (which the rollback guard rightly refuses)
        return Action(CAMPAIGN, "waiting", reason="this node served last: it takes the key back on its live data")
    if not i.auto:
        return Action(NOTHING, "standby",
                      "no primary holds the leader key; automatic failover is off: run `pit failover promote`")
    if i.retry_wait:
        return Action(NOTHING, "standby", "no primary holds the leader key; a promotion failed a moment ago, "
                      "retrying shortly (see `pit failover status`)")
    if i.rollback:
        return _refuse_rollback(i)
    return Action(PROMOTE, "promoting", reason="the primary's lease expired: it is dead or cut off from etcd")


def _watch(i: Inputs) -> Action:
    standby = dict(phase="standby", mirror=i.mirror)
    p = i.probe
    if p is None:
        return Action(NOTHING, **standby, note="")
    if not p.reachable:
        return Action(NOTHING, **standby, note=_unreachable(i))
    if not p.failing:
        return Action(NOTHING, **standby)
    failing = "; ".join(p.failing)
    if i.yielding:
        return Action(NOTHING, **standby, note=f"{i.holder}'s services fail ({failing}), but this node just handed "
                      "over to it: no automatic failover back")
    if not (i.last_node == i.holder and i.last_token == i.token and i.last_ready):
        return Action(NOTHING, **standby, forget=True,
                      note=f"{i.holder} is taking over (token {i.token}); its services are not counted until it "
                      "says the takeover is done")
    if not i.auto:
        return Action(NOTHING, **standby, note=f"{i.holder}'s services fail: {failing}; automatic failover is off")
    if i.retry_wait:
        return Action(NOTHING, **standby, note=f"{i.holder}'s services fail: {failing}; a promotion failed a "
                      "moment ago, retrying shortly")
    if i.rollback:
        return _refuse_rollback(i)
    return Action(TAKE_OVER, "promoting", reason=f"{i.holder}'s services fail while its agent answers: {failing}")


def _unreachable(i: Inputs) -> str:
    """Why nothing happens while the holder does not answer here: its lease says which case it is."""
    if i.holder_lease is None or i.holder_lease[0] < 0:
        return (f"{i.holder} does not answer here while its key is in etcd: no failover (a partition, or it "
                "died and its lease runs out)")
    left, granted = i.holder_lease
    if left >= granted - granted / 3 - 1:  # renewed within the last renewal period (TTL/3)
        return (f"{i.holder} does not answer here but renews its lease ({left} of {granted} s left): a partition "
                "between the two, no failover")
    return (f"{i.holder} does not answer here and has stopped renewing its lease ({left} of {granted} s left): "
            "it died or lost etcd; promoting when the lease runs out")


def _refuse_rollback(i: Inputs) -> Action:
    return Action(NOTHING, "standby", forget=True,
                  note=f"not promoting: this node served as primary after its newest image of set(s) "
                  f"{', '.join(i.rollback)}; promoting would roll back writes acknowledged here (pin an image with "
                  "`pit failover promote --snapshot SET@SNAP` to take it anyway, the live data is kept first)")
