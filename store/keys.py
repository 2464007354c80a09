"""Key slots: the master key of an encrypted repository, wrapped.

The 64-byte master key (crypto.py) is never stored in the clear. Each *slot*
(`<repo>/keys/<slot id>`, a small JSON file) holds it sealed with AES-256-GCM
under a wrapping key that comes either from a passphrase through a
memory-hard KDF (Argon2id when `cryptography` has it, else scrypt; the slot
records which, with its parameters) or from a *key file* (32 random bytes).
Several slots open the same repository: a passphrase for people, a key file
for agents; adding or removing one never touches a pack. docs/format.md,
section 12, describes the bytes.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import blake3

from .backend import fsync_dir
from .errors import InvalidArgument, KeyRequired, KeySlotRefused, WrongKey

KEYS_DIR = "keys"
SLOT_VERSION = 1
WRAP = "aes-256-gcm"
KEYFILE_MAGIC = "pitstore-keyfile-v1"
KEYFILE_CONTEXT = "pitstore 2026 keyfile fingerprint v1"
# Argon2id: RFC 9106's second recommended option (64 MiB, 3 passes, 4 lanes);
# scrypt: n=2**15, r=8, p=1 (32 MiB), where Argon2id is missing.
ARGON2 = {"algorithm": "argon2id", "iterations": 3, "lanes": 4, "memory_kib": 65536}
SCRYPT = {"algorithm": "scrypt", "n": 2 ** 15, "r": 8, "p": 1}


@dataclass
class KeySource:
    """Where the key to open an encrypted repository comes from. Tried in
    this order: the key file, the passphrase, then `prompt` (a callable that
    asks a person; None where nobody can answer)."""

    passphrase: str | None = None
    key_file: str | None = None
    prompt: Callable[[], str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> "KeySource":
        """PIT_KEY_FILE, PIT_PASSWORD (or PIT_PASSWORD_FILE): what a process
        with no command line (a test, a library user) can be given."""
        pw = os.environ.get("PIT_PASSWORD")
        if pw is None and os.environ.get("PIT_PASSWORD_FILE"):
            pw = read_password_file(os.environ["PIT_PASSWORD_FILE"])
        return cls(passphrase=pw, key_file=os.environ.get("PIT_KEY_FILE") or None)

    def given(self) -> bool:
        return self.passphrase is not None or self.key_file is not None or self.prompt is not None


def read_password_file(path: str) -> str:
    """The first line of a password file, without its line end."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the password file {path}: {exc.strerror or exc}") from None
    return line.rstrip("\r\n")


# --------------------------------------------------------------------------- key files
def new_key_file(path: str) -> bytes:
    """Create a key file (mode 0600, refusing to overwrite one); returns its key."""
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"{path} exists already: a new key file is never written over another") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{KEYFILE_MAGIC} {key.hex()}\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return key


def read_key_file(path: str) -> bytes:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(200)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    parts = text.split()
    if len(parts) != 2 or parts[0] != KEYFILE_MAGIC or len(parts[1]) != 64:
        raise InvalidArgument(f"{path} is not a pitstore key file")
    try:
        return bytes.fromhex(parts[1])
    except ValueError:
        raise InvalidArgument(f"{path} is not a pitstore key file") from None


def key_file_fingerprint(key: bytes) -> str:
    """Names which slot a key file opens (16 hex digits) without trying each."""
    return blake3.blake3(key, derive_key_context=KEYFILE_CONTEXT).hexdigest()[:16]


# --------------------------------------------------------------------------- wrapping
def _kdf(params: dict, passphrase: str, salt: bytes) -> bytes:
    pw = passphrase.encode("utf-8")
    if params["algorithm"] == "argon2id":
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        return Argon2id(salt=salt, length=32, iterations=params["iterations"], lanes=params["lanes"],
                        memory_cost=params["memory_kib"]).derive(pw)
    if params["algorithm"] == "scrypt":
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(pw)
    raise InvalidArgument(f"unknown key derivation {params['algorithm']!r} in a key slot")


def default_kdf() -> dict:
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id  # noqa: F401

        return dict(ARGON2)
    except ImportError:
        return dict(SCRYPT)


def _aad(repo_id: str, slot_id: str) -> bytes:
    # A slot opens only the repository and the name it was written for.
    return f"pitstore key slot v1 {repo_id} {slot_id}".encode()


def _wrap(wkey: bytes, master: bytes, repo_id: str, slot_id: str) -> dict:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    return {"algorithm": WRAP, "nonce": nonce.hex(),
            "ciphertext": AESGCM(wkey).encrypt(nonce, master, _aad(repo_id, slot_id)).hex()}


def _unwrap(wkey: bytes, slot: dict, repo_id: str) -> bytes | None:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    w = slot["wrap"]
    try:
        return AESGCM(wkey).decrypt(bytes.fromhex(w["nonce"]), bytes.fromhex(w["ciphertext"]),
                                    _aad(repo_id, slot["id"]))
    except (InvalidTag, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- slots on disk
@dataclass(frozen=True)
class Slot:
    id: str
    type: str  # "passphrase" or "keyfile"
    created: str
    record: dict

    def describe(self) -> dict:
        out = {"id": self.id, "type": self.type, "created": self.created}
        if self.type == "passphrase":
            out["kdf"] = self.record["kdf"]["algorithm"]
        else:
            out["fingerprint"] = self.record.get("fingerprint")
        return out


def list_slots(repo_path: str) -> list[Slot]:
    d = os.path.join(repo_path, KEYS_DIR)
    out = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(".tmp") or name.startswith("."):
            continue
        try:
            with open(os.path.join(d, name), "rb") as f:
                rec = json.loads(f.read())
            if rec.get("version") != SLOT_VERSION or rec.get("id") != name:
                continue
            out.append(Slot(rec["id"], rec["type"], rec.get("created", ""), rec))
        except (OSError, ValueError, KeyError, AttributeError):
            continue  # not a slot we can read: it opens nothing
    return out


def _write_slot(repo_path: str, rec: dict) -> None:
    d = os.path.join(repo_path, KEYS_DIR)
    new_dir = not os.path.isdir(d)
    os.makedirs(d, exist_ok=True)
    if new_dir:
        fsync_dir(repo_path)
    path = os.path.join(d, rec["id"])
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps(rec, indent=2).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(d)


def add_passphrase_slot(repo_path: str, repo_id: str, master: bytes, passphrase: str,
                        kdf: dict | None = None) -> str:
    if not passphrase:
        raise InvalidArgument("an empty passphrase protects nothing")
    slot_id = secrets.token_hex(8)
    params = dict(kdf or default_kdf())
    salt = secrets.token_bytes(16)
    params["salt"] = salt.hex()
    rec = {"version": SLOT_VERSION, "id": slot_id, "type": "passphrase",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kdf": params,
           "wrap": _wrap(_kdf(params, passphrase, salt), master, repo_id, slot_id)}
    _write_slot(repo_path, rec)
    return slot_id


def add_keyfile_slot(repo_path: str, repo_id: str, master: bytes, key: bytes) -> str:
    slot_id = secrets.token_hex(8)
    rec = {"version": SLOT_VERSION, "id": slot_id, "type": "keyfile",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kdf": {"algorithm": "none"},
           "fingerprint": key_file_fingerprint(key), "wrap": _wrap(key, master, repo_id, slot_id)}
    _write_slot(repo_path, rec)
    return slot_id


def remove_slot(repo_path: str, slot_id: str, in_use: str | None) -> None:
    """Delete a slot. Refuses the last one (the repository could never be
    opened again) and, as restic does, the one this session unlocked with."""
    slots = list_slots(repo_path)
    matches = [s for s in slots if s.id == slot_id or (len(slot_id) >= 4 and s.id.startswith(slot_id))]
    if not matches:
        raise InvalidArgument(f"no key slot {slot_id!r} (see `pit key list`)")
    if len(matches) > 1:
        raise InvalidArgument(f"key slot {slot_id!r} is ambiguous")
    slot = matches[0]
    if len(slots) == 1:
        raise KeySlotRefused(f"key slot {slot.id} is the last one: without it nothing opens the repository")
    if slot.id == in_use:
        raise KeySlotRefused(f"key slot {slot.id} is the one this command unlocked with; "
                             f"remove it with another passphrase or key file")
    path = os.path.join(repo_path, KEYS_DIR, slot.id)
    os.unlink(path)
    fsync_dir(os.path.dirname(path))


def unlock(repo_path: str, repo_id: str, source: KeySource) -> tuple[bytes, str]:
    """(master key, id of the slot that opened it). WrongKey when what was
    given opens no slot; KeyRequired when nothing was given."""
    slots = list_slots(repo_path)
    if not slots:
        raise KeyRequired(f"{repo_path} is encrypted but has no readable key slot in {KEYS_DIR}/")
    if source.key_file is not None:
        key = read_key_file(source.key_file)
        fp = key_file_fingerprint(key)
        for s in slots:
            if s.type == "keyfile" and s.record.get("fingerprint") == fp:
                master = _unwrap(key, s.record, repo_id)
                if master is not None:
                    return master, s.id
        if source.passphrase is None:  # a passphrase given too is tried next; a prompt is not
            raise WrongKey(f"the key file {source.key_file} opens no key slot of {repo_path}")
    passphrase = source.passphrase
    if passphrase is None and source.prompt is not None:
        passphrase = source.prompt()
    if passphrase is None:
        raise KeyRequired(f"{repo_path} is encrypted: give its passphrase (PIT_PASSWORD, --password-file) "
                          f"or a key file (--key-file, PIT_KEY_FILE)")
    for s in slots:
        if s.type != "passphrase":
            continue
        try:
            wkey = _kdf(s.record["kdf"], passphrase, bytes.fromhex(s.record["kdf"]["salt"]))
        except (KeyError, ValueError, TypeError):
            continue
        master = _unwrap(wkey, s.record, repo_id)
        if master is not None:
            return master, s.id
    raise WrongKey(f"wrong passphrase for {repo_path}")
