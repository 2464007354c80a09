"""The search page of the WebDAV view's HTML listing: `GET <folder>/?find=PATTERN`. Every version of
every matching path, newest first, with links that lead to those versions; only what the signed-in
user's scope holds; every name escaped; capped; a bad pattern is a 400 with text. A real `pit serve`
on 127.0.0.1 (TLS), spoken to with http.client."""
from __future__ import annotations

import base64
import html
import http.client
import re
import urllib.parse

import pytest

from davserver.config import hash_password
from davserver.provider import MAX_HITS
from store.repository import Repository

from test_serve_hostile import AUTH, GENEROUS, Served
from test_view_support import snap, write

BOB = "Basic " + base64.b64encode(b"bob:s3cret").decode()
ODD = "<b>&\"q'.txt"  # a name that is markup if it is not escaped
MANY = MAX_HITS + 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    r = Repository.init(str(tmp / "repo"))
    src = str(tmp / "data")
    write(src, "sales/report.xlsx", "v1")
    write(src, "sales/logout.txt", "bye")
    write(src, f"sales/{ODD}", "odd")
    write(src, "hr/secret.txt", "salaries")
    write(src, "hr/report.xlsx", "hr's own report")
    for i in range(MANY):
        write(src, f"many/f{i:05d}.log", str(i))
    s1 = snap(r, "office", src)
    write(src, "sales/report.xlsx", "v2 is longer")
    s2 = snap(r, "office", src)
    other = str(tmp / "other")
    write(other, "report.xlsx", "another set")
    snap(r, "elsewhere", other)
    r.close()
    s = Served(tmp, str(tmp / "repo"),
               f'\n[users.bob]\npassword = "{hash_password("s3cret")}"\n[users.bob.scope]\noffice = ["data/sales"]\n')
    s.s1, s.s2 = s1, s2
    try:
        yield s
    finally:
        s.close()


def get(served: Served, path: str, auth: str = AUTH, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPSConnection("127.0.0.1", served.port, context=served.context(), timeout=GENEROUS)
    try:
        c.request(method, path, headers={"Authorization": auth})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def search(served: Served, folder: str, pattern: str, auth: str = AUTH, **extra: str) -> tuple[int, str]:
    status, headers, body = get(served, folder + "?" + urllib.parse.urlencode({"find": pattern, **extra}), auth)
    if status == 200:
        assert headers["content-type"].startswith("text/html")
    return status, body.decode()


def rows(page: str) -> list[str]:
    return re.findall(r"<tr><td>.*?</tr>", page.split("<tbody>", 1)[1], re.S)


def links(row: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r'href="([^"]*)"', row)]


def test_every_version_newest_first_with_working_links(served):
    status, page = search(served, "/office/", "sales/report.xlsx")
    assert status == 200
    found = rows(page)
    assert len(found) == 2 and "2 matches" in page
    assert served.s2.name in found[0] and served.s1.name in found[1]  # newest first
    for row, want in zip(found, (b"v2 is longer", b"v1")):
        version, *_, all_versions = links(row)
        assert get(served, version)[::2] == (200, want)
        assert all_versions == "/office/.versions/data/sales/report.xlsx/"
        status, _, listing = get(served, all_versions)
        assert status == 200 and b"Previous versions of report.xlsx" in listing
    assert "12 B" in found[0] and "2 B" in found[1]  # sizes of each version


def test_from_any_folder_the_set_is_searched(served):
    deep = search(served, f"/office/{served.s1.name}/data/hr/", "logout.txt")[1]
    assert "data/sales/logout.txt" in deep
    versions = search(served, "/office/.versions/data/", "logout.txt")[1]
    assert rows(versions) == rows(deep)


def test_a_scoped_user_never_sees_a_path_outside_the_scope(served):
    everything = search(served, "/office/", "*", i="1")[1]
    assert "data/hr/secret.txt" in everything  # alice sees it ...
    for folder in ("/", "/office/", "/office/latest/data/sales/"):
        for pattern in ("*", "secret.txt", "hr/", "/data/hr/*", "report.xlsx", "*.log", "data"):
            status, page = search(served, folder, pattern, BOB)
            assert status == 200, (folder, pattern)
            shown = page.split("</form>", 1)[1]  # (the form repeats the pattern)
            assert "secret" not in shown and "hr/" not in shown and "f0" not in shown and "elsewhere" not in shown
            for row in rows(page):
                assert "data/sales/" in row, (folder, pattern, row)
                for link in links(row):  # and whatever it links to, bob may open
                    assert get(served, link, BOB)[0] == 200, link
    assert len(rows(search(served, "/", "report.xlsx", BOB)[1])) == 2  # (his own: both versions)
    assert "No match" in search(served, "/office/", "secret.txt", BOB)[1]


def test_at_the_root_only_the_users_sets(served):
    page = search(served, "/", "report.xlsx")[1]
    assert "elsewhere" not in page  # alice's sets are ["office"]
    assert len(rows(page)) == 3 and all("office: data/" in r for r in rows(page))


def test_names_and_the_pattern_are_escaped(served):
    page = search(served, "/office/", "*.txt")[1]
    assert ODD not in page and html.escape(ODD) in page
    row = next(r for r in rows(page) if html.escape(ODD) in r)
    assert get(served, links(row)[0])[::2] == (200, b"odd")
    page = search(served, "/office/", '<script>alert("x")</script>')[1]
    assert "<script>" not in page and "&lt;script&gt;" in page and "No match" in page


def test_hits_are_capped_and_the_page_says_so(served):
    page = search(served, "/office/", "many/*.log")[1]
    assert len(rows(page)) == MAX_HITS
    assert f"{MANY} matches" in page and f"the newest {MAX_HITS}" in page


def test_case(served):
    assert "No match" in search(served, "/office/", "REPORT.XLSX")[1]
    assert len(rows(search(served, "/office/", "REPORT.XLSX", i="1")[1])) == 3


@pytest.mark.parametrize("query", ["find=", "find=../x", "find=%ff", "find=a%00b"])
def test_bad_pattern_is_400_with_text(served, query):
    status, headers, body = get(served, "/office/?" + query)
    assert status == 400 and headers["content-type"].startswith("text/plain") and body.strip()
    assert int(headers["content-length"]) == len(body)
    log = served.log.read_text()
    assert "refused a search" in log and "Traceback" not in log and " ERROR " not in log


def test_a_search_for_logout_is_not_a_logout(served):
    """wsgidav takes any query with "logout" in it for a logout (401)."""
    status, page = search(served, "/office/", "logout.txt")
    assert status == 200 and "data/sales/logout.txt" in page
    assert get(served, "/office/?logout")[0] == 401  # (wsgidav's own logout still is one)


def test_headers_and_the_form(served):
    for path in ("/office/?find=report.xlsx", "/office/latest/data/"):
        status, h, body = get(served, path)
        assert status == 200
        csp = h["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "form-action 'self'" in csp
        assert h["x-content-type-options"] == "nosniff"
        assert b'<form class="find" method="get" action="">' in body and b'name="find"' in body
    assert b"Find in office" in get(served, "/office/latest/data/")[2]
    assert b"Find in every set" in get(served, "/")[2]
    status, h, body = get(served, "/office/?find=report.xlsx", method="HEAD")
    assert status == 200 and body == b"" and int(h["content-length"]) > 0
