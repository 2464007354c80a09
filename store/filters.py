"""What a snapshot, a replication set or a restore leaves out: one filter model.

Words: a *pattern* is a gitignore-style line (`*.tmp`, `cache/`, `/www/tmp`,
`**/node_modules/`, `!keep.tmp`), matched by the `pathspec` library against a
path *as stored*: the source's base name, then the path under it
(`www/img/a.png` for /var/www/img/a.png; what `pit ls` shows). A pattern
without a slash (other than a trailing one) matches at any depth; one with a
leading or inner slash is anchored at the snapshot's root. An absolute
pattern under one of the source paths (`/var/www/cache`) is rewritten to
the stored form (`/www/cache`). A *marker* (`exclude_if_present`,
`NAME[:HEADER]`) excludes a directory holding a file of that name (whose
first bytes are HEADER); `exclude_caches` is the marker of the Cache
Directory Tagging Specification (a regular file `CACHEDIR.TAG` beginning
with its 43-byte signature). `one_file_system` keeps a directory on
another file system (a mount point) as an empty directory.

An excluded directory is left out with everything under it (a `!` pattern
cannot bring back a file under it, as in git). The sources themselves are
never excluded. `FilterRules` is the value (kept in a snapshot's record,
in a set's configuration); `Filter` is its compiled form. Used by
`store.ingest`, `store.restore` and the replicator's scanner and watcher.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, fields

import pathspec

from .errors import InvalidArgument, SourceMissing

CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
MAX_PATTERN = 4096


@dataclass(frozen=True)
class FilterRules:
    """The filter as a value: what the user gave (patterns are kept as given)."""

    exclude: tuple[str, ...] = ()
    iexclude: tuple[str, ...] = ()
    exclude_if_present: tuple[str, ...] = ()
    exclude_caches: bool = False
    one_file_system: bool = False

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def to_json(self) -> dict:
        """Only what is set: a filter-less snapshot records nothing."""
        out: dict = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, d: dict | None) -> "FilterRules":
        d = d or {}
        return cls(**{f.name: (tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name])
                      for f in fields(cls) if f.name in d})

    def compile(self, sources: list[str] | list[bytes] | tuple = ()) -> "Filter":
        return Filter(self, sources)


def read_pattern_file(path: str) -> list[str]:
    """Patterns from a file (`--exclude-file`): one a line, `#` comments and
    blank lines skipped, names that are not UTF-8 kept (surrogate escapes)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise SourceMissing(f"cannot read pattern file {path}: {exc.strerror}") from None
    out = []
    for line in raw.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line.strip() or line.startswith(b"#"):
            continue
        out.append(os.fsdecode(line))
    return out


def _stored_prefixes(sources) -> list[tuple[str, str]]:
    out = []
    for s in sources:
        s = os.path.normpath(os.fsdecode(s))
        out.append((s, os.path.basename(s)))
    return out


def check_pattern(pattern: str, sources=(), what: str = "pattern") -> str:
    """One pattern, checked and put in its stored form; InvalidArgument naming it otherwise."""
    if not isinstance(pattern, str):
        raise InvalidArgument(f"{what} {pattern!r} is not a string")
    shown = pattern.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if "\0" in pattern:
        raise InvalidArgument(f"{what} {shown!r} contains a NUL byte")
    if "\n" in pattern or "\r" in pattern:
        raise InvalidArgument(f"{what} {shown!r} contains a line break")
    if len(pattern) > MAX_PATTERN:
        raise InvalidArgument(f"{what} is longer than {MAX_PATTERN} characters")
    neg = pattern.startswith("!")
    body = pattern[1:] if neg else pattern
    if not body.strip() or body.startswith("#"):
        raise InvalidArgument(f"{what} {shown!r} is empty")
    parts = body.rstrip("/").split("/")
    if ".." in parts:
        raise InvalidArgument(f"{what} {shown!r} contains `..`: patterns match paths inside the snapshot")
    if "." in parts[1:] or (parts[0] == "." and len(parts) > 1):
        raise InvalidArgument(f"{what} {shown!r} has a `.` component: write {parts[-1]!r} (at any depth) or an "
                              f"absolute path under a source")
    if body.startswith("/") and sources:
        prefixes = _stored_prefixes(sources)
        stripped = body.rstrip("/") or "/"
        for src, name in prefixes:
            if stripped == src or stripped.startswith(src.rstrip("/") + "/"):
                body = "/" + name + body[len(src.rstrip("/")):]
                break
        else:
            first = body.lstrip("/").split("/", 1)[0]
            if first not in [n for _, n in prefixes]:
                raise InvalidArgument(f"{what} {shown!r} is an absolute path under none of the source paths "
                                      f"({', '.join(s for s, _ in prefixes)})")
    if sources:
        # anchored (a slash before the end): its first component must be able to match a source's name
        first, sep, _ = body.lstrip("/").partition("/")
        names = [n for _, n in _stored_prefixes(sources)]
        if (body.startswith("/") or sep and body.rstrip("/").count("/")) and not any(c in first for c in "*?[\\") \
                and first not in names:
            raise InvalidArgument(f"{what} {shown!r} is anchored at the snapshot's root, which holds only "
                                  f"{', '.join(names)}: it can never match (use an absolute path, or a pattern "
                                  f"without a leading or inner slash to match at any depth)")
    out = ("!" if neg else "") + body
    try:
        pathspec.GitIgnoreSpec.from_lines([out])
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{what} {shown!r} is not a valid pattern: {exc}") from None
    return out


def _compiled(pats: list[str]) -> list[tuple]:
    """(regex, include) per pattern, each to be matched against the *whole* path (`fullmatch`; a
    directory's path ends with "/"). pathspec's regexes are meant to match a path's prefix (a file
    under a matched directory counts); a walk asks about each directory before what is under it, so
    here only a match of the path itself counts, except for `dir/**`, which names what is under it.
    This keeps git's rule that `!a` does not bring back `a/b` when `b` is excluded. pathspec's
    unanchored special cases become whole-path ones: `*`, `**` (".": any path) and `*/`, `**/`
    ("/": any directory)."""
    out = []
    for p in pathspec.GitIgnoreSpec.from_lines(pats).patterns:
        if p.include is None or p.regex is None:
            continue
        body = p.pattern[1:] if p.pattern.startswith("!") else p.pattern
        rx = p.regex.pattern
        if not rx.startswith("^"):
            rx = ".*" + rx if rx.startswith("(?P<ps_d>") else ".+"
        elif body.rstrip("/").endswith("**"):
            rx += ".+"  # what is under it, not the directory itself
        out.append((re.compile(rx, re.DOTALL), p.include))
    return out


def _verdict(compiled: list[tuple], s: str) -> bool:
    verdict = False
    for regex, include in compiled:
        if regex.fullmatch(s) is not None:
            verdict = include
    return verdict


class PathMatcher:
    """One or more patterns (the same language) for finding paths, not leaving them out: `pit find`,
    `pit restore --include`. `names_only` is True when every pattern matches at any depth, so a
    name can be tested without its parents' path (what lets `pit find` skip building paths)."""

    def __init__(self, patterns, ignore_case: bool = False, sources=(), what: str = "pattern",
                 floating: bool = False) -> None:
        pats = [check_pattern(p, sources, what) for p in patterns]
        if floating:  # `sub/*.txt` at any depth, as restic's find: only a leading slash anchors
            pats = [_floating(p) for p in pats]
        if ignore_case:
            pats = [p.lower() for p in pats]
        self.ignore_case = ignore_case
        self._c = _compiled(pats)
        self.names_only = all("/" not in p.lstrip("!").rstrip("/") and "**" not in p for p in pats)
        # the same regexes over bytes: a name that is not UTF-8 needs no decoding, and a search over
        # hundreds of thousands of names spends its time here (not for --iexclude-style matching)
        self._bc = None if ignore_case else [
            (re.compile(r.pattern.encode("utf-8", "surrogateescape"), re.DOTALL), inc) for r, inc in self._c]
        # one regex for "could any including pattern match this path, as a file or as a directory?",
        # asked of `path + "/"` (a pattern that matches a file matches it as a directory too): a
        # search tests each name once with it, and only the few candidates exactly
        alts = [r.pattern.replace("(?P<ps_d>", "(?:") for r, inc in self._c if inc]
        self._cand = re.compile("|".join(f"(?:{a})" for a in alts).encode("utf-8", "surrogateescape"),
                                re.DOTALL) if alts else None

    def candidate(self, path: bytes) -> bool:
        """False only when no pattern can match `path` (bytes, no slashes at the ends) as a file or a
        directory; True means: ask `match_bytes`."""
        if self._cand is None:
            return False
        if self.ignore_case:  # as `match` lowers it: the whole name, not only its ASCII letters
            path = os.fsdecode(path).lower().encode("utf-8", "surrogateescape")
        return self._cand.fullmatch(path + b"/") is not None

    def match_bytes(self, path: bytes, is_dir: bool) -> bool:
        """`match` for a path given as bytes without slashes at either end (the index's form)."""
        if self._bc is None:
            return self.match(path, is_dir)
        s = path + b"/" if is_dir else path
        verdict = False
        for regex, include in self._bc:
            if regex.fullmatch(s) is not None:
                verdict = include
        return verdict

    def match(self, path, is_dir: bool) -> bool:
        s = os.fsdecode(path).strip("/")
        if self.ignore_case:
            s = s.lower()
        return _verdict(self._c, s + "/" if is_dir else s)


def _floating(p: str) -> str:
    neg = p.startswith("!")
    body = p[1:] if neg else p
    if "/" in body.rstrip("/") and not body.startswith(("/", "**/")):
        body = "**/" + body
    return ("!" if neg else "") + body


def check_marker(marker: str, what: str = "exclude-if-present") -> str:
    """`NAME[:HEADER]`: NAME is a plain file name."""
    if not isinstance(marker, str):
        raise InvalidArgument(f"{what} {marker!r} is not a string")
    name = marker.split(":", 1)[0]
    if not name or "\0" in marker or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"{what} {marker!r} must be a file name, optionally followed by :HEADER")
    return marker


class Filter:
    """A compiled `FilterRules` for the sources it was given."""

    def __init__(self, rules: FilterRules, sources=()) -> None:
        self.rules = rules
        pats = [check_pattern(p, sources, "--exclude pattern") for p in rules.exclude]
        ipats = [check_pattern(p, sources, "--iexclude pattern").lower() for p in rules.iexclude]
        self._spec = _compiled(pats)
        self._ispec = _compiled(ipats)
        markers = [check_marker(m) for m in rules.exclude_if_present]
        self.markers: list[tuple[bytes, bytes]] = []
        for m in markers:
            name, _, header = m.partition(":")
            self.markers.append((os.fsencode(name), os.fsencode(header)))
        if rules.exclude_caches:
            self.markers.append((CACHEDIR_TAG.encode(), CACHEDIR_SIGNATURE))
        self.one_file_system = rules.one_file_system
        self.patterns = bool(pats or ipats)
        self.active = bool(rules)

    # ------------------------------------------------------------- patterns
    def match(self, rel, is_dir: bool) -> bool:
        """Do the patterns exclude this stored path (its ancestors not considered)?"""
        if not self.patterns:
            return False
        s = os.fsdecode(rel).strip("/")
        if is_dir:
            s += "/"
        return _verdict(self._spec, s) or _verdict(self._ispec, s.lower())

    def excluded(self, rel, is_dir: bool, sources_too: bool = False) -> bool:
        """The patterns on a single stored path: excluded when it or any ancestor directory is.
        The first component (a source) is never excluded unless `sources_too` (restore)."""
        if not self.patterns:
            return False
        parts = os.fsdecode(rel).strip("/").split("/")
        first = 1 if sources_too else 2
        for i in range(first, len(parts)):
            if self.match("/".join(parts[:i]), True):
                return True
        return len(parts) >= first and self.match("/".join(parts), is_dir)

    # ------------------------------------------------------------- markers, devices
    def marked(self, dirpath: bytes) -> str | None:
        """The marker that excludes this directory, if any (never following a symlink)."""
        for name, header in self.markers:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not header:
                return os.fsdecode(name)
            if not stat.S_ISREG(st.st_mode):
                continue  # the spec: a tag is an ordinary file, not a symlink
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                head = os.read(fd, len(header))
            except OSError:
                continue
            finally:
                os.close(fd)
            if head == header:
                return os.fsdecode(name)
        return None

    def dir_excluded(self, rel, dirpath: bytes) -> bool:
        """A directory met by a walk (its ancestors were not excluded): patterns, then markers."""
        return self.match(rel, True) or (bool(self.markers) and self.marked(dirpath) is not None)

    def other_device(self, st: os.stat_result, root_dev: int) -> bool:
        return self.one_file_system and st.st_dev != root_dev


NO_FILTER = Filter(FilterRules())


def rules_from_options(exclude=(), iexclude=(), exclude_file=(), iexclude_file=(), exclude_if_present=(),
                       exclude_caches=False, one_file_system=False) -> FilterRules:
    """The CLI's flags as rules (`--exclude-file` read here)."""
    ex = list(exclude)
    for f in exclude_file:
        ex += read_pattern_file(f)
    iex = list(iexclude)
    for f in iexclude_file:
        iex += read_pattern_file(f)
    return FilterRules(tuple(ex), tuple(iex), tuple(exclude_if_present), bool(exclude_caches),
                       bool(one_file_system))
