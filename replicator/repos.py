"""This node's replica repository: made when it is absent, opened with its key.

`pit cluster init --repo`, `pit join --repo` and, for a repository in a bucket, the agent on first use
make it as `pit init` would. Off site, the bucket's owner reads whatever is not encrypted, so a repository
in a bucket is encrypted with the agent file's `key_file` unless the operator refused it in so many words
(`encrypt = false`, `--no-encrypt`); a key file given for a local repository encrypts that one too.
"""
from __future__ import annotations

import os

from store.errors import InvalidArgument
from store.keys import KeySource
from store.repository import Repository


def wants_encryption(backend: str | None, key_file: str | None, encrypt: bool | None) -> bool:
    """Whether the repository to make is encrypted (InvalidArgument when what was given cannot be done)."""
    if encrypt is False and key_file:
        raise InvalidArgument("a key file and no encryption contradict each other: drop one")
    if encrypt and not key_file:
        raise InvalidArgument("an encrypted replica repository needs its key file (`key_file`, --key-file)")
    if backend and not key_file and encrypt is not False:
        raise InvalidArgument("a replica repository in a bucket is encrypted: give its key file (`key_file`, "
                              "--key-file; made when absent), or store it in the clear with `encrypt = false` "
                              "(--no-encrypt)")
    return bool(key_file)


def keys_for(key_file: str | None) -> KeySource | None:
    return KeySource(key_file=key_file) if key_file else None


def create(path: str, backend: str | None, s3_endpoint: str | None, key_file: str | None,
           encrypt: bool | None) -> Repository:
    """Make the repository at PATH (its packs in BACKEND's bucket when given)."""
    spec = None
    if backend:
        from store.s3backend import S3Location

        spec = S3Location.parse(backend, s3_endpoint).to_config()
    sealed = wants_encryption(backend, key_file, encrypt)
    return Repository.init(path, backend=spec, encrypt=sealed, keys=keys_for(key_file))


def ensure(path: str, backend: str | None = None, s3_endpoint: str | None = None, key_file: str | None = None,
           encrypt: bool | None = None) -> str:
    """The repository at PATH, made when there is none -> what was done, for the operator."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "config")):
        Repository(path, readonly=True, keys=keys_for(key_file)).close()  # one this pit (and key) opens
        return f"repository {path} is already there: kept"
    repo = create(path, backend, s3_endpoint, key_file, encrypt)
    try:
        p = repo.params
        enc = f", encrypted with {repo.codec.aead_name}" if repo.codec.sealed else ""
        where = f", packs in {backend}" if backend else ""
        return (f"created repository {repo.id[:12]} at {repo.path} "
                f"(chunks {p.min_size}/{p.avg_size}/{p.max_size} bytes, zstd {repo.level}{enc}{where})")
    finally:
        repo.close()
