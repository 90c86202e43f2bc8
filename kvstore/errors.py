"""Errors a user can cause with a snapshot: each carries one clear line.

Messages share one voice across the package: a lowercase sentence fragment
without a trailing period, naming the user's path where there is one (the
command line prints ``kvtrace: error: <message>``).
"""

from __future__ import annotations

import re

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x1f\x7f]")


class SnapshotError(Exception):
    """A snapshot that cannot be read, written or used: missing, corrupt, unsafe or mismatched."""


class CorruptError(SnapshotError):
    """A file whose bytes are damaged or crafted; ``reason`` names the defect without saying whose file it is."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class FingerprintMismatch(SnapshotError):
    """A snapshot made by another model than the one it is being loaded into."""


class PruneError(SnapshotError):
    """Pruning arguments that make no sense, or that this snapshot cannot satisfy."""


def one_line(error: BaseException) -> str:
    """The first line of a foreign exception's text, without terminal escapes (or its type's name)."""
    text = str(error).strip()
    return _ESCAPES.sub("", text.splitlines()[0]) if text else type(error).__name__
