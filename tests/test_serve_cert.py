"""`pit serve`'s certificates (issue 15): the self-signed one is a leaf
(CA:FALSE, serverAuth) naming every configured name and the listen address,
made again when they change; a certificate from the user's own CA is served
as given. Real `pit serve` processes on 127.0.0.1, real TLS clients."""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from davserver.config import hash_password
from davserver.errors import CertificateError
from store.repository import Repository

from test_view_support import free_port, snap, stop, wait_port, write

PIT = os.path.join(os.path.dirname(sys.executable), "pit")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cert")
    r = Repository.init(str(tmp / "repo"))
    write(str(tmp / "data"), "a.txt", "a")
    snap(r, "office", str(tmp / "data"))
    r.close()
    return tmp, str(tmp / "repo")


class Serve:
    def __init__(self, tmp, repo, server_toml: str) -> None:
        self.port = free_port()
        cfg = tmp / f"serve-{self.port}.toml"
        cfg.write_text(f"[server]\nport = {self.port}\n{server_toml}\n"
                       f'[users.alice]\npassword = "{hash_password("s3cret")}"\nsets = ["*"]\n')
        self.proc = subprocess.Popen([PIT, "-r", repo, "serve", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    def __enter__(self):
        try:
            wait_port(self.port, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)
        self.proc.stderr.close()

    def handshake(self, cafile: str, name: str) -> bytes:
        """Connects to 127.0.0.1 but checks the certificate for `name` (as a client that mapped the drive
        by that name would); the server's certificate (DER)."""
        ctx = ssl.create_default_context(cafile=cafile)
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as s:
                return s.getpeercert(binary_form=True)


def _load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def test_self_signed_is_a_leaf_with_every_name(repo):
    tmp, path = repo
    cert_path = os.path.join(path, "serve-tls", "cert.pem")
    with Serve(tmp, path, 'self_signed = true\nnames = ["backup.example.lan", "10.1.2.3"]\n') as s:
        cert = _load(cert_path)
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"backup.example.lan", "localhost", socket.gethostname()} <= set(sans.get_values_for_type(x509.DNSName))
        assert {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")} <= set(
            sans.get_values_for_type(x509.IPAddress))
        for name in ("backup.example.lan", "10.1.2.3", "127.0.0.1", "localhost"):
            s.handshake(cert_path, name)  # a client trusting just this certificate accepts each name
        with pytest.raises(ssl.SSLCertVerificationError):
            s.handshake(cert_path, "other.example.lan")
    first = cert.fingerprint(hashes.SHA256())
    with Serve(tmp, path, 'self_signed = true\nnames = ["backup.example.lan", "10.1.2.3"]\n'):
        assert _load(cert_path).fingerprint(hashes.SHA256()) == first  # same names: kept
    with Serve(tmp, path, 'self_signed = true\nnames = ["nas.example.lan"]\n') as s:
        again = _load(cert_path)
        assert again.fingerprint(hashes.SHA256()) != first  # names changed: made again
        s.handshake(cert_path, "nas.example.lan")
        r = subprocess.run(["curl", "-s", "--cacert", cert_path, "-u", "alice:s3cret", "-o", "/dev/null", "-w",
                            "%{http_code}", "--resolve", f"nas.example.lan:{s.port}:127.0.0.1",
                            f"https://nas.example.lan:{s.port}/office/"], capture_output=True, text=True, timeout=60)
        assert r.stdout == "200", r  # curl (OpenSSL) trusts the self-signed leaf as given


def test_an_old_ca_certificate_is_replaced(repo, tmp_path):
    from davserver.server import self_signed

    d = tmp_path / "tls"
    d.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    old = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    cert_path, _ = self_signed(str(d), ["127.0.0.1"])
    assert _load(cert_path).extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def _own_ca(d):
    """An office CA and a server certificate it signed (what `cert`/`key` point at)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Office CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backup")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("backup.office.lan")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return leaf


def test_certificate_from_the_users_own_ca(repo):
    tmp, path = repo
    d = tmp / "own-ca"
    d.mkdir()
    leaf = _own_ca(d)
    with Serve(tmp, path, f'cert = "{d / "server.pem"}"\nkey = "{d / "server.key"}"\n') as s:
        der = s.handshake(str(d / "ca.pem"), "backup.office.lan")
        assert der == leaf.public_bytes(serialization.Encoding.DER)


def test_a_key_that_does_not_match_is_a_typed_error(repo):
    tmp, path = repo
    d = tmp / "mismatch"
    d.mkdir()
    _own_ca(d)
    other = ec.generate_private_key(ec.SECP256R1())
    (d / "server.key").write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    s = Serve(tmp, path, f'cert = "{d / "server.pem"}"\nkey = "{d / "server.key"}"\n')
    try:
        s.proc.wait(60)
        err = s.proc.stderr.read().decode()
    finally:
        stop(s.proc)
        s.proc.stderr.close()
    assert s.proc.returncode == CertificateError.exit_code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
