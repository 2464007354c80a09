"""Errors of the application layer of failover: templates, `pit set add`,
point hooks and image selection. Each is a `ReplError` (so a `StoreError`):
the `pit` group prints it as one line and exits with its code (56-69).
"""
from __future__ import annotations

from .errors import ReplError


class FailoverError(ReplError):
    """Failover could not proceed."""

    exit_code = 56


class TemplateError(FailoverError):
    """Unknown template or invalid template parameters."""

    exit_code = 57


class SetExists(FailoverError):
    """A set of that name is already in the cluster file."""

    exit_code = 58


class HookFailed(FailoverError):
    """A point hook failed; the point is marked failed."""

    exit_code = 59

    def __init__(self, *args, result=None) -> None:
        super().__init__(*args)
        self.result = result


class HookTimeout(HookFailed):
    """A point hook ran past its timeout and was killed; the point is marked failed."""

    exit_code = 60


class NoImages(FailoverError):
    """The set has no snapshots in this repository."""

    exit_code = 61


class NoGoodImage(FailoverError):
    """No image of the set passed deep verify and the application check."""

    exit_code = 62

    def __init__(self, *args, selection=None) -> None:
        super().__init__(*args)
        self.selection = selection


class PinnedImageBad(FailoverError):
    """The operator-pinned image failed deep verify or the application check."""

    exit_code = 63

    def __init__(self, *args, selection=None) -> None:
        super().__init__(*args)
        self.selection = selection


class CheckUnavailable(FailoverError):
    """The application check cannot run on this node (a tool is missing)."""

    exit_code = 64


ALL = [FailoverError, TemplateError, SetExists, HookFailed, HookTimeout, NoImages, NoGoodImage, PinnedImageBad,
       CheckUnavailable]
