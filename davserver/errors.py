"""The restore views' own errors, under the store's one hierarchy.

They subclass `store.errors.StoreError`, so `pit serve` and `pit mount` end
with a one-line message and the class's exit code, never a traceback, like
every other `pit` command (store/cli_support.py maps them).
"""
from __future__ import annotations

from store.errors import StoreError


class ServeError(StoreError):
    """The restore view cannot be served."""

    exit_code = 70


class CertificateError(ServeError):
    """The TLS certificate or key cannot be used."""

    exit_code = 71


class ListenError(ServeError):
    """The server cannot listen on the configured address and port."""

    exit_code = 72
