"""Configuration: the agent's own file, and the cluster's sets (on the primary).

The agent file (`pit agent --config node.toml`) says where this node keeps
its membership (`state`), where it listens, which repository it writes
as a replica, and, on the primary only, the cluster file:

    state = "/var/lib/pit/state"
    repo = "/var/lib/pit/repo"          # needed when the node replicates any set
    listen = "0.0.0.0:7400"             # default: the address given at init/join
    cluster = "/etc/pit/cluster.toml"   # primary only

The cluster file defines the replication sets:

    [sets.web]
    master = "primary"            # the node that owns (watches) the set
    replicas = ["r1", "r2"]
    paths = ["/srv/www"]          # on the master; base names must be distinct
    mode = "mirror"               # or "archive"
    point_quiet = 5               # a consistent point after N s of quiet (0: off)
    point_every = 0               # and/or every N minutes (0: off)
    delete_percent = 50           # mass-delete breaker: more than this % of the set's files ...
    delete_count = 1000           # ... or more than this many files in one batch
    debounce = 0.3                # seconds of quiet before a burst of events is processed
    rescan = 300                  # seconds between reconcile scans (safety net)
    schedule = {every = "15m"}    # optional: scheduled instead of real-time replication,
                                  # or {daily = ["02:00", "13:00"]} (the master's local time)

The primary gives each distinct content a new version number and pushes
{version, sets, roster} to every node, which keeps it in its state
directory (cluster.json) and applies it without a restart.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib

from store.snapshots import check_set_name

from .errors import ConfigError
from .membership import _read_json, _write_json, check_node_id, parse_address

SET_DEFAULTS = {
    "mode": "mirror", "point_quiet": 5.0, "point_every": 0.0, "delete_percent": 50.0, "delete_count": 1000,
    "delete_min": 10, "debounce": 0.3, "settle": 0.2, "settle_max": 5.0, "rescan": 300.0, "queue": 10000,
    "avg_chunk": 16384,
}


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


def _load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no configuration file at {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_agent_config(path: str) -> dict:
    raw = _load_toml(path)
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(raw) - {"state", "repo", "listen", "cluster", "control", "log"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    if "state" not in raw:
        raise ConfigError(f"{path}: `state` (the node's state directory) is required")
    cfg = {k: (os.path.join(base, v) if k in ("state", "repo", "cluster", "control", "log") else v)
           for k, v in raw.items()}
    if "listen" in cfg:
        parse_address(cfg["listen"])
    return cfg


def normalise_sets(raw: dict, where: str = "cluster config") -> dict:
    sets = raw.get("sets", {})
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}: [sets] must be a table")
    unknown = set(raw) - {"sets"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    out = {}
    for name, s in sets.items():
        try:
            check_set_name(name)
        except Exception as exc:
            raise ConfigError(f"{where}: set {name!r}: {exc}") from None
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: set {name!r} must be a table")
        bad = set(s) - set(SET_DEFAULTS) - {"master", "replicas", "paths", "schedule"}
        if bad:
            raise ConfigError(f"{where}: set {name!r}: unknown keys {sorted(bad)}")
        d = {**SET_DEFAULTS, **s}
        try:
            check_node_id(d.get("master", ""))
            reps = d.get("replicas", [])
            if not isinstance(reps, list) or not reps:
                raise ConfigError("`replicas` must be a non-empty list of node ids")
            for r in reps:
                check_node_id(r)
            if d["master"] in reps:
                raise ConfigError("a set's master cannot be its own replica")
            paths = d.get("paths", [])
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and os.path.isabs(p)
                                                                    for p in paths):
                raise ConfigError("`paths` must be a non-empty list of absolute paths")
            names = [os.path.basename(os.path.normpath(p)) for p in paths]
            if len(set(names)) != len(names) or "" in names:
                raise ConfigError("source paths must have distinct, non-empty base names")
            if d["mode"] not in ("mirror", "archive"):
                raise ConfigError("`mode` must be \"mirror\" or \"archive\"")
            for k in ("point_quiet", "point_every", "delete_percent", "debounce", "settle", "settle_max", "rescan"):
                d[k] = float(d[k])
                if d[k] < 0:
                    raise ConfigError(f"`{k}` must not be negative")
            for k in ("delete_count", "delete_min", "queue", "avg_chunk"):
                d[k] = int(d[k])
            sched = normalise_schedule(d.pop("schedule", None))
            if sched is not None:  # absent when real-time: configurations without it keep their version
                d["schedule"] = sched
        except (ConfigError, Exception) as exc:
            msg = str(exc)
            raise ConfigError(f"{where}: set {name!r}: {msg}") from None
        d["paths"] = [os.path.normpath(p) for p in paths]
        out[name] = d
    return out


def load_cluster_file(path: str) -> dict:
    return normalise_sets(_load_toml(path), path)


def versioned(state_dir: str, sets: dict, roster: dict, primary: str) -> dict:
    """The pushed form: a new version number whenever sets or roster change."""
    body = {"sets": sets, "roster": roster, "primary": primary}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    vpath = os.path.join(state_dir, "config_version.json")
    cur = _read_json(vpath)
    if cur.get("hash") != digest:
        cur = {"version": int(cur.get("version", 0)) + 1, "hash": digest}
        _write_json(vpath, cur)
    return {"version": cur["version"], **body}


def check_pushed(cfg: dict) -> dict:
    """Validate a configuration received from the primary before keeping it."""
    if not isinstance(cfg.get("version"), int) or not isinstance(cfg.get("roster"), dict):
        raise ConfigError("pushed configuration lacks a version or roster")
    normalise_sets({"sets": cfg.get("sets", {})}, "pushed configuration")
    return cfg


def save_pushed(state_dir: str, cfg: dict) -> None:
    _write_json(os.path.join(state_dir, "cluster.json"), cfg)


def load_pushed(state_dir: str) -> dict:
    return _read_json(os.path.join(state_dir, "cluster.json"))
