"""The change set `pit snapshot --changes FILE` reads: paths, and written byte ranges.

One record per line, fields separated by one TAB (docs/store.md, "Change sets"):

    PATH                           the path changed (a file read whole, a directory rescanned)
    PATH<TAB>OFFSET<TAB>LENGTH     bytes [OFFSET, OFFSET+LENGTH) of file PATH were written
    PATH<TAB>baseline<TAB>SIZE<TAB>MTIME_NS
                                   the ranges of PATH are relative to the file as it was with this
                                   size and mtime (ns); if the parent snapshot's entry differs, the
                                   ranges are not trusted and the file is read whole

A file may have several range lines; a size change is a change too (the tail
from the shorter size is implied). A file named by a plain line anywhere is
read whole, whatever ranges it also has. Parsing is strict and all-or-nothing:
a malformed line is one error naming its line number, before anything is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from .errors import ChangeSetInvalid


@dataclass
class FileRanges:
    """The written ranges of one file, and the baseline they are relative to."""

    ranges: list[tuple[int, int]] | None = field(default_factory=list)  # None: read it whole (see why)
    why: str = ""  # why there are no ranges (a capture's reason), for the snapshot's stats
    baseline: tuple[int, int] | None = None  # (size, mtime_ns) of the file the ranges are relative to
    read_path: bytes | None = None  # read from here instead (a frozen clone of the file); None: the file


@dataclass
class ChangeSet:
    paths: list[bytes] = field(default_factory=list)       # every path named, once, in order
    ranges: dict[bytes, FileRanges] = field(default_factory=dict)  # absolute normalized path -> its ranges


def _number(text: str, what: str, lineno: int) -> int:
    if not text.isascii() or not text.isdigit():
        raise ChangeSetInvalid(f"change set line {lineno}: {what} {text!r} is not a non-negative decimal integer")
    return int(text)


def norm(path: str | bytes) -> bytes:
    return os.path.normpath(os.path.abspath(os.fsencode(path)))


def parse_changes(lines: Iterable[str | bytes]) -> ChangeSet:
    """Parse a change set; blank lines are skipped, anything malformed is refused."""
    out = ChangeSet()
    whole: set[bytes] = set()
    seen: set[bytes] = set()
    for lineno, raw in enumerate(lines, 1):
        line = os.fsdecode(raw) if isinstance(raw, bytes) else raw
        line = line[:-1] if line.endswith("\n") else line
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        if "\0" in line:
            raise ChangeSetInvalid(f"change set line {lineno}: contains a NUL byte")
        fields = line.split("\t")
        path = fields[0]
        if not path:
            raise ChangeSetInvalid(f"change set line {lineno}: empty path")
        key = norm(path)
        if len(fields) == 1:
            whole.add(key)
        elif len(fields) == 3:
            off = _number(fields[1], "offset", lineno)
            length = _number(fields[2], "length", lineno)
            if length == 0:
                raise ChangeSetInvalid(f"change set line {lineno}: length 0 (name the path alone for a whole-file change)")
            out.ranges.setdefault(key, FileRanges()).ranges.append((off, length))
        elif len(fields) == 4 and fields[1] == "baseline":
            base = (_number(fields[2], "baseline size", lineno), _number(fields[3], "baseline mtime_ns", lineno))
            fr = out.ranges.setdefault(key, FileRanges())
            if fr.baseline is not None and fr.baseline != base:
                raise ChangeSetInvalid(f"change set line {lineno}: a second, different baseline for {path}")
            fr.baseline = base
        else:
            raise ChangeSetInvalid(f"change set line {lineno}: expected PATH, PATH<TAB>OFFSET<TAB>LENGTH or "
                                   f"PATH<TAB>baseline<TAB>SIZE<TAB>MTIME_NS, got {len(fields)} fields")
        if key not in seen:
            seen.add(key)
            out.paths.append(key)
    for key in whole:
        out.ranges.pop(key, None)
    for key, fr in out.ranges.items():
        fr.ranges = merge_ranges(fr.ranges)
    return out


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping and touching ranges joined."""
    merged: list[list[int]] = []
    for off, n in sorted(ranges):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + n - merged[-1][0])
        else:
            merged.append([off, n])
    return [(o, n) for o, n in merged]
