"""The WebDAV server with real clients: curl (every verb, auth, scope, Range,
TLS, zip), davfs2, rclone and headless Chromium. The server is `pit serve`
in a subprocess on 127.0.0.1, stopped by its PID in a finally."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

from store.repository import Repository
from davserver.config import hash_password

from test_view_support import free_port, snap, stop, wait_port, write

PIT = os.path.join(os.path.dirname(sys.executable), "pit")


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dav")
    repo = Repository.init(str(tmp / "repo"))
    src = str(tmp / "data")
    write(src, "sales/report.xlsx", "v1")
    write(src, "hr/secret.txt", "salaries")
    write(src, "My Résumé ü 日本.txt", "unicode")
    write(src, "big.bin", os.urandom(5 * 1024 * 1024 + 123))
    s1 = snap(repo, "office", src)
    write(src, "sales/report.xlsx", "v2 is longer")
    s2 = snap(repo, "office", src)
    repo.close()
    h = hash_password("s3cret")
    cfg = tmp / "serve.toml"
    cfg.write_text(f'[users.alice]\npassword = "{h}"\nsets = ["office"]\n'
                   f'[users.bob]\npassword = "{h}"\n[users.bob.scope]\noffice = ["data/sales"]\n')
    port = free_port()
    proc = subprocess.Popen([PIT, "-r", str(tmp / "repo"), "serve", "-c", str(cfg), "--port", str(port),
                             "--self-signed"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        yield {"url": f"https://127.0.0.1:{port}", "cert": str(tmp / "repo" / "serve-tls" / "cert.pem"),
               "src": src, "s1": s1, "s2": s2, "tmp": tmp, "port": port}
    finally:
        stop(proc)


def curl(share, *args, user="alice:s3cret", path="/"):
    cmd = ["curl", "-s", "-g", "--cacert", share["cert"], "-w", "\n%{http_code}"]
    if user:
        cmd += ["-u", user]
    r = subprocess.run(cmd + list(args) + [share["url"] + path], capture_output=True, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


def test_propfind_depths_and_get(share):
    code, body = curl(share, "-X", "PROPFIND", "-H", "Depth: 0", path="/office/")
    assert code == 207 and body.count(b"<ns0:response>") == 1
    code, body = curl(share, "-X", "PROPFIND", "-H", "Depth: 1", path="/office/")
    assert code == 207
    for name in (share["s1"].name, share["s2"].name, "latest", ".versions"):
        assert name.encode() in body
    assert b"quota-available-bytes" in body
    code, body = curl(share, path="/office/latest/data/sales/report.xlsx")
    assert (code, body) == (200, b"v2 is longer")
    code, body = curl(share, path=f"/office/{share['s1'].name}/data/sales/report.xlsx")
    assert (code, body) == (200, b"v1")
    code, body = curl(share, path="/office/latest/data/My%20R%C3%A9sum%C3%A9%20%C3%BC%20%E6%97%A5%E6%9C%AC.txt")
    assert (code, body) == (200, b"unicode")


def test_depth_infinity_refused(share):
    code, body = curl(share, "-X", "PROPFIND", "-H", "Depth: infinity", path="/")
    assert code == 403 and b"propfind-finite-depth" in body


def test_range_etag_and_headers(share):
    want = open(os.path.join(share["src"], "big.bin"), "rb").read()
    code, body = curl(share, "-r", "1000000-1000099", path="/office/latest/data/big.bin")
    assert code == 206 and body == want[1000000:1000100]
    code, body = curl(share, "-r", f"{len(want) + 10}-", path="/office/latest/data/big.bin")
    assert code == 416
    code, head = curl(share, "-I", path="/office/latest/data/big.bin")
    h = head.decode().lower()
    assert f"content-length: {len(want)}" in h and "last-modified:" in h and "etag:" in h
    etag = [ln.split(":", 1)[1].strip() for ln in head.decode().splitlines() if ln.lower().startswith("etag")][0]
    code, _ = curl(share, "-H", f"If-None-Match: {etag}", path="/office/latest/data/big.bin")
    assert code == 304
    code, body = curl(share, path="/office/latest/data/big.bin")
    assert body == want


@pytest.mark.parametrize("verb", ["PUT", "DELETE", "MKCOL", "MOVE", "COPY", "PROPPATCH", "LOCK", "POST"])
def test_every_write_verb_refused(share, verb):
    extra = ["-H", f"Destination: {share['url']}/office/latest/data/x"] if verb in ("MOVE", "COPY") else []
    if verb in ("PUT", "POST", "PROPPATCH", "LOCK"):
        extra += ["--data-binary", "x"]
    code, _ = curl(share, "-X", verb, *extra, path="/office/latest/data/sales/report.xlsx")
    assert code in (403, 405), verb
    code, body = curl(share, path="/office/latest/data/sales/report.xlsx")
    assert body == b"v2 is longer"


def test_options_says_read_only(share):
    code, head = curl(share, "-X", "OPTIONS", "-i", path="/office/")
    allow = [ln for ln in head.decode().splitlines() if ln.lower().startswith("allow:")][0]
    assert "PUT" not in allow and "LOCK" not in allow and "GET" in allow
    assert "ms-author-via: dav" in head.decode().lower()


def test_auth_required(share):
    assert curl(share, user=None, path="/office/")[0] == 401
    assert curl(share, user="alice:wrong", path="/office/")[0] == 401
    assert curl(share, user="mallory:s3cret", path="/office/")[0] == 401


@pytest.mark.parametrize("path", [
    "/office/latest/data/hr/secret.txt",
    "/office/latest/data/hr/",
    "/office/latest/data/big.bin",
    "/office/latest/data/sales/../hr/secret.txt",
    "/office/latest/data/sales/%2e%2e/hr/secret.txt",
    "/office/latest/data%2Fhr%2Fsecret.txt",
    "/office/.versions/data/hr/secret.txt/",
    "/office/.versions/data/hr/",
])
def test_scope_violations_refused(share, path):
    code, body = curl(share, "--path-as-is", user="bob:s3cret", path=path)
    assert code in (400, 403, 404), path
    assert b"salaries" not in body  # (error pages echo the requested URL; listings are checked below)


def test_scope_listing_leaks_nothing(share):
    code, body = curl(share, "-X", "PROPFIND", "-H", "Depth: 1", user="bob:s3cret", path="/office/latest/data/")
    assert code == 207 and b"/sales/" in body and b"/hr/" not in body and b"big.bin" not in body
    code, body = curl(share, user="bob:s3cret", path="/office/latest/data/sales/report.xlsx")
    assert (code, body) == (200, b"v2 is longer")
    # an absolute URL in the request line is resolved the same way
    code, body = curl(share, "--request-target", share["url"] + "/office/latest/data/hr/secret.txt",
                      user="bob:s3cret", path="/")
    assert code in (400, 403, 404) and b"salaries" not in body


def test_versions_view_and_html(share):
    code, body = curl(share, path="/office/.versions/data/sales/report.xlsx/")
    assert code == 200
    n1 = f"report {share['s1'].name}.xlsx"
    assert n1.encode() in body and b"snapshot(s)" in body
    code, body = curl(share, path="/office/.versions/data/sales/report.xlsx/" + n1.replace(" ", "%20"))
    assert (code, body) == (200, b"v1")
    code, body = curl(share, path="/office/")
    assert b"not verified" in body and b"latest" in body


def test_zip_download(share):
    code, body = curl(share, path="/office/latest/data/sales/?zip")
    assert code == 200
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert z.read("report.xlsx") == b"v2 is longer"


def test_tls_needs_trusted_cert(share):
    r = subprocess.run(["curl", "-s", "-u", "alice:s3cret", share["url"] + "/"], capture_output=True, timeout=30)
    assert r.returncode == 60  # self-signed, not trusted without --cacert


def test_self_signed_from_the_config(share):
    """`self_signed = true` in [server] does what --self-signed does (the pit-serve unit passes no flag)."""
    h = hash_password("s3cret")
    cfg = share["tmp"] / "serve-self-signed.toml"
    port = free_port()
    cfg.write_text(f'[server]\nport = {port}\nself_signed = true\n\n[users.alice]\npassword = "{h}"\nsets = ["*"]\n')
    proc = subprocess.Popen([PIT, "-r", str(share["tmp"] / "repo"), "serve", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        r = subprocess.run(["curl", "-s", "--cacert", share["cert"], "-u", "alice:s3cret", "-o", "/dev/null",
                            "-w", "%{http_code}", f"https://127.0.0.1:{port}/office/"], capture_output=True,
                           text=True, timeout=30)
        assert r.stdout == "200", r
    finally:
        stop(proc)
        proc.stderr.close()

@pytest.mark.skipif(not shutil.which("rclone"), reason="rclone not installed (.ci/apt-deps installs it)")
def test_rclone_lists_and_copies(share, tmp_path):
    obscured = subprocess.run(["rclone", "obscure", "s3cret"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, RCLONE_CONFIG="/dev/null", RCLONE_CONFIG_DAV_TYPE="webdav",
               RCLONE_CONFIG_DAV_URL=share["url"] + "/office/latest/data/", RCLONE_CONFIG_DAV_VENDOR="other",
               RCLONE_CONFIG_DAV_USER="alice", RCLONE_CONFIG_DAV_PASS=obscured)
    ca = ["--ca-cert", share["cert"]]
    r = subprocess.run(["rclone", "lsf", "dav:", *ca], env=env, capture_output=True, text=True, timeout=60)
    assert "big.bin" in r.stdout and "sales/" in r.stdout, r.stderr
    subprocess.run(["rclone", "copy", "dav:big.bin", str(tmp_path), *ca], env=env, check=True, timeout=120)
    assert (tmp_path / "big.bin").read_bytes() == open(os.path.join(share["src"], "big.bin"), "rb").read()
    (tmp_path / "up.txt").write_text("x")
    r = subprocess.run(["rclone", "copy", str(tmp_path / "up.txt"), "dav:", *ca, "--retries", "1"], env=env,
                       capture_output=True, timeout=60)
    assert r.returncode != 0


@pytest.mark.skipif(not shutil.which("mount.davfs") or os.geteuid() != 0, reason="davfs2 needs root and the package")
def test_davfs2_mount(share, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    secrets = tmp_path / "secrets"
    url = share["url"] + "/office/"
    secrets.write_text(f"{url} alice s3cret\n")
    secrets.chmod(0o600)
    conf = tmp_path / "davfs2.conf"
    # buf_size 64: kernel 6.x asks READDIR for 32 KiB, more than davfs2's default buffer (alisarctl/davfs2#22)
    # mount.davfs reads the certificate as its own unprivileged user: give it a readable copy
    certdir = tempfile.mkdtemp(prefix="pit-davfs-")
    os.chmod(certdir, 0o755)
    cert = os.path.join(certdir, "cert.pem")
    shutil.copy(share["cert"], cert)
    os.chmod(cert, 0o644)
    conf.write_text(f"secrets {secrets}\nask_auth 0\nuse_locks 0\ntrust_server_cert {cert}\nbuf_size 64\n")
    subprocess.run(["mount", "-t", "davfs", "-o", f"ro,conf={conf}", url, str(mnt)], check=True,
                   stdin=subprocess.DEVNULL, timeout=60)
    try:
        names = os.listdir(mnt)
        assert "latest" in names and share["s1"].name in names
        assert (mnt / "latest" / "data" / "big.bin").read_bytes() == open(os.path.join(share["src"], "big.bin"),
                                                                            "rb").read()
        with pytest.raises(OSError):
            (mnt / "latest" / "data" / "new.txt").write_text("x")
    finally:
        subprocess.run(["umount", str(mnt)], timeout=60)
        shutil.rmtree(certdir, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (.ci/apt-deps installs it)")
def test_chromium_renders_versions_listing(share, tmp_path):
    url = share["url"].replace("https://", "https://alice:s3cret@") + "/office/.versions/data/sales/report.xlsx/"
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    assert "Previous versions of report.xlsx" in r.stdout, r.stderr[-2000:]
    assert f"report {share['s1'].name}.xlsx" in r.stdout
