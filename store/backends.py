"""Which backend a repository's packs live behind, from its config.

Kept apart from `backend.py` so that the S3 backend (which stages the open
pack with a `LocalBackend`) can import that module without a circle.
"""
from __future__ import annotations

import os

from .backend import LocalBackend, PackBackend


def open_backend(repo_path: str, cfg: dict) -> PackBackend:
    """The backend a repository config names: no `backend` field means local packs
    (boto3 is imported only for a repository in a bucket)."""
    spec = cfg.get("backend")
    if not spec or spec.get("type", "local") == "local":
        return LocalBackend(os.path.join(repo_path, "packs"))
    from .s3backend import S3Backend, S3Location

    return S3Backend(repo_path, S3Location.from_config(spec))
