"""A snapshot folder's status as WebDAV properties (issue 14): verification,
application check and failover image status in pitstore's namespace, the
same fields the HTML listing shows. A real `pit serve` on 127.0.0.1 in a
subprocess (stopped by its PID), asked with http.client."""
from __future__ import annotations

import base64
import http.client
import os
import subprocess
import sys
import urllib.parse
import xml.etree.ElementTree as ET

import pytest

from davserver.config import hash_password
from davserver.provider import PIT_NS, SNAPSHOT_PROPS, ViewProvider, snapshot_fields
from store.repository import Repository
from store.snapmeta import update_meta

from test_view_support import free_port, snap, stop, wait_port, write

PIT = os.path.join(os.path.dirname(sys.executable), "pit")
NS = "{" + PIT_NS + "}"
REASON = "damage found at data/a&b <c>.txt"  # XML and HTML both escape it


def _records(repo, chosen, skipped) -> None:
    with repo.writer() as w:
        update_meta(w, skipped.id, verify={"time": "2026-11-25T10:00:00Z", "depth": "deep", "result": "damaged"},
                    image={"time": "2026-11-25T10:00:01Z", "status": "skipped", "reason": REASON})
        update_meta(w, chosen.id, verify={"time": "2026-11-25T10:00:02Z", "depth": "deep", "result": "good"},
                    app_check={"time": "t", "template": "sqlite", "result": "good", "message": "ok"},
                    image={"time": "2026-11-25T10:00:03Z", "status": "chosen", "reason": None})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Snapshots oldest to newest: chosen, skipped (with a reason), never examined (also `latest`)."""
    tmp = tmp_path_factory.mktemp("props")
    repo = Repository.init(str(tmp / "repo"))
    src = str(tmp / "data")
    write(src, "x.txt", "1")
    chosen = snap(repo, "office", src)
    write(src, "x.txt", "22")
    skipped = snap(repo, "office", src)
    write(src, "x.txt", "333")
    plain = snap(repo, "office", src)
    _records(repo, chosen, skipped)
    repo.close()
    cfg = tmp / "serve.toml"
    cfg.write_text(f'[users.alice]\npassword = "{hash_password("s3cret")}"\nsets = ["office"]\n')
    port = free_port()
    proc = subprocess.Popen([PIT, "-r", str(tmp / "repo"), "serve", "-c", str(cfg), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        yield {"port": port, "chosen": chosen.name, "skipped": skipped.name, "plain": plain.name}
    finally:
        stop(proc)


def request(server, method: str, path: str, body: str | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    try:
        h = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
        if body is not None:
            h["Content-Type"] = "application/xml; charset=utf-8"
        h.update(headers or {})
        conn.request(method, path, body=body.encode() if body is not None else None, headers=h)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def propstats(body: bytes) -> dict[str, dict[str, dict[str, str | None]]]:
    """{folder name: {status code: {property name: text}}} of a multistatus."""
    out: dict = {}
    for resp in ET.fromstring(body).iter("{DAV:}response"):
        href = urllib.parse.unquote(resp.find("{DAV:}href").text).rstrip("/")
        by = out.setdefault(href.rsplit("/", 1)[-1], {})
        for ps in resp.iter("{DAV:}propstat"):
            code = ps.find("{DAV:}status").text.split()[1]
            for p in ps.find("{DAV:}prop"):
                by.setdefault(code, {})[p.tag] = p.text
    return out


def pit_props(props: dict[str, str | None]) -> dict[str, str | None]:
    return {k[len(NS):]: v for k, v in props.items() if k.startswith(NS)}


def test_allprop_depth1_carries_the_status(server):
    code, body = request(server, "PROPFIND", "/office/", headers={"Depth": "1"})
    assert code == 207
    res = propstats(body)
    chosen = pit_props(res[server["chosen"]]["200"])
    assert chosen == {"verification": "good", "verification-depth": "deep", "verification-time": "2026-11-25T10:00:02Z",
                      "app-check": "good", "app-check-template": "sqlite", "failover-image": "chosen"}
    skipped = pit_props(res[server["skipped"]]["200"])
    assert skipped == {"verification": "damaged", "verification-depth": "deep",
                       "verification-time": "2026-11-25T10:00:00Z", "failover-image": "skipped",
                       "failover-image-reason": REASON}
    # never examined by image selection: no failover property at all under allprop
    assert pit_props(res[server["plain"]]["200"]) == {"verification": "unverified"}
    assert pit_props(res["latest"]["200"]) == {"verification": "unverified"}
    assert set(res[server["plain"]]) == {"200"}  # allprop omits, it does not answer 404
    # only snapshot folders carry them
    assert pit_props(res["office"]["200"]) == {} and pit_props(res[".versions"]["200"]) == {}
    # the standard live properties are still there
    assert "{DAV:}getetag" in res[server["chosen"]]["200"]


def test_explicit_prop_request(server):
    names = ["failover-image", "failover-image-reason", "verification", "app-check"]
    body = ('<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:" xmlns:p="%s"><D:prop>%s'
            '<D:displayname/></D:prop></D:propfind>') % (PIT_NS, "".join(f"<p:{n}/>" for n in names))
    code, out = request(server, "PROPFIND", "/office/", body, {"Depth": "1"})
    assert code == 207
    res = propstats(out)
    s = res[server["skipped"]]
    assert pit_props(s["200"]) == {"failover-image": "skipped", "failover-image-reason": REASON,
                                   "verification": "damaged"}
    assert pit_props(s["404"]) == {"app-check": None}
    assert s["200"]["{DAV:}displayname"] == server["skipped"]
    c = res[server["chosen"]]
    assert pit_props(c["200"]) == {"failover-image": "chosen", "verification": "good", "app-check": "good"}
    assert pit_props(c["404"]) == {"failover-image-reason": None}  # a chosen image has no reason
    p = res[server["plain"]]
    assert pit_props(p["200"]) == {"verification": "unverified"}
    assert pit_props(p["404"]) == {"failover-image": None, "failover-image-reason": None, "app-check": None}
    # Depth 0 on the snapshot folder itself
    code, out = request(server, "PROPFIND", f"/office/{server['skipped']}/", body, {"Depth": "0"})
    assert code == 207
    assert pit_props(propstats(out)[server["skipped"]]["200"])["failover-image-reason"] == REASON
    # the raw XML is in our namespace, escaped
    assert PIT_NS.encode() in out and b"data/a&amp;b &lt;c&gt;.txt" in out


def test_html_and_properties_agree(server):
    code, page = request(server, "GET", "/office/")
    assert code == 200
    page = page.decode()
    assert "failover image: skipped (damage found at data/a&amp;b &lt;c&gt;.txt)" in page
    assert "failover image: chosen" in page and "sqlite check good" in page
    assert "verified good (deep, 2026-11-25T10:00:02Z)" in page
    assert page.count("failover image:") == 2  # the never-examined snapshot (and latest) shows none


@pytest.mark.parametrize("prop", [f'<p:failover-image xmlns:p="{PIT_NS}">chosen</p:failover-image>',
                                  f'<p:verification xmlns:p="{PIT_NS}">good</p:verification>',
                                  "<D:displayname>x</D:displayname>"])
def test_proppatch_refused(server, prop):
    """The view refuses PROPPATCH outright (405, the method is not allowed on a
    read-only share, docs/restore.md), for our properties as for {DAV:} ones;
    nothing changes."""
    path = f"/office/{server['plain']}/"
    body = (f'<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:"><D:set><D:prop>{prop}'
            f'</D:prop></D:set></D:propertyupdate>')
    code, _ = request(server, "PROPPATCH", path, body)
    assert code == 405
    code, out = request(server, "PROPFIND", path, headers={"Depth": "0"})
    assert code == 207
    assert pit_props(propstats(out)[server["plain"]]["200"]) == {"verification": "unverified"}
    remove = (f'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:"><D:remove><D:prop>'
              f'<p:verification xmlns:p="{PIT_NS}"/></D:prop></D:remove></D:propertyupdate>')
    assert request(server, "PROPPATCH", f"/office/{server['skipped']}/", remove)[0] == 405


@pytest.fixture
def local(tmp_path):
    """The provider in this process, over a repository with a chosen and a skipped snapshot."""
    repo = Repository.init(str(tmp_path / "repo"))
    try:
        write(tmp_path / "data", "x.txt", "1")
        chosen = snap(repo, "office", str(tmp_path / "data"))
        write(tmp_path / "data", "x.txt", "22")
        skipped = snap(repo, "office", str(tmp_path / "data"))
        _records(repo, chosen, skipped)
        provider = ViewProvider(repo)
        yield lambda path: provider.get_resource_inst(path, {"wsgidav.provider": provider}), chosen, skipped
    finally:
        repo.close()


def test_property_names(local):
    """propname mode lists them (wsgidav 4.4 answers `<propname/>` as an empty
    `<prop/>` request, so this is asked of the resource, not over HTTP)."""
    res_at, chosen, skipped = local
    names = res_at(f"/office/{skipped.name}").get_property_names(is_allprop=False)
    assert [n[len(NS):] for n in names if n.startswith(NS)] == [
        "verification", "verification-depth", "verification-time", "failover-image", "failover-image-reason"]
    assert "{DAV:}getetag" in names
    names = res_at(f"/office/{chosen.name}").get_property_names(is_allprop=True)
    assert NS + "failover-image" in names and NS + "failover-image-reason" not in names
    for path in ("/office", "/office/.versions", f"/office/{chosen.name}/data", f"/office/{chosen.name}/data/x.txt"):
        assert not [n for n in res_at(path).get_property_names(is_allprop=False) if n.startswith(NS)], path


def test_properties_are_protected_on_the_resource(local):
    """Below the method check too: setting or removing one is 403
    cannot-modify-protected-property, dry run or not."""
    from xml.etree.ElementTree import Element

    from wsgidav.dav_error import HTTP_FORBIDDEN, PRECONDITION_CODE_ProtectedProperty, DAVError

    res_at, chosen, skipped = local
    res = res_at(f"/office/{skipped.name}")
    assert res.get_property_value(NS + "failover-image-reason") == REASON
    for value in (Element(NS + "failover-image"), None):
        for dry in (True, False):
            with pytest.raises(DAVError) as exc:
                res.set_property_value(NS + "failover-image", value, dry_run=dry)
            assert exc.value.value == HTTP_FORBIDDEN
            assert exc.value.err_condition.condition_code == PRECONDITION_CODE_ProtectedProperty
    assert res_at(f"/office/{skipped.name}").get_property_value(NS + "failover-image") == "skipped"
    with pytest.raises(DAVError) as exc:
        res.get_property_value(NS + "no-such-property")
    assert exc.value.value == 404


def test_snapshot_fields_is_the_one_source():
    """What both the listing and PROPFIND are made of: absent values are absent keys."""
    assert snapshot_fields(None) == {}
    assert snapshot_fields({"result": "unverified", "depth": None, "time": None, "pinned": False}) == {
        "verification": "unverified"}
    f = snapshot_fields({"result": "good", "depth": "deep", "time": None, "pinned": False,
                         "app_check": {"result": "failed", "template": None, "time": "t", "message": "m"},
                         "image": {"status": "skipped", "reason": "app check failed: m", "time": "t"}})
    assert f == {"verification": "good", "verification-depth": "deep", "app-check": "failed",
                 "failover-image": "skipped", "failover-image-reason": "app check failed: m"}
    assert list(f) == [k for k in SNAPSHOT_PROPS if k in f]


def test_docs_name_every_property():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "restore.md"), encoding="utf-8").read()
    assert PIT_NS in doc
    for name in SNAPSHOT_PROPS:
        assert f"| `{name}` |" in doc, name
