"""PROPFIND answers are bounded whatever the body asks (issue 15): repeated
names once, a capped body (413) and name count (400), a streamed answer, a
truncated listing ends with 507; `propname` lists names; Win32 properties
with the read-only attribute. A real `pit serve` on 127.0.0.1 (raw HTTP
over TLS), and the answer writer on real view nodes."""
from __future__ import annotations

import os
import re
import socket
import xml.etree.ElementTree as ET

import pytest

from conftest import run_pit
from davserver import propfind
from davserver.config import PropfindLimits
from store.errors import InvalidArgument
from store.repository import Repository
from store.view import Node

from test_serve_hostile import AUTH, Served
from test_view_support import snap, write

ENTRIES = 2000


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("propfind")
    r = Repository.init(str(tmp / "repo"))
    src = str(tmp / "data")
    for i in range(ENTRIES):
        write(src, f"many/f{i:05d}.txt", str(i))
    write(src, "one.txt", "x")
    snap(r, "office", src)
    r.close()
    return tmp, str(tmp / "repo")


@pytest.fixture(scope="module")
def server(repo):
    s = Served(*repo)
    try:
        yield s
    finally:
        s.close()


def body_of(*props: str, ns: str = 'xmlns:D="DAV:"') -> bytes:
    return (f'<?xml version="1.0"?><D:propfind {ns}><D:prop>' + "".join(props) + "</D:prop></D:propfind>").encode()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])


def test_repeated_names_are_answered_once(server):
    """The issue's 3.7 KB body (getetag 300 times) on a big folder: one getetag per entry."""
    body = body_of(*["<D:getetag/>"] * 300)
    assert len(body) > 3500
    status, answer = server.request("PROPFIND", "/office/latest/data/many/", body=body,
                                    headers={"Depth": "1", "Content-Type": "application/xml"})
    assert status == 207
    root = ET.fromstring(answer)
    responses = root.findall("{DAV:}response")
    assert len(responses) == ENTRIES + 1
    assert all(len(r.findall(".//{DAV:}getetag")) == 1 for r in responses)
    assert len(answer) < (ENTRIES + 1) * 300  # (wsgidav 4.4 sent 300 getetags per entry)
    assert rss_kib(server.proc.pid) < 400 * 1024  # (and held 1.48 GB after the 10,000-entry case)


def test_body_too_big_is_413(server):
    """Refused on its Content-Length alone: the issue's 24 MB body is never read (so never sent here)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as raw:
        with server.context().wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(f"PROPFIND /office/latest/data/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH}\r\n"
                      f"Depth: 1\r\nContent-Type: application/xml\r\nContent-Length: {24 * 1024 * 1024}\r\n\r\n"
                      .encode())
            s.sendall(body_of("<D:getetag/>" * 100))
            assert s.recv(100).startswith(b"HTTP/1.1 413")


def test_too_many_distinct_names_is_400(server):
    body = body_of(*[f"<D:p{i}/>" for i in range(propfind.MAX_NAMES + 1)])
    status, _ = server.request("PROPFIND", "/office/latest/data/", body=body, headers={"Depth": "0"})
    assert status == 400
    body = body_of(*[f"<D:p{i}/>" for i in range(propfind.MAX_NAMES)])
    status, answer = server.request("PROPFIND", "/office/latest/data/", body=body, headers={"Depth": "0"})
    assert status == 207 and answer.count(b"404 Not Found") == 1


def test_big_answer_is_streamed(server):
    status, answer = server.request("PROPFIND", "/office/latest/data/many/", headers={"Depth": "1"})
    assert status == 207 and len(answer) > propfind.BUFFERED
    assert len(ET.fromstring(answer).findall("{DAV:}response")) == ENTRIES + 1


def test_propname_lists_names(server):
    body = b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:propname/></D:propfind>'
    status, answer = server.request("PROPFIND", "/office/latest/data/one.txt", body=body, headers={"Depth": "0"})
    assert status == 207
    prop = ET.fromstring(answer).find(".//{DAV:}prop")
    names = {el.tag for el in prop}
    assert {"{DAV:}getetag", "{DAV:}getcontentlength", "{DAV:}resourcetype",
            "{urn:schemas-microsoft-com:}Win32FileAttributes"} <= names
    assert all(not (el.text or "").strip() and len(el) == 0 for el in prop)  # names only, no values


def test_win32_properties_and_quoted_etags(server):
    body = body_of("<Z:Win32FileAttributes/>", "<Z:Win32LastModifiedTime/>", "<Z:Win32CreationTime/>",
                   "<D:getetag/>", ns='xmlns:D="DAV:" xmlns:Z="urn:schemas-microsoft-com:"')
    status, answer = server.request("PROPFIND", "/office/latest/data/", body=body, headers={"Depth": "1"})
    assert status == 207
    for r in ET.fromstring(answer).findall("{DAV:}response"):
        href = r.find("{DAV:}href").text
        ok = r.find("{DAV:}propstat/{DAV:}prop")
        attrs = int(ok.find("{urn:schemas-microsoft-com:}Win32FileAttributes").text, 16)
        assert attrs & 0x1, href  # FILE_ATTRIBUTE_READONLY: Explorer shows the file read-only
        assert bool(attrs & 0x10) == href.endswith("/"), href
        assert re.match(r"\w{3}, \d\d \w{3} \d{4} ", ok.find("{urn:schemas-microsoft-com:}Win32LastModifiedTime").text)
        etag = ok.find("{DAV:}getetag").text
        assert etag.startswith('"') and etag.endswith('"'), (href, etag)


def test_truncated_listing_ends_with_507():
    """Past `max_entries` the folder's href closes the answer with 507 (RFC 4918 9.1)."""
    nodes = [("/s/", Node("snapdir", "s"))] + [(f"/s/f{i}", Node("file", f"f{i}", size=i)) for i in range(50)]
    out = b"".join(propfind.answer(iter(nodes), "allprop", [],
                                   lambda n: propfind.live_properties(n, lambda _: "text/plain", lambda _: {}, 1),
                                   "https://pitstore.dev/ns", limits=PropfindLimits(max_entries=10)))
    root = ET.fromstring(out)
    responses = root.findall("{DAV:}response")
    assert len(responses) == 11
    assert responses[-1].find("{DAV:}href").text == "/s/"
    assert "507" in responses[-1].find("{DAV:}status").text


def test_no_traceback_in_the_log(server):
    assert b"Traceback" not in server.log.read_bytes()
    assert os.path.getsize(server.log) < 100_000


def test_fast_allprop_writes_what_the_general_writer_writes():
    """`allprop_response` (one string per entry) and the cached dates and types give the bytes
    `live_properties` + the general writer give, for awkward names, folders, files without an
    ETag, empty names, old and fractional times, several suffixes and snapshot status fields."""
    from davserver.provider import AVAILABLE, PIT_NS, content_type, snapshot_fields

    names = ["a.txt", "A.TXT", "x.tar.gz", "x.tgz", ".bashrc", "..tar.gz", ".x.html", "data:x.txt", "noext",
             "R&D <1>.pdf", "caf\u00e9 \u65e5\u672c.svg", "bad\udcff.bin", "a.b.c.JPEG", "trail.", "", "x.gz"]
    nodes = []
    for i, name in enumerate(names):
        mtime = [0, 1_700_000_000_123_456_789, -1_500_000_000, 86_399_999_999_999][i % 4]
        nodes.append(Node("file", name, size=i * 1000, mtime_ns=mtime, etag="" if i % 3 == 0 else f"e{i}"))
        nodes.append(Node("snapdir", name, size=i, mtime_ns=mtime, etag=f"d{i}" if i % 2 else ""))
    nodes.append(Node("snapdir", "2026-01-01", status={"result": "good", "depth": "read", "time": "t"}))
    entries = [(propfind.child_href("/s/", n.name, n.is_dir), n) for n in nodes]
    assert [h for h, _ in entries] == [propfind.href_of("/s/" + n.name, n.is_dir) for n in nodes]

    def pit_fields(node):
        return {"{" + PIT_NS + "}" + k: v for k, v in snapshot_fields(node.status).items()} if node.status else {}

    def props_of(node):
        return propfind.live_properties(node, content_type, pit_fields, AVAILABLE)

    def allprop(href, node):
        return propfind.allprop_response(href, node, content_type, AVAILABLE)

    general = b"".join(propfind.answer(iter(entries), "allprop", [], props_of, PIT_NS))
    fast = b"".join(propfind.answer(iter(entries), "allprop", [], props_of, PIT_NS, allprop))
    assert fast == general
    root = ET.fromstring(fast)
    types = [t.text for t in root.iter("{DAV:}getcontenttype")]
    assert types == [content_type(name) for name in names]


# ----------------------------------------------------------------------------- the caps from the config
@pytest.fixture(scope="module")
def capped(repo):
    """A second server on the same repository with the caps lowered in its [server] table."""
    s = Served(*repo, "propfind_max_entries = 10\npropfind_max_names = 3\npropfind_max_body = 400\n")
    try:
        yield s
    finally:
        s.close()


def test_configured_max_entries_truncates_with_507(capped):
    status, answer = capped.request("PROPFIND", "/office/latest/data/many/", headers={"Depth": "1"})
    assert status == 207
    responses = ET.fromstring(answer).findall("{DAV:}response")
    assert len(responses) == 11  # the folder, 9 entries, then the folder again with 507
    assert responses[0].find("{DAV:}href").text == responses[-1].find("{DAV:}href").text
    assert responses[-1].find("{DAV:}href").text.endswith("/many/")
    assert "507" in responses[-1].find("{DAV:}status").text
    assert "507" not in "".join(r.findtext(".//{DAV:}status") or "" for r in responses[:-1])


def test_configured_max_names_and_body(capped, server):
    body = body_of("<D:getetag/>", "<D:displayname/>", "<D:getcontentlength/>", "<D:resourcetype/>")
    assert len(body) < 400
    assert capped.request("PROPFIND", "/office/latest/data/", body=body, headers={"Depth": "0"})[0] == 400
    assert server.request("PROPFIND", "/office/latest/data/", body=body, headers={"Depth": "0"})[0] == 207
    big = body_of(*[f"<D:getetag/><!-- {'x' * 40} -->" for _ in range(10)])
    assert len(big) > 400
    assert capped.request("PROPFIND", "/office/latest/data/", body=big, headers={"Depth": "0"})[0] == 413
    assert b"Traceback" not in capped.log.read_bytes()


@pytest.mark.parametrize("line", ["propfind_max_entries = 0", 'propfind_max_answer = "64M"',
                                  "propfind_max_body = true", "propfind_max_names = -1"])
def test_config_check_rejects_a_bad_cap(tmp_path, line):
    key = line.split(" ")[0]
    path = tmp_path / "serve.toml"
    path.write_text(f"[server]\nport = 8080\n{line}\n")
    p = run_pit(None, "config", "check", "--kind", "serve", str(path), expect=InvalidArgument.exit_code)
    err = p.stderr.decode()
    assert err.count("\n") == 1 and f"server.{key}" in err and ":3:" in err, err


def test_config_check_accepts_the_caps(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text("[server]\nport = 8080\npropfind_max_body = 1024\npropfind_max_names = 8\n"
                    "propfind_max_entries = 5000\npropfind_max_answer = 1048576\n")
    assert b": ok: " in run_pit(None, "config", "check", "--kind", "serve", str(path)).stdout
