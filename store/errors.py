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


class IndexDamaged(IndexMissing):
    """The LMDB index is damaged (truncated, or pages overwritten); run `pit repair` to rebuild it from the packs."""

    exit_code = 26


class PermissionDenied(StoreError):
    """Permission denied on a repository file (not damage: fix its owner or mode, `pit repair` would not help)."""

    exit_code = 27


class ReadOnlyRepository(StoreError):
    """The repository is on a read-only file system: only reading commands (and `pit verify`) work there."""

    exit_code = 28


class RestoreVerifyFailed(StoreError):
    """`pit restore --verify`: a restored file read back differently from the snapshot."""

    exit_code = 29


class ChangeSetInvalid(InvalidArgument):
    """A line of a change set (`pit snapshot --changes FILE`) is malformed; nothing was done."""

    exit_code = 66


class CaptureError(InvalidArgument):
    """The change capture cannot be set up as asked (its clone directory is unusable)."""

    exit_code = 67


class ShortRead(StoreError):
    """A file gave fewer bytes than its size said: it shrank while read."""

    exit_code = 68


class KeyRequired(StoreError):
    """The repository is encrypted: give its passphrase (PIT_PASSWORD, --password-file) or key file (--key-file, PIT_KEY_FILE)."""

    exit_code = 33


class WrongKey(StoreError):
    """The passphrase or key file given opens none of the repository's key slots."""

    exit_code = 34


class KeySlotRefused(StoreError):
    """The key slot change was refused (the last slot, or the slot in use)."""

    exit_code = 35


class BackendError(StoreError):
    """The object store holding the packs failed a request (see the message); nothing committed was harmed."""

    exit_code = 36


class BackendUnreachable(BackendError):
    """The object store's endpoint cannot be reached (connection refused, timed out, or cut)."""

    exit_code = 37


class BackendAuthDenied(BackendError):
    """The object store refused our credentials (or found none): check AWS_ACCESS_KEY_ID / AWS_PROFILE."""

    exit_code = 38


class BackendBucketMissing(BackendError):
    """The bucket named by the repository's backend does not exist."""

    exit_code = 39


# LMDB's codes for a damaged environment (MDB_CORRUPTED, MDB_PAGE_NOTFOUND,
# MDB_INVALID, ...), by py-lmdb class name: a damaged index, which the
# packs can rebuild. Other LMDB errors are not damage.
_LMDB_DAMAGE = ("CorruptedError", "PageNotFoundError", "BadRslotError", "InvalidError", "VersionMismatchError",
                "PanicError", "IncompatibleError", "BadTxnError")


def translate(exc: BaseException, path: str | None = None) -> StoreError | None:
    """The typed error for a foreign exception we anticipate (an LMDB error
    from a damaged index, a permission or read-only-file-system error), or
    None. `path` names the file or directory involved when the exception
    does not."""
    import errno

    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, OSError):
        where = exc.filename or path
        suffix = f": {where}" if where else ""
        if exc.errno == errno.ENOSPC:
            return DiskFull()
        if exc.errno in (errno.EACCES, errno.EPERM):
            return PermissionDenied(f"permission denied{suffix} (fix its owner or mode; this is not damage)")
        if exc.errno == errno.EROFS:
            return ReadOnlyRepository(f"read-only file system{suffix}: only reading commands (and `pit verify`, "
                                      f"which then records nothing) work there")
        return None
    try:
        import lmdb
    except ImportError:  # pragma: no cover - lmdb is a dependency
        return None
    if not isinstance(exc, lmdb.Error):
        return None
    where = f" at {path}" if path else ""
    text = str(exc)
    if type(exc).__name__ in _LMDB_DAMAGE:
        return IndexDamaged(f"the index{where} is damaged ({text}); run `pit repair` to rebuild it from the packs")
    if isinstance(exc, lmdb.MapFullError):
        return DiskFull("the index is full")
    if "Permission denied" in text:
        return PermissionDenied(f"permission denied on the index{where or ' ' + text.split(':')[0]} "
                                f"(fix its owner or mode; this is not damage)")
    if "Read-only file system" in text:
        return ReadOnlyRepository(f"read-only file system{where}: only reading commands (and `pit verify`, which "
                                  f"then records nothing) work there")
    if "No space left" in text:
        return DiskFull(f"no space left on device ({text})")
    return None
