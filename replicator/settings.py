"""The configuration model: every key of the agent file and the cluster file,
with its type, default and meaning, in one place.

A file is parsed once, when it is loaded (`replicator.config`); what comes
out are the frozen dataclasses below, and every consumer takes them rather
than digging in dicts. Each field's metadata holds its documentation and the
converter that checks and normalises a raw TOML value; an error is a
`ConfigError` whose `key` is the path of the bad key (`("failover", "ttl")`),
so `pit config check` can name the key and its line without guessing.

The reference table in docs/operators.md is generated from these classes
(`python -m replicator.settings`), and a test keeps the two equal.

A configuration also travels: the primary pushes its sets and failover table
to every node as JSON. `to_wire` gives the exact form that is pushed and
hashed for the version (defaults filled in, absent optional tables left
out), and the receiver parses it with the same converters.
"""
from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable

from .errors import ClusterError, ConfigError
from .names import check_node_id, parse_address, parse_listen
from .schedule import normalise_schedule

Path = tuple  # a key path in a file: ("sets", "web", "mode"), ("failover", "checks", 1)


def _dotted(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def fail(path: Path, what: str) -> ConfigError:
    """A ConfigError about the key at `path`: "`failover.ttl` must be at least 2" (WHAT may start with ":")."""
    return ConfigError(f"`{_dotted(path)}`{'' if what.startswith(':') else ' '}{what}", key=path)


# ----------------------------------------------------------------------------- converters
# A converter takes (raw value, key path) and returns the checked value or raises ConfigError.
Conv = Callable[[Any, Path], Any]


def number(minimum: float | None = None, above: bool = False, maximum: float | None = None,
           integer: bool = False) -> Conv:
    def conv(v, path):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and isinstance(v, float)
                                                                       and not v.is_integer()):
            raise fail(path, f"must be {'a whole number' if integer else 'a number'}, not {v!r}")
        if minimum is not None and (v < minimum or (above and v == minimum)):
            raise fail(path, f"must be {'above' if above else 'at least'} {minimum:g}, not {v!r}")
        if maximum is not None and v > maximum:
            raise fail(path, f"must be at most {maximum:g}, not {v!r}")
        return int(v) if integer else float(v)
    conv.kind = "integer" if integer else "number"  # type: ignore[attr-defined]
    return conv


def boolean(v, path):
    if not isinstance(v, bool):
        raise fail(path, "must be true or false")
    return v


boolean.kind = "true/false"  # type: ignore[attr-defined]


def text(v, path):
    if not isinstance(v, str):
        raise fail(path, f"must be a string, not {v!r}")
    return v


text.kind = "string"  # type: ignore[attr-defined]


def s3_url(v, path):
    """s3://BUCKET[/PREFIX], checked as `pit init --backend` checks it."""
    from store.errors import InvalidArgument
    from store.s3backend import S3Location

    if not isinstance(v, str):
        raise fail(path, f"must be a string, not {v!r}")
    try:
        S3Location.parse(v)
    except InvalidArgument as exc:
        raise fail(path, str(exc)) from None
    return v


s3_url.kind = "s3://BUCKET/PREFIX"  # type: ignore[attr-defined]


def http_url(v, path):
    if not isinstance(v, str) or not re.match(r"^https?://[^/\s]+", v):
        raise fail(path, f"must be an http:// or https:// URL, not {v!r}")
    return v


http_url.kind = "URL"  # type: ignore[attr-defined]


def node_id(v, path):
    try:
        return check_node_id(v)
    except ClusterError as exc:
        raise fail(path, f": {exc}") from None


node_id.kind = "node id"  # type: ignore[attr-defined]


def node_ids(v, path):
    if not isinstance(v, list) or not v:
        raise fail(path, "must be a non-empty list of node ids")
    return tuple(node_id(r, path + (i,)) for i, r in enumerate(v))


node_ids.kind = "list of node ids"  # type: ignore[attr-defined]


def address(v, path):
    try:
        if not isinstance(v, str):
            raise ClusterError(f"address {v!r} must be HOST:PORT")
        parse_address(v)
    except ClusterError as exc:
        raise fail(path, f": {exc}") from None
    return v


address.kind = "HOST:PORT"  # type: ignore[attr-defined]


def listen_address(v, path):
    try:
        if not isinstance(v, str):
            raise ValueError
        parse_listen(v)
    except ValueError:
        raise fail(path, f": {v!r} is not an address to serve on "
                         '("127.0.0.1:9474", "0.0.0.0:9474", "[::]:9474" or ":9474")') from None
    return v


listen_address.kind = "[HOST]:PORT"  # type: ignore[attr-defined]


def abs_path(v, path):
    if not isinstance(v, str) or not os.path.isabs(v):
        raise fail(path, f"must be an absolute path, not {v!r}")
    return v


abs_path.kind = "absolute path"  # type: ignore[attr-defined]


def file_path(v, path):
    """A path in the agent file; relative ones are made absolute against the file's directory by the loader."""
    if not isinstance(v, str) or not v:
        raise fail(path, f"must be a path, not {v!r}")
    return v


file_path.kind = "path"  # type: ignore[attr-defined]


def table(v, path):
    if not isinstance(v, dict):
        raise fail(path, "must be a table")
    return dict(v)


table.kind = "table"  # type: ignore[attr-defined]


def one_of(*choices: str) -> Conv:
    def conv(v, path):
        if v not in choices:
            raise fail(path, "must be " + " or ".join(f'"{c}"' for c in choices))
        return v
    conv.kind = " or ".join(f'"{c}"' for c in choices)  # type: ignore[attr-defined]
    return conv


def commands(v, path):
    """A hook list: a command line, or a list of command lines or argv lists."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(c, str) or (isinstance(c, list) and c and all(
            isinstance(a, str) for a in c)) for c in v):
        raise fail(path, "must be a list of commands")
    return tuple(v)


commands.kind = "list of commands"  # type: ignore[attr-defined]


def schedule(v, path):
    try:
        return normalise_schedule(v)
    except ConfigError as exc:
        sub = str(exc).split("`", 2)[1] if str(exc).startswith("`schedule.") else ""
        raise ConfigError(f"`{_dotted(path[:-1])}.{str(exc)[1:]}",
                          key=path + tuple(sub.split(".")[1:2])) from None


schedule.kind = '{every = "15m"} or {daily = ["HH:MM", ...]}'  # type: ignore[attr-defined]


def patterns(v, path):
    """gitignore-style patterns (store/filters.py); absolute ones are checked against the set's paths later."""
    from store.errors import InvalidArgument
    from store.filters import check_pattern

    if not isinstance(v, list):
        raise fail(path, "must be a list of patterns")
    for i, p in enumerate(v):
        try:
            check_pattern(p, what="pattern")
        except InvalidArgument as exc:
            raise fail(path + (i,), f": {exc}") from None
    return tuple(v)


patterns.kind = "list of patterns"  # type: ignore[attr-defined]


def markers(v, path):
    from store.errors import InvalidArgument
    from store.filters import check_marker

    if not isinstance(v, list):
        raise fail(path, 'must be a list of file names ("NAME" or "NAME:HEADER")')
    for i, m in enumerate(v):
        try:
            check_marker(m, "marker")
        except InvalidArgument as exc:
            raise fail(path + (i,), f": {exc}") from None
    return tuple(v)


markers.kind = "list of NAME[:HEADER]"  # type: ignore[attr-defined]

FILTER_KEYS = ("exclude", "iexclude", "exclude_if_present", "exclude_caches", "one_file_system")


def setting(doc: str, conv: Conv | None = None, default: Any = MISSING, key: str | None = None,
            shown: str | None = None) -> Any:
    """A dataclass field for one key: its doc line, converter, default (MISSING: required), the TOML key
    when it is not the field's name, and how the default is shown in the reference."""
    md = {"doc": doc, "conv": conv, "key": key, "shown": shown}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


def key_of(f) -> str:
    return f.metadata.get("key") or f.name


def build(cls, raw, path: Path, what: str = "table"):
    """An instance of `cls` from a raw TOML table: unknown keys refused, each key converted, defaults
    filled in, then the class's own cross-key checks (`_check`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"`{_dotted(path)}` must be a {what}" if path else f"must be a {what}", key=path)
    fs = {key_of(f): f for f in fields(cls) if f.metadata.get("doc") is not None}
    unknown = [k for k in raw if k not in fs]
    if unknown:
        where = f"`{_dotted(path + (unknown[0],))}`" if path else f"`{unknown[0]}`"
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(fs))})", key=path + (unknown[0],))
    values = {}
    for k, f in fs.items():
        if k in raw:
            conv = f.metadata.get("conv")
            values[f.name] = conv(raw[k], path + (k,)) if conv else raw[k]
        elif f.default is MISSING and f.default_factory is MISSING:  # named at its table, if it has one
            raise ConfigError(f"`{_dotted(path + (k,))}` is required ({f.metadata['doc']})", key=path or (k,))
    obj = cls(**values)
    return obj._check(path) if hasattr(obj, "_check") else obj


def wire(obj) -> Any:
    """The JSON form of a configuration value (tuples as lists, None-valued optional tables left out)."""
    if hasattr(obj, "__dataclass_fields__"):
        to = getattr(obj, "to_wire", None)
        if to is not None:
            return to()
        return {key_of(f): wire(getattr(obj, f.name)) for f in fields(obj) if getattr(obj, f.name) is not None}
    if isinstance(obj, (list, tuple)):
        return [wire(v) for v in obj]
    if isinstance(obj, dict):
        return {k: wire(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- the cluster file
@dataclass(frozen=True)
class SetConfig:
    """One replication set ([sets.NAME] in the cluster file)."""

    master: str = setting("the node that owns (watches) the set", node_id)
    replicas: tuple[str, ...] = setting("the nodes that receive it", node_ids)
    paths: tuple[str, ...] = setting("the set's folders on the master; base names must be distinct", None)
    mode: str = setting("mirror (deletions follow) or archive (deletions are held back)",
                        one_of("mirror", "archive"), "mirror")
    point_quiet: float = setting("a consistent point after N s without changes (0: off)", number(0), 5.0)
    point_every: float = setting("and/or a consistent point every N minutes (0: off)", number(0), 0.0)
    delete_percent: float = setting("mass-delete breaker: hold a batch deleting more than this % of the set's "
                                    "files ...", number(0), 50.0)
    delete_count: int = setting("... or more than this many files", number(0, integer=True), 1000)
    delete_min: int = setting("... and never for fewer than this many files", number(0, integer=True), 10)
    debounce: float = setting("seconds of quiet before a burst of events is processed", number(0), 0.3)
    settle: float = setting("a file changed less than N s ago is read again later", number(0), 0.2)
    settle_max: float = setting("but never waits longer than N s for a file to settle", number(0), 5.0)
    rescan: float = setting("seconds between reconcile scans (a safety net for missed events)", number(0), 300.0)
    queue: int = setting("changes queued per replica before it is caught up by tree comparison instead",
                         number(1, integer=True), 10000)
    avg_chunk: int = setting("average chunk size in bytes", number(4096, integer=True), 16384)
    capture: str = setting("how a big changed file's written byte ranges are found: reflink (clones compared "
                           "with FIEMAP, on XFS or btrfs) or off (read whole)", one_of("off", "reflink"), "off")
    capture_min: int = setting("files from this size on are captured by ranges (bytes)",
                               number(1024 * 1024, integer=True), 64 * 1024 * 1024)
    schedule: dict | None = setting("scheduled instead of real-time replication (the master's local time)",
                                    schedule, None, shown="real-time")
    app: dict | None = setting("the application template's settings (docs/templates.md)", table, None,
                               shown="none")
    exclude: tuple[str, ...] = setting("gitignore-style patterns of paths never replicated (docs/replication.md, "
                                       "\"Filters\")", patterns, (), shown="[]")
    iexclude: tuple[str, ...] = setting("the same, ignoring case", patterns, (), shown="[]")
    exclude_if_present: tuple[str, ...] = setting("leave out directories holding a file of this name "
                                                  '("NAME" or "NAME:HEADER")', markers, (), shown="[]")
    exclude_caches: bool = setting("leave out directories tagged with a CACHEDIR.TAG", boolean, False)
    one_file_system: bool = setting("do not cross into other file systems (a mount point is kept empty)",
                                    boolean, False)
    name: str = field(default="", compare=True)  # the set's name (the table's), not a key of its own

    def _check(self, path: Path) -> SetConfig:
        if self.master in self.replicas:
            raise fail(path + ("replicas",), "cannot name the set's master: a master is not its own replica")
        paths = self.paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and os.path.isabs(p)
                                                                for p in paths):
            raise fail(path + ("paths",), "must be a non-empty list of absolute paths")
        norm = tuple(os.path.normpath(p) for p in paths)
        names = [os.path.basename(p) for p in norm]
        if len(set(names)) != len(names) or "" in names:
            raise fail(path + ("paths",), "must have distinct, non-empty base names")
        from store.errors import InvalidArgument
        from store.filters import check_pattern

        stored = {}
        for key in ("exclude", "iexclude"):
            out = []
            for i, p in enumerate(getattr(self, key)):
                try:
                    # kept in the stored form (`/var/lib/x/main/postmaster.pid` -> `/main/postmaster.pid`):
                    # a promoted secondary masters the set from its own live paths (the same base names
                    # elsewhere), and the set's filter must mean the same there
                    out.append(check_pattern(p, norm, "pattern"))
                except InvalidArgument as exc:
                    raise fail(path + (key, i), f": {exc}") from None
            stored[key] = tuple(out)
        return replace(self, paths=norm, name=str(path[-1]) if path else self.name, **stored)

    def filter_rules(self):
        """The set's filter (store/filters.py): the scanner's and the watcher's."""
        from store.filters import FilterRules

        return FilterRules(**{k: getattr(self, k) for k in FILTER_KEYS})

    def to_wire(self) -> dict:
        out = {key_of(f): wire(getattr(self, f.name)) for f in fields(self) if f.metadata.get("doc")}
        for k in ("schedule", "app"):  # absent when not set: configurations without them keep their version
            if out[k] is None:
                del out[k]
        for k in FILTER_KEYS:  # the same for the filter keys
            if not out[k]:
                del out[k]
        return out


CHECK_KINDS = ("tcp", "http", "command", "nic")


@dataclass(frozen=True)
class Check:
    """One failure check: {tcp = "host:port"}, {http = URL, status, text}, {command = "..."} or {nic = "eth0"}."""

    kind: str
    target: str
    timeout: float = 2.0
    status: int | None = None
    text: str | None = None
    name: str | None = None

    def to_wire(self) -> dict:
        out: dict = {self.kind: self.target, "timeout": self.timeout}
        for k in ("status", "text", "name"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def check_list(kinds: tuple[str, ...]) -> Conv:
    def conv(v, path):
        if not isinstance(v, list):
            raise fail(path, "must be a list of tables")
        out = []
        for i, c in enumerate(v):
            at = path + (i,)
            if not isinstance(c, dict):
                raise fail(at, 'must be a table such as {tcp = "host:port"}')
            kind = [k for k in c if k in kinds]
            if len(kind) != 1:
                raise fail(at, f"needs exactly one of {list(kinds)}")
            extra = [k for k in c if k not in kinds and k not in ("status", "text", "timeout", "name")]
            if extra:
                raise ConfigError(f"`{_dotted(at)}`: unknown keys {sorted(extra)}", key=at)
            k = kind[0]
            if not isinstance(c[k], str) or not c[k]:
                raise fail(at + (k,), "must be a non-empty string")
            if k == "tcp":
                address(c[k], at + (k,))
            out.append(Check(
                kind=k, target=c[k],
                timeout=number(0, above=True)(c["timeout"], at + ("timeout",)) if "timeout" in c else 2.0,
                status=number(100, integer=True, maximum=599)(c["status"], at + ("status",))
                if "status" in c else None,
                text=text(c["text"], at + ("text",)) if "text" in c else None,
                name=text(c["name"], at + ("name",)) if "name" in c else None))
        return tuple(out)
    conv.kind = "list of checks"  # type: ignore[attr-defined]
    return conv


@dataclass(frozen=True)
class FailoverConfig:
    """[failover] in the cluster file: a secondary station takes over when the primary fails."""

    secondary: str = setting("the replica that takes over", node_id)
    etcd: tuple[str, ...] = setting('the etcd endpoints ("http://host:2379")', None)
    ttl: int = setting("lease seconds: a silent primary stops acting after ttl - margin",
                       number(2, integer=True), 5)
    heartbeat: float = setting("seconds between checks on the secondary", number(0, above=True), 0.5)
    confirm: int = setting("consecutive failures before a check counts", number(1, integer=True), 3)
    checks: tuple[Check, ...] = setting("the primary's services, seen from the secondary "
                                        "({tcp}, {http, status, text}, {command}; each with `timeout`, `name`)",
                                        check_list(("tcp", "http", "command")), (), shown="[]")
    link: tuple[Check, ...] = setting("the primary's public link, checked on the primary ({tcp}, {nic}, {command})",
                                      check_list(("tcp", "nic", "command")), (), shown="[]")
    takeover: tuple = setting("commands run on the new primary after materialising", commands, (), shown="[]")
    demote: tuple = setting("commands run on a primary that stops acting", commands, (), shown="[]")
    hook_timeout: float = setting("seconds a takeover or demote command may take", number(0, above=True), 60.0)
    auto: bool = setting("false: detect and report, promote only on `pit failover promote`", boolean, True)
    rejoin: bool = setting("a returning old primary becomes a replica of the new one (failback)", boolean, True)
    app_check: bool = setting("image selection runs the set's application check", boolean, True)
    mirror: bool = setting("the secondary keeps its live paths at the newest consistent point", boolean, True)
    key: str = setting("the etcd leader key (default: derived from the cluster CA)", text, "",
                       shown="derived")

    def _check(self, path: Path) -> FailoverConfig:
        e = self.etcd
        if not isinstance(e, list) or not e or not all(isinstance(x, str) and x for x in e):
            raise fail(path + ("etcd",), 'must be a non-empty list of endpoints ("http://host:2379")')
        return replace(self, etcd=tuple(e))

    def to_wire(self) -> dict:
        return {key_of(f): wire(getattr(self, f.name)) for f in fields(self)}


def check_protected(fo: FailoverConfig, sets: dict[str, SetConfig], path: Path = ("failover",)) -> None:
    """The secondary must replicate every set the primary masters (those failover protects)."""
    for n, s in sets.items():
        if s.master != fo.secondary and fo.secondary not in s.replicas:
            raise fail(path + ("secondary",), f"{fo.secondary!r} must be a replica of set {n!r}")


# ----------------------------------------------------------------------------- the agent file
@dataclass(frozen=True)
class SmtpConfig:
    """[alerts.smtp]: mail the alerts."""

    host: str = setting("the mail server", None)
    from_: str = setting("the sender's address", None, key="from")
    to: tuple[str, ...] = setting("the recipients", None)
    port: int | None = setting("465 with ssl, 587 with starttls, else 25",
                               number(1, integer=True, maximum=65535), None, shown="by ssl/starttls")
    starttls: bool = setting("STARTTLS on a plain connection", boolean, False)
    ssl: bool = setting("SMTPS from the start", boolean, False)
    user: str | None = setting("log in as this user ...", text, None, shown="none")
    password_file: str | None = setting("... with the password in this file", abs_path, None, shown="none")
    timeout: float = setting("seconds for the mail server", number(0, above=True), 30.0)
    cafile: str | None = setting("CA certificates (PEM) to trust instead of the system's", abs_path, None,
                                 shown="system")

    def _check(self, path: Path) -> SmtpConfig:
        if not isinstance(self.host, str) or not self.host:
            raise fail(path + ("host",), f": {self.host!r} is not a host name")
        if self.starttls and self.ssl:
            raise fail(path + ("ssl",), ": give `ssl` (SMTPS, port 465) or `starttls`, not both")
        if not isinstance(self.from_, str) or "@" not in self.from_:
            raise fail(path + ("from",), f": {self.from_!r} is not a mail address")
        to = [self.to] if isinstance(self.to, str) else self.to
        if not isinstance(to, list) or not to or not all(isinstance(a, str) and "@" in a for a in to):
            raise fail(path + ("to",), f": {self.to!r} must be a list of mail addresses")
        if (self.user is None) != (self.password_file is None):
            raise fail(path + ("password_file",), "and `user` go together")
        port = self.port if self.port is not None else 465 if self.ssl else 587 if self.starttls else 25
        return replace(self, to=tuple(to), port=port)


def command_line(v, path):
    if isinstance(v, str):
        if not v.strip():
            raise fail(path, ": empty command")
        return v
    if not (isinstance(v, list) and v and all(isinstance(a, str) and a for a in v)):
        raise fail(path, "must be a command line or a non-empty list of strings")
    return tuple(v)


command_line.kind = "command"  # type: ignore[attr-defined]


def smtp_table(v, path):
    return build(SmtpConfig, v, path, "table: {host = ..., from = ..., to = [...]}")


smtp_table.kind = "table"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AlertsConfig:
    """[alerts] in the agent file: alerts that reach a person (docs/metrics-alerts.md)."""

    command: str | tuple[str, ...] | None = setting("run this with the alert on stdin", command_line, None,
                                                    shown="none")
    smtp: SmtpConfig | None = setting("mail the alerts ([alerts.smtp])", smtp_table, None, shown="none")
    lag_seconds: float = setting("alert when a replica has been behind this long", number(0, above=True), 300.0)
    wal_lag_seconds: float = setting("alert when a replica's database log (WAL) is this far behind, or its "
                                     "receiver away this long", number(0, above=True), 10.0)
    repeat_minutes: float = setting("repeat an alert that still holds after N minutes", number(0), 60.0)
    disconnect_seconds: float = setting("alert when a replica has been disconnected this long", number(0), 60.0)
    disk_free_percent: float = setting("alert when a repository's disk has less free space",
                                       number(0, maximum=100), 10.0)
    interval: float = setting("seconds between looks at the status", number(0, above=True), 5.0)
    command_timeout: float = setting("seconds the alert command may take", number(0, above=True), 60.0)


def alerts_table(v, path):
    return build(AlertsConfig, v, path, "table ([alerts])")


alerts_table.kind = "table"  # type: ignore[attr-defined]


def live_table(v, path):
    if not isinstance(v, dict) or not all(isinstance(x, list) and x and all(isinstance(p, str) and os.path.isabs(p)
                                                                             for p in x) for x in v.values()):
        raise fail(path, "maps set names to lists of absolute paths (where a promoted secondary materialises "
                         "each set)")
    return {k: tuple(x) for k, x in v.items()}


live_table.kind = "{SET = [paths]}"  # type: ignore[attr-defined]


def app_tables(v, path):
    if not isinstance(v, dict) or not all(isinstance(x, dict) for x in v.values()):
        raise fail(path, "maps set names to tables of application settings (app = {NAME = {...}})")
    return {k: dict(x) for k, x in v.items()}


app_tables.kind = "{SET = {...}}"  # type: ignore[attr-defined]

PATH_KEYS = ("state", "repo", "key_file", "cluster", "control", "log")  # made absolute against the file's directory


@dataclass(frozen=True)
class AgentConfig:
    """The agent file (`pit agent --config FILE`): this node's own settings."""

    state: str = setting("the node's state directory (keys, certificates, membership)", file_path)
    repo: str | None = setting("the repository this node writes as a replica", file_path, None, shown="none")
    key_file: str | None = setting("the key file that opens `repo` when it is encrypted (pit init --encrypt); with "
                                   "`backend`, the agent creates the repository encrypted with it", file_path, None,
                                   shown="none")
    backend: str | None = setting("where that repository keeps its packs when the agent creates it: an S3-compatible "
                                  "bucket (credentials from the agent's environment: AWS_ACCESS_KEY_ID/"
                                  "AWS_SECRET_ACCESS_KEY or AWS_PROFILE; docs/store.md); encrypted with `key_file` "
                                  "unless `encrypt = false`", s3_url, None, shown="local packs")
    s3_endpoint: str | None = setting("the S3 endpoint of `backend` (MinIO, Ceph, ...)", http_url, None,
                                      shown="AWS")
    encrypt: bool | None = setting("with `backend`: false stores the packs in the bucket in the clear (refused "
                                   "unless said)", boolean, None, shown="required with backend")
    listen: str | None = setting("where the agent listens", address, None, shown="the init/join address")
    cluster: str | None = setting("the cluster file (the primary only)", file_path, None, shown="none")
    control: str | None = setting("the local control socket", file_path, None, shown="STATE/agent.sock")
    log: str | None = setting("a log file (default: standard error)", file_path, None, shown="stderr")
    live: dict = setting("secondary only: where a promotion materialises each set (default: the set's paths)",
                         live_table, {}, shown="{}")
    metrics: str | None = setting("serve Prometheus metrics here", listen_address, None, shown="off")
    alerts: AlertsConfig | None = setting("alerts that reach a person ([alerts])", alerts_table, None,
                                          shown="off")
    app: dict = setting("this node's own application settings over [sets.NAME.app]", app_tables, {},
                        shown="{}")

    def with_paths_from(self, base: str) -> AgentConfig:
        return replace(self, **{k: os.path.join(base, getattr(self, k)) for k in PATH_KEYS
                                if getattr(self, k) is not None})

    def to_wire(self) -> dict:
        return {key_of(f): wire(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) not in (None, {})}


# ----------------------------------------------------------------------------- the pushed configuration
@dataclass(frozen=True)
class ClusterConfig:
    """What the primary pushes to every node: a version, who is primary, the roster, the sets, failover.

    Version 0 is "nothing received yet"."""

    version: int = 0
    primary: str = ""
    roster: dict = field(default_factory=dict)
    sets: dict[str, SetConfig] = field(default_factory=dict)
    failover: FailoverConfig | None = None

    def __bool__(self) -> bool:
        return self.version > 0

    def to_wire(self) -> dict:
        out = {"version": self.version, "sets": {n: s.to_wire() for n, s in self.sets.items()},
               "roster": self.roster, "primary": self.primary}
        if self.failover is not None:
            out["failover"] = self.failover.to_wire()
        return out


# ----------------------------------------------------------------------------- the reference
MODEL = [("the agent file", (), AgentConfig), ("[alerts]", ("alerts",), AlertsConfig),
         ("[alerts.smtp]", ("alerts", "smtp"), SmtpConfig),
         ("the cluster file: [sets.NAME]", ("sets", "NAME"), SetConfig),
         ("the cluster file: [failover]", ("failover",), FailoverConfig)]


def _shown(f) -> str:
    if f.metadata.get("shown") is not None:
        return f.metadata["shown"]
    if f.default is MISSING and f.default_factory is MISSING:
        return "required"
    d = f.default
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, str):
        return f'"{d}"'
    if isinstance(d, float) and d.is_integer():
        return f"{d:g}"
    return str(d)


def _kind(f) -> str:
    conv = f.metadata.get("conv")
    if conv is not None:
        return getattr(conv, "kind", "")
    return {"paths": "list of absolute paths", "etcd": "list of endpoints", "host": "host name",
            "from_": "mail address", "to": "list of mail addresses"}.get(f.name, "")


def reference() -> str:
    """The configuration reference as Markdown tables, one per table of the files (docs/operators.md)."""
    out = []
    for title, _path, cls in MODEL:
        out += [f"**{title}**", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in fields(cls):
            if f.metadata.get("doc") is None:
                continue
            doc = f.metadata["doc"].replace("|", "\\|")
            out.append(f"| `{key_of(f)}` | {_kind(f).replace('|', '/')} | {_shown(f)} | {doc} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(reference(), end="")
