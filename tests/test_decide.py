"""The failover decision (replicator/failover/decide.py) over its whole input space.

Every combination of the inputs that matter is fed to `decide`; each invariant of docs/failover.md is a
predicate that must hold for every one of them (safety: who may promote, campaign, resign), and the
liveness rules say when it must act. The controller only gathers these inputs and carries the action out,
so a stale counter, an unreachable holder or a healed partition can only promote by changing this table.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from replicator.failover.decide import (CAMPAIGN, NOTHING, PROMOTE, RESIGN, SERVE, TAKE_OVER, Action, Inputs, Probe,
                                        decide)
from replicator.ops.metrics import PHASES

A, B, C = "a", "b", "c"  # the configured primary, the secondary station, another replica
FAILING = ("tcp a:5432: refused (3x)",)
# an unreachable holder with failures counted is not what the probe loop produces, but decide must not trust it
PROBES = (None, Probe(reachable=False), Probe(reachable=False, failing=FAILING), Probe(reachable=True),
          Probe(reachable=True, failing=FAILING))


def every_input():
    for me, etcd_ok, holding, holder, mine_newer, last, last_matches, last_ready, served, link, frozen, probe, \
            auto, yielding, retry_wait, rollback in itertools.product(
                (A, B, C), (True, False), (True, False), (None, A, B, C), (True, False), (None, A, B),
                (True, False), (True, False), (None, A, B), ((), ("nic eth0: down (3x)",)), (True, False), PROBES,
                (True, False), (True, False), (True, False), ((), ("db",))):
        if served is not None and me == C:
            continue  # only the primary and the secondary read it (decide's `_no_holder`): one value for C
        token = 40 if holder else 0
        yield Inputs(me=me, primary=A, secondary=B, etcd_ok=etcd_ok, etcd_error="" if etcd_ok else "refused",
                     holding=holding, holder=holder, token=token, my_token=30, highest=30 if mine_newer else 40,
                     last_node=last, last_token=token if last_matches else 7, last_ready=last_ready,
                     last_served=served,
                     link_failing=link, frozen=frozen, probe=probe, auto=auto, yielding=yielding,
                     retry_wait=retry_wait, rollback=rollback, mirror=True)


ALL = list(every_input())
DECIDED = [(i, decide(i)) for i in ALL]  # decided once: every rule below reads these (decide is pure)


def test_the_space_is_what_we_think():
    assert len(ALL) == (3 + 3 + 1) * 2 * 2 * 4 * 2 * 3 * 2 * 2 * 2 * 2 * 5 * 2 * 2 * 2 * 2  # last_served: 3 on A, B


def _violations(pred) -> list[tuple[Inputs, Action]]:
    out = []
    for i, a in DECIDED:
        if not pred(i, a):
            out.append((i, a))
            if len(out) > 3:
                break
    return out


def _evidence_of_this_term(i: Inputs) -> bool:
    return (i.probe is not None and i.probe.reachable and bool(i.probe.failing)
            and (i.last_node, i.last_token, i.last_ready) == (i.holder, i.token, True))


SAFETY = {
    "every action is known and has a phase the metrics know": lambda i, a: (
        a.kind in (SERVE, RESIGN, CAMPAIGN, PROMOTE, TAKE_OVER, NOTHING) and a.phase in PHASES),
    "without etcd nobody changes role": lambda i, a: i.etcd_ok or a.kind == (SERVE if i.holding else NOTHING),
    "only the secondary station promotes": lambda i, a: a.kind not in (PROMOTE, TAKE_OVER) or i.me == B,
    "a node holding the key never promotes or campaigns": lambda i, a: not i.holding or a.kind in (SERVE, RESIGN),
    "a holder resigns only for its own public link": lambda i, a: a.kind != RESIGN or (i.holding and i.link_failing),
    "a holder with a good link serves": lambda i, a: not (i.etcd_ok and i.holding and not i.link_failing)
    or a.kind == SERVE,
    "promotion without a holder only": lambda i, a: a.kind != PROMOTE or i.holder is None,
    "no promotion while auto is off or while a failed one is waited out": lambda i, a: (
        a.kind not in (PROMOTE, TAKE_OVER) or (i.auto and not i.retry_wait)),
    "no take-over of the node this one just handed over to": lambda i, a: a.kind != TAKE_OVER or not i.yielding,
    "never roll back data this node served": lambda i, a: a.kind not in (PROMOTE, TAKE_OVER) or not i.rollback,
    "a take-over needs evidence of this term: reached, failing, and after the holder said it is ready":
        lambda i, a: a.kind != TAKE_OVER or (i.holder not in (None, i.me) and _evidence_of_this_term(i)),
    "an unreachable holder (a partition) or no probe yet is never evidence": lambda i, a: (
        a.kind != TAKE_OVER or (i.probe is not None and i.probe.reachable)),
    "a node takes the key back only if nobody served after it": lambda i, a: a.kind != CAMPAIGN or (
        i.holder is None and ((i.me == A and i.last_served in (None, A)
                               and (i.last_node is not None or i.highest <= i.my_token))
                              or (i.me == B and i.last_served == B and i.last_node is not None))),
    "the secondary never promotes an image over the data it served last": lambda i, a: (
        a.kind not in (PROMOTE, TAKE_OVER) or not (i.holder is None and i.last_served == i.me
                                                   and i.last_node is not None)),
    "evidence from before the holder was ready is forgotten": lambda i, a: not (
        i.me == B and i.etcd_ok and not i.holding and i.holder not in (None, B) and i.probe is not None
        and i.probe.reachable and i.probe.failing and not i.yielding
        and (i.last_node, i.last_token, i.last_ready) != (i.holder, i.token, True)) or a.forget,
}


@pytest.mark.parametrize("rule", sorted(SAFETY))
def test_safety(rule):
    assert _violations(SAFETY[rule]) == []


LIVENESS = {
    "the secondary promotes when the lease is gone": (
        lambda i: i.me == B and i.etcd_ok and not i.holding and i.holder is None and i.auto
        and not i.retry_wait and not i.rollback and not (i.last_served == B and i.last_node is not None), PROMOTE),
    "the secondary takes over on confirmed failing services of a ready holder that answers": (
        lambda i: i.me == B and i.etcd_ok and not i.holding and i.holder in (A, C) and _evidence_of_this_term(i)
        and i.auto and not i.yielding and not i.retry_wait and not i.rollback, TAKE_OVER),
    "the secondary takes the key back when it served last": (
        lambda i: i.me == B and i.etcd_ok and not i.holding and i.holder is None and i.last_served == B
        and i.last_node is not None, CAMPAIGN),
    "the primary takes the key when nobody served after it": (
        lambda i: i.me == A and i.etcd_ok and not i.holding and i.holder is None and i.last_served in (None, A)
        and (i.last_node is not None or i.highest <= i.my_token), CAMPAIGN),
    "a holder whose public link is down resigns": (lambda i: i.etcd_ok and i.holding and i.link_failing, RESIGN),
}


@pytest.mark.parametrize("rule", sorted(LIVENESS))
def test_liveness(rule):
    when, kind = LIVENESS[rule]
    cases = [(i, a) for i, a in DECIDED if when(i)]
    assert cases
    assert [(i, a) for i, a in cases if a.kind != kind][:3] == []


def test_the_standby_mirrors_and_the_others_do_not():
    for i, a in DECIDED:
        if a.mirror:
            assert i.me == B and a.phase == "standby" and a.kind == NOTHING


# The sequences of issue 14, as the inputs the secondary saw.

def test_failback_evidence_built_as_primary_never_counts_for_the_new_term():
    """B froze and handed over; A holds token 41 but has not said its takeover is done; B's probes of A
    fail (its services are still starting): B forgets and waits, it does not promote over A."""
    i = Inputs(me=B, primary=A, secondary=B, etcd_ok=True, holding=False, holder=A, token=41, my_token=40,
               highest=41, last_node=A, last_token=41, last_ready=False,
               probe=Probe(reachable=True, failing=("tcp a:5432: Connection refused (21x)",)))
    a = decide(i)
    assert a.kind == NOTHING and a.forget and "taking over" in a.note


def test_a_healed_partition_starts_from_nothing():
    """During the partition the probes did not reach A: no evidence; after the heal the first probe that
    reaches A starts a new count (the probe loop resets on an unanswered ping), so nothing happens."""
    during = Inputs(me=B, primary=A, secondary=B, etcd_ok=True, holding=False, holder=A, token=41,
                    last_node=A, last_token=41, last_ready=True,
                    probe=Probe(reachable=False, failing=("tcp a:5432: timed out (16x)",)))
    assert decide(during).kind == NOTHING and "partition" in decide(during).note


def test_a_configuration_change_does_not_touch_a_holder():
    i = Inputs(me=B, primary=A, secondary=B, etcd_ok=True, holding=True, holder=B, token=41, my_token=41,
               highest=41, auto=False)
    assert decide(i).kind == SERVE


def test_a_frozen_holder_keeps_the_key():
    i = Inputs(me=B, primary=A, secondary=B, etcd_ok=True, holding=True, holder=B, token=41, frozen=True)
    a = decide(i)
    assert a.kind == SERVE and "frozen" in a.note


def test_rollback_is_refused_with_the_way_out():
    i = Inputs(me=B, primary=A, secondary=B, etcd_ok=True, holding=False, holder=None, rollback=("db",))
    a = decide(i)
    assert a.kind == NOTHING and "--snapshot" in a.note and "db" in a.note


def test_an_unanswering_holder_is_named_by_its_lease():
    """While the holder's agent does not answer here, its lease tells a partition (still renewed) from a
    death (running out): the note says which, and neither is a reason to act before the key is gone."""
    base = dict(me=B, primary=A, secondary=B, etcd_ok=True, holding=False, holder=A, token=41,
                last_node=A, last_token=41, last_ready=True, probe=Probe(reachable=False))
    renewing = decide(Inputs(**base, holder_lease=(5, 6)))
    dying = decide(Inputs(**base, holder_lease=(2, 6)))
    unknown = decide(Inputs(**base))
    assert "renews its lease" in renewing.note and "partition" in renewing.note
    assert "stopped renewing" in dying.note
    assert "a partition, or it died" in unknown.note
    assert {renewing.kind, dying.kind, unknown.kind} == {NOTHING}


def test_a_lease_that_expires_after_a_failback_is_a_failover():
    """Harness seed 2006: the primary isolated a minute after `pit failback`. The hand-over moved the key in
    one transaction, so a free key is the new holder's failure: the node that handed over promotes."""
    i = Inputs(me=B, primary=A, secondary=B, etcd_ok=True, holding=False, holder=None, yielding=True,
               last_node=A, last_token=41, last_ready=True)
    assert decide(i).kind == PROMOTE


def test_a_promotion_that_failed_before_serving_does_not_fence_the_primary():
    """Namespace harness seed 2013: etcd died before any point; when it came back the secondary took the key,
    had no image, and resigned. Its record says it never served, so the primary's data is still the newest:
    it takes the key back instead of waiting, fenced, for a failback from a node that never served."""
    i = Inputs(me=A, primary=A, secondary=B, etcd_ok=True, holding=False, holder=None, my_token=2, highest=7,
               last_node=B, last_token=7, last_ready=False, last_served=A)
    assert decide(i).kind == CAMPAIGN
    assert decide(replace(i, last_served=B)).kind == NOTHING  # B served after it: fenced


def test_the_secondary_that_served_last_takes_the_key_back_on_its_live_data():
    """PostgreSQL harness seed 3011: the promoted secondary's term ended (etcd away) before any point of it;
    its own newest image predates what it served, so promoting refused (a rollback), and the primary was
    fenced by it: nobody served. It served last, so it takes the key back without materialising anything."""
    i = Inputs(me=B, primary=A, secondary=B, etcd_ok=True, holding=False, holder=None, my_token=7, highest=7,
               last_node=B, last_token=7, last_ready=True, last_served=B, rollback=("db",))
    assert decide(i).kind == CAMPAIGN
    assert decide(replace(i, me=A, my_token=2)).kind == NOTHING  # and the primary stays fenced
