"""When a scheduled set replicates: its `schedule` table, validated, and the next due time.

A set with `schedule = {every = "15m"}` or `schedule = {daily = ["02:00", "13:00"]}`
streams nothing on events: at each due time its master scans, every sender
reconciles by tree comparison and ends with a consistent point
(`MasterSet._run_scheduled`). The configuration validates the table with
`normalise_schedule`; the master asks `next_due` when to run next.
"""
from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(v) -> float:
    """90, "90s", "15m", "2h", "1d" -> seconds (> 0)."""
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, (int, float)):
        secs = float(v)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(v))
        if not m:
            raise ValueError
        secs = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not secs > 0 or secs == float("inf"):
        raise ValueError
    return secs


def normalise_schedule(v) -> dict | None:
    """A set's `schedule`: None (real-time), {"every": seconds} or {"daily": ["HH:MM", ...]} (sorted)."""
    if v is None or v == {}:
        return None
    if not isinstance(v, dict):
        raise ConfigError('`schedule` must be a table: {every = "15m"} or {daily = ["02:00", "13:00"]}')
    bad = set(v) - {"every", "daily"}
    if bad:
        raise ConfigError(f"`schedule`: unknown keys {sorted(bad)} (use `every` or `daily`)")
    if len(v) != 1:
        raise ConfigError("`schedule`: give `every` or `daily`, not both")
    if "every" in v:
        try:
            return {"every": parse_duration(v["every"])}
        except ValueError:
            raise ConfigError(f"`schedule.every`: {v['every']!r} is not a positive duration "
                              '(seconds, or e.g. "90s", "15m", "2h", "1d")') from None
    times = v["daily"]
    if isinstance(times, str):
        times = [times]
    if not isinstance(times, list) or not times:
        raise ConfigError('`schedule.daily` must be a non-empty list of times of day ("HH:MM")')
    out = set()
    for t in times:
        m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", t) if isinstance(t, str) else None
        if not m:
            raise ConfigError(f"`schedule.daily`: {t!r} is not a time of day (\"HH:MM\", 00:00 to 23:59)")
        out.add(f"{int(m.group(1)):02d}:{m.group(2)}")
    return {"daily": sorted(out)}


def next_due(schedule: dict, now: float, last: float | None = None) -> float:
    """Wall-clock time of the next scheduled reconcile after `now`.

    `every`: at start (no `last`), then `every` seconds after the previous run
    began. `daily`: the next of the listed local times of day."""
    if "every" in schedule:
        return now if last is None else max(now, last + schedule["every"])
    import datetime as dt

    t = dt.datetime.fromtimestamp(now)
    for day in (0, 1, 2):
        d = (t + dt.timedelta(days=day)).date()
        for hm in schedule["daily"]:
            h, m = map(int, hm.split(":"))
            cand = dt.datetime.combine(d, dt.time(h, m)).timestamp()
            if cand > now:
                return cand
    raise AssertionError("unreachable: a daily schedule has a time within two days")
