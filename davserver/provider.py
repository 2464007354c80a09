"""A strictly read-only wsgidav provider over `store.view`.

Everything the user sees comes from a `View` limited to that user's scope,
built per request from the authenticated user name; a path outside the
scope resolves to nothing (404), exactly like a path that does not exist.

Client quirks handled here (each named):
- wsgidav's own `readonly=True` still allows LOCK (measured, see
  docs/restore.md): `is_readonly()` returns True, so OPTIONS says `DAV: 1`,
  `Allow: OPTIONS, HEAD, GET, PROPFIND`, and every write verb gets 405.
- Windows Explorer decides free space and "is this FAT" from the quota
  properties; we report the snapshot's size as used and a large number as
  available, never the host disk.
- `Depth: infinity` PROPFIND is refused (403 propfind-finite-depth, RFC
  4918 9.1): one request must not walk a million-file snapshot. Every other
  PROPFIND is answered by `propfind.py` (bounded, streamed, propname that
  works, Win32 properties), not by wsgidav.
- wsgidav streams GET bodies in 8 KiB blocks; we raise that to 256 KiB, and
  the blocks come from `body.Body`, which reads a file's chunks in runs
  rather than one by one (wsgidav still does the headers, conditions and
  Range).

`GET <folder>/?find=PATTERN` (a search form on every listing) is a page of
every version of every path of the folder's set (at the root: of every set)
that matches PATTERN, newest first, from `store.find.find` (the same matcher
and the same previous-versions index as `pit find`), limited to the user's
scope and to `MAX_HITS` rows; `&i=1` ignores case. A bad pattern is a 400
with the reason as text.

A snapshot folder carries what the HTML listing shows about it (verification,
application check, failover image status) as read-only live properties in
our own namespace `PIT_NS`, so a WebDAV client sees it with PROPFIND; both
come from `snapshot_fields`.
"""
from __future__ import annotations

import html
import logging
import mimetypes
import re
import time
import urllib.parse
import zipfile
from typing import Iterator

from wsgidav.dav_error import (HTTP_BAD_REQUEST, HTTP_FORBIDDEN, HTTP_NOT_FOUND, PRECONDITION_CODE_ProtectedProperty,
                               DAVError)
from wsgidav.dav_provider import DAVCollection, DAVNonCollection, DAVProvider
from wsgidav.util import parse_time_string

from store.errors import InvalidArgument, PathNotFound, StoreError
from store.find import Hit, find
from store.trees import DIR, SYMLINK
from store.view import ALL, FULL, LATEST, VERSIONS, Node, Scope, View

from . import propfind
from .body import Body
from .config import PropfindLimits
from .safety import listing_headers

log = logging.getLogger("pit.serve")

BLOCK = 256 * 1024
MAX_HITS = 1000  # rows of a search page: past it the page says how many more there were
SINGLE_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")
AVAILABLE = 1 << 50  # "plenty": a read-only share that Windows must not think is full or FAT

PIT_NS = "https://pitstore.dev/ns"  # the XML namespace of pitstore's own WebDAV properties
_PIT = "{" + PIT_NS + "}"
# A snapshot folder's live properties, in the order PROPFIND lists them (docs/restore.md).
SNAPSHOT_PROPS = ("verification", "verification-depth", "verification-time", "app-check", "app-check-template",
                  "failover-image", "failover-image-reason")


def snapshot_fields(status: dict | None) -> dict[str, str]:
    """What a snapshot folder says about itself, from its `Node.status`
    (`store.view.verification`): the one source of both the HTML listing and
    the `{PIT_NS}` properties. Keys are `SNAPSHOT_PROPS`; a field with no
    value is absent (a snapshot image selection never examined has no
    `failover-image`; an unverified one has no depth or time).

    - verification: good | damaged | unverified
    - verification-depth, verification-time: of the last verification
    - app-check: good | failed; app-check-template: which check (sqlite, ...)
    - failover-image: chosen | pinned | skipped | superseded;
      failover-image-reason: why (for a skipped image)"""
    if not status:
        return {}
    out = {"verification": status.get("result") or "unverified"}
    if out["verification"] != "unverified":
        out["verification-depth"] = status.get("depth")
        out["verification-time"] = status.get("time")
    app, img = status.get("app_check"), status.get("image")
    if app:
        out["app-check"] = app.get("result")
        out["app-check-template"] = app.get("template")
    if img:
        out["failover-image"] = img.get("status")
        out["failover-image-reason"] = img.get("reason")
    return {k: str(v) for k, v in out.items() if v not in (None, "")}


def content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _href(parts: list[str], trailing: bool) -> str:
    return "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts) + ("/" if trailing and parts else "")


class _Common:
    def _init(self, provider: "ViewProvider", node: Node, view: View, parts: list[str]) -> None:
        self.provider, self.node, self.view, self.parts = provider, node, view, parts
        self._fields: dict[str, str] | None = None

    def get_display_name(self) -> str:
        return self.node.name

    def get_creation_date(self):
        return self.node.mtime_ns // 10**9

    def get_last_modified(self):
        # whole seconds, as Last-Modified says: wsgidav compares If-Modified-Since with this value, and a
        # sub-second mtime was always "newer" than the date the client had been given (200, not 304)
        return self.node.mtime_ns // 10**9

    def get_etag(self):
        return self.node.etag or None

    def support_etag(self) -> bool:
        return bool(self.node.etag)

    def support_modified(self) -> bool:
        return True

    def get_used_bytes(self):
        return self.node.size

    def get_available_bytes(self):
        return AVAILABLE

    # Live properties in PIT_NS (wsgidav's custom live property hooks, dav_provider.py):
    # listed for allprop and propname only when the resource has them; an absent one
    # asked for by name is 404 in its propstat; all are protected.
    def _pit_fields(self) -> dict[str, str]:
        if self._fields is None:
            self._fields = snapshot_fields(self.node.status)
        return self._fields

    def get_property_names(self, *, is_allprop):
        names = super().get_property_names(is_allprop=is_allprop)
        return names + [_PIT + k for k in self._pit_fields()]

    def get_property_value(self, name):
        if name.startswith(_PIT):
            value = self._pit_fields().get(name[len(_PIT):])
            if value is None:
                raise DAVError(HTTP_NOT_FOUND)
            return value
        return super().get_property_value(name)

    def set_property_value(self, name, value, *, dry_run=False):
        if name.startswith(_PIT):
            raise DAVError(HTTP_FORBIDDEN, err_condition=PRECONDITION_CODE_ProtectedProperty)
        return super().set_property_value(name, value, dry_run=dry_run)


class FileResource(_Common, DAVNonCollection):
    def __init__(self, path: str, environ: dict, provider, node: Node, view: View, parts: list[str]) -> None:
        DAVNonCollection.__init__(self, path, environ)
        self._init(provider, node, view, parts)

    def get_content_length(self) -> int:
        return self.node.size

    def get_content_type(self) -> str:
        return content_type(self.node.name)

    def support_ranges(self) -> bool:
        return True

    def get_content(self):
        return Body(self.view.open(self.node), BLOCK)

    def get_display_info(self):
        return {"type": "File"}


class DirResource(_Common, DAVCollection):
    def __init__(self, path: str, environ: dict, provider, node: Node, view: View, parts: list[str]) -> None:
        DAVCollection.__init__(self, path, environ)
        self._init(provider, node, view, parts)
        self._kids: list[Node] | None = None

    def _children(self) -> list[Node]:
        if self._kids is None:
            # Symlinks have no WebDAV form; they stay visible in the FUSE mount.
            self._kids = [n for n in self.view.listdir(self.node) if n.kind != "symlink"]
        return self._kids

    def get_display_info(self):
        return {"type": "Directory"}

    def get_member_names(self) -> list[str]:
        return [n.name for n in self._children()]

    def get_member_list(self):
        return [self.provider._resource(self.path.rstrip("/") + "/" + n.name, self.environ, n, self.view,
                                        self.parts + [n.name]) for n in self._children()]

    def get_member(self, name: str):
        for n in self._children():
            if n.name == name:
                return self.provider._resource(self.path.rstrip("/") + "/" + name, self.environ, n, self.view,
                                               self.parts + [name])
        return None


class ViewProvider(DAVProvider):
    """Serves the view of one repository; each user sees their own scope."""

    def __init__(self, repo, scopes: dict[str, Scope] | None = None, anonymous_scope: Scope | None = None,
                 propfind_limits: PropfindLimits | None = None) -> None:
        super().__init__()
        self.repo = repo
        self.scopes = scopes  # None: no access control at all (tests, `pit serve --no-auth` never)
        self.anonymous_scope = anonymous_scope
        # the server's `propfind_max_*` caps: held here (not module globals) and handed to propfind.py per request
        self.propfind_limits = propfind_limits or PropfindLimits()

    def is_readonly(self) -> bool:
        return True

    def view_for(self, environ: dict) -> View | None:
        if self.scopes is None:
            return View(self.repo, ALL)
        user = environ.get("wsgidav.auth.user_name") or ""
        if user and user in self.scopes:
            return View(self.repo, self.scopes[user])
        if not user and self.anonymous_scope is not None:
            return View(self.repo, self.anonymous_scope)
        return None

    def _resource(self, path, environ, node: Node, view: View, parts: list[str]):
        cls = DirResource if node.is_dir else FileResource
        return cls(path, environ, self, node, view, parts)

    def get_resource_inst(self, path: str, environ: dict):
        view = self.view_for(environ)
        if view is None:
            return None
        parts = [p for p in path.split("/") if p]
        try:
            node = view.resolve(parts)
        except (PathNotFound, StoreError):
            return None
        if node.kind == "symlink":
            return None
        return self._resource(path, environ, node, view, parts)

    # ------------------------------------------------------------------
    def custom_request_handler(self, environ, start_response, default_handler):
        server = getattr(default_handler, "__self__", None)
        if server is not None:
            server.block_size = BLOCK
        method = environ["REQUEST_METHOD"]
        if method == "PROPFIND":
            depth = environ.get("HTTP_DEPTH", "").lower()
            if depth == "infinity":
                raise DAVError(HTTP_FORBIDDEN, err_condition="{DAV:}propfind-finite-depth",
                               context_info="Depth: infinity is not served; use Depth 1")
            if depth == "":
                depth = environ["HTTP_DEPTH"] = "1"  # RFC default is infinity: bounded instead
            if depth not in ("0", "1"):
                raise DAVError(HTTP_BAD_REQUEST, context_info=f"invalid Depth header {depth!r}")
            return self._propfind(environ, start_response, depth == "1")
        if method in ("GET", "HEAD"):
            if "HTTP_RANGE" in environ and not SINGLE_RANGE.fullmatch(environ["HTTP_RANGE"].strip()):
                # wsgidav 4.4 answers `bytes=0-9,20-29` with a 206 of the last range only, and a malformed
                # Range with 416; RFC 9110 14.2 lets a server ignore Range: the whole body, 200.
                del environ["HTTP_RANGE"]
            res = self.get_resource_inst(environ["PATH_INFO"], environ)
            if res is not None and res.is_collection:
                q = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
                if "zip" in q:
                    return self._zip(res, environ, start_response, method == "HEAD")
                if "find" in q:
                    return self._search(res, environ, start_response, method == "HEAD")
                return self._html(res, environ, start_response, method == "HEAD")
            if res is not None and not_modified_since(res, environ):
                # wsgidav 4.4 answers 304 only when If-Modified-Since is *later* than Last-Modified; a
                # client sends back the very Last-Modified it was given (RFC 9110 13.1.3: not later = 304)
                start_response("304 Not Modified", [("ETag", propfind.quote_etag(res.node.etag)),
                                                    ("Last-Modified", propfind.http_date(res.get_last_modified()))])
                return [b""]
        return default_handler(environ, start_response)

    # -------------------------------------------------------------- PROPFIND
    def _propfind(self, environ, start_response, depth1: bool):
        limits = self.propfind_limits
        mode, names = propfind.parse_request(propfind.read_body(environ, limits.max_body), limits.max_names)
        res = self.get_resource_inst(environ["PATH_INFO"], environ)
        if res is None:
            raise DAVError(HTTP_NOT_FOUND)
        base = ((self.mount_path or "") + (self.share_path or "")).rstrip("/")

        def entries():
            yield propfind.href_of(base + (res.path or "/"), res.is_collection), res.node
            if depth1 and res.is_collection:
                parent = propfind.href_of(base + res.path.rstrip("/") + "/", False)
                for n in res._children():
                    yield propfind.child_href(parent, n.name, n.is_dir), n

        def pit_fields(node):
            return {_PIT + k: v for k, v in snapshot_fields(node.status).items()} if node.status else {}

        def props_of(node):
            return propfind.live_properties(node, content_type, pit_fields, AVAILABLE)

        def allprop(href, node):
            return propfind.allprop_response(href, node, content_type, AVAILABLE)

        return propfind.send(environ, start_response,
                             propfind.answer(entries(), mode, names, props_of, PIT_NS, allprop, limits))

    # -------------------------------------------------------- HTML listing
    def _html(self, res: DirResource, environ, start_response, head: bool):
        if not environ["PATH_INFO"].endswith("/"):
            loc = urllib.parse.quote(environ.get("SCRIPT_NAME", "") + environ["PATH_INFO"]) + "/"
            start_response("301 Moved Permanently", [("Location", loc), ("Content-Length", "0")])
            return [b""]
        window = restorable_window(self.repo, res.node.set) if res.node.kind == "set" else None
        body = render_listing(res.node, res.parts, res._children(), res.node.set,
                              window).encode("utf-8", "replace")
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-cache"), *page_headers()])
        return [b"" if head else body]

    # ---------------------------------------------------------------- search
    def _search(self, res: DirResource, environ, start_response, head: bool):
        """The search page of `?find=PATTERN` on a folder: every version of every matching path of the
        folder's set (the root: of every set the user sees), newest first, only what the user's scope
        holds (a hit outside it is dropped before anything is rendered)."""
        addr = environ.get("REMOTE_ADDR", "")
        try:
            q = strict_query(environ.get("QUERY_STRING", ""))
        except UnicodeError:
            log.info("refused a search from %s: the query is not UTF-8", addr)
            return _text(start_response, "400 Bad Request", "The search pattern is not valid UTF-8.")
        pattern = q.get("find", [""])[0]
        ignore_case = q.get("i", [""])[0] not in ("", "0")
        view = res.view
        sets = [res.node.set] if res.node.set else [n.name for n in view.listdir(res.node)]
        hits: list[Hit] = []
        try:
            for set_name in sets:
                hits += find(self.repo, pattern, set_name=set_name, ignore_case=ignore_case)
        except InvalidArgument as exc:
            log.info("refused a search from %s: %s", addr, exc)
            return _text(start_response, "400 Bad Request", f"Cannot search: {exc}")
        hits = [h for h in hits if in_scope(view.scope, h)]
        hits.sort(key=lambda h: (-h.newest.time_ns, h.set, h.path))  # (store.find's order, across sets)
        body = render_search(res.parts, res.node.set, pattern, ignore_case, hits, view.snap_folder,
                             show_set=not res.node.set).encode("utf-8", "replace")
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-cache"), *page_headers()])
        return [b"" if head else body]

    # ---------------------------------------------------------- zip download
    def _zip(self, res: DirResource, environ, start_response, head: bool):
        name = (res.node.name or "pitstore").replace('"', "") + ".zip"
        quoted = urllib.parse.quote(name)
        start_response("200 OK", [("Content-Type", "application/zip"),
                                  ("Content-Disposition", f"attachment; filename*=UTF-8''{quoted}")])
        if head:
            return [b""]
        return stream_zip(res.view, res.node)


def page_headers() -> list[tuple[str, str]]:
    """The listing's headers (safety.py: no script, no frame; forms only to this server)."""
    return listing_headers()


def strict_query(qs: str) -> dict[str, list[str]]:
    """A query string's parameters, UnicodeError if it is not UTF-8 (WSGI hands raw bytes over as latin-1;
    parse_qs would quietly put U+FFFD in the pattern)."""
    qs = qs.encode("latin-1").decode("utf-8")
    return urllib.parse.parse_qs(qs, keep_blank_values=True, errors="strict")


def in_scope(scope: Scope, hit: Hit) -> bool:
    """Whether a search may show `hit`: a path the scope holds whole (FULL), never one outside it, nor a
    folder above it (whose name the listing shows, but whose versions and sizes span what is outside)."""
    if hit.state.type == SYMLINK:  # WebDAV has no form for one (the listing leaves them out too)
        return False
    return scope.level(hit.set, tuple(hit.path.split(b"/"))) == FULL


def _text(start_response, status: str, text: str) -> list[bytes]:
    body = (text + "\n").encode("utf-8", "replace")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


def not_modified_since(res, environ) -> bool:
    ims = environ.get("HTTP_IF_MODIFIED_SINCE")
    if not ims or "HTTP_IF_NONE_MATCH" in environ or not res.node.etag:  # If-None-Match wins (RFC 9110 13.1.3)
        return False
    when = parse_time_string(ims)
    return when is not None and res.get_last_modified() <= when


class _Sink:
    """A write-only, non-seekable buffer: zipfile writes, the generator drains."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.n = 0

    def write(self, b) -> int:
        self.parts.append(bytes(b))
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def stream_zip(view: View, node: Node) -> Iterator[bytes]:
    """A folder as a zip, produced while it is sent: memory stays at one chunk.
    Stored (not deflated): the server's CPU goes to reading, and most office
    files are compressed already. ZIP64 for large files and archives."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for rel, n in view.walk(node):
            t = time.gmtime(max(n.mtime, 315532800))[:6]  # zip dates start in 1980
            if n.is_dir:
                zi = zipfile.ZipInfo(rel + "/", t)
                zi.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(zi, b"")
            elif n.kind in ("file", "version"):
                zi = zipfile.ZipInfo(rel, t)
                zi.external_attr = 0o100644 << 16
                zi.file_size = n.size
                with zf.open(zi, "w", force_zip64=n.size > 0x7FFFFFFF) as w:
                    for piece in view.open(n).iter_range():
                        w.write(piece)
                        if sink.parts:
                            yield sink.drain()
            if sink.parts:
                yield sink.drain()
    yield sink.drain()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


STATUS_LABEL = {"good": "verified good", "damaged": "DAMAGED", "unverified": "not verified"}


STYLE = """body{font-family:sans-serif;margin:2em}td{padding:.2em 1em}.n{text-align:right}
.v-good{color:#070}.v-damaged{color:#b00;font-weight:bold}.v-unverified{color:#777}form.find{margin:1em 0}"""


def search_form(set_name: str, pattern: str = "", ignore_case: bool = True) -> str:
    """The search form of a listing (a GET to the folder itself: `?find=...&i=1`); `set_name` is what it
    searches ("" at the root: every set)."""
    e = html.escape
    where = f"in {e(set_name)}" if set_name else "in every set"
    checked = " checked" if ignore_case else ""
    return (f'<form class="find" method="get" action=""><input type="search" name="find" value="{e(pattern)}" '
            f'placeholder="report.xlsx, *.pdf, sales/*.xlsx" aria-label="Name or pattern" size="40"> '
            f'<label><input type="checkbox" name="i" value="1"{checked}> any case</label> '
            f'<button type="submit">Find {where}</button></form>')


def restorable_window(repo, set_name: str) -> tuple[str, str] | None:
    """For a database set whose log the replica archives (set `SET.wal` for PostgreSQL and SQLite, `SET.binlog`
    for MariaDB; docs/restore.md): the span it can be restored to any second of, from its oldest snapshot to its
    newest log archive (UTC). None otherwise."""
    from store.snapshots import list_snapshots

    with repo.reading() as txn:
        wal = list_snapshots(repo, txn, f"{set_name}.wal") + list_snapshots(repo, txn, f"{set_name}.binlog")
        snaps = list_snapshots(repo, txn, set_name) if wal else []
    if not wal or not snaps:
        return None
    fmt = "%Y-%m-%d %H:%M:%S UTC"
    return (time.strftime(fmt, time.gmtime(snaps[0].time_ns // 10**9)),
            time.strftime(fmt, time.gmtime(max(w.time_ns for w in wal) // 10**9)))


def render_listing(node: Node, parts: list[str], kids: list[Node], search_set: str | None = None,
                   window: tuple[str, str] | None = None) -> str:
    """A plain, readable HTML page: names, sizes, dates; snapshot verification;
    for a file's versions folder, which snapshots hold each version; with `search_set`
    (a set name, or "" at the root) a search form; with `window`, the span a database set can be restored
    to any second of."""
    e = html.escape
    title = "/" + "/".join(parts)
    rows = []
    if parts:
        rows.append(f'<tr><td><a href="{_href(parts[:-1], True)}">../</a></td><td></td><td></td><td></td></tr>')
    show_status = node.kind == "set"
    for k in kids:
        href = _href(parts + [k.name], k.is_dir)
        label = k.name + ("/" if k.is_dir else "")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(k.mtime)) if k.mtime_ns else ""
        extra = ""
        if show_status and k.status:
            fields = snapshot_fields(k.status)  # the same fields PROPFIND gives as properties
            st = fields["verification"]
            detail = f" ({e(fields.get('verification-depth', ''))}, {e(fields.get('verification-time', ''))})" \
                if st != "unverified" else ""
            extra = f'<span class="v-{e(st)}">{e(STATUS_LABEL.get(st, st))}{detail}</span>'
            if "app-check" in fields:
                extra += (f'; <span class="v-{"good" if fields["app-check"] == "good" else "damaged"}">'
                          f'{e(fields.get("app-check-template", "application"))} check {e(fields["app-check"])}</span>')
            if "failover-image" in fields:
                reason = fields.get("failover-image-reason")
                extra += f"; failover image: {e(fields['failover-image'])}" + (f" ({e(reason)})" if reason else "")
            if k.name == LATEST:
                extra += " &rarr; newest snapshot"
        elif k.kind == "version":
            names = ", ".join(s.name for s in k.versions[:5]) + (" ..." if len(k.versions) > 5 else "")
            extra = f"in {len(k.versions)} snapshot(s): {e(names)}"
        elif k.name == VERSIONS:
            extra = "previous versions of every file"
        z = f' <a class="zip" href="{href}?zip">[zip]</a>' if k.kind == "snapdir" else ""
        size = "" if k.is_dir else _size(k.size)
        rows.append(f'<tr><td><a href="{href}">{e(label)}</a>{z}</td><td class="n">{size}</td>'
                    f"<td>{when}</td><td>{extra}</td></tr>")
    heading = "Previous versions of " + e(node.name) if node.kind == "vfile" else "Index of " + e(title)
    zip_link = '<p><a href="?zip">Download this folder as .zip</a></p>' if node.kind == "snapdir" else ""
    form = search_form(search_set) if search_set is not None else ""
    if window:
        form += (f'<p class="window">Restorable to any second from {e(window[0])} to {e(window[1])}: '
                 f"<code>pit restore {e(node.name)} --at TIME --target DIR</code> (the snapshots below are the "
                 "base images; the database log between them is kept too)</p>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{e(title)} - pitstore</title>
<style>{STYLE}</style></head>
<body><h1>{heading}</h1>{form}{zip_link}
<table><thead><tr><th>Name</th><th>Size</th><th>Modified</th><th></th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table><p><small>pitstore restore view (read-only)</small></p></body></html>
"""


def _quoted(parts) -> str:
    """'/a/b' of path parts (str, or bytes as the index keeps names), each percent-quoted whole."""
    return "".join("/" + urllib.parse.quote(p if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape"),
                                            safe="") for p in parts)


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9)) if ns else ""


def render_search(parts: list[str], set_name: str, pattern: str, ignore_case: bool, hits: list[Hit],
                  snap_folder, show_set: bool) -> str:
    """The search page: the form again, then one row per hit (at most `MAX_HITS`, saying so when there
    were more): the path, linked to that version in the newest snapshot holding it; its size and
    modification time; the snapshots holding it; a link to the path's versions folder. Every name is
    escaped (a backed-up name may hold `<`, `&` or quotes)."""
    e = html.escape
    title = "/" + "/".join(parts)
    where = e(set_name) if set_name else "every set"
    shown = hits[:MAX_HITS]
    if not hits:
        count = "<p>No match.</p>"
    elif len(hits) > MAX_HITS:
        count = (f"<p>{len(hits)} matches: the newest {MAX_HITS} are shown. "
                 "A longer name or a path (<code>sales/*.xlsx</code>) finds fewer.</p>")
    else:
        count = f"<p>{len(hits)} match{'es' if len(hits) != 1 else ''}.</p>"
    rows = []
    for h in shown:
        is_dir = h.state.type == DIR
        path = h.path.split(b"/")
        newest, first = h.newest, h.snapshots[0]
        label = h.path.decode("utf-8", "replace") + ("/" if is_dir else "")
        if show_set:
            label = f"{h.set}: {label}"
        href = _quoted([h.set, snap_folder(newest), *path]) + ("/" if is_dir else "")
        snaps = (f'<a href="{e(_quoted([h.set, snap_folder(newest)]))}/">{e(snap_folder(newest))}</a>'
                 if len(h.snapshots) == 1 else
                 f'{len(h.snapshots)} snapshots: {e(snap_folder(first))} .. '
                 f'<a href="{e(_quoted([h.set, snap_folder(newest)]))}/">{e(snap_folder(newest))}</a>')
        versions = _quoted([h.set, VERSIONS, *path]) + "/"
        rows.append(f'<tr><td><a href="{e(href)}">{e(label)}</a></td>'
                    f'<td class="n">{"" if is_dir else _size(h.state.size)}</td><td>{_when(h.state.mtime_ns)}</td>'
                    f'<td>{snaps}</td><td><a href="{e(versions)}">all versions</a></td></tr>')
    up = f'<p><a href="{e(_quoted(parts))}/">Back to {e(title)}</a></p>'
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Find {e(pattern)} - pitstore</title>
<style>{STYLE}</style></head>
<body><h1>Find <code>{e(pattern)}</code> in {where}</h1>{search_form(set_name, pattern, ignore_case)}{up}{count}
<table><thead><tr><th>Path</th><th>Size</th><th>Modified</th><th>In snapshot(s)</th><th></th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table><p><small>pitstore restore view (read-only)</small></p></body></html>
"""
