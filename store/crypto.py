"""The frame codec: how a blob's (compressed or plain) payload becomes the
bytes of a frame in a pack, and back.

Every path that writes or reads frames goes through the repository's codec,
so that encryption at rest (docs/format.md, section 12) is one decision made
at `pit init`, not a flag tested in every reader:

- `PlainCodec`: the frame stores the payload as is and the frame header's id
  field holds the blob's logical id (format version 2).
- `SealedCodec`: the frame stores nonce || AEAD(logical id || payload) || tag,
  with the 48-byte frame header as associated data, and the header's id field
  holds `blake3(logical id, key=id_key)`. A stored id so says nothing about
  the plain data, a frame cannot be moved to another id or kind, and the
  frame CRC still covers the stored bytes (walks and resync work without the
  key).

The *logical* id (the plain BLAKE3 of the data, or the per-kind derive-key
hash of a tree or filelist) stays the id used everywhere else: trees, the
index, dedup, the replication wire.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import blake3

from . import packs as P
from .errors import IntegrityError, StoreError

NONCE_LEN = 12
TAG_LEN = 16
ID_LEN = 32
SEAL_OVERHEAD = NONCE_LEN + ID_LEN + TAG_LEN  # a sealed payload is this much longer than the plain one
MASTER_KEY_LEN = 64  # 32-byte AEAD key, then 32-byte id key

AES_256_GCM = "aes-256-gcm"
AES_256_GCM_SIV = "aes-256-gcm-siv"
CHACHA20_POLY1305 = "chacha20-poly1305"
AEADS = (AES_256_GCM, AES_256_GCM_SIV, CHACHA20_POLY1305)
ID_HASH = "blake3-keyed"


def _aead(name: str, key: bytes):
    from cryptography.hazmat.primitives.ciphers import aead

    if name == AES_256_GCM:
        return aead.AESGCM(key)
    if name == AES_256_GCM_SIV:
        if not hasattr(aead, "AESGCMSIV"):
            raise StoreError("this repository uses AES-256-GCM-SIV, which the installed `cryptography` lacks")
        return aead.AESGCMSIV(key)
    if name == CHACHA20_POLY1305:
        return aead.ChaCha20Poly1305(key)
    raise StoreError(f"unknown AEAD {name!r} in the repository config")


def default_aead() -> str:
    """AES-256-GCM: several GB/s with AES-NI, where GCM-SIV in `cryptography`
    ran at a tenth of that (docs/benchmarks.md, "Encryption at rest"), which
    would have cost ingest far more than the 10 % budget. Random 96-bit
    nonces bound a key to about 2^32 frames (docs/format.md, 12.6)."""
    return AES_256_GCM


_INVALID_TAG = None


def _invalid_tag():
    """cryptography's InvalidTag, imported once (not per frame)."""
    global _INVALID_TAG
    if _INVALID_TAG is None:
        from cryptography.exceptions import InvalidTag

        _INVALID_TAG = InvalidTag
    return _INVALID_TAG


class PlainCodec:
    """An unencrypted repository: frames as in format version 2."""

    sealed = False
    aead_name: str | None = None

    def stored_id(self, bid: bytes) -> bytes:
        return bid

    def encode(self, kind: int, flags: int, bid: bytes, payload: bytes | memoryview, raw_len: int) -> bytes:
        return P.encode_frame(kind, flags, bid, payload, raw_len)

    def open(self, header: bytes | memoryview, stored: bytes | memoryview, want: bytes | None = None
             ) -> tuple[bytes, bytes | memoryview]:
        """(logical id, compressed-or-plain payload) of a frame whose header
        and stored payload are given (the CRC is the caller's business)."""
        bid = bytes(header[16:48])
        if want is not None and bid != want:
            raise IntegrityError("frame header does not match the index")
        return bid, stored

    def spec(self) -> tuple | None:
        """What a worker process needs to rebuild this codec (picklable)."""
        return None


class SealedCodec:
    """An encrypted repository's frames: AEAD-sealed payloads under keyed ids."""

    sealed = True

    def __init__(self, aead_name: str, master: bytes) -> None:
        if len(master) != MASTER_KEY_LEN:
            raise StoreError("a master key is 64 bytes")
        self.aead_name = aead_name
        self._master = master
        self._aead = _aead(aead_name, master[:32])  # reused: no per-frame key schedule
        self._id_key = master[32:]

    def stored_id(self, bid: bytes) -> bytes:
        return blake3.blake3(bid, key=self._id_key).digest()

    def encode(self, kind: int, flags: int, bid: bytes, payload: bytes | memoryview, raw_len: int) -> bytes:
        header = P.FRAME_HEADER.pack(P.FRAME_MAGIC, kind, flags, 0, len(payload) + SEAL_OVERHEAD, raw_len,
                                     self.stored_id(bid))
        nonce = os.urandom(NONCE_LEN)
        sealed = self._aead.encrypt(nonce, bid + payload, header)
        crc = zlib.crc32(sealed, zlib.crc32(nonce, zlib.crc32(header)))
        return b"".join((header, nonce, sealed, P.CRC.pack(crc)))

    def open(self, header: bytes | memoryview, stored: bytes | memoryview, want: bytes | None = None
             ) -> tuple[bytes, memoryview]:
        """With `want` (a read through the index) the caller has checked the header's stored id against
        `stored_id(want)`, so the sealed id need only equal `want`: one keyed hash per read, not two (a
        restore spent a third of its decryption time hashing ids twice)."""
        header = bytes(header[:P.FRAME_HEADER.size])
        if len(stored) < SEAL_OVERHEAD:
            raise IntegrityError("sealed frame shorter than its nonce, id and tag")
        stored = memoryview(stored)
        try:
            plain = self._aead.decrypt(stored[:NONCE_LEN], stored[NONCE_LEN:], header)
        except _invalid_tag():
            raise IntegrityError("frame does not authenticate (damaged, moved, or not this repository's key)"
                                 ) from None
        bid = plain[:ID_LEN]
        if want is not None:
            if bid != want:
                raise IntegrityError("frame header does not match the index")
        elif self.stored_id(bid) != header[16:48]:
            raise IntegrityError("frame's sealed id does not match its stored id")
        return bid, memoryview(plain)[ID_LEN:]

    def spec(self) -> tuple | None:
        return (self.aead_name, self._master)

    def master_key(self) -> bytes:
        """For wrapping in a new key slot (`pit key add`)."""
        return self._master


FrameCodec = PlainCodec | SealedCodec


def codec_from_spec(spec: tuple | None) -> FrameCodec:
    return PlainCodec() if spec is None else SealedCodec(*spec)


@dataclass(frozen=True)
class EncryptionConfig:
    """The config's `encryption` field (docs/format.md, 12.1)."""

    aead: str
    id_hash: str = ID_HASH

    def to_dict(self) -> dict:
        return {"aead": self.aead, "id_hash": self.id_hash, "plaintext": "logical id || payload",
                "associated_data": "frame header", "keys": "keys/"}

    @classmethod
    def from_dict(cls, d) -> "EncryptionConfig":
        from .errors import FormatVersionError

        if not isinstance(d, dict) or d.get("aead") not in AEADS or d.get("id_hash") != ID_HASH:
            raise FormatVersionError(f"unsupported encryption settings in the repository config: {d!r}")
        return cls(d["aead"], d["id_hash"])
