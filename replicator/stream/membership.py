"""Cluster membership in the kubeadm style: a cluster CA, join tokens, a roster.

- `pit cluster init` (on the primary) makes the cluster CA (ECDSA P-256) and
  the primary's own key and certificate, and starts the roster with it.
- `pit cluster token` prints a join token: the primary's join address,
  a random secret (only its SHA-256 is kept), the CA's SHA-256 fingerprint
  and an expiry. It is good for one join, or for N (`--uses N`, or
  `--nodes b,c`: only those node ids, each once); every join spends one use
  under the tokens file's lock, and a spent or expired token is refused.
- `pit join TOKEN` makes the node's key locally (it never leaves the node),
  connects to the join address, fetches the CA certificate and checks it
  against the pinned fingerprint *and* that the primary's TLS certificate was
  issued by it, and only then sends the secret and a CSR; it gets back a
  certificate whose CN is its node id.
- Afterwards every link is mutual TLS 1.3 with CERT_REQUIRED; a peer is
  authorised by the node id in its certificate *and* the certificate's
  fingerprint recorded in the roster, so `pit cluster remove` revokes a node
  at once, with no CRL.

State directory files: node.json, node.key, node.crt, ca.crt; on the
primary also ca.key, roster.json and tokens.json.
"""
from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import socket
import ssl
import time
from contextlib import contextmanager

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import ClusterExists, ClusterError, NotAuthorised, NotInCluster, TokenInvalid, UnknownNode
from ..names import check_node_id, parse_address
from . import protocol

TOKEN_PREFIX = "PIT1."
DEFAULT_TTL = 24 * 3600
MAX_TOKEN_USES = 1000


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj, mode: int = 0o644) -> None:
    _write(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", mode)


@contextmanager
def _locked(path: str):
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ------------------------------------------------------------------ certs
def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _make_ca(cluster_name: str):
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pitstore cluster CA {cluster_name}")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _sign(ca_key, ca_cert, node: str, public_key) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=1825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def make_csr(key, node: str) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------ state
class NodeState:
    """A node's membership, read from its state directory."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            with open(self.file("node.json")) as f:
                self.info = json.load(f)
        except FileNotFoundError:
            raise NotInCluster(f"{self.path} holds no cluster membership (run `pit cluster init` or `pit join`)") from None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{self.file('node.json')} is unreadable: {exc}") from None
        self.node: str = self.info["node"]
        self.address: str = self.info["address"]
        self.primary: str = self.info["primary"]
        self.is_primary = self.node == self.primary

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- TLS
    def _context(self, side) -> ssl.SSLContext:
        ctx = ssl.SSLContext(side)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        if side == ssl.PROTOCOL_TLS_CLIENT:
            ctx.check_hostname = False  # peers are named by the node id in their cert, checked by us
        ctx.load_cert_chain(self.file("node.crt"), self.file("node.key"))
        ctx.load_verify_locations(cafile=self.file("ca.crt"))
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_CLIENT)

    # -- roster (authoritative on the primary; a pushed copy elsewhere)
    def roster(self) -> dict:
        """{node: {"address", "fp"}}: the primary reads roster.json, others the pushed config."""
        name = "roster.json" if self.is_primary else "cluster.json"
        try:
            with open(self.file(name)) as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        return data.get("nodes", {}) if self.is_primary else data.get("roster", {})

    def authorise(self, node: str, fp: str, roster: dict | None = None) -> None:
        r = self.roster() if roster is None else roster
        ent = r.get(node)
        if ent is None and node == self.primary and self.info.get("primary_fp"):
            ent = {"fp": self.info["primary_fp"]}  # pinned at join: valid before the first pushed config
        if ent is None:
            raise NotAuthorised(f"node {node!r} is not in the cluster roster")
        if not hmac.compare_digest(ent.get("fp", ""), fp):
            raise NotAuthorised(f"node {node!r} presented a certificate the roster does not list")


def peer_identity(sock: ssl.SSLSocket) -> tuple[str, str]:
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise NotAuthorised("the peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise NotAuthorised("the peer certificate has no single common name")
    return str(cns[0].value), fingerprint(der)


def connect(state: NodeState, address: str, timeout: float = 10.0) -> tuple[ssl.SSLSocket, str]:
    """mTLS to a peer; returns the socket and the peer's node id (authorised against the roster)."""
    host, port = parse_address(address)
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        protocol.tune_socket(raw)
        s = state.client_context().wrap_socket(raw)
    except BaseException:
        raw.close()
        raise
    try:
        node, fp = peer_identity(s)
        state.authorise(node, fp)
    except BaseException:
        s.close()
        raise
    return s, node


# ------------------------------------------------------------------ init / token / join / remove
def init_cluster(path: str, node: str, address: str, join_address: str | None = None,
                 cluster_name: str | None = None) -> NodeState:
    check_node_id(node)
    parse_address(address)
    join_address = join_address or _next_port(address)
    parse_address(join_address)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(path, "node.json")):
        raise ClusterExists(f"{path} already holds a cluster membership")
    ca_key, ca_cert = _make_ca(cluster_name or node)
    key = _new_key()
    cert = _sign(ca_key, ca_cert, node, key.public_key())
    P = lambda n: os.path.join(path, n)  # noqa: E731
    _write(P("ca.key"), _key_pem(ca_key), 0o600)
    _write(P("ca.crt"), ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(P("node.key"), _key_pem(key), 0o600)
    _write(P("node.crt"), cert.public_bytes(serialization.Encoding.PEM))
    der = cert.public_bytes(serialization.Encoding.DER)
    _write_json(P("roster.json"), {"nodes": {node: {"address": address, "fp": fingerprint(der),
                                                    "joined": int(time.time())}}})
    _write_json(P("tokens.json"), {}, 0o600)
    # node.json last: its presence means "a complete membership".
    _write_json(P("node.json"), {"node": node, "address": address, "primary": node,
                                 "join_address": join_address})
    return NodeState(path)


def _next_port(address: str) -> str:
    host, port = parse_address(address)
    return f"{host}:{port + 1}"


def ca_fingerprint(state: NodeState) -> str:
    with open(state.file("ca.crt"), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    return fingerprint(ca.public_bytes(serialization.Encoding.DER))


def make_token(state: NodeState, ttl: int = DEFAULT_TTL, uses: int = 1, nodes: list[str] | None = None) -> str:
    """A join token good for `uses` joins (one per joining node) until `ttl` seconds from now.

    With `nodes`, only those node ids may join with it, each once, and `uses` is their number.
    Only the secret's SHA-256 is kept; each join spends one use under the tokens file's lock.
    """
    if not state.is_primary:
        raise ClusterError("join tokens are made on the primary master")
    if nodes is not None:
        nodes = [check_node_id(n) for n in nodes]
        if not nodes or len(set(nodes)) != len(nodes):
            raise ClusterError("--nodes must name each joining node once")
        if uses not in (1, len(nodes)):
            raise ClusterError(f"--uses {uses} does not match the {len(nodes)} nodes named")
        uses = len(nodes)
    if not isinstance(uses, int) or not 1 <= uses <= MAX_TOKEN_USES:
        raise ClusterError(f"a join token has 1 to {MAX_TOKEN_USES} uses")
    if not isinstance(ttl, int) or ttl < 1:
        raise ClusterError("a join token's TTL is a positive number of seconds")
    tid = secrets.token_hex(6)
    secret = secrets.token_bytes(24)
    expires = int(time.time()) + ttl
    path = state.file("tokens.json")
    with _locked(path):
        toks = _read_json(path)
        now = time.time()
        toks = {k: v for k, v in toks.items() if v["expires"] > now and _uses_left(v) > 0}
        toks[tid] = {"hash": hashlib.sha256(secret).hexdigest(), "expires": expires, "uses": uses,
                     "joined": [], "nodes": nodes, "used": False}
        _write_json(path, toks, 0o600)
    blob = msgpack.packb([state.info["join_address"], tid, secret, bytes.fromhex(ca_fingerprint(state)), expires],
                         use_bin_type=True)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")


def _uses_left(t: dict) -> int:
    """Joins a tokens.json entry still allows (entries from before multi-use tokens: one, or none once used)."""
    if "uses" not in t:
        return 0 if t.get("used") else 1
    return max(0, int(t["uses"]) - len(t.get("joined", [])))


def _spend(t: dict, node: str) -> None:
    """Check that `node` may join with the token entry `t` (secret already checked) and spend one use."""
    if t["expires"] < time.time():
        raise TokenInvalid("the join token has expired; make a new one with `pit cluster token`")
    if _uses_left(t) <= 0:
        who = ", ".join(t.get("joined", [])) or "earlier joins"
        raise TokenInvalid(f"the join token is spent (its {t.get('uses', 1)} use(s) went to {who}); "
                           "make a new one with `pit cluster token`")
    if t.get("nodes") is not None and node not in t["nodes"]:
        raise TokenInvalid(f"the join token is for node(s) {', '.join(t['nodes'])}, not {node!r}")
    t.setdefault("joined", []).append(node)
    t.setdefault("uses", 1)
    t["used"] = _uses_left(t) == 0


def parse_token(token: str) -> tuple[str, str, bytes, str, int]:
    try:
        if not token.startswith(TOKEN_PREFIX):
            raise ValueError
        raw = token[len(TOKEN_PREFIX):].strip()
        addr, tid, secret, fp, expires = msgpack.unpackb(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not (isinstance(addr, str) and isinstance(tid, str) and isinstance(secret, bytes)
                and isinstance(fp, bytes) and len(fp) == 32 and isinstance(expires, int)):
            raise ValueError
    except Exception:
        raise TokenInvalid("the join token is malformed (copy it whole from `pit cluster token`)") from None
    if expires < time.time():
        raise TokenInvalid("the join token has expired; make a new one with `pit cluster token`")
    return addr, tid, secret, fp.hex(), expires


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def join(token: str, path: str, node: str, address: str, timeout: float = 15.0) -> NodeState:
    """Join the cluster the token names; writes this node's state directory."""
    check_node_id(node)
    parse_address(address)
    join_addr, tid, secret, ca_fp, _ = parse_token(token)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(path, "node.json")):
        raise ClusterExists(f"{path} already holds a cluster membership")
    key = _new_key()
    host, port = parse_address(join_addr)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Verified by hand below: the CA is pinned by fingerprint, then the server cert is checked against it.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((host, port), timeout=timeout)
    protocol.tune_socket(raw)
    s = ctx.wrap_socket(raw)
    conn = protocol.Conn(s, join_addr, heartbeat=False, dead_after=timeout)
    try:
        protocol.hello(conn, node, "join")
        conn.send({"t": "ca_request"})
        ca_pem = conn.recv("ca")["ca"]
        ca = x509.load_pem_x509_certificate(ca_pem)
        if not hmac.compare_digest(fingerprint(ca.public_bytes(serialization.Encoding.DER)), ca_fp):
            raise NotAuthorised("the primary's CA does not match the fingerprint in the token: refusing to join")
        server_der = s.getpeercert(binary_form=True)
        server = x509.load_der_x509_certificate(server_der)
        try:
            server.verify_directly_issued_by(ca)
        except Exception:
            raise NotAuthorised("the primary's certificate was not issued by the pinned CA: refusing to join") from None
        conn.send({"t": "join", "token": tid, "secret": secret, "csr": make_csr(key, node), "node": node,
                   "address": address})
        reply = conn.recv("joined")
    except protocol.ProtocolError as exc:
        raise TokenInvalid(f"the primary refused to join: {exc}") from None
    finally:
        conn.close()
    cert = x509.load_pem_x509_certificate(reply["cert"])
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ClusterError("the primary returned a certificate for another key")
    P = lambda n: os.path.join(path, n)  # noqa: E731
    _write(P("node.key"), _key_pem(key), 0o600)
    _write(P("node.crt"), reply["cert"])
    _write(P("ca.crt"), ca_pem)
    _write_json(P("node.json"), {"node": node, "address": address, "primary": reply["primary"],
                                 "primary_address": join_addr, "primary_fp": fingerprint(server_der)})
    return NodeState(path)


def serve_join(conn: protocol.Conn, state: NodeState, sslsock: ssl.SSLSocket) -> str:
    """Primary side of a join (on the join listener): returns the new node's id."""
    msg = protocol.accept_hello(conn, state.node)
    if msg["kind"] != "join":
        conn.fail("kind", "the join port only accepts joins")
        raise NotAuthorised("a non-join connection on the join port")
    protocol.welcome(conn, state.node)
    conn.recv("ca_request")
    with open(state.file("ca.crt"), "rb") as f:
        conn.send({"t": "ca", "ca": f.read()})
    req = conn.recv("join")
    try:
        node = check_node_id(req["node"])
        parse_address(req["address"])
        csr = x509.load_pem_x509_csr(req["csr"])
        if not csr.is_signature_valid:
            raise TokenInvalid("the CSR signature is invalid")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != node:
            raise TokenInvalid("the CSR must name exactly the joining node")
        path = state.file("tokens.json")
        with _locked(path):
            toks = _read_json(path)
            t = toks.get(req["token"])
            if t is None or not isinstance(req["secret"], bytes) or not hmac.compare_digest(
                    t["hash"], hashlib.sha256(req["secret"]).hexdigest()):
                raise TokenInvalid("unknown join token (or a wrong secret)")
            with _locked(state.file("roster.json")):
                roster = _read_json(state.file("roster.json"))
                if node in roster.get("nodes", {}):
                    raise ClusterExists(f"node {node!r} is already a member (remove it first)")
                with open(state.file("ca.key"), "rb") as f:
                    ca_key = serialization.load_pem_private_key(f.read(), None)
                with open(state.file("ca.crt"), "rb") as f:
                    ca_cert = x509.load_pem_x509_certificate(f.read())
                cert = _sign(ca_key, ca_cert, node, csr.public_key())
                der = cert.public_bytes(serialization.Encoding.DER)
                _spend(t, node)
                _write_json(path, toks, 0o600)  # spent before the node exists: counted even on a crash
                roster.setdefault("nodes", {})[node] = {"address": req["address"], "fp": fingerprint(der),
                                                        "joined": int(time.time())}
                _write_json(state.file("roster.json"), roster)
    except (TokenInvalid, ClusterExists, ClusterError) as exc:
        conn.fail("join", str(exc))
        raise
    except ValueError as exc:
        conn.fail("join", "malformed CSR")
        raise TokenInvalid(f"malformed CSR: {exc}") from None
    conn.send({"t": "joined", "cert": cert.public_bytes(serialization.Encoding.PEM), "ca": b"", "primary": state.node})
    return node


def remove_node(state: NodeState, node: str) -> None:
    if not state.is_primary:
        raise ClusterError("nodes are removed on the primary master")
    if node == state.node:
        raise ClusterError("the primary cannot remove itself")
    with _locked(state.file("roster.json")):
        roster = _read_json(state.file("roster.json"))
        if node not in roster.get("nodes", {}):
            raise UnknownNode(f"no node {node!r} in the roster")
        del roster["nodes"][node]
        _write_json(state.file("roster.json"), roster)


def roster_mtime(state: NodeState) -> float:
    try:
        return os.stat(state.file("roster.json")).st_mtime_ns
    except FileNotFoundError:
        return 0
