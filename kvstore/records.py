"""The record layer of a ``.kvs`` file: preamble, checksummed header, payload records, end marker.

Readers locate every record first (walking the 12-byte record headers with
positional reads), checking each declared length against the bytes left in
the file and against what the header says the record decodes to, so a
truncated or inflated file is refused before anything is allocated or
decompressed. Payloads are then streamed from the file by offset (safe from
several threads at once), their CRC-32 computed on the way, never held whole
in memory.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from kvstore import format as fmt
from kvstore.compression import READ_SIZE, FrameError, decompress_into
from kvstore.errors import SnapshotError
from kvstore.safe_io import pread_exact


@dataclass(frozen=True)
class RecordSpec:
    """One record as the header declares it: what it holds and its exact decoded size."""

    name: str  # how messages name it: "layer 3 keys", "the trace"
    decoded: int
    kind: str  # "key", "value", "positions", "scores" or "trace"
    layer: int = -1


@dataclass(frozen=True)
class Record:
    """A record located in a file: its payload's offset, length and CRC-32."""

    spec: RecordSpec
    offset: int
    length: int
    crc: int


def corrupt(reason: str) -> SnapshotError:
    return SnapshotError(f"the snapshot is corrupt: {reason}")


def write_header(out: BinaryIO, header: bytes) -> int:
    """Preamble, header and header checksum; returns the bytes written."""
    preamble = fmt.PREAMBLE.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, len(header))
    out.write(preamble)
    out.write(header)
    out.write(fmt.CHECKSUM.pack(zlib.crc32(header, zlib.crc32(preamble))))
    return len(preamble) + len(header) + fmt.CHECKSUM.size


def write_record(out: BinaryIO, payload: bytes) -> int:
    out.write(fmt.RECORD.pack(len(payload), zlib.crc32(payload)))
    out.write(payload)
    return fmt.RECORD.size + len(payload)


def read_header(f: BinaryIO, size: int, path: str | os.PathLike[str]) -> tuple[int, bytes, int]:
    """(format version, header bytes, offset of the first record), after the preamble and CRC checks."""
    preamble = f.read(fmt.PREAMBLE.size)
    if len(preamble) < fmt.PREAMBLE.size or not preamble.startswith(fmt.MAGIC):
        if preamble and preamble[: len(fmt.MAGIC)] == fmt.MAGIC[: len(preamble)]:
            raise corrupt("the file is truncated inside its preamble")
        raise SnapshotError(f"{path} is not a kvtrace snapshot (wrong magic bytes)")
    _, version, flags, header_len = fmt.PREAMBLE.unpack(preamble)
    if version not in fmt.READABLE_VERSIONS:
        raise SnapshotError(
            f"the snapshot has format version {version}; this kvtrace reads versions "
            + " and ".join(map(str, fmt.READABLE_VERSIONS))
        )
    if flags != 0:
        raise corrupt(f"unknown flags {flags:#x} in the preamble")
    if header_len > fmt.MAX_HEADER_BYTES:
        raise corrupt(f"the declared header length {header_len} exceeds the limit {fmt.MAX_HEADER_BYTES}")
    if header_len + fmt.CHECKSUM.size > size - fmt.PREAMBLE.size:
        raise corrupt("the file is truncated or declares too long a length for the header")
    header = f.read(header_len)
    checksum = f.read(fmt.CHECKSUM.size)
    if len(header) != header_len or len(checksum) != fmt.CHECKSUM.size:
        raise corrupt("the file is truncated in the header")
    if fmt.CHECKSUM.unpack(checksum)[0] != zlib.crc32(header, zlib.crc32(preamble)):
        raise corrupt("the header checksum does not match")
    return version, header, fmt.PREAMBLE.size + header_len + fmt.CHECKSUM.size


def locate_records(fd: int, start: int, size: int, specs: list[RecordSpec]) -> list[Record]:
    """Every record's place, then the end marker and the end of the file; ``SnapshotError`` on any defect."""
    records, offset = [], start
    for spec in specs:
        head = pread_exact(fd, fmt.RECORD.size, offset)
        if len(head) < fmt.RECORD.size:
            raise corrupt(f"the file is truncated in the record of {spec.name}")
        length, crc = fmt.RECORD.unpack(head)
        offset += fmt.RECORD.size
        if length > size - offset:
            raise corrupt(f"the file is truncated or declares too long a length for {spec.name}")
        if length > fmt.max_frame_bytes(spec.decoded):
            raise corrupt(f"the record of {spec.name} is {length} bytes long, more than "
                          f"{spec.decoded} decoded bytes can need")
        if spec.decoded > fmt.max_decoded_bytes(length):
            raise corrupt(f"{spec.name} would expand {length} stored bytes to {spec.decoded}, "
                          f"more than {fmt.MAX_EXPANSION} times (a zstd bomb)")
        records.append(Record(spec, offset, length, crc))
        offset += length
    marker = pread_exact(fd, len(fmt.END_MARKER), offset)
    if len(marker) < len(fmt.END_MARKER):
        raise corrupt("the file is truncated before its end marker")
    if marker != fmt.END_MARKER:
        raise corrupt("the end marker is wrong")
    if offset + len(fmt.END_MARKER) != size:
        raise corrupt("there are extra bytes after the end marker")
    return records


class PayloadStream:
    """One record's payload as a readable stream (positional reads), with a running CRC-32."""

    def __init__(self, fd: int, record: Record) -> None:
        self._fd, self._offset, self._left = fd, record.offset, record.length
        self.crc = 0
        self.truncated = False

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        data = os.pread(self._fd, size, self._offset) if size else b""
        if len(data) < size:
            self.truncated = True  # the file shrank while being read
            self._left = 0
        else:
            self._left -= size
        self._offset += len(data)
        self.crc = zlib.crc32(data, self.crc)
        return data

    def drain(self) -> None:
        """Read what the decoder left unread, so the CRC covers the whole payload."""
        while self._left and self.read(READ_SIZE):
            pass


def read_payload(fd: int, record: Record, out: memoryview | None) -> None:
    """Decompress ``record`` into ``out`` (``None``: decode and discard) and check its CRC.

    A payload whose checksum does not match is reported as such even when it
    also fails to decompress: the checksum names the damage more exactly.
    """
    stream = PayloadStream(fd, record)
    problem = None
    try:
        decompress_into(stream, out, record.spec.decoded)
    except FrameError as error:
        problem = error
    stream.drain()
    check_stream(stream, record)
    if problem is not None:
        raise corrupt(f"the payload of {record.spec.name} {problem}")


def check_checksum(fd: int, record: Record) -> None:
    """The record's CRC-32, computed streaming (constant memory)."""
    stream = PayloadStream(fd, record)
    stream.drain()
    check_stream(stream, record)


def check_stream(stream: PayloadStream, record: Record) -> None:
    if stream.truncated:
        raise corrupt(f"the file is truncated in {record.spec.name}")
    if stream.crc != record.crc:
        raise corrupt(f"the checksum of {record.spec.name} does not match")
