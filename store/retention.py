"""Which snapshots a set keeps: a hard cap plus keep-last/hourly/daily/weekly/monthly thinning.

The cap (64 by default, never unbounded) is the promise: a set never holds
more. Inside it, the keep rules choose like restic's `forget`: the newest
snapshot of each of the N most recent hours/days/weeks/months is kept. With
no keep rule set, every snapshot is kept up to the cap. Pinned snapshots are
always kept and count against the cap; the newest snapshot is always kept.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import msgpack

from .errors import InvalidArgument, PinRefused
from .prune import DropStats, drop_snapshot
from .snapmeta import get_meta, record_setting, update_meta
from .snapshots import Snapshot, list_snapshots

DEFAULT_MAX = 64
MAX_CAP = 1000


@dataclass
class Policy:
    max: int = DEFAULT_MAX
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def check(self) -> "Policy":
        if not 1 <= self.max <= MAX_CAP:
            raise InvalidArgument(f"the snapshot cap must be between 1 and {MAX_CAP}, not {self.max}")
        for k, v in asdict(self).items():
            if v < 0:
                raise InvalidArgument(f"{k} must not be negative")
        return self

    @property
    def thins(self) -> bool:
        return any((self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly))


BUCKETS = {
    "keep_hourly": "%Y-%m-%d %H",
    "keep_daily": "%Y-%m-%d",
    "keep_weekly": "%G-W%V",
    "keep_monthly": "%Y-%m",
}


def get_policy(repo, txn, set_name: str) -> Policy:
    raw = txn.get(set_name.encode(), db=repo.index.db["sets"])
    if raw is None:
        return Policy()
    d = msgpack.unpackb(raw).get("retention", {})
    return Policy(**{k: int(v) for k, v in d.items() if k in Policy.__dataclass_fields__})


def set_policy(writer, set_name: str, policy: Policy) -> None:
    policy.check()
    pinned = pinned_ids(writer.repo, writer.txn, list_snapshots(writer.repo, writer.txn, set_name))
    if len(pinned) > policy.max - 1:
        raise PinRefused(
            f"set {set_name} has {len(pinned)} pinned snapshots; a cap of {policy.max} would leave no room "
            f"for the newest one (unpin some first)"
        )
    key = set_name.encode()
    raw = writer.txn.get(key, db=writer.db["sets"])
    d = msgpack.unpackb(raw) if raw else {}
    d["retention"] = asdict(policy)
    writer.txn.put(key, msgpack.packb(d), db=writer.db["sets"])
    record_setting(writer, "policy", key, asdict(policy))


@dataclass
class Decision:
    snapshot: Snapshot
    keep: bool
    reasons: list[str]

    def to_json(self) -> dict:
        return {"id": self.snapshot.hex, "set": self.snapshot.set, "name": self.snapshot.name,
                "keep": self.keep, "reasons": self.reasons}


def decide(snaps: list[Snapshot], policy: Policy, pinned: set[bytes]) -> list[Decision]:
    """Decide keep/drop for one set's snapshots (any order in, newest first out)."""
    ordered = sorted(snaps, key=lambda s: s.time_ns, reverse=True)
    reasons: dict[bytes, list[str]] = {s.id: [] for s in ordered}
    if ordered:
        reasons[ordered[0].id].append("newest")
    for s in ordered:
        if s.id in pinned:
            reasons[s.id].append("pinned")
    if policy.thins:
        for s in ordered[:policy.keep_last]:
            reasons[s.id].append("last")
        for rule, fmt in BUCKETS.items():
            n = getattr(policy, rule)
            if not n:
                continue
            seen: list[str] = []
            for s in ordered:
                b = time.strftime(fmt, time.gmtime(s.time_ns // 1_000_000_000))
                if b in seen:
                    continue
                if len(seen) >= n:
                    break
                seen.append(b)
                reasons[s.id].append(rule.removeprefix("keep_"))
    else:
        for s in ordered:
            reasons[s.id].append("within cap")
    kept = [s for s in ordered if reasons[s.id]]
    # The cap wins over thinning: drop the oldest unpinned survivors past it.
    capped: set[bytes] = set()
    over = len(kept) - policy.max
    for s in reversed(kept):
        if over <= 0:
            break
        if s.id in pinned or s is ordered[0]:
            continue
        reasons[s.id] = []
        capped.add(s.id)
        over -= 1
    return [Decision(s, bool(reasons[s.id]), reasons[s.id] or
                     ([f"beyond the cap of {policy.max}"] if s.id in capped else ["no keep rule matched"]))
            for s in ordered]


def pinned_ids(repo, txn, snaps: list[Snapshot]) -> set[bytes]:
    return {s.id for s in snaps if get_meta(repo, txn, s.id).get("pinned")}


def apply_retention(writer, set_name: str, policy: Policy | None = None, dry_run: bool = False
                    ) -> tuple[list[Decision], DropStats]:
    repo, txn = writer.repo, writer.txn
    policy = (policy or get_policy(repo, txn, set_name)).check()
    snaps = list_snapshots(repo, txn, set_name)
    decisions = decide(snaps, policy, pinned_ids(repo, txn, snaps))
    stats = DropStats()
    if not dry_run:
        for d in decisions:
            if not d.keep:
                drop_snapshot(writer, d.snapshot, stats)
    return decisions, stats


def pin(writer, snap: Snapshot, on: bool = True) -> None:
    repo, txn = writer.repo, writer.txn
    if on:
        policy = get_policy(repo, txn, snap.set)
        snaps = list_snapshots(repo, txn, snap.set)
        already = pinned_ids(repo, txn, snaps)
        if snap.id not in already and len(already) + 1 > policy.max - 1:
            raise PinRefused(
                f"set {snap.set} already has {len(already)} pinned snapshots; its cap of {policy.max} "
                f"must leave room for the newest one (unpin one or raise the cap)"
            )
    update_meta(writer, snap.id, pinned=on)
    record_setting(writer, "pin", snap.id, on)
