"""Server configuration: a TOML file.

    [server]
    listen = "127.0.0.1"        # loopback unless you say otherwise
    port = 8080
    certificate = "/etc/pit/cert.pem"   # TLS when both are given (from your own CA; the file may hold the chain)
    private_key = "/etc/pit/key.pem"    # (`cert` and `key` are the same keys, shorter)
    names = ["backup.example.lan"]      # with self_signed: more names the certificate must carry
    self_signed = true          # or: HTTPS with a self-signed certificate kept in REPO/serve-tls/
    anonymous = false           # true: no login; then [anonymous] gives the scope
    threads = 64                # workers: each request being answered (a download) holds one
    max_connections_per_client = 32     # open connections from one address (more are closed at accept)
    max_connections = 1000      # open connections in all
    request_timeout = 20        # seconds for a TLS handshake, and for reading a request's head and body
    max_requests_per_user = 16  # requests one user may have being answered at once (a download counts
                                # until it ends); below `threads`, so one user never holds every worker
    propfind_max_body = 65536   # bytes of a PROPFIND body (413 beyond)
    propfind_max_names = 64     # distinct properties one PROPFIND may ask for (400 beyond)
    propfind_max_entries = 100000       # responses in one PROPFIND answer (then a 507 for the folder)
    propfind_max_answer = 67108864      # bytes of one PROPFIND answer (then a 507 for the folder)

    [users.alice]
    password = "scrypt$16384$8$1$<salt b64>$<hash b64>"   # `pit passwd`
    sets = ["office"]           # whole sets ("*" = every set)
    [users.alice.scope]         # or per set, path prefixes inside snapshots
    web = ["www/uploads"]

Passwords are stored only as scrypt hashes (hashlib.scrypt, random salt),
compared in constant time.

`max_requests_per_user` counts per signed-in user name; with `anonymous =
true` (nobody signs in) it counts per client address instead, so one
anonymous machine cannot hold the slots of every other. Left out, it is 16,
or `threads - 1` when that is less; given, it must be below `threads`
(else one user's downloads could hold every worker and nobody else would be
answered).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tomllib
from dataclasses import dataclass, field

from store.errors import InvalidArgument
from store.view import Scope

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b = lambda x: base64.b64encode(x).decode()  # noqa: E731
    return f"scrypt${n}${r}${p}${b(salt)}${b(dk)}"


def check_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, dk = stored.split("$")
        if algo != "scrypt":
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class PropfindLimits:
    """What one PROPFIND may cost (davserver/propfind.py): the caps the `propfind_max_*` keys set, held by the
    provider and passed to the writer, so two servers in one process (tests) can differ."""

    max_body: int = 64 * 1024  # bytes of the request body (413 beyond)
    max_names: int = 64  # distinct property names asked for (400 beyond)
    max_entries: int = 100_000  # responses in the answer (then a 507 response for the folder)
    max_answer: int = 64 * 1024 * 1024  # bytes of the answer (then the same 507)


# [server] key -> PropfindLimits field
PROPFIND_KEYS = {"propfind_max_body": "max_body", "propfind_max_names": "max_names",
                 "propfind_max_entries": "max_entries", "propfind_max_answer": "max_answer"}
MAX_REQUESTS_PER_USER = 16


@dataclass
class User:
    name: str
    password_hash: str
    scope: Scope


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1"
    port: int = 8080
    certificate: str | None = None
    private_key: str | None = None
    self_signed: bool = False
    anonymous: bool = False
    anonymous_scope: Scope | None = None
    users: dict[str, User] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    threads: int = 64
    max_connections_per_client: int = 32
    max_connections: int = 1000
    request_timeout: int = 20
    max_requests_per_user: int = MAX_REQUESTS_PER_USER
    propfind: PropfindLimits = field(default_factory=PropfindLimits)

    @property
    def tls(self) -> bool:
        return bool(self.certificate and self.private_key)


def _scope(name: str, d: dict) -> Scope:
    rules: dict[str, list[str]] = {}
    sets = d.get("sets", [])
    if not isinstance(sets, list):
        raise InvalidArgument(f"{name}: 'sets' must be a list of set names")
    for s in sets:
        rules[str(s)] = [""]
    for s, prefixes in (d.get("scope") or {}).items():
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        if rules.get(str(s)) != [""]:  # a whole set already allowed stays whole
            rules.setdefault(str(s), []).extend(str(p) for p in prefixes)
    return Scope(rules)


def load_config(path: str) -> ServerConfig:
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: {exc}") from None
    return parse_config(d, base=os.path.dirname(os.path.abspath(path)))


def parse_config(d: dict, base: str = ".") -> ServerConfig:
    srv = d.get("server", {})
    cfg = ServerConfig(listen=str(srv.get("listen", "127.0.0.1")), port=int(srv.get("port", 8080)),
                       anonymous=bool(srv.get("anonymous", False)))
    if not isinstance(srv.get("self_signed", False), bool):
        raise InvalidArgument("server.self_signed must be true or false")
    cfg.self_signed = srv.get("self_signed", False)
    for k, alias in (("certificate", "cert"), ("private_key", "key")):
        if srv.get(k) and srv.get(alias):
            raise InvalidArgument(f"give server.{k} or server.{alias}, not both")
        if srv.get(k) or srv.get(alias):
            setattr(cfg, k, os.path.join(base, srv.get(k) or srv[alias]))
    names = srv.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InvalidArgument("server.names must be a list of host names and addresses")
    cfg.names = names
    for k in LIMIT_KEYS:
        if k in srv:
            v = srv[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgument(f"server.{k} must be a whole number of at least 1, got {v!r}")
            setattr(cfg, k, v)
    per_user = srv.get("max_requests_per_user")
    if per_user is None:
        cfg.max_requests_per_user = max(1, min(MAX_REQUESTS_PER_USER, cfg.threads - 1))
    elif per_user >= cfg.threads and cfg.threads > 1:
        raise InvalidArgument(f"server.max_requests_per_user ({per_user}) must be below server.threads "
                              f"({cfg.threads}): else one user's downloads can hold every worker")
    limits = {}
    for k, name in PROPFIND_KEYS.items():
        if k in srv:
            v = srv[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgument(f"server.{k} must be a whole number of at least 1, got {v!r}")
            limits[name] = v
    cfg.propfind = PropfindLimits(**limits)
    if bool(cfg.certificate) != bool(cfg.private_key):
        raise InvalidArgument("give both server.certificate and server.private_key, or neither")
    for name, u in (d.get("users") or {}).items():
        pw = u.get("password", "")
        if not str(pw).startswith("scrypt$"):
            raise InvalidArgument(f"user {name}: password must be a scrypt hash (make one with `pit passwd`)")
        cfg.users[name] = User(name, pw, _scope(f"user {name}", u))
    if cfg.anonymous:
        cfg.anonymous_scope = _scope("anonymous", d.get("anonymous") or {})
    return cfg


# ----------------------------------------------------------------------------- `pit config check --kind serve`
FILE_KEYS = {"server", "users", "anonymous"}
LIMIT_KEYS = ("threads", "max_connections_per_client", "max_connections", "request_timeout",
              "max_requests_per_user")
SERVER_KEYS = {"listen", "port", "certificate", "private_key", "cert", "key", "names", "self_signed", "anonymous",
               *LIMIT_KEYS, *PROPFIND_KEYS}
USER_KEYS = {"password", "sets", "scope"}
ANONYMOUS_KEYS = {"sets", "scope"}


def check_file(path: str, raw: dict) -> str:
    """`pit config check --kind serve`: FILE (already parsed as RAW) loaded as `pit serve` loads it; a summary
    line, or InvalidArgument naming the key."""
    # pit serve's loader ignores keys it does not know and trusts the types: a misspelt key would
    # silently fall back to its default, so the check names it.
    for k, v in raw.items():
        if k not in FILE_KEYS:
            raise InvalidArgument(f"unknown keys ['{k}']")
        if not isinstance(v, dict):
            raise InvalidArgument(f"`{k}` must be a table ([{k}])")
    srv = raw.get("server", {})
    for k in srv:
        if k not in SERVER_KEYS:
            raise InvalidArgument(f"`server.{k}`: unknown key (one of {', '.join(sorted(SERVER_KEYS))})")
    if "port" in srv and (isinstance(srv["port"], bool) or not isinstance(srv["port"], int)
                          or not 0 < srv["port"] < 65536):
        raise InvalidArgument(f"`server.port` must be a port number (1-65535), got {srv['port']!r}")
    for k in ("listen", "certificate", "private_key", "cert", "key"):
        if k in srv and not isinstance(srv[k], str):
            raise InvalidArgument(f"`server.{k}` must be a string")
    if "anonymous" in srv and not isinstance(srv["anonymous"], bool):
        raise InvalidArgument("`server.anonymous` must be true or false")
    for name, u in raw.get("users", {}).items():
        if not isinstance(u, dict):
            raise InvalidArgument(f"`users.{name}` must be a table ([users.{name}])")
        for k in u:
            if k not in USER_KEYS:
                raise InvalidArgument(f"`users.{name}.{k}`: unknown key (one of {', '.join(sorted(USER_KEYS))})")
        if "scope" in u and not isinstance(u["scope"], dict):
            raise InvalidArgument(f"`users.{name}.scope` must be a table of set = [path prefixes]")
    for k in raw.get("anonymous", {}):
        if k not in ANONYMOUS_KEYS:
            raise InvalidArgument(f"`anonymous.{k}`: unknown key (one of {', '.join(sorted(ANONYMOUS_KEYS))})")
    cfg = load_config(path)
    for k in ("certificate", "private_key"):
        p = getattr(cfg, k)
        if p and not os.path.isfile(p):
            raise InvalidArgument(f"`server.{k}`: no file at {p}")
    who = f"{len(cfg.users)} user(s)" + (", anonymous allowed" if cfg.anonymous else "")
    return f"pit serve configuration: {cfg.listen}:{cfg.port}, {'TLS' if cfg.tls else 'no TLS'}, {who}"


@dataclass(frozen=True)
class FileKind:
    """What `pit config check` needs to know of a kind of file (registered as a `pit.config_kinds` entry point)."""

    keys: frozenset
    check: object
    error: type


CONFIG_KIND = FileKind(frozenset(FILE_KEYS), check_file, InvalidArgument)
