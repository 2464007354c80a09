"""Configuration: the agent's own file, and the cluster's sets (on the primary).

The agent file (`pit agent --config node.toml`) says where this node keeps
its membership (`state`), where it listens, which repository it writes
as a replica, and, on the primary only, the cluster file:

    state = "/var/lib/pit"
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
import logging
import os
import re
import tomllib
from dataclasses import dataclass, fields, replace

from store.snapshots import check_set_name

from .errors import ConfigError, TemplateError
from .names import check_node_id
from .settings import (AgentConfig, ClusterConfig, FailoverConfig, SetConfig, build, check_protected, key_of)
from .stream.membership import _read_json, _write_json

log = logging.getLogger("pit.config")

def _load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no configuration file at {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


AGENT_KEYS = tuple(key_of(f) for f in fields(AgentConfig))


def _at(path: str, exc: ConfigError) -> ConfigError:
    """EXC with the file's name in front, keeping the key it is about."""
    return ConfigError(f"{path}: {exc}", key=exc.key)


def with_local_app(sets: dict[str, SetConfig], local: dict | None) -> dict[str, SetConfig]:
    """The sets with this node's `app` settings over each set's application
    table: the cluster file is one for all nodes, but after a failover the
    new primary's database may listen on another socket or port, and its
    hooks must reach the database that runs here."""
    if not local:
        return sets
    out = dict(sets)
    for name, over in local.items():
        s = out.get(name)
        if s is not None and s.app is not None:
            out[name] = replace(s, app={**s.app, **over})
    return out


def load_agent_config(path: str) -> AgentConfig:
    return check_agent_config(_load_toml(path), path)


def check_agent_config(raw: dict, path: str) -> AgentConfig:
    """The agent file's values, typed (paths made absolute against the file's directory); ConfigError
    naming `path` and the key when one is bad."""
    try:
        cfg = build(AgentConfig, raw, ())
    except ConfigError as exc:
        raise _at(path, exc) from None
    from .apps.templates import check_app_override

    for name, over in cfg.app.items():
        try:
            check_app_override(over, f"app.{name}")
        except TemplateError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return cfg.with_paths_from(os.path.dirname(os.path.abspath(path)))


# ------------------------------------------------------------------ the agent file `pit cluster init`/`pit join` write
AGENT_FILE_KEYS = ("state", "repo", "backend", "s3_endpoint", "key_file", "encrypt", "cluster", "metrics")  # what --agent-config writes, in this order


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
        v = values.get(k)
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif v is not None:
            lines.append(f"{k} = {_toml_string(v)}")
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


def normalise_sets(raw: dict, where: str = "cluster config") -> dict[str, SetConfig]:
    """The [sets] of a cluster file (or of a pushed configuration), typed; ConfigError naming WHERE and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    sets = raw.get("sets", {})
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}: [sets] must be a table", key=("sets",))
    unknown = set(raw) - {"sets", "failover"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}", key=(sorted(unknown)[0],))
    out = {}
    for name, s in sets.items():
        try:
            check_set_name(name)
        except Exception as exc:
            raise ConfigError(f"{where}: set {name!r}: {exc}", key=("sets", name)) from None
        try:
            out[name] = build(SetConfig, s, ("sets", name))
        except ConfigError as exc:
            raise _at(where, exc) from None
    return out


@dataclass(frozen=True)
class ClusterFile:
    """The primary's cluster file, typed: its sets and its [failover] table (None: no failover)."""

    sets: dict[str, SetConfig]
    failover: FailoverConfig | None


def load_cluster(path: str) -> ClusterFile:
    """The whole cluster file, validated."""
    raw = _load_toml(path)
    sets = normalise_sets(raw, path)
    return ClusterFile(sets, normalise_failover(raw.get("failover"), sets, path))


def normalise_failover(raw, sets: dict[str, SetConfig], where: str = "cluster config") -> FailoverConfig | None:
    if raw is None:
        return None
    try:
        fo = build(FailoverConfig, raw, ("failover",), "table ([failover])")
        check_protected(fo, sets)
    except ConfigError as exc:
        raise _at(where, exc) from None
    return fo


def versioned(state_dir: str, sets: dict[str, SetConfig], roster: dict, primary: str,
              failover: FailoverConfig | None = None) -> ClusterConfig:
    """The pushed form: a new version number whenever sets, failover or roster change."""
    cfg = ClusterConfig(0, primary, roster, sets, failover)
    body = cfg.to_wire()
    del body["version"]
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    vpath = os.path.join(state_dir, "config_version.json")
    cur = _read_json(vpath)
    if cur.get("hash") != digest:
        cur = {"version": int(cur.get("version", 0)) + 1, "hash": digest}
        _write_json(vpath, cur)
    return replace(cfg, version=cur["version"])


def check_pushed(cfg: dict) -> ClusterConfig:
    """A configuration received from the primary (its wire form), validated and typed before it is kept."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("version"), int) or not isinstance(cfg.get("roster"),
                                                                                               dict):
        raise ConfigError("pushed configuration lacks a version or roster")
    sets = normalise_sets({"sets": cfg.get("sets", {})}, "pushed configuration")
    fo = normalise_failover(cfg.get("failover"), sets, "pushed configuration")
    return ClusterConfig(cfg["version"], str(cfg.get("primary") or ""), cfg["roster"], sets, fo)


def save_pushed(state_dir: str, cfg: ClusterConfig) -> None:
    _write_json(os.path.join(state_dir, "cluster.json"), cfg.to_wire())


def load_pushed(state_dir: str) -> ClusterConfig:
    """The configuration last received (version 0: none yet, or one this version cannot read: the primary
    pushes it again)."""
    raw = _read_json(os.path.join(state_dir, "cluster.json"))
    if not raw:
        return ClusterConfig()
    try:
        return check_pushed(raw)
    except ConfigError as exc:
        log.warning("ignoring the kept cluster configuration (%s); waiting for the primary's", exc)
        return ClusterConfig()


def set_failover_secondary(path: str, node: str) -> None:
    """Rewrite `secondary` in the [failover] table of the cluster file, keeping the rest of the text;
    the result is validated (NODE must replicate every protected set) before it replaces the file."""
    check_node_id(node)
    cur = load_cluster(path)
    if cur.failover is None:
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
