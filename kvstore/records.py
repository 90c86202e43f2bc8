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
from typing import BinaryIO, Protocol

from kvstore import format as fmt
from kvstore.compression import READ_SIZE, FrameError, decompress_into
from kvstore.errors import CorruptError, SnapshotError
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


class Digest(Protocol):
    """A running hash (``hashlib``'s objects): what ``PayloadStream`` feeds besides its CRC."""

    def update(self, data: bytes, /) -> None: ...


def corrupt(reason: str) -> CorruptError:
    return CorruptError(f"the snapshot is corrupt: {reason}", reason)


def write_header(out: BinaryIO, header: bytes, framing: fmt.Framing = fmt.SNAPSHOT,
                 version: int = fmt.FORMAT_VERSION) -> int:
    """Preamble, header and header checksum; returns the bytes written."""
    preamble = fmt.PREAMBLE.pack(framing.magic, version, 0, len(header))
    out.write(preamble)
    out.write(header)
    out.write(fmt.CHECKSUM.pack(zlib.crc32(header, zlib.crc32(preamble))))
    return len(preamble) + len(header) + fmt.CHECKSUM.size


def write_record(out: BinaryIO, payload: bytes) -> int:
    out.write(fmt.RECORD.pack(len(payload), zlib.crc32(payload)))
    out.write(payload)
    return fmt.RECORD.size + len(payload)


def read_header(f: BinaryIO, size: int, path: str | os.PathLike[str],
                framing: fmt.Framing = fmt.SNAPSHOT) -> tuple[int, bytes, int]:
    """(format version, header bytes, offset of the first record), after the preamble and CRC checks."""
    magic = framing.magic
    preamble = f.read(fmt.PREAMBLE.size)
    if len(preamble) < fmt.PREAMBLE.size or not preamble.startswith(magic):
        if preamble and preamble[: len(magic)] == magic[: len(preamble)]:
            raise corrupt("the file is truncated inside its preamble")
        raise SnapshotError(f"{path} is not a {framing.what} (wrong magic bytes)")
    _, version, flags, header_len = fmt.PREAMBLE.unpack(preamble)
    if version not in framing.versions:
        raise SnapshotError(
            f"{path} is a {framing.what} of format version {version}; this kvtrace reads versions "
            + " and ".join(map(str, framing.versions))
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


def locate_records(fd: int, start: int, size: int, specs: list[RecordSpec],
                   end: bytes = fmt.END_MARKER) -> list[Record]:
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
    marker = pread_exact(fd, len(end), offset)
    if len(marker) < len(end):
        raise corrupt("the file is truncated before its end marker")
    if marker != end:
        raise corrupt("the end marker is wrong")
    if offset + len(end) != size:
        raise corrupt("there are extra bytes after the end marker")
    return records


class PayloadStream:
    """One record's payload as a readable stream (positional reads), with a running CRC-32 (and ``digest``)."""

    def __init__(self, fd: int, record: Record, digest: Digest | None = None) -> None:
        self._fd, self._offset, self._left = fd, record.offset, record.length
        self.crc = 0
        self.digest = digest
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
        if self.digest is not None:
            self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read what the decoder left unread, so the CRC covers the whole payload."""
        while self._left and self.read(READ_SIZE):
            pass


def read_payload(fd: int, record: Record, out: memoryview | None, digest: Digest | None = None) -> None:
    """Decompress ``record`` into ``out`` (``None``: decode and discard) and check its CRC.

    A payload whose checksum does not match is reported as such even when it
    also fails to decompress: the checksum names the damage more exactly.
    ``digest`` is fed the stored bytes on the way (the caller compares it).
    """
    stream = PayloadStream(fd, record, digest)
    problem = None
    try:
        decompress_into(stream, out, record.spec.decoded)
    except FrameError as error:
        problem = error
    stream.drain()
    check_stream(stream, record)
    if problem is not None:
        raise corrupt(f"the payload of {record.spec.name} {problem}")


def check_checksum(fd: int, record: Record, digest: Digest | None = None) -> None:
    """The record's CRC-32, computed streaming (constant memory); ``digest`` is fed the stored bytes."""
    stream = PayloadStream(fd, record, digest)
    stream.drain()
    check_stream(stream, record)


def check_stream(stream: PayloadStream, record: Record) -> None:
    if stream.truncated:
        raise corrupt(f"the file is truncated in {record.spec.name}")
    if stream.crc != record.crc:
        raise corrupt(f"the checksum of {record.spec.name} does not match")
