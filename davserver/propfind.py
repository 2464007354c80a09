"""PROPFIND on the read-only view, answered by us rather than by wsgidav.

wsgidav 4.4 builds the whole multistatus as an element tree and serializes
it at the end, once per requested property name including repeats: a 3.7 KB
body asking for `getetag` 300 times on a 10,000-entry folder made a 275 MB
answer, 1.48 GB of server memory (still held afterwards) and 27.6 s of CPU
(issue 15). It also answers `<propname/>` with empty responses. Here:

- the body is capped (`max_body`, else 413), requested names are deduplicated
  and capped (`max_names`, else 400);
- the answer is written while it is sent, one `<response>` at a time, so
  memory stays at one entry (small answers still go out with a
  Content-Length: Windows' WebClient and davfs2 see what they always saw);
- entries (`max_entries`) and bytes (`max_answer`) are capped: past either,
  the folder's own href closes the answer with `507 Insufficient Storage`,
  as RFC 4918 (section 9.1) says a truncated listing should;
- every live property comes straight from the view's `Node`, which is also
  why 10,000 entries cost a fraction of what wsgidav's per-property calls do;
- `propname` lists names; `getetag` is a quoted entity-tag (RFC 4918 15.6);
  Windows' Win32 properties are served with the read-only attribute set.

The four caps are a `PropfindLimits` (the `propfind_max_*` keys of the
server's [server] table, davserver/config.py), handed to each call by the
provider rather than read from module globals; `MAX_*` below are their
defaults.
"""
from __future__ import annotations

import posixpath
import time
import urllib.parse
from email.utils import formatdate
from functools import lru_cache
from xml.sax.saxutils import escape

from wsgidav.dav_error import HTTP_BAD_REQUEST, HTTP_REQUEST_ENTITY_TOO_LARGE, DAVError
from wsgidav.util import etree

from .config import PropfindLimits

DEFAULT_LIMITS = PropfindLimits()
MAX_BODY = DEFAULT_LIMITS.max_body
MAX_NAMES = DEFAULT_LIMITS.max_names
MAX_ENTRIES = DEFAULT_LIMITS.max_entries
MAX_ANSWER = DEFAULT_LIMITS.max_answer
BUFFERED = 256 * 1024  # an answer up to this size goes out whole, with a Content-Length

DAV = "{DAV:}"
MS = "{urn:schemas-microsoft-com:}"
READONLY, DIRECTORY = 0x1, 0x10
# Windows' mini-redirector asks for these by name (never in allprop, as IIS does).
WIN32 = (MS + "Win32CreationTime", MS + "Win32LastModifiedTime", MS + "Win32LastAccessTime",
         MS + "Win32FileAttributes")
HREF_SAFE = "/!*'(),$-_|.~"  # as wsgidav: Nautilus chokes on an encoded '('


def read_body(environ, max_body: int = MAX_BODY) -> bytes:
    """The request body, at most `max_body` bytes (413 beyond)."""
    length = environ.get("CONTENT_LENGTH", "").strip()
    stream = environ["wsgi.input"]
    if length:
        try:
            n = int(length)
        except ValueError:
            raise DAVError(HTTP_BAD_REQUEST, context_info="Content-Length is not a number") from None
        if n < 0:
            raise DAVError(HTTP_BAD_REQUEST, context_info="negative Content-Length")
        if n > max_body:
            raise DAVError(HTTP_REQUEST_ENTITY_TOO_LARGE,
                           context_info=f"a PROPFIND body may hold {max_body} bytes, this one {n}")
        body = stream.read(n) if n else b""
    elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        body = stream.read(max_body + 1)
        if len(body) > max_body:
            raise DAVError(HTTP_REQUEST_ENTITY_TOO_LARGE,
                           context_info=f"a PROPFIND body may hold {max_body} bytes")
    else:
        body = b""
    environ["wsgidav.all_input_read"] = 1
    return body


def parse_request(body: bytes, max_names: int = MAX_NAMES) -> tuple[str, list[str]]:
    """(mode, names): mode is allprop, propname or prop; names deduplicated in their order."""
    if not body.strip():
        return "allprop", []
    try:
        root = etree.fromstring(body)
    except Exception:  # defusedxml and expat raise several kinds: all are a malformed body
        raise DAVError(HTTP_BAD_REQUEST, context_info="the PROPFIND body is not well-formed XML") from None
    if root.tag != DAV + "propfind":
        raise DAVError(HTTP_BAD_REQUEST, context_info="the PROPFIND body is not a DAV:propfind")
    mode, names = None, {}
    for el in root:
        tag = {DAV + "allprop": "allprop", DAV + "propname": "propname", DAV + "prop": "prop"}.get(el.tag)
        if tag is None:
            continue  # RFC 4918 17: unknown elements are ignored (litmus propextended)
        if mode is not None and mode != tag:
            raise DAVError(HTTP_BAD_REQUEST, context_info="allprop, propname and prop exclude each other")
        mode = tag
        if tag == "prop":
            for p in el:
                if isinstance(p.tag, str):
                    names[p.tag] = None
    if mode is None:
        raise DAVError(HTTP_BAD_REQUEST, context_info="a DAV:propfind needs allprop, propname or prop")
    if len(names) > max_names:
        raise DAVError(HTTP_BAD_REQUEST, context_info=f"a PROPFIND may ask for {max_names} distinct properties")
    return mode, list(names)


def http_date(secs: float) -> str:
    return formatdate(secs, usegmt=True)


# A folder's entries mostly share a handful of modification seconds and extensions: each date and
# type is formatted once (the formatting was a third of a 10,000-entry PROPFIND).
@lru_cache(maxsize=4096)
def _dates(secs: int) -> tuple[str, str]:
    """(creationdate, getlastmodified) of whole seconds `secs` (both drop a fraction, floor)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs)), formatdate(secs, usegmt=True)


def _seconds(node) -> int:
    return node.mtime_ns // 10**9


@lru_cache(maxsize=1024)
def _type_of_suffix(content_type, suffix: str) -> str:
    return escape(content_type("x" + suffix))


def escaped_type(content_type, name: str) -> str:
    """escape(content_type(name)), cached by the name's last two suffixes, which are all
    `mimetypes.guess_type` looks at (a type and an encoding, .tar.gz); names with a ':' (a URL
    scheme to guess_type) and leading-dot names are asked as they are."""
    base, ext = posixpath.splitext(name)
    if not ext or ":" in name or base.startswith("."):
        return escape(content_type(name))
    return _type_of_suffix(content_type, posixpath.splitext(base)[1] + ext)


def _esc(text: str) -> str:
    return escape(text) if ("&" in text or "<" in text or ">" in text) else text


def live_properties(node, content_type, pit_fields, available: int) -> dict[str, str]:
    """A resource's live properties as escaped XML content, in allprop order."""
    created, modified = _dates(_seconds(node))
    is_dir = node.is_dir
    props = {DAV + "resourcetype": "<ns0:collection/>" if is_dir else "",
             DAV + "creationdate": created}
    if not is_dir:
        props[DAV + "getcontentlength"] = str(node.size)
        props[DAV + "getcontenttype"] = escaped_type(content_type, node.name)
    props[DAV + "quota-used-bytes"] = str(node.size)
    props[DAV + "quota-available-bytes"] = str(available)
    props[DAV + "getlastmodified"] = modified
    props[DAV + "displayname"] = _esc(node.name)
    if node.etag:
        props[DAV + "getetag"] = _esc(quote_etag(node.etag))
    if node.status:
        for k, v in pit_fields(node).items():
            props[k] = escape(v)
    return props


def win32_properties(node) -> dict[str, str]:
    when = _dates(_seconds(node))[1]
    attrs = READONLY | (DIRECTORY if node.is_dir else 0)
    return dict(zip(WIN32, (when, when, when, f"{attrs:08X}")))


def quote_etag(etag: str) -> str:
    return etag if etag.startswith('"') or etag.startswith('W/"') else f'"{etag}"'


class Prefixes:
    """Namespace prefixes of one answer: ns0 is DAV: (clients and our tests expect the prefix
    ElementTree gives), then one per namespace met, all declared on the root element."""

    def __init__(self, namespaces) -> None:
        self.map = {"DAV:": "ns0"}
        self._elements: dict[str, tuple[str, str, str]] = {}
        for ns in namespaces:
            if ns:  # (no namespace: written without a prefix)
                self.map.setdefault(ns, f"ns{len(self.map)}")

    def tag(self, clark: str) -> str:
        if not clark.startswith("{"):
            return clark
        ns, _, local = clark[1:].partition("}")
        return f"{self.map[ns]}:{local}" if ns else local

    def element(self, clark: str) -> tuple[str, str, str]:
        """(open tag, close tag, empty element) of a property, made once per answer."""
        el = self._elements.get(clark)
        if el is None:
            t = self.tag(clark)
            el = self._elements[clark] = (f"<{t}>", f"</{t}>", f"<{t}/>")
        return el

    def declarations(self) -> str:
        return "".join(f' xmlns:{p}="{escape(ns)}"' for ns, p in self.map.items())


def _ns(clark: str) -> str:
    return clark[1:].partition("}")[0] if clark.startswith("{") else ""


def allprop_response(href: str, node, content_type, available: int) -> str | None:
    """The `<response>` of an allprop answer for `node`, written in one go: what `answer` makes
    of `live_properties` for it, at a third of the cost. None for a node with status fields (a
    snapshot folder: those go the general way)."""
    if node.status:
        return None
    created, modified = _dates(_seconds(node))
    name = _esc(node.name)
    size = str(node.size)
    out = ["<ns0:response><ns0:href>", _esc(href), "</ns0:href><ns0:propstat><ns0:prop>"]
    if node.is_dir:
        out += ("<ns0:resourcetype><ns0:collection/></ns0:resourcetype><ns0:creationdate>", created,
                "</ns0:creationdate>")
    else:
        out += ("<ns0:resourcetype/><ns0:creationdate>", created, "</ns0:creationdate><ns0:getcontentlength>",
                size, "</ns0:getcontentlength><ns0:getcontenttype>", escaped_type(content_type, node.name),
                "</ns0:getcontenttype>")
    out += ("<ns0:quota-used-bytes>", size, "</ns0:quota-used-bytes><ns0:quota-available-bytes>", str(available),
            "</ns0:quota-available-bytes><ns0:getlastmodified>", modified, "</ns0:getlastmodified>",
            f"<ns0:displayname>{name}</ns0:displayname>" if name else "<ns0:displayname/>")
    if node.etag:
        out += ("<ns0:getetag>", _esc(quote_etag(node.etag)), "</ns0:getetag>")
    out.append("</ns0:prop><ns0:status>HTTP/1.1 200 OK</ns0:status></ns0:propstat></ns0:response>")
    return "".join(out)


def answer(entries, mode: str, names: list[str], props_of, pit_ns: str, allprop=None,
           limits: PropfindLimits = DEFAULT_LIMITS):
    """The multistatus for `entries` ((href, node) pairs, the folder first): an iterator of byte chunks.
    `props_of(node)` gives a node's live properties (`live_properties`); `allprop(href, node)`, if
    given, an allprop `<response>` at once (`allprop_response`), or None to go the general way.
    Past `limits.max_entries` responses or `limits.max_answer` bytes the answer ends with a 507."""
    max_entries, max_answer = limits.max_entries, limits.max_answer
    px = Prefixes([pit_ns, _ns(MS), *(_ns(n) for n in names)])
    yield (f'<?xml version="1.0" encoding="utf-8" ?>\n<ns0:multistatus{px.declarations()}>').encode()
    sent, parts, size = 0, [], 0
    folder_href = None
    element = px.element
    for href, node in entries:
        if folder_href is None:
            folder_href = href
        if sent >= max_entries or size >= max_answer:
            parts.append(f"<ns0:response><ns0:href>{escape(folder_href)}</ns0:href>"
                         "<ns0:status>HTTP/1.1 507 Insufficient Storage</ns0:status><ns0:responsedescription>"
                         f"the answer stops after {sent} entries: ask for fewer properties, or a deeper folder"
                         "</ns0:responsedescription></ns0:response>")
            break
        piece = allprop(href, node) if allprop is not None and mode == "allprop" else None
        if piece is not None:
            parts.append(piece)
            size += len(piece)
            sent += 1
            if len(parts) >= 64:
                yield "".join(parts).encode("utf-8", "replace")
                parts = []
            continue
        props = props_of(node)
        if mode == "allprop":
            found, missing = props, []
        elif mode == "propname":
            found, missing = dict.fromkeys([*props, *WIN32], ""), []
        else:
            if any(n.startswith(MS) for n in names):
                props.update(win32_properties(node))
            found = {n: props[n] for n in names if n in props}
            missing = [n for n in names if n not in props]
        out = ["<ns0:response><ns0:href>", _esc(href), "</ns0:href>"]
        if found or not missing:
            out.append("<ns0:propstat><ns0:prop>")
            for n, v in found.items():
                el = element(n)
                if v:
                    out += (el[0], v, el[1])
                else:
                    out.append(el[2])
            out.append("</ns0:prop><ns0:status>HTTP/1.1 200 OK</ns0:status></ns0:propstat>")
        if missing:
            out.append("<ns0:propstat><ns0:prop>")
            out.extend(element(n)[2] for n in missing)
            out.append("</ns0:prop><ns0:status>HTTP/1.1 404 Not Found</ns0:status></ns0:propstat>")
        out.append("</ns0:response>")
        piece = "".join(out)
        parts.append(piece)
        size += len(piece)
        sent += 1
        if len(parts) >= 64:
            yield "".join(parts).encode("utf-8", "replace")
            parts = []
    if parts:
        yield "".join(parts).encode("utf-8", "replace")
    yield b"</ns0:multistatus>"


def href_of(path: str, is_dir: bool) -> str:
    # (a name that is not UTF-8 on disk comes as surrogates: its bytes are quoted as they are)
    p = urllib.parse.quote(path.encode("utf-8", "surrogateescape"), safe=HREF_SAFE)
    return p + "/" if is_dir and not p.endswith("/") else p


def child_href(parent: str, name: str, is_dir: bool) -> str:
    """href_of(path + name) for `parent` = href_of(path) ending in '/': quoting goes character by
    character, so the parent is quoted once per folder and only the name per entry."""
    p = parent + urllib.parse.quote(name.encode("utf-8", "surrogateescape"), safe=HREF_SAFE)
    return p + "/" if is_dir and not p.endswith("/") else p


def send(environ, start_response, chunks):
    """Small answers whole (with a Content-Length), big ones as they are made."""
    head, n = [], 0
    for c in chunks:
        head.append(c)
        n += len(c)
        if n > BUFFERED:
            break
    else:
        body = b"".join(head)
        start_response("207 Multi-Status", [("Content-Type", "application/xml; charset=utf-8"),
                                            ("Content-Length", str(len(body)))])
        return [body]
    start_response("207 Multi-Status", [("Content-Type", "application/xml; charset=utf-8")])

    def rest():
        yield from head
        yield from chunks
    return rest()
