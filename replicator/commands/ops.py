"""Operating commands of `pit` (registered through the `pit.commands` entry points):

    pit install-service [--root DIR] [--unit agent|serve|scrub|etcd ...] [--config PATH] [--no-enable]
    pit config check FILE [--kind agent|cluster|serve]

`config check` loads FILE with the loader its command uses (the agent's,
the cluster file's, `pit serve`'s) and turns any error into one line naming
the bad key and its line in the file: `FILE:LINE: KEY: what is wrong`, with
the loader's exit code (53 for the agent and cluster files, 22 for serve's).
"""
from __future__ import annotations

import os
import re
import tomllib

import click

from store.errors import StoreError

from ..errors import ClusterError, ConfigError

KINDS = ("agent", "cluster", "serve")
from ..config import AGENT_KEYS as _AGENT_KEYS

AGENT_KEYS = set(_AGENT_KEYS)
CLUSTER_KEYS = {"sets", "failover"}


# ----------------------------------------------------------------------------- where each key is
class _Scanner:
    """Line of every key, table header and array element of a TOML text that tomllib accepted.

    Paths are tuples of keys and array indexes: ("sets", "web", "mode"), ("failover", "checks", 1)."""

    BARE = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[tuple, int] = {}
        self.aot: dict[tuple, int] = {}  # array-of-tables path -> count so far
        self._scan()

    # -- low level
    def _peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def _adv(self, n: int = 1) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def _ws(self, newlines: bool = False) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self._adv()
            elif c == "#":
                j = self.s.find("\n", self.i)
                self._adv((j if j >= 0 else len(self.s)) - self.i)
            else:
                return

    def _string(self) -> str:
        for q in ('"""', "'''"):
            if self._peek(3) == q:
                self._adv(3)
                j = self.s.find(q, self.i)
                while self.s[j + 3:j + 4] == q[0]:  # up to two quotes may end the content
                    j += 1
                body = self.s[self.i:j]
                self._adv(j + 3 - self.i)
                return body
        q = self.s[self.i]
        self._adv()
        out = []
        while self.s[self.i] != q:
            if q == '"' and self.s[self.i] == "\\":
                out.append(self.s[self.i:self.i + 2])
                self._adv(2)
                continue
            out.append(self.s[self.i])
            self._adv()
        self._adv()
        body = "".join(out)
        if q == '"' and "\\" in body:
            try:
                body = tomllib.loads(f"k = \"{body}\"")["k"]
            except tomllib.TOMLDecodeError:
                pass
        return body

    def _key(self) -> tuple:
        parts = []
        while True:
            self._ws()
            if self._peek() in ('"', "'"):
                parts.append(self._string())
            else:
                m = self.BARE.match(self.s, self.i)
                parts.append(m.group(0))
                self._adv(m.end() - self.i)
            self._ws()
            if self._peek() != ".":
                return tuple(parts)
            self._adv()

    def _value(self, path: tuple) -> None:
        self._ws()
        c = self._peek()
        if c in ('"', "'"):
            self._string()
        elif c == "[":
            self._adv()
            n = 0
            while True:
                self._ws(newlines=True)
                if self._peek() == "]":
                    self._adv()
                    return
                self.lines.setdefault(path + (n,), self.line)
                self._value(path + (n,))
                n += 1
                self._ws(newlines=True)
                if self._peek() == ",":
                    self._adv()
        elif c == "{":
            self._adv()
            while True:
                self._ws()
                if self._peek() == "}":
                    self._adv()
                    return
                k = path + self._key()
                self.lines.setdefault(k, self.line)
                self._adv()  # "="
                self._value(k)
                self._ws()
                if self._peek() == ",":
                    self._adv()
        else:
            m = re.compile(r"[^,\]}#\n]*").match(self.s, self.i)
            self._adv(m.end() - self.i)

    def _scan(self) -> None:
        table: tuple = ()
        while True:
            self._ws(newlines=True)
            if self.i >= len(self.s):
                return
            if self._peek(2) == "[[":
                self._adv(2)
                key = self._key()
                self._adv(2)
                n = self.aot.get(key, 0)
                self.aot[key] = n + 1
                self.lines.setdefault(key, self.line)
                table = key + (n,)
                self.lines.setdefault(table, self.line)
            elif self._peek() == "[":
                self._adv()
                table = self._key()
                self._adv()
                self.lines.setdefault(table, self.line)
            else:
                k = table + self._key()
                self.lines.setdefault(k, self.line)
                self._adv()  # "="
                self._value(k)


def key_lines(text: str) -> dict[tuple, int]:
    """{path: line} for a TOML text tomllib accepts (paths as tuples of keys and array indexes)."""
    return _Scanner(text).lines


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            p = p if _Scanner.BARE.fullmatch(p) else '"' + p.replace('"', '\\"') + '"'
            out += ("." if out else "") + p
    return out


def _parse_ref(ref: str) -> tuple:
    """`failover.checks[1].tcp` -> ("failover", "checks", 1, "tcp")."""
    out: list = []
    for part in ref.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
        if not m:
            return tuple(out + [part])
        if m.group(1):
            out.append(m.group(1))
        out += [int(x) for x in re.findall(r"\[(\d+)\]", m.group(2))]
    return tuple(out)


def _get(raw, path: tuple):
    for p in path:
        try:
            raw = raw[p]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


_MISSING = object()
# keys a message names together ("ttl, confirm, heartbeat and hook_timeout must be numbers"): is the value good?
_GOOD = {
    "ttl": lambda v: not isinstance(v, bool) and int(v) >= 2,
    "confirm": lambda v: not isinstance(v, bool) and int(v) >= 1,
    "heartbeat": lambda v: not isinstance(v, bool) and float(v) > 0,
    "hook_timeout": lambda v: not isinstance(v, bool) and float(v) > 0,
}


def _good(key, v) -> bool:
    try:
        return bool(_GOOD[key](v)) if key in _GOOD else True
    except (TypeError, ValueError):
        return False


def line_of(path: tuple, lines: dict[tuple, int]) -> int:
    """The line of the key at PATH; for a key that is missing, the line of the nearest table that is there."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return 1


def locate(msg: str, raw: dict, lines: dict[tuple, int], tops: set | None = None) -> tuple[tuple, int]:
    """For errors that carry no key (pit serve's loader, a template's check): the key the message is about,
    found in its words, and its line: (path, line). A key that is missing gives the line of its table.
    `tops`: the top-level keys of every kind of file (a key named from the top)."""
    base: tuple = ()
    m = re.match(r"(?:set '([^']*)'|user (\S+?)|(failover|anonymous)):\s*", msg)
    if m:
        base = ("sets", m.group(1)) if m.group(1) is not None else (
            ("users", m.group(2)) if m.group(2) else (m.group(3),))
        rest = msg[m.end():]
    else:
        rest = msg
    top = set(raw)

    def resolve(ref: tuple) -> tuple:
        """A key named in the message: absolute when it starts at the top level (`failover.ttl`),
        else relative to the table the message is about (`mode` in set 'web')."""
        here = _get(raw, base)
        inside = isinstance(here, dict) and ref[:1] and ref[0] in here
        if base and not inside and ref[:1] and ref[0] in top | CLUSTER_KEYS | (tops or set()):
            return ref
        return base + ref

    candidates: list[tuple] = []
    m = re.search(r"unknown keys \[([^\]]*)\]", rest)
    if m:
        names = re.findall(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", m.group(1))
        found = [base + (a or b,) for a, b in names]
        found.sort(key=lambda p: lines.get(p, 1 << 30))
        candidates += found
    for ref in re.findall(r"`([^`]+)`", rest):
        if re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+", ref):
            candidates.append(resolve(_parse_ref(ref)))
    for ref in re.findall(r"\[([A-Za-z0-9_.-]+)\]", rest):  # "[sets] must be a table"
        candidates.append(_parse_ref(ref))
    for ref in re.findall(r"\b([a-z_]+\.[a-z_]+)\b", rest):  # "server.certificate"
        if _get(raw, _parse_ref(ref)) is not _MISSING:
            candidates.append(_parse_ref(ref))
    here = _get(raw, base)
    if isinstance(here, dict):
        for ref in re.findall(r"'([^']+)'", rest):  # "'sets' must be a list", or a value: "address 'x' must be"
            if ref in here:
                candidates.append(base + (ref,))
        for v in re.findall(r"'((?:[^'\\]|\\.)*)'", rest):
            for k, val in here.items():
                if val == v or (isinstance(val, list) and v in val):
                    candidates.append(base + (k,) + ((val.index(v),) if isinstance(val, list) else ()))
        words = [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest) if w in here]
        bad = [w for w in words if not _good(w, here[w])]
        candidates += [base + (w,) for w in (bad or words)]
    present = [c for c in candidates if c in lines]
    if present:
        return present[0], lines[present[0]]
    path = candidates[0] if candidates else base
    return path, line_of(path, lines)


# ----------------------------------------------------------------------------- checks per kind
def detect_kind(raw: dict, path: str, kinds: dict) -> str:
    keys = set(raw)
    hits = [k for k, (known, _check, _err) in kinds.items() if keys & known]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConfigError(f"{path}:1: cannot tell what configuration this is (keys {sorted(keys)}): "
                          "give --kind agent, cluster or serve")
    raise ConfigError(f"{path}:1: keys of several kinds ({', '.join(hits)}) in one file: give --kind")


def _check_agent(path: str, raw: dict) -> str:
    from ..config import load_agent_config

    cfg = load_agent_config(path)  # the model checks each key's type and names it
    role = f"the primary (cluster file {cfg.cluster})" if cfg.cluster else "a node"
    return f"agent configuration of {role}, state {cfg.state}"


def _check_cluster(path: str, raw: dict) -> str:
    from ..config import load_cluster

    c = load_cluster(path)
    fo = c.failover
    return (f"cluster file: {len(c.sets)} set(s) ({', '.join(sorted(c.sets)) or 'none'}); "
            + (f"failover to {fo.secondary} via {len(fo.etcd)} etcd endpoint(s)" if fo else "no failover"))


def config_kinds() -> dict[str, tuple[set, object, type]]:
    """{kind: (its top-level keys, its check(path, raw) -> summary, its error class)}: the agent and cluster
    files are the replicator's own; other packages add theirs through the `pit.config_kinds` entry points
    (`pit serve`'s file: davserver.config), so this package never imports them."""
    from importlib.metadata import entry_points

    kinds = {"agent": (AGENT_KEYS, _check_agent, ConfigError), "cluster": (CLUSTER_KEYS, _check_cluster, ConfigError)}
    for ep in entry_points(group="pit.config_kinds"):
        k = ep.load()
        kinds[ep.name] = (set(k.keys), k.check, k.error)
    return kinds


def check_config(path: str, kind: str | None = None) -> tuple[str, str]:
    """(kind, summary) when FILE is good; else raises the loader's error class with one line
    `FILE:LINE: KEY: message`."""
    kinds = config_kinds()
    if kind is not None and kind not in kinds:
        raise ConfigError(f"no checker for {kind} files here (its package is not installed)")
    err_cls = kinds[kind][2] if kind else ConfigError
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise err_cls(f"no configuration file at {path}") from None
    except OSError as exc:
        raise err_cls(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode()
        raw = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise err_cls(f"{path}:{line}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        line = int(m.group(1)) if m else 1
        if not m and "end of document" in str(exc):
            line = text.count("\n") + 1
        src = text.splitlines()[line - 1] if 0 < line <= len(text.splitlines()) else ""
        km = re.match(r"\s*([A-Za-z0-9_.\-\"' ]+?)\s*=", src) or re.match(r"\s*(\[\[?[^\]]*\]\]?)", src)
        key = f"{km.group(1).strip()}: " if km else ""
        raise err_cls(f"{path}:{line}: {key}TOML syntax: {exc}") from None
    kind = kind or detect_kind(raw, path, kinds)
    _keys, fn, err_cls = kinds[kind]
    lines = key_lines(text)
    known = None
    try:
        return kind, fn(path, raw)
    except StoreError as exc:
        msg, cls, known = str(exc), type(exc), getattr(exc, "key", None)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a loader trusting a type
        msg, cls = f"{type(exc).__name__}: {exc}", err_cls
    for prefix in (f"{path}: ", f"cannot read {path}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    tops = set().union(*(k[0] for k in kinds.values()))
    key, line = (known, line_of(known, lines)) if known is not None else locate(msg, raw, lines, tops)
    where = f"{_dotted(key)}: " if key else ""
    if issubclass(cls, ClusterError) and kind in ("agent", "cluster"):
        cls = ConfigError  # check_node_id / parse_address inside a configuration: a configuration error
    err = cls(f"{path}:{line}: {where}{msg}")
    err.exit_code = cls.exit_code
    raise err from None


# ----------------------------------------------------------------------------- commands
@click.group("config")
def config():
    """Configuration files: check them before a service reads them."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="The file's kind (default: told by its keys): the agent's, the cluster file, pit serve's.")
def config_check(file, kind):
    """Load FILE as its command would; one line per error naming the key and its line."""
    kind, summary = check_config(file, kind)
    click.echo(f"{file}: ok: {summary}")


@click.command("install-service")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Write under ROOT/etc/systemd/system (systemctl runs only when ROOT is / and systemd runs).")
@click.option("--unit", "units", multiple=True, type=click.Choice(["agent", "serve", "scrub", "etcd"]),
              help="Units to install (repeat; default: agent). scrub is a service and its weekly timer.")
@click.option("--config", "config_path", default=None, metavar="PATH",
              help="The agent's TOML (default /etc/pit/agent.toml); with only --unit serve, serve's.")
@click.option("--serve-config", default=None, metavar="PATH", help="pit serve's TOML (default /etc/pit/serve.toml).")
@click.option("--repo", default=None, metavar="DIR",
              help="Repository of serve and scrub (default: the agent config's `repo`, else /var/lib/pit/repo).")
@click.option("--state", default=None, metavar="DIR",
              help="State directory for etcd's data (default: the agent config's `state`, else /var/lib/pit).")
@click.option("--pit", "pit_exe", default=None, metavar="PATH", help="The pit executable (default: this one).")
@click.option("--etcd-name", default=None, help="etcd: this member's name (default: the host name).")
@click.option("--etcd-client", default=None, metavar="URL", help="etcd: e.g. http://10.0.0.1:2379")
@click.option("--etcd-peer", default=None, metavar="URL", help="etcd: e.g. http://10.0.0.1:2380")
@click.option("--etcd-initial-cluster", default=None, metavar="N1=URL,N2=URL,N3=URL",
              help="etcd: every member's peer URL (default: this member alone).")
@click.option("--no-enable", is_flag=True, help="Write the units and reload, but do not enable or start them.")
def install_service(root, units, config_path, serve_config, repo, state, pit_exe, etcd_name, etcd_client,
                    etcd_peer, etcd_initial_cluster, no_enable):
    """Write systemd units for this node (pit-agent, pit-serve, pit-scrub + timer, pit-etcd) and enable them."""
    import socket

    from ..ops.service import DEFAULTS, default_pit, install

    units = list(units) or ["agent"]
    if config_path and units == ["serve"] and not serve_config:
        serve_config, config_path = config_path, None
    agent_config = os.path.abspath(config_path) if config_path else DEFAULTS["agent_config"]
    agent_cfg = None
    if ({"serve", "scrub", "etcd"} & set(units)) and not (repo and state):
        try:
            from ..config import load_agent_config

            agent_cfg = load_agent_config(agent_config)
        except ConfigError:
            agent_cfg = None  # absent or not readable here: the defaults, or the options
    if "etcd" in units:
        missing = [o for o, v in (("--etcd-client", etcd_client), ("--etcd-peer", etcd_peer)) if not v]
        if missing:
            raise ConfigError(f"--unit etcd needs {' and '.join(missing)} (the member's URLs)")
    params = {
        "pit": os.path.abspath(pit_exe) if pit_exe else default_pit(),
        "agent_config": agent_config,
        "serve_config": os.path.abspath(serve_config) if serve_config else None,
        "repo": os.path.abspath(repo) if repo else (agent_cfg.repo if agent_cfg else None),
        "state": os.path.abspath(state) if state else (agent_cfg.state if agent_cfg else None),
        "etcd_name": etcd_name or socket.gethostname().split(".")[0].lower(),
        "etcd_client": etcd_client, "etcd_peer": etcd_peer, "etcd_initial_cluster": etcd_initial_cluster,
    }
    if "etcd" in units:
        import shutil

        params["etcd"] = shutil.which("etcd") or DEFAULTS["etcd"]
    install(root, units, params, enable=not no_enable, echo=click.echo)
