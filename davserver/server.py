"""The WebDAV server: wsgidav over our provider, on cheroot, optionally TLS.

Authentication is HTTP Basic against scrypt hashes (`config.py`). Basic
sends the password with every request, so use TLS anywhere but loopback;
Windows' WebClient refuses Basic over plain HTTP by default anyway. A
verified password is remembered (as a keyed hash, in memory) for a few
minutes, because davfs2 and Explorer send dozens of requests per folder and
scrypt is deliberately slow.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import signal
import threading
import time

from wsgidav.dc.base_dc import BaseDomainController
from wsgidav.default_conf import DEFAULT_CONFIG
from wsgidav.http_authenticator import HTTPAuthenticator
from wsgidav.wsgidav_app import WsgiDAVApp

from .config import ServerConfig, check_password, hash_password
from .errors import CertificateError, ListenError
from .guard import Lockout, PerUserLimit, RestoreQuery, UserSlots, guard, holding
from .listener import DeferredTLSAdapter, PitServer, request_reading
from .safety import safe_responses
from .provider import ViewProvider

REALM = "pitstore"
AUTH_CACHE_SECONDS = 300


class PitDomainController(BaseDomainController):
    """Users and passwords from the pit server config (set by `build_app`)."""

    def __init__(self, wsgidav_app, config) -> None:
        super().__init__(wsgidav_app, config)
        self.cfg: ServerConfig = config["pit_server_config"]
        self._ok: dict[str, tuple[bytes, float]] = {}
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self.lockout: Lockout = config["pit_lockout"]
        # what an unknown user's password is checked against: the same scrypt cost as a real hash
        self._dummy = hash_password(os.urandom(16).hex())

    def __str__(self) -> str:
        return "PitDomainController"

    def get_domain_realm(self, path_info, environ):
        return REALM

    def require_authentication(self, realm, environ) -> bool:
        return not self.cfg.anonymous

    def supports_http_digest_auth(self) -> bool:
        return False  # we keep only scrypt hashes, which Digest cannot use

    def basic_auth_user(self, realm, user_name, password, environ) -> bool:
        """Constant work whoever asks: an unknown user costs the same scrypt as a
        wrong password (answering unknown names in 4 ms and known ones in 50 ms
        told which names exist). Failures count towards the address's lockout
        (guard.py)."""
        user = self.cfg.users.get(user_name)
        tag = hashlib.blake2b(password.encode(), key=self._key, digest_size=32).digest()
        now = time.monotonic()
        addr = environ.get("REMOTE_ADDR", "")
        if user is not None:
            with self._lock:
                hit = self._ok.get(user_name)
            if hit is not None and hmac.compare_digest(hit[0], tag) and now - hit[1] < AUTH_CACHE_SECONDS:
                return True
        ok = check_password(password, user.password_hash if user is not None else self._dummy)
        if not ok or user is None:
            self.lockout.failed(addr, user_name)
            return False
        self.lockout.succeeded(addr)
        with self._lock:
            self._ok[user_name] = (tag, now)
        return True

    def digest_auth_user(self, realm, user_name, environ):
        return False


SCRATCH_SHARE = "/litmus-scratch"


def middleware_stack() -> list:
    """wsgidav's default middleware with ours right after HTTPAuthenticator, the first place that knows who
    is asking: `RestoreQuery` (a search's query the guard hid from it) and `PerUserLimit` (before anything
    that answers, so a busy user's request costs no provider work)."""
    stack = list(DEFAULT_CONFIG["middleware_stack"])
    at = stack.index(HTTPAuthenticator)
    return stack[:at + 1] + [RestoreQuery, PerUserLimit] + stack[at + 1:]


def build_app(repo, cfg: ServerConfig, verbose: int = 1, scratch_dir: str | None = None):
    """The WSGI app: wsgidav over our provider, behind the guard (guard.py) and the browser safety headers
    (safety.py); requests per user are counted inside wsgidav (`PerUserLimit`) and given back by
    `holding`, right outside it."""
    scopes = {name: u.scope for name, u in cfg.users.items()}
    provider = ViewProvider(repo, scopes, cfg.anonymous_scope if cfg.anonymous else None, cfg.propfind)
    lockout = Lockout()
    conf = {
        "provider_mapping": {"/": provider},
        "pit_server_config": cfg,
        "pit_lockout": lockout,
        "pit_user_slots": UserSlots(cfg.max_requests_per_user),
        "middleware_stack": middleware_stack(),
        "http_authenticator": {"domain_controller": PitDomainController, "accept_basic": True,
                               "accept_digest": False, "default_to_digest": False},
        "dir_browser": {"enable": False},  # the provider renders its own listing (versions, verification)
        "lock_storage": None,
        "property_manager": None,
        "add_header_MS_Author_Via": True,
        "hotfixes": {"emulate_win32_lastmod": True},
        "verbose": verbose,
        "logging": {"enable": verbose > 1},
    }
    app = WsgiDAVApp(conf)
    if scratch_dir:
        add_scratch_share(app, scratch_dir)
    return safe_responses(guard(holding(app), lockout, (SCRATCH_SHARE,) if scratch_dir else ()))


def add_scratch_share(app: WsgiDAVApp, scratch_dir: str) -> None:
    """DIAGNOSTIC ONLY (`pit serve --litmus-scratch DIR`, off by default): a
    writable share of a scratch folder at /litmus-scratch, in the same app with
    the same users and auth, so the litmus conformance suite (which starts
    every suite with MKCOL) can exercise this server stack. Only that share
    gets a lock and property manager; the restore view stays read-only."""
    from wsgidav.fs_dav_provider import FilesystemProvider
    from wsgidav.lock_man.lock_manager import LockManager
    from wsgidav.lock_man.lock_storage import LockStorageDict
    from wsgidav.prop_man.property_manager import PropertyManager

    scratch = app.add_provider(SCRATCH_SHARE, FilesystemProvider(scratch_dir))
    scratch.set_lock_manager(LockManager(LockStorageDict()))
    scratch.set_prop_manager(PropertyManager())


def self_signed(directory: str, hosts: list[str]) -> tuple[str, str]:
    """A self-signed *leaf* certificate for `hosts` under `directory`: made on first
    use, made again when the names it must carry change (or it is an older one).

    Users are told to trust this certificate (docs/restore.md). It is a leaf
    (`CA:FALSE`, serverAuth only), so trusting it trusts this server and nothing
    its key could sign: the key sits on the backup server, and a CA there would
    let whoever takes that server impersonate any site to every user. Every
    name a user may map the drive by (configured names, the listen address,
    host name and FQDN, loopback) is a SAN, or the client refuses the name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    if os.path.exists(cert_path) and os.path.exists(key_path) and _fits(cert_path, sans):
        return cert_path, key_path
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pitstore")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))  # the most Apple platforms accept
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path + ".new", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(key_path + ".new", key_path)
    os.replace(cert_path + ".new", cert_path)
    return cert_path, key_path


def certificate_names(cfg: ServerConfig) -> list[str]:
    """Every name a client may reach this server by: `names` from the config first (the first is the
    certificate's CN), the listen address, this host's name and FQDN and their addresses, loopback."""
    import socket

    names = list(cfg.names)
    wildcard = cfg.listen in ("0.0.0.0", "::", "")
    if not wildcard:
        names.append(cfg.listen)
    host, fqdn = socket.gethostname(), socket.getfqdn()
    names += [host, fqdn]
    if wildcard:
        try:
            names += [ai[4][0] for ai in socket.getaddrinfo(host, None) if not ai[4][0].startswith("fe80")]
        except OSError:
            pass
    names += ["localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(n.strip("[]") for n in names if n))


def _fits(cert_path: str, sans) -> bool:
    """The certificate there is one of ours as made today (a leaf) with exactly these names."""
    from cryptography import x509

    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return set(have) == set(sans)


def make_server(repo, cfg: ServerConfig, verbose: int = 1, scratch_dir: str | None = None) -> PitServer:
    app = build_app(repo, cfg, verbose, scratch_dir)
    server = PitServer((cfg.listen, cfg.port), request_reading(app), threads=cfg.threads,
                       max_connections_per_client=cfg.max_connections_per_client,
                       max_connections=cfg.max_connections, request_timeout=cfg.request_timeout)
    if cfg.tls:
        try:
            server.ssl_adapter = DeferredTLSAdapter(cfg.certificate, cfg.private_key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise CertificateError(f"cannot use {cfg.certificate} / {cfg.private_key}: {exc}") from None
    return server


def serve_forever(server: PitServer) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly."""
    def stop(signum, frame):
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("wsgidav").setLevel(logging.WARNING)
    try:
        server.prepare()
    except OSError as exc:
        raise ListenError(f"cannot listen on {server.bind_addr}: {exc.strerror or exc}") from None
    server.serve()
