"""Errors a user can cause with a snapshot: each carries one clear, complete sentence."""


class SnapshotError(Exception):
    """A snapshot that cannot be read, written or used: missing, corrupt, unsafe or mismatched."""


class FingerprintMismatch(SnapshotError):
    """A snapshot made by another model than the one it is being loaded into."""


class PruneError(SnapshotError):
    """Pruning arguments that make no sense, or that this snapshot cannot satisfy."""
