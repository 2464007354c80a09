"""The litmus WebDAV conformance suite against `pit serve`.

litmus cannot run against a read-only share: every suite's `begin` step does
`MKCOL <url>/litmus/` and aborts when it is refused. So the server is started
with the diagnostic option `--litmus-scratch DIR`, which serves DIR writable at
/litmus-scratch/ beside the read-only restore view, in the same process: same
wsgidav app, same cheroot server, same TLS and the same Basic/scrypt login.
litmus then tests that stack (HTTP, PROPFIND parsing, props, locks); the
restore view itself is checked here for the read-only counterparts of the
litmus steps that apply to it (OPTIONS, PROPFIND depth 0, malformed PROPFIND
bodies, GET/404) and for refusing every write verb litmus uses.

The server runs in a subprocess on 127.0.0.1 and is stopped by its PID.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from store.repository import Repository
from davserver.config import hash_password

from test_view_support import free_port, snap, stop, wait_port, write

PIT = os.path.join(os.path.dirname(sys.executable), "pit")
pytestmark = pytest.mark.skipif(not shutil.which("litmus") or not shutil.which("curl"),
                                reason="litmus and curl not installed (.ci/apt-deps installs them)")

# The suites litmus 0.13 ships (its default set). All pass on the scratch share.
SUITES = ["basic", "copymove", "props", "locks", "http"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("litmus")
    repo = Repository.init(str(tmp / "repo"))
    src = str(tmp / "data")
    write(src, "sales/report.xlsx", "v1")
    write(src, "notes.txt", "keep me")
    s1 = snap(repo, "office", src)
    repo.close()
    cfg = tmp / "serve.toml"
    cfg.write_text(f'[users.alice]\npassword = "{hash_password("s3cret")}"\nsets = ["office"]\n')
    scratch = tmp / "scratch"
    port = free_port()
    proc = subprocess.Popen([PIT, "-r", str(tmp / "repo"), "serve", "-c", str(cfg), "--port", str(port),
                             "--self-signed", "--litmus-scratch", str(scratch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        yield {"url": f"https://127.0.0.1:{port}", "cert": str(tmp / "repo" / "serve-tls" / "cert.pem"),
               "tmp": tmp, "scratch": scratch, "s1": s1}
    finally:
        stop(proc)


def curl(server, *args, path="/", user="alice:s3cret"):
    cmd = ["curl", "-s", "-g", "--cacert", server["cert"], "-w", "\n%{http_code}", "-u", user]
    r = subprocess.run(cmd + list(args) + [server["url"] + path], capture_output=True, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


def test_litmus_passes_on_the_scratch_share(server, tmp_path):
    # litmus writes debug.log and child.log into its working directory
    env = dict(os.environ, TESTS=" ".join(SUITES))
    r = subprocess.run(["litmus", "-k", server["url"] + "/litmus-scratch/", "alice", "s3cret"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    summaries = dict(re.findall(r"summary for `(\w+)': of \d+ tests run: \d+ passed, (\d+) failed", out))
    assert set(summaries) == set(SUITES), out[-4000:]
    assert all(n == "0" for n in summaries.values()), summaries
    assert "FAIL" not in out


def test_scratch_share_needs_the_same_login(server):
    assert curl(server, path="/litmus-scratch/", user="alice:wrong")[0] == 401
    code, _ = curl(server, "-X", "PROPFIND", "-H", "Depth: 0", path="/litmus-scratch/")
    assert code == 207


# --- the read-only restore view: what litmus would check, and its writes refused ---

def test_options_class_1_read_only(server):
    code, head = curl(server, "-X", "OPTIONS", "-i", path="/office/latest/data/")
    h = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head.decode().splitlines()[1:])
         if _}
    assert h["dav"] == "1"  # no class 2: no LOCK, even with the scratch share's lock manager in the process
    assert set(x.strip() for x in h["allow"].split(",")) == {"OPTIONS", "HEAD", "GET", "PROPFIND"}


def test_propfind_depth0_and_invalid_bodies(server):
    code, body = curl(server, "-X", "PROPFIND", "-H", "Depth: 0", path="/office/latest/data/")
    assert code == 207 and body.count(b"<ns0:response>") == 1 and b"collection" in body
    # litmus props: propfind_invalid (not well-formed) and propfind_invalid2 (a prefix bound to the empty namespace)
    for bad in ("<foo>", '<D:propfind xmlns:D="DAV:"><D:prop><bar:foo xmlns:bar=""/></D:prop></D:propfind>'):
        code, _ = curl(server, "-X", "PROPFIND", "-H", "Depth: 0", "-H", "Content-Type: application/xml",
                       "--data-binary", bad, path="/office/latest/data/")
        assert code == 400, bad
    # litmus props: propextended (an unknown element beside allprop is ignored)
    code, body = curl(server, "-X", "PROPFIND", "-H", "Depth: 0", "-H", "Content-Type: application/xml",
                      "--data-binary", '<?xml version="1.0" encoding="utf-8" ?><propfind xmlns="DAV:"><foobar/>'
                      "<allprop/></propfind>", path="/office/latest/data/notes.txt")
    assert code == 207 and b"getcontentlength" in body
    assert curl(server, path="/office/latest/data/nothing-here.txt")[0] == 404


LOCKINFO = ('<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
            '</D:lockscope><D:locktype><D:write/></D:locktype><D:owner>litmus test suite</D:owner></D:lockinfo>')
PROPPATCH = ('<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:"><D:set><D:prop>'
             '<X:prop0 xmlns:X="http://example.com/ns">value0</X:prop0></D:prop></D:set></D:propertyupdate>')


@pytest.mark.parametrize("verb,target,extra", [
    ("MKCOL", "/office/latest/data/litmus/", []),
    ("MKCOL", "/office/latest/data/sales/", []),
    ("PUT", "/office/latest/data/new.txt", ["--data-binary", "x"]),
    ("PUT", "/office/latest/data/notes.txt", ["--data-binary", "overwritten"]),
    ("DELETE", "/office/latest/data/notes.txt", []),
    ("DELETE", "/office/latest/data/sales/", []),
    ("COPY", "/office/latest/data/notes.txt", ["-H", "Destination: {url}/office/latest/data/copy.txt"]),
    ("COPY", "/office/latest/data/notes.txt", ["-H", "Destination: {url}/litmus-scratch/stolen.txt"]),
    ("MOVE", "/office/latest/data/notes.txt", ["-H", "Destination: {url}/office/latest/data/moved.txt"]),
    ("MOVE", "/office/latest/data/sales/", ["-H", "Destination: {url}/office/latest/data/sales2/"]),
    ("PROPPATCH", "/office/latest/data/notes.txt", ["-H", "Content-Type: application/xml",
                                                     "--data-binary", PROPPATCH]),
    ("LOCK", "/office/latest/data/notes.txt", ["-H", "Content-Type: application/xml", "-H", "Timeout: Second-60",
                                                "--data-binary", LOCKINFO]),
    ("LOCK", "/office/latest/data/", ["-H", "Content-Type: application/xml", "-H", "Depth: infinity",
                                       "--data-binary", LOCKINFO]),
])
def test_read_only_tree_refuses_litmus_writes(server, verb, target, extra):
    extra = [x.format(url=server["url"]) for x in extra]
    before = curl(server, "-X", "PROPFIND", "-H", "Depth: 1", path="/office/latest/data/")[1]
    code, body = curl(server, "-X", verb, *extra, path=target)
    assert code in (403, 405), (verb, target, code, body[:300])
    assert b"opaquelocktoken" not in body
    assert curl(server, path="/office/latest/data/notes.txt") == (200, b"keep me")
    assert curl(server, path="/office/latest/data/sales/report.xlsx") == (200, b"v1")
    assert curl(server, "-X", "PROPFIND", "-H", "Depth: 1", path="/office/latest/data/")[1] == before
    assert not (server["scratch"] / "stolen.txt").exists()
