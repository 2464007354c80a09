"""Configuration: the agent's own file, and the cluster's sets (on the primary).

The agent file (`pit agent --config node.toml`) says where this node keeps
its membership (`state`), where it listens, which repository it writes
as a replica, and, on the primary only, the cluster file:

    state = "/var/lib/pit/state"
    repo = "/var/lib/pit/repo"          # needed when the node replicates any set
    listen = "0.0.0.0:7400"             # default: the address given at init/join
    cluster = "/etc/pit/cluster.toml"   # primary only
    live = {web = ["/srv/www"]}         # secondary only: where a promotion materialises each set
                                        # (default: the set's paths; base names must match them)
    metrics = "0.0.0.0:9474"            # Prometheus metrics (docs/metrics-alerts.md)
    app = {sales = {port = 5433}}       # this node's own application settings, over the set's
                                        # [sets.NAME.app] (a socket, port or client that differs here)
    [alerts]                            # alerts that reach a person: command and/or SMTP
    command = "/usr/local/bin/page-me"

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

Failover (optional; docs/failover.md) protects the sets whose master is the
cluster's primary: a secondary station takes over when the primary fails,
guarded by a leader key in etcd:

    [failover]
    secondary = "r1"              # the replica that takes over
    etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
    ttl = 5                       # lease seconds: a silent primary stops acting after ttl - margin
    heartbeat = 0.5               # seconds between checks on the secondary
    confirm = 3                   # consecutive failures before a check counts
    checks = [{tcp = "10.0.0.1:5432"}, {http = "http://10.0.0.1/", status = 200, text = "Welcome"},
              {command = "pg_isready -h 10.0.0.1"}]      # the primary's services, seen from the secondary
    link = [{tcp = "10.0.0.254:53"}, {nic = "eth0"}]   # the primary's public link, checked on the primary
    takeover = ["/etc/pit/hooks/start-services"]       # run on the new primary after materialising
    demote = ["/etc/pit/hooks/stop-services"]          # run on a primary that stops acting
    hook_timeout = 60
    auto = true                   # false: detect and report, promote only on `pit failover promote`
    rejoin = true                 # a returning old primary becomes a replica of the new one (failback)
    app_check = true              # image selection runs the set's application check
    mirror = true                 # the secondary keeps its live paths at the newest consistent point

The primary gives each distinct content a new version number and pushes
{version, sets, failover, roster} to every node, which keeps it in its state
directory (cluster.json) and applies it without a restart.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib

from store.snapshots import check_set_name

from .errors import ConfigError, TemplateError
from .stream.membership import _read_json, _write_json, check_node_id, parse_address
from .stream.schedule import normalise_schedule

SET_DEFAULTS = {
    "mode": "mirror", "point_quiet": 5.0, "point_every": 0.0, "delete_percent": 50.0, "delete_count": 1000,
    "delete_min": 10, "debounce": 0.3, "settle": 0.2, "settle_max": 5.0, "rescan": 300.0, "queue": 10000,
    "avg_chunk": 16384,
}


def _load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no configuration file at {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


AGENT_KEYS = ("state", "repo", "listen", "cluster", "control", "log", "live", "metrics", "alerts", "app")
def with_local_app(sets: dict, local: dict | None) -> dict:
    """The sets with this node's `app` settings over each set's application
    table: the cluster file is one for all nodes, but after a failover the
    new primary's database may listen on another socket or port, and its
    hooks must reach the database that runs here."""
    if not local:
        return sets
    out = dict(sets)
    for name, over in local.items():
        s = out.get(name)
        if isinstance(s, dict) and isinstance(s.get("app"), dict):
            out[name] = {**s, "app": {**s["app"], **over}}
    return out


def load_agent_config(path: str) -> dict:
    return check_agent_config(_load_toml(path), path)


def check_agent_config(raw: dict, path: str) -> dict:
    """The agent file's values as `load_agent_config` returns them (paths made absolute against the file's
    directory); ConfigError naming `path` when one is bad."""
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(raw) - set(AGENT_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    if "state" not in raw:
        raise ConfigError(f"{path}: `state` (the node's state directory) is required")
    cfg = {k: (os.path.join(base, v) if k in ("state", "repo", "cluster", "control", "log") else v)
           for k, v in raw.items()}
    if "listen" in cfg:
        parse_address(cfg["listen"])
    live = cfg.get("live", {})
    if not isinstance(live, dict) or not all(isinstance(v, list) and v and all(isinstance(p, str) and os.path.isabs(p)
                                                                                 for p in v) for v in live.values()):
        raise ConfigError(f"{path}: `live` maps set names to lists of absolute paths (where a promoted "
                          "secondary materialises each set)")
    app = cfg.get("app", {})
    if not isinstance(app, dict) or not all(isinstance(v, dict) for v in app.values()):
        raise ConfigError(f"{path}: `app` maps set names to tables of application settings (app = {{NAME = {{...}}}})")
    for name, over in app.items():
        from .apps.templates import check_app_override

        try:
            check_app_override(over, f"app.{name}")
        except TemplateError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    try:
        if "metrics" in cfg:
            from .ops.metrics import validate_metrics_address

            validate_metrics_address(cfg["metrics"])
        if "alerts" in cfg:
            from .ops.alerts import validate_alerts

            cfg["alerts"] = validate_alerts(cfg["alerts"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


# ------------------------------------------------------------------ the agent file `pit cluster init`/`pit join` write
AGENT_FILE_KEYS = ("state", "repo", "cluster", "metrics")  # what --agent-config writes, in this order


def _toml_string(v: str) -> str:
    """A TOML basic string (control characters, DEL, quote and backslash escaped)."""
    out = []
    for c in v:
        if c in "\"\\":
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def render_agent_config(values: dict, written_by: str) -> str:
    """The agent file for `values` (keys of AGENT_FILE_KEYS; paths absolute), with a header naming the command."""
    lines = [f"# this node's agent configuration (pit agent --config), written by `{written_by}`;",
             "# check it after an edit with `pit config check FILE` (keys: docs/replication.md)"]
    for k in AGENT_FILE_KEYS:
        if values.get(k) is not None:
            lines.append(f"{k} = {_toml_string(values[k])}")
    return "\n".join(lines) + "\n"


def _not_a_directory(path: str) -> str:
    """The ancestor of `path` nearest the root that exists and is not a directory (else `path`'s parent)."""
    found = os.path.dirname(path)
    d = found
    while d != os.path.dirname(d):
        if os.path.lexists(d) and not os.path.isdir(d):
            found = d
        d = os.path.dirname(d)
    return found


def plan_agent_config(path: str, values: dict, written_by: str, force: bool = False,
                      option: str = "--agent-config") -> dict:
    """What `pit cluster init` / `pit join` check before they change anything: the file they would write
    loads as the agent loads it, PATH's directory exists (it is created) and is writable, and a file already
    at PATH either says the same (it is left alone) or is replaced only with `force`.

    Returns {"path", "text", "action"}: action "write" (no file yet), "replace" (force) or "unchanged".
    Every refusal is one ConfigError line naming `option` and the path."""
    if not path or not path.strip():
        raise ConfigError(f"{option}: give the file's path (e.g. /etc/pit/agent.toml)")
    path = os.path.abspath(path)
    if "\n" in path or "\r" in path or "\0" in path:
        raise ConfigError(f"{option} {path!r}: a path with a line break or NUL")
    text = render_agent_config(values, written_by)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{option} {path}: a path in it is not UTF-8 text") from None
    new = tomllib.loads(text)
    try:
        check_agent_config(new, path)
    except ConfigError as exc:
        raise ConfigError(f"{option} {path}: {str(exc).removeprefix(path + ': ')}") from None
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path}: is a directory (give the file's path, e.g. {path}/agent.toml)")
    d = os.path.dirname(path)
    try:
        os.makedirs(d, mode=0o755, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{option} {path}: {_not_a_directory(path)} is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create the directory {d}: {exc.strerror}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {d} (permission denied)")
    try:
        with open(path, "rb") as f:
            existing = f.read()
    except FileNotFoundError:
        return {"path": path, "text": text, "action": "write"}
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read the file already there: {exc.strerror}") from None
    try:
        old = tomllib.loads(existing.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        old = None
    if old == new:
        return {"path": path, "text": text, "action": "unchanged"}
    if not force:
        what = "not TOML" if old is None else \
            "differs in " + ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))
        raise ConfigError(f"{option} {path}: a different file is already there ({what}); "
                          "give --force to replace it")
    return {"path": path, "text": text, "action": "replace"}


def write_agent_config(plan: dict) -> str:
    """Write what `plan_agent_config` planned (atomically, mode 0644); returns "wrote", "replaced" or
    "unchanged"."""
    if plan["action"] == "unchanged":
        return "unchanged"
    path = plan["path"]
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(plan["text"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConfigError(f"cannot write the agent configuration {path}: {exc.strerror}") from None
    return "replaced" if plan["action"] == "replace" else "wrote"


def normalise_sets(raw: dict, where: str = "cluster config") -> dict:
    sets = raw.get("sets", {})
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}: [sets] must be a table")
    unknown = set(raw) - {"sets", "failover"}
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
        bad = set(s) - set(SET_DEFAULTS) - {"master", "replicas", "paths", "schedule", "app"}
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
            if "app" in d and not isinstance(d["app"], dict):
                raise ConfigError("`app` (the application template's settings) must be a table")
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


def load_cluster(path: str) -> dict:
    """{"sets": ..., "failover": ... or None}: the whole cluster file, validated."""
    raw = _load_toml(path)
    sets = normalise_sets(raw, path)
    return {"sets": sets, "failover": normalise_failover(raw.get("failover"), sets, path)}


FAILOVER_DEFAULTS = {"ttl": 5, "heartbeat": 0.5, "confirm": 3, "checks": [], "link": [], "takeover": [],
                     "demote": [], "hook_timeout": 60.0, "auto": True, "rejoin": True, "app_check": True,
                     "mirror": True, "key": ""}
CHECK_KINDS = {"tcp", "http", "command", "nic"}


def _check_list(v, key: str, kinds: set[str]) -> list[dict]:
    if not isinstance(v, list):
        raise ConfigError(f"`failover.{key}` must be a list of tables")
    out = []
    for i, c in enumerate(v):
        if not isinstance(c, dict):
            raise ConfigError(f"`failover.{key}[{i}]` must be a table such as {{tcp = \"host:port\"}}")
        kind = [k for k in c if k in kinds]
        if len(kind) != 1:
            raise ConfigError(f"`failover.{key}[{i}]` needs exactly one of {sorted(kinds)}")
        extra = set(c) - kinds - {"status", "text", "timeout", "name"}
        if extra:
            raise ConfigError(f"`failover.{key}[{i}]`: unknown keys {sorted(extra)}")
        if kind[0] == "tcp":
            parse_address(c["tcp"])
        if not isinstance(c[kind[0]], str) or not c[kind[0]]:
            raise ConfigError(f"`failover.{key}[{i}].{kind[0]}` must be a non-empty string")
        out.append({"timeout": 2.0, **c})
    return out


def normalise_failover(raw, sets: dict, where: str = "cluster config") -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [failover] must be a table")
    bad = set(raw) - set(FAILOVER_DEFAULTS) - {"secondary", "etcd"}
    if bad:
        raise ConfigError(f"{where}: failover: unknown keys {sorted(bad)}")
    d = {**FAILOVER_DEFAULTS, **raw}
    try:
        check_node_id(d.get("secondary", ""))
    except Exception:
        raise ConfigError(f"{where}: `failover.secondary` must name the node that takes over") from None
    if not isinstance(d.get("etcd"), list) or not d["etcd"] or not all(isinstance(e, str) for e in d["etcd"]):
        raise ConfigError(f"{where}: `failover.etcd` must be a non-empty list of endpoints (\"http://host:2379\")")
    try:
        d["ttl"] = int(d["ttl"])
        d["confirm"] = int(d["confirm"])
        d["heartbeat"] = float(d["heartbeat"])
        d["hook_timeout"] = float(d["hook_timeout"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: failover: ttl, confirm, heartbeat and hook_timeout must be numbers") from None
    if d["ttl"] < 2:
        raise ConfigError(f"{where}: `failover.ttl` must be at least 2 (etcd's smallest lease)")
    if d["confirm"] < 1 or d["heartbeat"] <= 0 or d["hook_timeout"] <= 0:
        raise ConfigError(f"{where}: failover: confirm >= 1, heartbeat > 0 and hook_timeout > 0")
    for k in ("auto", "rejoin", "app_check", "mirror"):
        if not isinstance(d[k], bool):
            raise ConfigError(f"{where}: `failover.{k}` must be true or false")
    for k in ("takeover", "demote"):
        if isinstance(d[k], str):
            d[k] = [d[k]]
        if not isinstance(d[k], list) or not all(isinstance(c, (str, list)) for c in d[k]):
            raise ConfigError(f"{where}: `failover.{k}` must be a list of commands")
    try:
        d["checks"] = _check_list(d["checks"], "checks", {"tcp", "http", "command"})
        d["link"] = _check_list(d["link"], "link", {"tcp", "nic", "command"})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    protected = [n for n, s in sets.items() if s["master"] != d["secondary"]]
    for n in protected:
        if d["secondary"] not in sets[n]["replicas"]:
            raise ConfigError(f"{where}: `failover.secondary` {d['secondary']!r} must be a replica of set {n!r}")
    return d


def versioned(state_dir: str, sets: dict, roster: dict, primary: str, failover: dict | None = None) -> dict:
    """The pushed form: a new version number whenever sets, failover or roster change."""
    body = {"sets": sets, "roster": roster, "primary": primary}
    if failover:  # absent without failover: older configurations keep their version
        body["failover"] = failover
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
    sets = normalise_sets({"sets": cfg.get("sets", {})}, "pushed configuration")
    normalise_failover(cfg.get("failover"), sets, "pushed configuration")
    return cfg


def save_pushed(state_dir: str, cfg: dict) -> None:
    _write_json(os.path.join(state_dir, "cluster.json"), cfg)


def load_pushed(state_dir: str) -> dict:
    return _read_json(os.path.join(state_dir, "cluster.json"))


def set_failover_secondary(path: str, node: str) -> None:
    """Rewrite `secondary` in the [failover] table of the cluster file, keeping the rest of the text;
    the result is validated (NODE must replicate every protected set) before it replaces the file."""
    check_node_id(node)
    cur = load_cluster(path)
    if cur["failover"] is None:
        raise ConfigError(f"{path}: no [failover] table: failover is not configured")
    with open(path) as f:
        text = f.read()
    m = re.search(r"(?ms)^\[failover\][^\n]*\n(.*?)(?=^\[|\Z)", text)
    line = re.compile(r'(?m)^(\s*secondary\s*=\s*)"[^"\n]*"')
    if not m or not line.search(m.group(1)):
        raise ConfigError(f"{path}: cannot find `secondary = \"...\"` in [failover] to change")
    body = line.sub(lambda mm: f'{mm.group(1)}"{node}"', m.group(1), count=1)
    new = text[:m.start(1)] + body + text[m.end(1):]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    try:
        load_cluster(tmp)
    except ConfigError as exc:
        os.unlink(tmp)
        raise ConfigError(str(exc).replace(tmp, path)) from None
    os.replace(tmp, path)
