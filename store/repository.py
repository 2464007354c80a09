"""The repository: a config file, packs behind a backend, and the LMDB index.

`Repository` is the blob floor: put and get blobs by id. Everything above
(files, trees, snapshots) is built from these two calls. Writing happens in a
`Writer` session that holds the repository's writer lock; any number of
readers in other processes may read at the same time (LMDB MVCC).

Crash-safety ordering of a commit (docs/format.md, "Write ordering"):
1. frames are appended to the open pack;
2. the pack is fsynced (and its directory, when the pack was created);
3. the LMDB transaction that references them commits (LMDB syncs it).
A crash before 3 leaves bytes past the committed pack size; the next writer
truncates them away. A crash after 3 has nothing to undo.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import blake3
import lmdb
import msgpack
import zstandard

from . import packs as P
from .backend import fsync_dir, sync_and_close
from .backends import open_backend
from .cache import LRU
from .chunker import DEFAULT_AVG, ChunkerParams
from .crypto import FrameCodec, PlainCodec
from .errors import (
    BlobMissing, DiskFull, FormatVersionError, IndexMissing, IntegrityError, InvalidArgument,
    RepositoryExists, RepositoryLocked, RepositoryNotFound, StoreError, translate,
)
from .index import REF, SEQ_AT, SEQ_LE, U64, BlobEntry, Index, PackEntry, next_seq_problem, pack_seqs, ref_of

if TYPE_CHECKING:
    from .keys import KeySource

FORMAT = "pitstore"
FORMAT_VERSION = 2  # 2: per-kind ids for trees and filelists, two-level chunk lists
ENCRYPTED_VERSION = 3  # 2 plus encryption at rest (docs/format.md, section 12): a pit that reads only 2 refuses it
VERSIONS = (FORMAT_VERSION, ENCRYPTED_VERSION)
DEFAULT_PACK_SIZE = 32 * 1024 * 1024
DEFAULT_LEVEL = 3
LOCK_FILE_BYTES = 256 * 1024  # > LMDB's lock table for 1024 readers (64 bytes each plus a header)


def blob_id(data: bytes | memoryview) -> bytes:
    """The id of a chunk (and of records): BLAKE3-256 of the plain bytes."""
    return blake3.blake3(data).digest()


_KIND_CONTEXT = {P.TREE: "pitstore 2026 tree v1", P.FILELIST: "pitstore 2026 filelist v1"}


def object_id(kind: int, data: bytes | memoryview) -> bytes:
    """The id of a tree or filelist: BLAKE3 in derive-key mode with a context
    per kind, so no file's bytes can ever share an id with a tree or a
    filelist (which would make the refcount of one count for the other)."""
    ctx = _KIND_CONTEXT.get(kind)
    if ctx is None:
        return blob_id(data)
    return blake3.blake3(data, derive_key_context=ctx).digest()


def read_config(path: str) -> dict:
    """The repository's config, checked for the format and a version this pit reads."""
    cfg_path = os.path.join(path, "config")
    try:
        with open(cfg_path, "rb") as f:
            cfg = json.loads(f.read())
    except FileNotFoundError:
        raise RepositoryNotFound(f"no repository at {path} (run `pit init`)") from None
    except (OSError, ValueError) as exc:
        raise RepositoryNotFound(f"{cfg_path} is not a readable repository config: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise FormatVersionError(f"{path} is not a pitstore repository")
    if cfg.get("version") not in VERSIONS:
        raise FormatVersionError(
            f"repository format version {cfg.get('version')} is not supported "
            f"(this pit reads versions {', '.join(map(str, VERSIONS))})"
        )
    if (cfg.get("version") == ENCRYPTED_VERSION) != ("encryption" in cfg):
        raise FormatVersionError(f"{path}: format version {cfg.get('version')} and the `encryption` field disagree")
    return cfg


def open_codec(path: str, cfg: dict, keys: "KeySource | None") -> tuple[FrameCodec, str | None]:
    """The frame codec of a repository, unlocking its master key when it is
    encrypted; -> (codec, id of the key slot that opened it, or None)."""
    if cfg.get("version") != ENCRYPTED_VERSION:
        return PlainCodec(), None
    from .crypto import EncryptionConfig, SealedCodec
    from .keys import KeySource, unlock

    enc = EncryptionConfig.from_dict(cfg["encryption"])
    master, slot = unlock(path, cfg["id"], keys if keys is not None and keys.given() else KeySource.from_env())
    return SealedCodec(enc.aead, master), slot


def mirror_keys(path: str, backend) -> None:
    """The key slots beside the config, copied into the bucket (and those removed here removed there), so
    that a directory attached to the bucket (`pit init --attach`) can open the repository. Nothing to do for
    packs on a local file system: the slots are already beside them."""
    from .keys import KEYS_DIR, list_slots

    if not hasattr(backend, "put_meta"):
        return
    here = {s.id for s in list_slots(path)}
    for sid in sorted(here):
        with open(os.path.join(path, KEYS_DIR, sid), "rb") as f:
            backend.put_meta(f"{KEYS_DIR}/{sid}", f.read())
    for sid in backend.list_meta(KEYS_DIR):
        if sid not in here:
            backend.delete_meta(f"{KEYS_DIR}/{sid}")


def fetch_keys(path: str, backend) -> int:
    """The bucket's key slots into `path/keys` (attaching a directory to a bucket) -> how many."""
    from .keys import KEYS_DIR

    d = os.path.join(path, KEYS_DIR)
    os.makedirs(d, exist_ok=True)
    n = 0
    for sid in backend.list_meta(KEYS_DIR):
        data = backend.get_meta(f"{KEYS_DIR}/{sid}")
        if data is None or "/" in sid or sid.startswith("."):
            continue
        _atomic_write(os.path.join(d, sid), data)
        n += 1
    fsync_dir(path)
    return n


def _init_keys(path: str, cfg: dict, keys: "KeySource", aead: str | None) -> None:
    """Make the master key and its first slots; mark the config encrypted."""
    import secrets

    from .crypto import MASTER_KEY_LEN, EncryptionConfig, default_aead
    from .keys import add_keyfile_slot, add_passphrase_slot, new_key_file, read_key_file

    master = secrets.token_bytes(MASTER_KEY_LEN)
    if keys.key_file is not None:
        key = read_key_file(keys.key_file) if os.path.exists(keys.key_file) else new_key_file(keys.key_file)
        add_keyfile_slot(path, cfg["id"], master, key)
    if keys.passphrase is not None:
        add_passphrase_slot(path, cfg["id"], master, keys.passphrase)
    cfg["version"] = ENCRYPTED_VERSION
    cfg["encryption"] = EncryptionConfig(aead or default_aead()).to_dict()


def _plain(dctx: zstandard.ZstdDecompressor, flags: int, payload, raw_len: int):
    if flags & P.ZSTD:
        try:
            return dctx.decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"cannot decompress: {exc}") from None
    return payload


def frame_data(codec: FrameCodec, dctx: zstandard.ZstdDecompressor, bid: bytes, buf, off: int, stored_len: int,
               verify: bool = True):
    """The plain bytes of blob `bid` from the frame at `off` in `buf` (its
    header and payload; the CRC is not read), checked: the header against the
    index (magic, stored id, length), the codec's seal, the length and, with
    `verify`, the content against its id. The one read path of every reader
    that goes through the index (Repository, the WebDAV body, verify). A
    stored (uncompressed) payload of a plain repository comes back as a
    slice of `buf`."""
    magic, kind, flags, _r, stored, raw_len, fid = P.FRAME_HEADER.unpack_from(buf, off)
    if magic != P.FRAME_MAGIC or stored != stored_len or fid != codec.stored_id(bid):
        raise IntegrityError("frame header does not match the index")
    start = off + P.FRAME_HEADER.size
    mv = memoryview(buf)
    _bid, payload = codec.open(mv[off:start], mv[start:start + stored], bid)
    data = _plain(dctx, flags, payload, raw_len)
    if len(data) != raw_len or (verify and object_id(kind, data) != bid):
        raise IntegrityError("content does not match its id")
    return data


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


class Repository:
    """An open repository. Cheap to open; safe to share between reader threads."""

    def __init__(self, path: str, readonly: bool = False, lock_wait: float = 10.0,
                 keys: "KeySource | None" = None) -> None:
        """`keys` says where an encrypted repository's key comes from
        (default: PIT_KEY_FILE, PIT_PASSWORD, PIT_PASSWORD_FILE); a plain
        repository ignores it."""
        self.path = os.path.abspath(path)
        self.readonly = readonly
        cfg = read_config(self.path)
        self.config = cfg
        self.id = cfg["id"]
        # The key first: a wrong one must fail before anything is opened.
        self.codec, self.key_slot = open_codec(self.path, cfg, keys)
        self.params = ChunkerParams.from_dict(cfg["chunker"])
        self.level = int(cfg["compression"]["level"])
        self.pack_size = int(cfg["pack_size"])
        self.backend = open_backend(self.path, cfg)
        self.index_dir = index_dir = os.path.join(self.path, "index")
        try:
            os.stat(os.path.join(index_dir, "data.mdb"))
        except FileNotFoundError:
            raise IndexMissing(f"the index of {self.path} is missing; run `pit repair` to rebuild it from the packs"
                               ) from None
        except OSError as exc:  # not "missing": say what it is (a permission problem is not repair's to fix)
            raise translate(exc, os.path.join(index_dir, "data.mdb")) or IndexMissing(
                f"cannot reach the index of {self.path}: {exc}") from None
        if readonly:
            self.index = Index(index_dir, readonly=True)
        else:
            # Opening the environment read-write takes an LMDB write transaction
            # (py-lmdb opens named databases in one), which would wait behind a
            # writer's long transaction. Every writer holds our lock for the
            # whole of its transaction, so holding the lock while opening makes
            # the wait bounded and the error clear.
            fd = _acquire_lock(os.path.join(self.path, "lock"), lock_wait)
            try:
                self.index = Index(index_dir)
            finally:
                _release_lock(fd)
        try:
            with self.index.read() as txn:
                fmt = txn.get(b"format", db=self.index.db["meta"])
                seq_problem = next_seq_problem(txn, self.index.db) if fmt is not None else None
        except lmdb.Error as exc:
            self.index.close()
            raise translate(exc, index_dir) or IndexMissing(
                f"cannot read the index of {self.path}: {exc}; run `pit repair`") from exc
        if fmt is None:
            raise IndexMissing(f"the index of {self.path} is empty; run `pit repair` to rebuild it from the packs")
        if seq_problem:
            raise IndexMissing(f"{self.path}: {seq_problem}; run `pit repair` to rebuild the index from the packs")
        if not readonly and hasattr(self.backend, "reconcile"):
            self._reconcile()
        # The write session open in this process, if any: reads through its
        # transaction must also see the blobs it has not flushed yet.
        self.active_writer: "Writer | None" = None
        self.chunk_cache: LRU[bytes] = LRU(64 * 1024 * 1024, len)
        self.object_cache: LRU[object] = LRU(8192)
        self._local = threading.local()  # a zstd context is not thread-safe: one per thread

    def _reconcile(self) -> None:
        """Upload what a crash left staged though committed (docs/format.md, section 9.6).
        A failure here only warns: the staged copy still serves reads, and the
        next open tries again."""
        import logging

        with self.index.read() as txn:
            nxt = U64.unpack(txn.get(b"next_pack", db=self.index.db["meta"]))[0]
        try:
            n = self.backend.reconcile(nxt)
        except StoreError as exc:
            logging.getLogger("pitstore").warning("committed packs are still only staged locally: %s", exc)
            return
        if n:
            logging.getLogger("pitstore").info("uploaded %d committed packs a crash had left staged", n)

    # ----------------------------------------------------------------- init
    @classmethod
    def init(cls, path: str, avg_chunk: int = DEFAULT_AVG, level: int = DEFAULT_LEVEL,
             pack_size: int = DEFAULT_PACK_SIZE, encrypt: bool = False, keys: "KeySource | None" = None,
             aead: str | None = None, backend: dict | None = None, attach: bool = False) -> "Repository | None":
        """A new, empty repository. With `encrypt`, a random master key is
        made and wrapped by a key slot for each of `keys.key_file` (created
        when it does not exist) and `keys.passphrase` (at least one). With
        `backend` (an S3 location's config, see s3backend.S3Location.to_config)
        its packs live in a bucket; the bucket is checked before anything is
        created, and the config and key slots are copied there. With `attach`
        the bucket already holds a repository: its config and key slots are
        fetched and the directory is made ready for `pit repair` to build the
        index from the bucket (returns None: there is no index to open yet)."""
        from .keys import KeySource

        path = os.path.abspath(path)
        if encrypt:
            keys = keys or KeySource.from_env()
            if keys.passphrase is None and keys.key_file is None:
                raise InvalidArgument("an encrypted repository needs a passphrase or a key file to open it")
        params = ChunkerParams.for_average(avg_chunk)
        if os.path.exists(os.path.join(path, "config")):
            raise RepositoryExists(f"a repository already exists at {path}")
        if os.path.isdir(path) and os.listdir(path):
            raise RepositoryExists(f"{path} exists and is not empty")
        if not 1 <= level <= 22:
            raise StoreError(f"zstd level must be 1..22, not {level}")
        if attach and not backend:
            raise StoreError("--attach needs --backend s3://BUCKET/PREFIX")
        remote = None
        if backend:
            remote = open_backend(path, {"backend": backend})
            remote.check_bucket()
            existing = remote.get_config()
            if attach:
                if existing is None:
                    raise RepositoryNotFound(f"no repository config in {backend['url']} to attach to")
                return cls._attach(path, existing, backend)
            if existing is not None:
                raise RepositoryExists(f"{backend['url']} already holds a repository; use --attach to use it "
                                       f"from this directory")
        existed = os.path.isdir(path)
        config_put = False
        try:
            os.makedirs(os.path.join(path, "staging" if backend else "packs"), exist_ok=True)
            os.makedirs(os.path.join(path, "index"), exist_ok=True)
            # LMDB memory-maps lock.mdb; on a full disk the first store into a
            # sparse page is a SIGBUS, not an error. Allocate its blocks first
            # so a full disk is an ENOSPC we can report.
            fd = os.open(os.path.join(path, "index", "lock.mdb"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
            finally:
                os.close(fd)
            cfg = {
                "format": FORMAT, "version": FORMAT_VERSION, "id": uuid.uuid4().hex,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "chunker": params.to_dict(),
                "compression": {"algorithm": "zstd", "level": level},
                "pack_size": pack_size, "hash": "blake3-256",
            }
            if encrypt:
                _init_keys(path, cfg, keys, aead)
            if backend:
                cfg["backend"] = backend
                if encrypt:  # before the config: a config in the bucket means its key slots are there too
                    mirror_keys(path, remote)
            idx = Index(os.path.join(path, "index"), create=True)
            with idx.write() as txn:
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=idx.db["meta"])
                txn.put(b"repo_id", cfg["id"].encode(), db=idx.db["meta"])
                txn.put(b"next_pack", U64.pack(1), db=idx.db["meta"])
                txn.put(b"next_seq", U64.pack(1), db=idx.db["meta"])
            idx.close()
            cfg_bytes = json.dumps(cfg, indent=2).encode() + b"\n"
            if remote is not None:  # the bucket's copy lets another directory attach (`pit init --attach`)
                remote.put_config(cfg_bytes)
                config_put = True
            # The config is written last: its presence means "a complete repository".
            _atomic_write(os.path.join(path, "config"), cfg_bytes)
        except (OSError, lmdb.Error, StoreError) as exc:
            # Leave nothing half-made: the next `pit init` must find the path (and the bucket) as it was.
            import shutil

            if config_put:
                try:
                    remote.delete_config()
                except StoreError:
                    pass
            if remote is not None and encrypt:
                try:
                    for sid in remote.list_meta("keys"):
                        remote.delete_meta(f"keys/{sid}")
                except StoreError:
                    pass

            if existed:
                for name in os.listdir(path):
                    p = os.path.join(path, name)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
            else:
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(exc, DiskFull):
                raise
            if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or _nearly_full(os.path.dirname(path)):
                raise DiskFull(f"no space left on device while creating {path}") from exc
            raise
        return cls(path, keys=keys)

    @classmethod
    def _attach(cls, path: str, raw: bytes, backend: dict) -> None:
        """Write the bucket's config (with the backend as given now: the
        endpoint may differ from the one the creator used) and nothing else."""
        try:
            cfg = json.loads(raw)
        except ValueError:
            raise FormatVersionError(f"the config in {backend['url']} is not JSON") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise FormatVersionError(f"{backend['url']} does not hold a pitstore repository")
        if cfg.get("version") not in VERSIONS:
            raise FormatVersionError(f"repository format version {cfg.get('version')} in {backend['url']} is not "
                                     f"supported (this pit reads versions {', '.join(map(str, VERSIONS))})")
        cfg["backend"] = backend
        os.makedirs(path, exist_ok=True)
        if "encryption" in cfg:
            fetch_keys(path, open_backend(path, cfg))
        _atomic_write(os.path.join(path, "config"), json.dumps(cfg, indent=2).encode() + b"\n")
        return None

    def close(self) -> None:
        self.backend.close()
        self.index.close()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- reads
    @contextmanager
    def reading(self) -> Iterator[lmdb.Transaction]:
        """A consistent read view: everything read inside sees one commit."""
        txn = self.index.read()
        try:
            yield txn
        finally:
            txn.abort()

    def blob_entry(self, txn: lmdb.Transaction, bid: bytes) -> BlobEntry | None:
        w = self.active_writer
        if w is not None and txn is w.txn:
            return w.entry(bid)
        raw = txn.get(bid, db=self.index.db["blobs"])
        return BlobEntry.decode(raw) if raw is not None else None

    def read_blob(self, txn: lmdb.Transaction, bid: bytes, verify: bool = True) -> bytes:
        """Plain bytes of a blob, checked against its id."""
        cached = self.chunk_cache.get(bid)
        if cached is not None:
            return cached
        e = self.blob_entry(txn, bid)
        if e is None:
            raise BlobMissing(f"blob {bid.hex()[:16]} is not in the index")
        w = self.active_writer
        data = w.read_entry(bid, e) if (w is not None and txn is w.txn) else self.read_entry(bid, e, verify)
        self.chunk_cache.put(bid, data)
        return data

    def read_entry(self, bid: bytes, e: BlobEntry, verify: bool = True) -> bytes:
        name = P.pack_name(e.pack)
        frame = self.backend.read(name, e.offset, P.FRAME_HEADER.size + e.stored_len)
        try:
            data = frame_data(self.codec, self.dctx(), bid, frame, 0, e.stored_len, verify)
        except IntegrityError as exc:
            raise IntegrityError(f"blob {bid.hex()[:16]} (pack {name} offset {e.offset}): {exc}") from None
        return data if isinstance(data, bytes) else bytes(data)

    def decode_frame(self, frame: bytes | memoryview, offset: int = 0) -> tuple[P.FrameInfo, bytes, bytes]:
        """A whole frame read without the index (repair, compaction, a deep
        check): its CRC checked, opened by the codec. -> (frame as stored,
        logical id, plain bytes checked against that id)."""
        info, stored = P.decode_frame(frame, offset)
        bid, payload = self.codec.open(frame, stored)
        data = _plain(self.dctx(), info.flags, payload, info.raw_len)
        if len(data) != info.raw_len or (object_id(info.kind, data) != bid and info.kind != P.TOMBSTONE):
            raise IntegrityError(f"frame at pack offset {offset}: content does not match its id")
        return info, bid, data if isinstance(data, bytes) else bytes(data)

    def dctx(self) -> zstandard.ZstdDecompressor:
        """This thread's decompressor (FUSE and WebDAV read on many threads)."""
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def meta(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        return txn.get(key, db=self.index.db["meta"])

    # --------------------------------------------------------------- writes
    def writer(self, lock_wait: float = 10.0) -> "Writer":
        if self.readonly:
            raise StoreError("internal error: this repository was opened read-only")
        return Writer(self, lock_wait)


class Writer:
    """One write session: the writer lock, one LMDB write transaction, the open pack.

    Use as a context manager: leaving normally commits, leaving by an
    exception aborts (and truncates whatever reached the pack).
    """

    def __init__(self, repo: Repository, lock_wait: float) -> None:
        self.repo = repo
        self.db = repo.index.db
        self._lock_fd = _acquire_lock(os.path.join(repo.path, "lock"), lock_wait)
        self._ended = False
        self._cctx = zstandard.ZstdCompressor(level=repo.level)
        try:
            self.txn = repo.index.write()
            self._txn_id = self.txn.id()
            self.pack: P.PackWriter | None = None
            self._pack_entry: PackEntry | None = None
            self._prior_end = 0  # frames before this offset were written by earlier sessions
            # What an abort must undo on disk: packs this session created, and
            # the committed size of the open pack it reopened.
            self._created_packs: list[str] = []
            self._reopened: tuple[str, int] | None = None
            # New blobs' index entries wait here until commit (or until there
            # are many): a chunk is written once with its final reference
            # count instead of put, read back and put again per reference.
            self._pending: dict[bytes, BlobEntry] = {}
            self._pending_refs: dict[bytes, int] = {}
            self._pending_seq: dict[int, bytes] = {}
            self._next_seq = U64.unpack(self.txn.get(b"next_seq", db=self.db["meta"]))[0]
            # Blobs a repair found referenced but lost (docs/format.md, `quarantine`):
            # looked up by id only while there are any, one stat per session.
            self._quarantined = self.txn.stat(self.db["quarantine"])["entries"] > 0
            self._zero_flushed: list[bytes] = []  # flushed early with refs 0: sweep them at commit
            self._syncer: ThreadPoolExecutor | None = None  # fsyncs of sealed packs (_sync_later)
            self._syncs: list[Future] = []
            self.stats = {"new_blobs": 0, "new_stored": 0, "new_raw": 0, "healed": 0}
            self._clean_leftover_packs()
            repo.active_writer = self
        except BaseException:
            _release_lock(self._lock_fd)
            raise

    # -- session lifecycle
    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, etype, exc, tb) -> None:
        if self._ended:
            return
        if etype is None:
            self.commit()
        else:
            self.abort()

    def _clean_leftover_packs(self) -> None:
        """Packs numbered at or past `next_pack` were never committed: a crash
        left them, and maybe snapshot workers' spool files."""
        nxt = U64.unpack(self.txn.get(b"next_pack", db=self.db["meta"]))[0]
        for name in list(self.repo.backend.list_uncommitted()):
            if P.pack_number(name) >= nxt:
                self.repo.backend.delete(name)
        clear_spool(self.repo.path)

    def _open_pack(self) -> P.PackWriter:
        if self.pack is not None:
            return self.pack
        meta = self.db["meta"]
        cur = self.txn.get(b"open_pack", db=meta)
        if cur is not None:
            num = U64.unpack(cur)[0]
            entry = PackEntry.decode(self.txn.get(cur, db=self.db["packs"]))
            handle = self.repo.backend.open_append(P.pack_name(num), entry.size)
            self.pack = P.PackWriter(P.pack_name(num), handle, [])
            self._prior_end = entry.size
            if self._reopened is None:
                self._reopened = (P.pack_name(num), entry.size)
        else:
            num = U64.unpack(self.txn.get(b"next_pack", db=meta))[0]
            self.txn.put(b"next_pack", U64.pack(num + 1), db=meta)
            self.txn.put(b"open_pack", U64.pack(num), db=meta)
            self._created_packs.append(P.pack_name(num))
            self.pack = P.PackWriter.create(self.repo.backend, P.pack_name(num))
            entry = PackEntry(size=P.PACK_HEADER.size, sealed=False, live=0, dead=0)
            self._prior_end = P.PACK_HEADER.size
        self._pack_num = num
        self._pack_entry = entry
        return self.pack

    def _seal_pack(self) -> None:
        """Write the footer (listing earlier sessions' frames too) and retire the pack."""
        assert self.pack is not None and self._pack_entry is not None
        earlier = [f for f in P.walk_frames(self._read_own, self._prior_end, resync=True)
                   if isinstance(f, P.FrameInfo)] if self._prior_end > P.PACK_HEADER.size else []
        self.pack.frames = earlier + self.pack.frames
        self.pack.seal(self._sync_later if hasattr(self.pack.handle, "sync_fd") else None)
        e = self._pack_entry
        e.size, e.sealed = self.pack.size, True
        self.txn.put(U64.pack(self._pack_num), e.encode(), db=self.db["packs"])
        self.txn.delete(b"open_pack", db=self.db["meta"])
        self.pack.close()
        self.pack = None
        self._pack_entry = None

    def _sync_later(self, handle) -> None:
        """Make a sealed local pack durable on a thread of its own: an fsync of 32 MiB took the
        snapshot's writing thread (its busiest) 60-100 ms per pack, ~20 times per GB, while the
        workers waited for it. `commit` waits for every one before the index names the packs."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pit-packsync")
        fd = handle.sync_fd()
        try:
            self._syncs.append(self._syncer.submit(sync_and_close, fd))
        except BaseException:
            os.close(fd)
            raise

    def _await_syncs(self) -> None:
        """Every pack sealed this session is durable (or its error is raised) once this returns."""
        syncs, self._syncs = self._syncs, []
        error: BaseException | None = None
        for f in syncs:
            try:
                f.result()
            except BaseException as exc:  # wait for all before raising: none may run on after an abort
                error = error or exc
        if error is not None:
            raise error

    def _read_own(self, off: int, n: int) -> bytes:
        self.pack.flush()
        return self.repo.backend.read(self.pack.name, off, n)

    # -- blobs
    # New entries held in memory (~350 bytes each, all at once in the main process at commit, beside the
    # transaction's dirty pages) before they go to the index with no references yet: 16k, not 50k, took
    # ~7 MiB off an initial snapshot's peak at no measurable cost (docs/benchmarks.md, issue 17 part 3).
    PENDING_MAX = 16_384

    def has(self, bid: bytes) -> bool:
        return bid in self._pending or self.txn.get(bid, db=self.db["blobs"]) is not None

    def entry(self, bid: bytes) -> BlobEntry | None:
        e = self._pending.get(bid)
        if e is not None:
            return e
        raw = self.txn.get(bid, db=self.db["blobs"])
        return BlobEntry.decode(raw) if raw is not None else None

    def put_entry(self, bid: bytes, e: BlobEntry) -> None:
        if bid in self._pending:
            self._pending[bid] = e
        else:
            self.txn.put(bid, e.encode(), db=self.db["blobs"])

    def drop_pending(self, bid: bytes) -> BlobEntry:
        """Forget a blob new in this session whose last reference went (its frame is garbage)."""
        e = self._pending.pop(bid)
        del self._pending_refs[bid]
        del self._pending_seq[e.seq]
        return e

    def _flush_pending(self) -> None:
        blobs, refs = self.db["blobs"], self.db["refs"]
        put = self.txn.put
        for bid, e in self._pending.items():
            n = self._pending_refs[bid]
            if n == 0:
                self._zero_flushed.append(bid)
            put(bid, e.encode(), db=blobs)
            if not put(U64.pack(e.seq), REF.pack(n, bid), db=refs, overwrite=False):
                raise IntegrityError(f"sequence number {e.seq} is already taken in the index; run `pit repair`")
        self._pending.clear()
        self._pending_refs.clear()
        self._pending_seq.clear()

    def compress(self, data: bytes | memoryview) -> tuple[int, bytes]:
        c = self._cctx.compress(data)
        if len(c) < len(data):
            return P.ZSTD, c
        return 0, bytes(data)

    def put(self, kind: int, bid: bytes, data: bytes | memoryview) -> bool:
        """Store plain `data` under `bid` unless present. True when it was new."""
        if self.has(bid):
            return False
        flags, payload = self.compress(data)
        self.put_stored(kind, bid, flags, payload, len(data))
        return True

    def put_stored(self, kind: int, bid: bytes, flags: int, payload: bytes, raw_len: int) -> None:
        """Append an already-compressed blob and index it. Caller has checked it is new."""
        num, info = self.append_frame(kind, flags, bid, payload, raw_len)
        self._index_new(bid, BlobEntry(kind, flags, num, info.offset, info.stored_len, raw_len, -1))

    def put_encoded(self, kind: int, bid: bytes, flags: int, frame: bytes, stored_len: int, raw_len: int) -> None:
        """Like put_stored, for a frame a worker already encoded with the repository's codec."""
        pack = self._open_pack()
        num = self._pack_num
        info = pack.append_encoded(frame, kind, flags, bytes(frame[16:48]), stored_len, raw_len)
        self._pack_entry.live += len(frame)
        if pack.size >= self.repo.pack_size:
            self._seal_pack()
        self._index_new(bid, BlobEntry(kind, flags, num, info.offset, stored_len, raw_len, -1))

    def put_spooled(self, kind: int, src_fd: int, src_off: int,
                    frames: list[tuple[bytes, int, bytes, int, int]]) -> None:
        """Like put_encoded for frames lying back to back in a file from
        `src_off` on (a snapshot worker's spool, store/segments.py): copied
        into the pack in the kernel, a pack's worth at a time. `frames`:
        (blob id, flags, id as stored, stored length, raw length) of each;
        the caller has checked that each is new."""
        at = 0
        while at < len(frames):
            pack = self._open_pack()
            room = self.repo.pack_size - pack.size
            end, take = at, 0
            while end < len(frames) and (end == at or take + P.FRAME_OVERHEAD + frames[end][3] <= room):
                take += P.FRAME_OVERHEAD + frames[end][3]
                end += 1
            run = frames[at:end]
            infos = pack.append_copied(src_fd, src_off, [(kind, fl, sid, st, raw) for _, fl, sid, st, raw in run])
            self._pack_entry.live += take
            num = self._pack_num
            if pack.size >= self.repo.pack_size:
                self._seal_pack()
            for (bid, fl, _sid, st, raw), info in zip(run, infos):
                self._index_new(bid, BlobEntry(kind, fl, num, info.offset, st, raw, -1))
            src_off += take
            at = end

    def _index_new(self, bid: bytes, e: BlobEntry) -> None:
        if not (self._quarantined and self._heal(bid, e)):
            e.seq = self._next_seq
            self._next_seq += 1
            self._pending[bid] = e
            self._pending_refs[bid] = 0
            self._pending_seq[e.seq] = bid
        if len(self._pending) >= self.PENDING_MAX:
            self._flush_pending()
        self.stats["new_blobs"] += 1
        self.stats["new_stored"] += e.stored_len
        self.stats["new_raw"] += e.raw_len

    def _heal(self, bid: bytes, e: BlobEntry) -> bool:
        """A blob stored again that a repair quarantined. With a reserved
        sequence number (it was referenced: its `refs` record holds the
        recounted count and the parents' `kids` name that number) it takes
        that number and its index record is written now, so the snapshots it
        broke are whole again; True. Its quarantine record goes either way.
        A tree or filelist healed here gets its `kids` record from `link`,
        like a new one: the repair could not read it, so it has none."""
        qdb = self.db["quarantine"]
        raw = self.txn.get(bid, db=qdb)
        if raw is None:
            return False
        self.txn.delete(bid, db=qdb)
        try:
            rec = msgpack.unpackb(raw)
            seq = rec.get("seq") if isinstance(rec, dict) else None
        except (ValueError, TypeError, msgpack.UnpackException):
            seq = None
        if type(seq) is not int or not 0 < seq < self._next_seq:
            return False  # a damaged frame nothing referenced: the blob is simply new
        ref = self.txn.get(U64.pack(seq), db=self.db["refs"])
        if ref is None or len(ref) != REF.size or ref[4:] != bid or self.txn.get(bid, db=self.db["blobs"]):
            return False  # not what repair left (verify names it): index the blob as new, under a new number
        e.seq = seq
        self.txn.put(bid, e.encode(), db=self.db["blobs"])
        self.stats["healed"] += 1
        return True

    def put_record(self, kind: int, bid: bytes, data: bytes) -> None:
        """Append a record frame (snapshot, tombstone) that the blob index does not hold."""
        flags, payload = self.compress(data)
        self.append_frame(kind, flags, bid, payload, len(data))

    def append_frame(self, kind: int, flags: int, bid: bytes, payload: bytes, raw_len: int
                     ) -> tuple[int, P.FrameInfo]:
        """Append one frame to the open pack, encoded by the repository's
        codec; returns (pack number, frame as stored). Seals a full pack."""
        frame = self.repo.codec.encode(kind, flags, bid, payload, raw_len)
        return self.append_stored_frame(frame, kind, flags, raw_len)

    def append_stored_frame(self, frame: bytes, kind: int, flags: int, raw_len: int) -> tuple[int, P.FrameInfo]:
        """Append a frame's bytes as they are (compaction copies frames
        without opening them: a sealed frame's associated data is its own
        header, which does not change with its place)."""
        pack = self._open_pack()
        num = self._pack_num
        info = pack.append_encoded(frame, kind, flags, bytes(frame[16:48]), len(frame) - P.FRAME_OVERHEAD, raw_len)
        self._pack_entry.live += len(frame)
        if pack.size >= self.repo.pack_size:
            self._seal_pack()
        return num, info

    def incref(self, bid: bytes, n: int = 1) -> int:
        """Add `n` references to `bid`; returns its sequence number."""
        e = self._pending.get(bid)
        if e is not None:
            self._pending_refs[bid] += n
            return e.seq
        raw = self.txn.get(bid, db=self.db["blobs"])
        if raw is None:
            raise BlobMissing(f"cannot reference blob {bid.hex()[:16]}: not in the index")
        if len(raw) != SEQ_AT + 8:
            BlobEntry.decode(raw)  # raises: a corrupt record
        seq = SEQ_LE.unpack_from(raw, SEQ_AT)[0]
        key = U64.pack(seq)
        refs = self.db["refs"]
        cur = self.txn.get(key, db=refs)
        if cur is None or len(cur) != REF.size or cur[4:] != bid:
            raise IntegrityError(f"the reference count of blob {bid.hex()[:16]} is missing or corrupt; "
                                 f"run `pit repair`")
        self.txn.put(key, REF.pack(REF.unpack(cur)[0] + n, bid), db=refs)
        return seq

    def link(self, parent: bytes, children: list[bytes]) -> None:
        """A new tree or filelist references each of its children once per
        mention; its children's sequence numbers are kept under its own so
        that dropping it needs neither its frame nor a lookup per child."""
        seqs = [self.incref(c) for c in children]
        e = self.entry(parent)
        if e is None:
            raise BlobMissing(f"cannot link blob {parent.hex()[:16]}: not in the index")
        if not self.txn.put(U64.pack(e.seq), pack_seqs(seqs), db=self.db["kids"], overwrite=False):
            raise IntegrityError(f"sequence number {e.seq} already has children in the index; run `pit repair`")

    def read_entry(self, bid: bytes, e: BlobEntry) -> bytes:
        """Read a blob that may sit in this session's unflushed pack buffer."""
        if self.pack is not None and e.pack == self._pack_num:
            self.pack.flush()
        return self.repo.read_entry(bid, e)

    def read_blob(self, bid: bytes) -> bytes:
        """Read through this session's transaction (sees its own uncommitted blobs)."""
        cached = self.repo.chunk_cache.get(bid)
        if cached is not None:
            return cached
        e = self.entry(bid)
        if e is None:
            raise BlobMissing(f"blob {bid.hex()[:16]} is not in the index")
        return self.read_entry(bid, e)

    # -- commit / abort
    def _sweep_unreferenced(self) -> None:
        """Write the pending index entries. Blobs written this session that
        nothing ended up referencing (a file that vanished mid-read) are
        garbage at birth: they are not indexed (and what they referenced
        loses that reference), so every indexed blob keeps refs > 0."""
        from .refcounts import DropStats, release

        zero = [e.seq for bid, e in self._pending.items() if self._pending_refs[bid] == 0]
        for bid in self._zero_flushed:  # still unreferenced at the end of the session?
            e = self.entry(bid)
            if e is not None and e.seq not in self._pending_seq and ref_of(self.txn, self.db, e.seq) == (0, bid):
                zero.append(e.seq)
        self._zero_flushed = []
        if zero:
            # Each has no reference to take off: give it one, then release it.
            for seq in zero:
                bid = self._pending_seq.get(seq)
                if bid is not None:
                    self._pending_refs[bid] = 1
                else:
                    self.txn.put(U64.pack(seq), REF.pack(1, self._ref_id(seq)), db=self.db["refs"])
            release(self, {s: 1 for s in zero}, DropStats())
        self._flush_pending()
        self._zero_flushed = []

    def _ref_id(self, seq: int) -> bytes:
        raw = self.txn.get(U64.pack(seq), db=self.db["refs"])
        if raw is None or len(raw) != REF.size:
            raise IntegrityError(f"reference count record {seq} is missing or corrupt; run `pit repair`")
        return raw[4:]

    def _account_dead(self, e: BlobEntry) -> None:
        size = e.stored_len + P.FRAME_OVERHEAD
        if self._pack_entry is not None and e.pack == self._pack_num:
            self._pack_entry.live -= size
            self._pack_entry.dead += size
            return
        key = U64.pack(e.pack)
        raw = self.txn.get(key, db=self.db["packs"])
        if raw is None:
            return
        pe = PackEntry.decode(raw)
        pe.live -= size
        pe.dead += size
        self.txn.put(key, pe.encode(), db=self.db["packs"])

    def commit(self) -> None:
        try:
            self._sweep_unreferenced()
            if self.pack is not None and self.repo.backend.seal_on_commit:
                self._seal_pack()  # an object store: the index names only packs it holds
            if self.pack is not None:
                self.pack.sync()  # 2. pack bytes durable ...
                self._pack_entry.size = self.pack.size
                self.txn.put(U64.pack(self._pack_num), self._pack_entry.encode(), db=self.db["packs"])
            self.txn.put(b"next_seq", U64.pack(self._next_seq), db=self.db["meta"])
            self._await_syncs()  # 2. every sealed pack durable too ...
            self.repo.backend.before_commit()  # an object store: every pack sealed here is uploaded and checked
            self.txn.commit()  # 3. ... before the index that points at them
            try:
                self.repo.backend.after_commit()
            except OSError:
                pass  # a staged copy left behind is checked and dropped by the next open (reconcile)
        except lmdb.MapFullError as exc:
            self.abort()
            raise DiskFull("the index is full") from exc
        except lmdb.Error as exc:
            self.abort()
            # LMDB reports a failed page write as EIO even when the cause is a
            # full disk; the free space tells the two apart. Either way the
            # commit did not happen (LMDB writes its meta page last).
            if "No space" in str(exc) or _nearly_full(self.repo.path):
                raise DiskFull(f"no space left on device while committing the index ({exc})") from exc
            raise IntegrityError(f"the index commit failed: {exc}; nothing was committed") from exc
        except BaseException:
            self.abort()
            raise
        finally:
            self._finish()

    def abort(self) -> None:
        try:
            self.txn.abort()
        except lmdb.Error:
            pass
        try:
            self._await_syncs()  # before the packs go: no fsync may run on after the session
        except (OSError, StoreError):
            pass
        if self.pack is not None:
            try:
                self.pack.close()
            except OSError:
                pass
            self.pack = None
        self._undo_packs()
        self.repo.chunk_cache.clear()
        self.repo.object_cache.clear()
        self._finish()

    def _undo_packs(self) -> None:
        """Give back the disk space of what this session wrote: delete the
        packs it created and cut the pack it reopened back to its committed
        size (a failed snapshot on a full disk must not keep 100 MB of
        uncommitted bytes until the next writer). Best effort and unsynced:
        the next writer does the same (section 9.3 of docs/format.md), and
        nothing committed names these bytes. We still hold the lock."""
        backend = self.repo.backend
        try:  # a commit that failed after all (it never should: LMDB restores its old meta page) keeps its packs
            if self.repo.index.env.info()["last_txnid"] >= self._txn_id:
                return
        except lmdb.Error:
            return
        for name in self._created_packs:
            try:
                backend.delete(name)
            except (OSError, StoreError):
                pass  # the next writer's leftover cleanup tries again
        if self._reopened is not None:
            name, size = self._reopened
            try:
                if backend.size(name) > size:
                    backend.truncate(name, size)
            except (OSError, StoreError):
                pass
        self._created_packs, self._reopened = [], None

    def _finish(self) -> None:
        self._ended = True
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        self._pending.clear()
        if self.repo.active_writer is self:
            self.repo.active_writer = None
        if self.pack is not None:
            self.pack.close()
            self.pack = None
        if self._lock_fd is not None:
            _release_lock(self._lock_fd)
            self._lock_fd = None


SPOOL_DIR = "tmp-ingest"  # snapshot workers' frames on their way into a pack (docs/format.md, section 2)


def clear_spool(repo_path: str) -> None:
    """Delete what snapshot workers spooled (store/segments.py): after a
    failed snapshot, and when a writer starts, since only a writer's session
    makes such files and a crash can leave them."""
    d = os.path.join(repo_path, SPOOL_DIR)
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass


def _nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 4 * 1024 * 1024


def flock_within(fd: int, wait: float) -> bool:
    """Take an exclusive flock on `fd`, trying for up to `wait` seconds: False if another holds it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _acquire_lock(path: str, wait: float) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only file system, or not ours to write: say which
        raise translate(exc, path) or exc
    if not flock_within(fd, wait):
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        raise RepositoryLocked(f"the repository is locked by another writer ({holder or 'unknown holder'})")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass
    return fd


def _release_lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def filelist_id(ids: list[bytes], lengths: list[int]) -> bytes:
    """The content id a tree entry gets for a file of more than one chunk
    (what a master computes to compare with a replica's trees)."""
    from .files import plan_filelist

    return plan_filelist(ids, lengths, lambda b: object_id(P.FILELIST, b)).top


def write_filelist(w: "Writer", ids: list[bytes], lengths: list[int]) -> bytes:
    """Store a file's chunk list (one leaf, or leaves under an index); returns the top id.

    Merkle rule: a filelist new to the repository references each of its
    entries once; one that exists already is only referenced by its parent."""
    from .files import plan_filelist

    plan = plan_filelist(ids, lengths, lambda b: object_id(P.FILELIST, b))
    for payload, children in plan.blobs:
        fid = object_id(P.FILELIST, payload)
        if w.put(P.FILELIST, fid, payload):
            w.link(fid, children)
    return plan.top
