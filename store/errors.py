"""One exception hierarchy for the store, each class with its exit code.

The CLI maps every `StoreError` to a one-line message and `exit_code`, so a
user never sees a traceback for a condition we anticipated (like borg's
`Error` classes and its return-codes test).
"""
from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:  # a one-line message, always
        return " ".join(str(a) for a in self.args) or self.__class__.__doc__.strip().splitlines()[0]


class RepositoryNotFound(StoreError):
    """No repository at this path (run `pit init` first)."""

    exit_code = 10


class RepositoryExists(StoreError):
    """A repository (or other data) already exists at this path."""

    exit_code = 11


class FormatVersionError(StoreError):
    """The repository format is not one this version of pit can read."""

    exit_code = 12


class IndexMissing(StoreError):
    """The LMDB index is missing or unreadable; run `pit repair` to rebuild it from the packs."""

    exit_code = 13


class RepositoryLocked(StoreError):
    """Another process holds the repository's writer lock."""

    exit_code = 14


class SnapshotNotFound(StoreError):
    """No snapshot matches."""

    exit_code = 15


class AmbiguousSnapshot(StoreError):
    """More than one snapshot matches; give more of the id or SET@NAME."""

    exit_code = 16


class PathNotFound(StoreError):
    """The path is not in the snapshot."""

    exit_code = 17


class SourceMissing(StoreError):
    """A source path to snapshot does not exist or cannot be read."""

    exit_code = 18


class DiskFull(StoreError):
    """No space left on the device; the operation was abandoned and nothing committed was harmed."""

    exit_code = 19


class IntegrityError(StoreError):
    """Stored data does not match its id or its checksum."""

    exit_code = 20


class BlobMissing(IntegrityError):
    """A blob the index or a tree refers to cannot be found."""

    exit_code = 21


class InvalidArgument(StoreError):
    """A value given to the store is not acceptable."""

    exit_code = 22


class UnsafePath(InvalidArgument):
    """A path is absolute, contains `..`, NUL, or would leave the target."""

    exit_code = 23


class ChunkerUnavailable(StoreError):
    """The compiled FastCDC implementation is not installed."""

    exit_code = 24


class PinRefused(StoreError):
    """Pinning this snapshot would leave no room under the set's cap."""

    exit_code = 25


class DamageFound(StoreError):
    """Verification found damage (see the report)."""

    exit_code = 3
