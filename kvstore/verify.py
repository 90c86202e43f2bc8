"""Check a snapshot file end to end without loading it: what ``kvtrace info`` reports as damage.

``read_info`` reads only the header, so a file with a truncated payload or a
flipped bit looks healthy until someone resumes it. ``verify`` walks every
record (header checksum and fields, each payload's length and CRC-32, the
trace record, the end marker, nothing after it) in constant memory; with
``deep=True`` it also decompresses every payload, discarding the output, and
checks its exact decoded size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvstore.header import decode_header
from kvstore.pipeline import default_threads, in_order
from kvstore.records import Record, check_checksum, locate_records, read_header, read_payload
from kvstore.safe_io import open_regular


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked; any damage raises instead."""

    format_version: int
    records: int  # payload records checked (K, V, per-head tables, trace)
    stored_bytes: int  # compressed payload bytes whose checksums were computed
    decoded_bytes: int  # bytes the payloads decompressed to (0 unless deep)
    deep: bool

    def describe(self) -> str:
        """``every checksum of 62 records (1.2 MB) matches`` (and, deep, that every payload decodes)."""
        text = f"every checksum of {self.records} records ({self.stored_bytes:,} bytes) matches"
        return text + (f"; every payload decodes ({self.decoded_bytes:,} bytes)" if self.deep else "")


def verify(path: str | os.PathLike[str], *, deep: bool = False, threads: int | None = None) -> VerifyReport:
    """Check every record of the snapshot at ``path``; ``SnapshotError`` naming the first damaged one.

    Memory stays constant whatever the file's size: payloads are streamed in
    1 MiB steps (``threads`` at a time, default one per core).
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        version, data, start = read_header(f, size, path)
        header = decode_header(data, version)
        records = locate_records(f.fileno(), start, size, header.records())

        def check(record: Record) -> None:
            if deep:
                read_payload(f.fileno(), record, None)
            else:
                check_checksum(f.fileno(), record)

        for _ in in_order([lambda r=record: check(r) for record in records], threads or default_threads()):
            pass
    return VerifyReport(
        format_version=version,
        records=len(records),
        stored_bytes=sum(r.length for r in records),
        decoded_bytes=sum(r.spec.decoded for r in records) if deep else 0,
        deep=deep,
    )
