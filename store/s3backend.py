"""Packs in an S3-compatible bucket: the `PackBackend` protocol over boto3.

Objects cannot be appended to, so the open pack is written to a staging
directory in the repository (`staging/`, laid out like `packs/`) exactly as
the local backend writes `packs/`. When the pack layer seals a pack, the
staged file is fsynced, uploaded once (one PutObject with Content-MD5, or a
multipart upload for big packs) and the upload is checked (size, and the
MD5 ETag or our SHA-256 metadata or a ranged re-read). Only then may an index
commit name it: the writer seals its open pack before every commit
(`seal_on_commit`), so everything a committed index names is in the bucket.
The staged copy is dropped after that commit (`after_commit`); until then it
marks the upload as possibly uncommitted, which is how the next writer finds
leftovers of a crash without listing the bucket (`list_uncommitted`). A
committed pack still staged (a crash between the commit and the drop) is
checked against the bucket and uploaded if needed at the next open
(`reconcile`).

Reads of sealed packs are ranged GETs through a size-capped block cache
(`s3cache.py`). Nothing here relies on conditional writes: where the server
honours `If-None-Match: *` it guards every upload against overwriting a pack
another repository directory wrote; elsewhere a HEAD before the upload does
the same check (without the atomicity).

Requests (by operation, retries included) and bytes moved are counted in
`stats`, so maintenance can report what it cost.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .backend import LocalBackend
from .errors import (
    BackendAuthDenied, BackendBucketMissing, BackendError, BackendUnreachable, BlobMissing, InvalidArgument,
    StoreError,
)
from .s3cache import DEFAULT_CACHE_BYTES, BlockCache

log = logging.getLogger("pitstore.s3")

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # the default pack (32 MiB) goes in one PutObject
MULTIPART_PART = 16 * 1024 * 1024
UPLOAD_ATTEMPTS = 4  # our retries of a whole upload, on top of botocore's per request
GET_ATTEMPTS = 3  # a body cut mid-stream is not retried by botocore
READAHEAD_BLOCKS = 8  # a sequential reader (repair, compaction) gets this many blocks per GET
BYPASS_BLOCKS = 4  # reads longer than this many blocks (verify's spans) skip the cache
HOT_BLOCKS = 16  # the last blocks fetched, kept in memory too
UPLOADERS = 2  # sealed packs uploading at once while the writer fills the next
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class S3Location:
    """Where a repository's packs live, as its config records it (never a secret)."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES

    @classmethod
    def parse(cls, url: str, endpoint: str | None = None, region: str | None = None,
              profile: str | None = None, cache_bytes: int | None = None) -> "S3Location":
        if not url.startswith("s3://"):
            raise InvalidArgument(f"backend {url!r} is not an s3://BUCKET/PREFIX URL")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidArgument(f"backend {url!r} names no bucket (s3://BUCKET/PREFIX)")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise InvalidArgument(f"{bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise InvalidArgument(f"backend prefix {prefix!r} has an empty, . or .. part")
        if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
            raise InvalidArgument(f"--s3-endpoint {endpoint!r} is not an http:// or https:// URL")
        if cache_bytes is not None and cache_bytes < 0:
            raise InvalidArgument("the cache size cannot be negative")
        return cls(bucket, prefix, endpoint, region, profile,
                   DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def to_config(self) -> dict:
        return {"type": "s3", "url": self.url, "endpoint": self.endpoint, "region": self.region,
                "profile": self.profile, "cache_bytes": self.cache_bytes}

    @classmethod
    def from_config(cls, d: dict) -> "S3Location":
        if d.get("type") != "s3":
            raise InvalidArgument(f"unknown backend type {d.get('type')!r} in the repository config")
        return cls.parse(d["url"], d.get("endpoint"), d.get("region"), d.get("profile"), d.get("cache_bytes"))

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def pack_key(self, name: str) -> str:
        return self.key(f"packs/{name.split('.')[0][-2:]}/{name}")


@dataclass
class BackendStats:
    """What this process asked of the object store (retries count as requests)."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def copy(self) -> "BackendStats":
        return BackendStats(dict(self.requests), self.bytes_up, self.bytes_down)

    def since(self, before: "BackendStats") -> dict:
        req = {k: v - before.requests.get(k, 0) for k, v in self.requests.items()
               if v - before.requests.get(k, 0)}
        return {"requests": req, "requests_total": sum(req.values()),
                "bytes_up": self.bytes_up - before.bytes_up, "bytes_down": self.bytes_down - before.bytes_down}


class _UploadMismatch(Exception):
    """The object read back differs from what we sent: upload again."""


def _client_error_code(exc) -> tuple[str, int | None]:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")), resp.get("ResponseMetadata", {}).get("HTTPStatusCode")


def translate(exc: BaseException, loc: S3Location, what: str) -> StoreError:
    """A botocore exception as one of our typed, one-line errors."""
    from botocore import exceptions as bx

    if isinstance(exc, StoreError):
        return exc
    where = loc.endpoint or os.environ.get("PIT_S3_ENDPOINT") or "the default AWS endpoint"
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.ProfileNotFound)):
        return BackendAuthDenied(f"no usable credentials for {loc.url} while {what}: {exc} (set AWS_ACCESS_KEY_ID "
                                 f"and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                        bx.ConnectionClosedError, bx.HTTPClientError, bx.ResponseStreamingError,
                        bx.IncompleteReadError, ConnectionError, TimeoutError)):
        return BackendUnreachable(f"cannot reach the object store at {where} while {what}: {exc}")
    if isinstance(exc, bx.ClientError):
        code, status = _client_error_code(exc)
        if code == "NoSuchBucket" or (code == "404" and "bucket" in what):
            return BackendBucketMissing(f"bucket {loc.bucket!r} does not exist at {where} ({what})")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
                                     "403"):
            return BackendAuthDenied(f"the object store at {where} denied access to {loc.url} while {what} ({code}): "
                                     f"check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE)")
        return BackendError(f"the object store at {where} answered {code or status} while {what} on {loc.url}")
    if isinstance(exc, bx.BotoCoreError):
        return BackendError(f"object store request failed while {what} on {loc.url}: {exc}")
    return BackendError(f"object store request failed while {what} on {loc.url}: {type(exc).__name__}: {exc}")


def _transient(exc: BaseException) -> bool:
    """Worth another try of the whole operation (botocore already retried each request)."""
    from botocore import exceptions as bx

    if isinstance(exc, (_UploadMismatch, bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                        bx.ConnectionClosedError, bx.HTTPClientError, bx.ResponseStreamingError,
                        bx.IncompleteReadError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, bx.ClientError):
        code, status = _client_error_code(exc)
        return (status or 0) >= 500 or code in ("RequestTimeout", "SlowDown", "InternalError", "BadDigest")
    try:
        from boto3.exceptions import S3UploadFailedError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(exc, S3UploadFailedError)


def _backoff(attempt: int) -> None:
    time.sleep(min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2))


def make_client(loc: S3Location):
    """A client for `loc`: credentials from boto3's chain (environment, AWS_PROFILE
    or the config's profile, ~/.aws, instance roles), never from our config.
    PIT_S3_MAX_ATTEMPTS sets botocore's attempts per request (default 5)."""
    import boto3
    from botocore.config import Config

    max_attempts = int(os.environ.get("PIT_S3_MAX_ATTEMPTS") or 5)

    endpoint = os.environ.get("PIT_S3_ENDPOINT") or loc.endpoint
    try:
        session = boto3.session.Session(profile_name=loc.profile) if loc.profile else boto3.session.Session()
    except Exception as exc:  # ProfileNotFound
        raise translate(exc, loc, "loading the AWS profile") from None
    cfg = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=5, read_timeout=60, max_pool_connections=16,
        # Path-style URLs for a named endpoint: S3-compatible servers (MinIO, rclone, Ceph) serve those.
        s3={"addressing_style": "path" if endpoint else "auto"},
        # Checksums only where S3 requires them: many S3-compatible servers reject the
        # aws-chunked trailers newer botocore sends by default. We check uploads ourselves.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=endpoint, region_name=loc.region, config=cfg)


class _StagedAppend:
    """The open pack, written locally; sealing it uploads it."""

    def __init__(self, backend: "S3Backend", name: str, inner) -> None:
        self.backend, self.name, self.inner = backend, name, inner

    def write(self, data: bytes) -> int:
        return self.inner.write(data)

    def write_parts(self, parts: list[bytes]) -> int:
        return self.inner.write_parts(parts)

    def copy_from(self, src_fd: int, src_off: int, n: int) -> int:
        return self.inner.copy_from(src_fd, src_off, n)

    def tell(self) -> int:
        return self.inner.tell()

    def sync(self) -> None:
        self.inner.sync()

    def seal(self) -> None:
        """The footer is written: make the staged file durable, then upload and check it (in the
        background: the writer goes on with the next pack, and waits for it before its commit)."""
        self.inner.sync()
        self.backend.upload_soon(self.name)

    def close(self) -> None:
        self.inner.close()


class S3Backend:
    """Sealed packs in a bucket, the open pack and a read cache in the repository directory."""

    seal_on_commit = True  # a committed index names only packs that are in the bucket

    def __init__(self, repo_path: str, loc: S3Location, cache_bytes: int | None = None) -> None:
        self.repo_path = repo_path
        self.loc = loc
        self.staging = LocalBackend(os.path.join(repo_path, "staging"))
        env_cap = os.environ.get("PIT_S3_CACHE_BYTES")
        cap = cache_bytes if cache_bytes is not None else int(env_cap) if env_cap else loc.cache_bytes
        self.cache = BlockCache(os.path.join(repo_path, "s3cache"), cap)
        self.stats = BackendStats()
        self._lock = threading.Lock()
        self._client = None
        self._sizes: dict[str, int] = {}
        self._uploaded: set[str] = set()  # staged and verified in the bucket; dropped after the next commit
        self._last_block: dict[str, int] = {}
        self._conditional: bool | None = None
        self._probe_lock = threading.Lock()  # two uploaders must not probe at once
        # Packs known not to be staged: a pack leaves staging for good once uploaded, and a name is
        # staged again only by create() here (an aborted number reused), so one stat per pack will do.
        self._not_staged: set[str] = set()
        # The blocks fetched last, in memory: a restore reads a pack's chunks in order, and a chunk
        # costs no file open when its block was just fetched.
        self._hot: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._pool = None  # uploads of sealed packs, overlapping the writer's next pack
        self._in_flight: dict[str, object] = {}  # pack name -> Future of its upload

    def __getstate__(self) -> dict:
        """Sent to verify's worker processes: they read each span once, so they
        read without the cache (it would only evict what restores need)."""
        return {"repo_path": self.repo_path, "loc": self.loc}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["repo_path"], state["loc"], cache_bytes=0)

    # ------------------------------------------------------------ plumbing
    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    c = make_client(self.loc)
                    c.meta.events.register("before-send.s3", self._count)
                    self._client = c
        return self._client

    def _count(self, **kwargs) -> None:
        op = kwargs.get("event_name", "").rsplit(".", 1)[-1] or "?"
        with self._lock:
            self.stats.requests[op] = self.stats.requests.get(op, 0) + 1

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            raise translate(exc, self.loc, what) from exc

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.loc.bucket, Key=key)
        except ClientError as exc:
            code, status = _client_error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _staged(self, name: str) -> bool:
        if name in self._not_staged:
            return False
        if os.path.exists(self.staging._path(name)):
            return True
        self._not_staged.add(name)
        return False

    # --------------------------------------------------- repository level
    def check_bucket(self) -> None:
        """Raise the typed error when the bucket cannot be used (before `pit init` creates anything)."""
        self._call("checking the bucket", self.client.head_bucket, Bucket=self.loc.bucket)

    def get_meta(self, rel: str) -> bytes | None:
        """A small file beside the packs (`config`, `keys/SLOT`), or None when the bucket has none."""
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key(rel))
            data = r["Body"].read()
        except ClientError as exc:
            code, status = _client_error_code(exc)
            if status == 404 or code in ("NoSuchKey", "404"):
                return None
            raise translate(exc, self.loc, f"reading the bucket's {rel}") from exc
        except Exception as exc:
            raise translate(exc, self.loc, f"reading the bucket's {rel}") from exc
        self.stats.bytes_down += len(data)
        return data

    def put_meta(self, rel: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self._call(f"writing {rel} to the bucket", self.client.put_object, Bucket=self.loc.bucket,
                   Key=self.loc.key(rel), Body=data, ContentMD5=md5)
        self.stats.bytes_up += len(data)

    def delete_meta(self, rel: str) -> None:
        self._call(f"deleting {rel} from the bucket", self.client.delete_object, Bucket=self.loc.bucket,
                   Key=self.loc.key(rel))

    def list_meta(self, folder: str) -> list[str]:
        """The names of the small files in `folder` of the bucket's prefix (`keys`)."""
        out: list[str] = []
        base = self.loc.key(folder).rstrip("/") + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.loc.bucket, Prefix=base)
        try:
            for page in pages:
                out += [o["Key"][len(base):] for o in page.get("Contents", []) if "/" not in o["Key"][len(base):]]
        except Exception as exc:
            raise translate(exc, self.loc, f"listing {folder} in the bucket") from exc
        return sorted(out)

    def get_config(self) -> bytes | None:
        return self.get_meta("config")

    def put_config(self, data: bytes) -> None:
        self.put_meta("config", data)

    def delete_config(self) -> None:
        """Undo put_config (a `pit init` that failed after it)."""
        self.delete_meta("config")

    # -------------------------------------------------------- the protocol
    def create(self, name: str) -> _StagedAppend:
        self._forget(name)
        self.cache.drop_pack(name)
        self._sizes.pop(name, None)
        self._last_block.pop(name, None)
        return _StagedAppend(self, name, self.staging.create(name))

    def open_append(self, name: str, truncate_to: int) -> _StagedAppend:
        """An unsealed pack is always staged (it was never uploaded)."""
        self._forget(name)
        return _StagedAppend(self, name, self.staging.open_append(name, truncate_to))

    def truncate(self, name: str, size: int) -> None:
        try:
            self._wait(name)
        except Exception:
            pass
        if name in self._uploaded:  # sealed and uploaded by a session that then aborted: not a pack any more
            self._delete_remote(name)
        self.staging.truncate(name, size)

    def read(self, name: str, offset: int, length: int) -> bytes:
        if self._staged(name):
            try:
                return self.staging.read(name, offset, length)
            except BlobMissing:
                pass  # uploaded and dropped meanwhile: read it from the bucket
        return self._read_remote(name, offset, length)

    def will_need(self, name: str, offset: int, length: int) -> None:
        """No prefetch: a hint that costs a request per object would cost more than it saves."""

    def size(self, name: str) -> int:
        if self._staged(name):
            try:
                return self.staging.size(name)
            except BlobMissing:
                pass
        n = self._sizes.get(name)
        if n is None:
            h = self._call(f"looking up pack {name}", self._head, self.loc.pack_key(name))
            if h is None:
                raise BlobMissing(f"pack {name} is missing from {self.loc.url}")
            n = self._sizes[name] = int(h["ContentLength"])
        return n

    def delete(self, name: str) -> None:
        """The bucket's copy first: if that fails the staged copy stays, and
        the next writer's leftover cleanup tries again. An upload of it still
        running is waited for (whatever its outcome), so it cannot land after the delete."""
        try:
            self._wait(name)
        except Exception:
            pass
        self._delete_remote(name)
        self.staging.delete(name)

    def _delete_remote(self, name: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.loc.bucket, Key=self.loc.pack_key(name))
        except ClientError as exc:
            code, status = _client_error_code(exc)
            if not (status == 404 or code in ("NoSuchKey", "404")):  # gone already is what we wanted
                raise translate(exc, self.loc, f"deleting pack {name}") from exc
        except Exception as exc:
            raise translate(exc, self.loc, f"deleting pack {name}") from exc
        self._uploaded.discard(name)
        self._sizes.pop(name, None)
        self._last_block.pop(name, None)
        self._forget(name)
        self.cache.drop_pack(name)

    def _forget(self, name: str) -> None:
        self._not_staged.discard(name)
        with self._lock:
            for key in [k for k in self._hot if k[0] == name]:
                del self._hot[key]

    def _hot_get(self, name: str, blk: int, lo: int, hi: int) -> bytes | None:
        with self._lock:
            data = self._hot.get((name, blk))
            if data is not None:
                self._hot.move_to_end((name, blk))
        return None if data is None else data[lo:hi]

    def _hot_put(self, name: str, blk: int, data: bytes) -> None:
        with self._lock:
            self._hot[(name, blk)] = data
            while len(self._hot) > HOT_BLOCKS:
                self._hot.popitem(last=False)

    def list(self):
        names = set(self.staging.list())
        pager = self.client.get_paginator("list_objects_v2")
        try:
            for page in pager.paginate(Bucket=self.loc.bucket, Prefix=self.loc.key("packs/")):
                for obj in page.get("Contents", []):
                    base = obj["Key"].rsplit("/", 1)[-1]
                    if base.endswith(".pack"):
                        names.add(base)
                        self._sizes.setdefault(base, int(obj["Size"]))
        except Exception as exc:
            raise translate(exc, self.loc, "listing the packs") from exc
        return iter(sorted(names))

    def list_uncommitted(self):
        """Packs a crashed or aborted session may have left: only staged ones,
        since a pack leaves staging only after the commit that names it."""
        return self.staging.list()

    def upload_soon(self, name: str) -> None:
        """Start uploading a sealed staged pack in the background (at most UPLOADERS at once, so a
        writer never has more than that many packs' bytes in flight). An earlier upload's failure
        is raised here, so a snapshot stops at the first one rather than at its commit."""
        self._raise_failed()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=UPLOADERS, thread_name_prefix="pit-upload")
        while len(self._in_flight) >= UPLOADERS:  # back-pressure: the writer waits for the oldest
            self._wait(next(iter(self._in_flight)))
        self._in_flight[name] = self._pool.submit(self.upload, name)

    def _wait(self, name: str) -> None:
        fut = self._in_flight.get(name)
        if fut is None:
            return
        try:
            fut.result()
        finally:
            self._in_flight.pop(name, None)

    def _raise_failed(self) -> None:
        for name, fut in list(self._in_flight.items()):
            if fut.done():
                self._wait(name)

    def before_commit(self) -> None:
        """Every pack sealed in this session is in the bucket and checked, or this raises (and the
        session aborts): a commit never names a pack that is not there."""
        for name in list(self._in_flight):
            self._wait(name)

    def after_commit(self) -> None:
        """The index now names the packs uploaded in this session: their staged copies can go."""
        for name in sorted(self._uploaded):
            self.staging.delete(name)
        self._uploaded.clear()

    def reconcile(self, next_pack: int) -> int:
        """Staged packs a committed index names (numbered below `next_pack`):
        make sure each is in the bucket, then drop the staged copy. Returns
        how many were handled. Unsealed ones stay: they are an open pack."""
        from . import packs as P

        done = 0
        for name in list(self.staging.list()):
            if P.pack_number(name) >= next_pack:
                continue  # a writer's session in progress, or a crash's leftover: the writer cleans those
            try:
                size = self.staging.size(name)
                footer = P.read_footer(lambda o, n, name=name: self.staging.read(name, o, n), size)
            except BlobMissing:
                continue
            if footer is None:
                continue
            self.upload(name)
            self.staging.delete(name)
            self._uploaded.discard(name)
            done += 1
        return done

    def close(self) -> None:
        """Uploads still running belong to a session that did not commit (commit waits for them):
        they are waited for, not cancelled half-way, and their packs are cleaned up as leftovers."""
        for name in list(self._in_flight):
            try:
                self._wait(name)
            except Exception:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.staging.close()

    # -------------------------------------------------------------- reads
    def _get_range(self, name: str, offset: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        key = self.loc.pack_key(name)
        last_exc: BaseException | None = None
        for attempt in range(GET_ATTEMPTS):
            try:
                r = self.client.get_object(Bucket=self.loc.bucket, Key=key,
                                           Range=f"bytes={offset}-{offset + length - 1}")
                data = r["Body"].read()
                if "ContentRange" not in r and len(data) > length:  # a server that ignored Range
                    data = data[offset:offset + length]
                with self._lock:
                    self.stats.bytes_down += len(data)
                return data
            except ClientError as exc:
                code, status = _client_error_code(exc)
                if status == 404 or code in ("NoSuchKey", "404"):
                    raise BlobMissing(f"pack {name} is missing from {self.loc.url}") from None
                if status == 416 or code == "InvalidRange":
                    raise BlobMissing(f"pack {name} is truncated: wanted {length} bytes at {offset}") from None
                if not _transient(exc):
                    raise translate(exc, self.loc, f"reading pack {name}") from exc
                last_exc = exc
            except Exception as exc:
                if not _transient(exc):
                    raise translate(exc, self.loc, f"reading pack {name}") from exc
                last_exc = exc
            if attempt + 1 < GET_ATTEMPTS:
                _backoff(attempt)
        raise translate(last_exc, self.loc, f"reading pack {name}")

    def _read_remote(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        bs = self.cache.block
        if not self.cache.enabled or length > BYPASS_BLOCKS * bs:
            data = self._get_range(name, offset, length)
        else:
            first, last = offset // bs, (offset + length - 1) // bs
            end_off = offset + length
            parts: list[bytes] = []
            b = first
            while b <= last:
                lo = max(offset, b * bs) - b * bs  # the part of block b this read wants
                hi = min(end_off, (b + 1) * bs) - b * bs
                got = self._hot_get(name, b, lo, hi)
                if got is None:
                    got = self.cache.get(name, b, lo, hi - lo)
                if got is not None and (len(got) == hi - lo or b == last):
                    parts.append(got)
                    if len(got) < hi - lo:
                        break  # the pack ends inside this block: truncated
                    b += 1
                    continue
                end = b
                while end < last and not self.cache.has(name, end + 1):
                    end += 1
                if self._last_block.get(name) == b - 1:  # reading on from the last fetch: read ahead
                    end = max(end, b + READAHEAD_BLOCKS - 1)
                fetched = self._get_range(name, b * bs, (end - b + 1) * bs)  # short at the pack's end
                for i in range(b, end + 1):
                    piece = fetched[(i - b) * bs:(i - b + 1) * bs]
                    if not piece:
                        break
                    self.cache.put(name, i, piece)
                    self._hot_put(name, i, piece)
                    if i <= last:
                        lo = max(offset, i * bs) - i * bs
                        hi = min(end_off, (i + 1) * bs) - i * bs
                        parts.append(piece[lo:hi])
                self._last_block[name] = end
                if len(fetched) < (min(end, last) - b + 1) * bs and end_off > b * bs + len(fetched):
                    break  # the pack ended before the range did
                b = end + 1
            data = b"".join(parts)
        if len(data) != length:
            raise BlobMissing(f"pack {name} is truncated: wanted {length} bytes at {offset}, got {len(data)}")
        return data

    # ------------------------------------------------------------ uploads
    def _conditional_writes(self) -> bool:
        """Whether the server honours `If-None-Match: *` on PutObject, probed
        once and remembered in the staging directory (a server that ignores
        the header would make the guard a false comfort)."""
        if self._conditional is not None:
            return self._conditional
        with self._probe_lock:
            if self._conditional is None:
                self._conditional = self._probe_conditional_writes()
        return self._conditional

    def _probe_conditional_writes(self) -> bool:
        marker = os.path.join(self.staging.root, ".conditional-writes")
        try:
            with open(marker) as f:
                return f.read().strip() == "yes"
        except OSError:
            pass
        from botocore.exceptions import ClientError

        key = self.loc.key(f"probe-{os.getpid()}-{random.getrandbits(48):012x}")
        ok = False
        try:
            self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=b"probe", IfNoneMatch="*")
            try:
                self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=b"probe", IfNoneMatch="*")
            except ClientError as exc:
                code, status = _client_error_code(exc)
                ok = status == 412 or code == "PreconditionFailed"
        except ClientError:
            ok = False  # the header itself was refused
        except Exception as exc:
            raise translate(exc, self.loc, "probing the object store") from exc
        finally:
            try:
                self.client.delete_object(Bucket=self.loc.bucket, Key=key)
            except Exception:
                pass
        try:
            os.makedirs(self.staging.root, exist_ok=True)
            with open(marker, "w") as f:
                f.write("yes\n" if ok else "no\n")
        except OSError:
            pass
        return ok

    def upload(self, name: str) -> None:
        """Put a sealed staged pack into the bucket and check it arrived whole.
        Idempotent: a pack already there with the same bytes is left as it is."""
        path = self.staging._path(name)
        md5, sha = hashlib.md5(), hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while piece := f.read(8 << 20):
                    md5.update(piece)
                    sha.update(piece)
                size = f.tell()
        except FileNotFoundError:
            raise BlobMissing(f"staged pack {name} is missing") from None
        key = self.loc.pack_key(name)
        want = (size, md5.hexdigest(), sha.hexdigest())
        guard = self._conditional_writes()
        last_exc: BaseException | None = None
        bad_copy = False  # our last PUT did not read back right: that object is ours to replace
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                if bad_copy:
                    self.client.delete_object(Bucket=self.loc.bucket, Key=key)
                    bad_copy = False
                elif not guard or attempt > 0:
                    head = self._head(key)
                    if head is not None:
                        if self._matches(name, key, head, want, path):
                            break  # an earlier attempt (or process) put exactly these bytes
                        raise BackendError(
                            f"pack {name} already exists in {self.loc.url} with other content: is another "
                            f"repository directory writing to this bucket? (only one may; see docs/store.md)")
                self._put(name, key, path, want, guard)
                head = self._head(key)
                if head is None or not self._matches(name, key, head, want, path):
                    bad_copy = head is not None
                    raise _UploadMismatch(f"pack {name} read back differently after the upload")
                break
            except StoreError:
                raise
            except Exception as exc:
                code, status = _client_error_code(exc)
                if status == 412 or code == "PreconditionFailed":
                    last_exc = exc  # someone put this key first: the HEAD of the next attempt says whether it is ours
                elif not _transient(exc):
                    raise translate(exc, self.loc, f"uploading pack {name}") from exc
                else:
                    last_exc = exc
                log.warning("upload of pack %s failed (attempt %d of %d): %s", name, attempt + 1, UPLOAD_ATTEMPTS,
                            exc)
                if attempt + 1 < UPLOAD_ATTEMPTS:
                    _backoff(attempt)
        else:
            if isinstance(last_exc, _UploadMismatch):
                raise BackendError(f"pack {name} did not arrive intact in {self.loc.url} in {UPLOAD_ATTEMPTS} "
                                   f"uploads (each read back differently)")
            raise translate(last_exc, self.loc, f"uploading pack {name} ({UPLOAD_ATTEMPTS} attempts)")
        with self._lock:
            self._sizes[name] = size
            self._uploaded.add(name)

    def _put(self, name: str, key: str, path: str, want: tuple[int, str, str], guard: bool) -> None:
        size, md5, sha = want
        meta = {"sha256": sha}
        if size <= MULTIPART_THRESHOLD:
            with open(path, "rb") as f:
                body = f.read()
            kwargs = dict(Bucket=self.loc.bucket, Key=key, Body=body, Metadata=meta,
                          ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode())
            if guard:
                kwargs["IfNoneMatch"] = "*"
            self.client.put_object(**kwargs)
        else:
            from boto3.s3.transfer import TransferConfig

            cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_PART,
                                 max_concurrency=4)
            self.client.upload_file(path, self.loc.bucket, key, ExtraArgs={"Metadata": meta}, Config=cfg)
        with self._lock:
            self.stats.bytes_up += size

    def _matches(self, name: str, key: str, head: dict, want: tuple[int, str, str], path: str) -> bool:
        """Is the object at `key` the staged file? The size always; then the
        strongest proof the server gives: our SHA-256 metadata, an MD5 ETag
        (single-part uploads), else a re-read of the trailer and a random block."""
        size, md5, sha = want
        if int(head.get("ContentLength", -1)) != size:
            return False
        got_sha = (head.get("Metadata") or {}).get("sha256")
        if got_sha and got_sha != sha:
            return False
        etag = str(head.get("ETag", "")).strip('"').lower()
        if _MD5_ETAG.match(etag):
            return etag == md5
        spans = [(max(0, size - 65536), min(size, 65536))]
        if size > 65536:
            off = random.randrange(0, size - 65536)
            spans.append((off, 65536))
        with open(path, "rb") as f:
            for off, n in spans:
                f.seek(off)
                if self._get_range(name, off, n) != f.read(n):
                    return False
        return True
