"""What a browser may do with what `pit serve` sends.

Backed-up files are other people's bytes: an `.html` or `.svg` in one user's
scope, opened by another user in a browser, would otherwise run as a page of
the share's own origin with the second user's credentials and read anything
they may read (issue 15: a page in bob's scope fetched a file outside it with
alice's login, 200). So every answer here carries `nosniff` (a `.txt` that
holds HTML stays text), every file is served under a CSP sandbox (an opaque
origin without scripts: nothing it does counts as the share's origin), and
the active types (HTML, SVG, XML, JavaScript) come as downloads. The HTML
listing is our own page and gets a CSP that allows no script at all.
"""
from __future__ import annotations

import urllib.parse

# The listing: inline style only (render_listing has a <style> block), links, its search form's GET to this
# server, no scripts, no frames.
LISTING_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")
# Any other answer (files, error pages, multistatus): a sandbox with nothing allowed.
FILE_CSP = "sandbox; default-src 'none'; frame-ancestors 'none'"
# Types a browser would run or render as a document of the origin when shown inline.
ACTIVE_TYPES = {"text/html", "application/xhtml+xml", "image/svg+xml", "application/xml", "text/xml",
                "application/xslt+xml", "text/xsl", "text/javascript", "application/javascript",
                "application/ecmascript", "text/ecmascript", "application/x-javascript",
                "application/vnd.adobe.flash.movie", "application/x-shockwave-flash", "text/vtt",
                "application/rss+xml", "application/atom+xml", "multipart/x-mixed-replace"}


def listing_headers() -> list[tuple[str, str]]:
    return [("Content-Security-Policy", LISTING_CSP)]


def safe_responses(app):
    """WSGI middleware adding the headers above to every answer that lacks them."""

    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        try:  # WSGI gives the path's bytes as latin-1; the name in the header is its UTF-8 text
            path = path.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass

        def answer(status, headers, exc_info=None):
            names = {k.lower() for k, _ in headers}
            headers = list(headers)
            headers.append(("X-Content-Type-Options", "nosniff"))
            if "content-security-policy" not in names:
                headers.append(("Content-Security-Policy", FILE_CSP))
                ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
                active = ctype.split(";")[0].strip().lower() in ACTIVE_TYPES
                if (active and status[:1] == "2" and "content-disposition" not in names
                        and environ.get("REQUEST_METHOD") in ("GET", "HEAD")):
                    name = path.rstrip("/").rsplit("/", 1)[-1] or "download"
                    headers.append(("Content-Disposition",
                                    f"attachment; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"))
            return start_response(status, headers, exc_info)

        return app(environ, answer)

    return wrapped
