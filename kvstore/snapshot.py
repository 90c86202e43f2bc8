"""Save, load and describe ``.kvs`` snapshot files.

Writing streams one payload at a time (a layer's K, then its V) into an atomic
temporary file, so memory holds at most one compressed payload beyond the
state itself. Reading checks the magic, version and header checksum, validates
the header, then reads each payload only after checking its declared length
against the bytes left in the file, verifies its checksum, and decompresses it
to exactly the size the header implies.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from kvstore import format as fmt
from kvstore.atomic import atomic_writer
from kvstore.codecs import DTYPE_NAMES, make_codec
from kvstore.compression import compress, decompress
from kvstore.errors import FingerprintMismatch, SnapshotError
from kvstore.header import Header, decode_header, encode_header
from kvstore.state import KVState, ModelFingerprint


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's header and sizes, read without decoding any payload."""

    path: Path
    format_version: int
    codec: str
    codec_params: dict[str, Any]
    dtype: str
    fingerprint: ModelFingerprint
    token_ids: list[int] = field(repr=False)
    positions: list[int] = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)
    label: str
    created: float
    num_layers: int
    has_attention_scores: bool
    raw_bytes: int  # the K/V tensors uncompressed, in their own dtype
    file_bytes: int

    @property
    def cache_length(self) -> int:
        return len(self.positions)

    @property
    def next_position(self) -> int:
        return len(self.token_ids) - 1

    @property
    def ratio(self) -> float:
        """File size over the raw K/V size (lower is smaller)."""
        return self.file_bytes / self.raw_bytes if self.raw_bytes else 0.0


def save(state: KVState, path: str | os.PathLike[str], *, codec: str = "lossless") -> int:
    """Write ``state`` to ``path`` atomically; returns the bytes written."""
    try:
        state.validate()
    except ValueError as error:
        raise SnapshotError(f"Cannot save an inconsistent KV state: {error}.") from None
    chosen = make_codec(codec)
    header_bytes, _ = encode_header(state, chosen)
    written = 0
    with atomic_writer(path) as out:
        preamble = fmt.PREAMBLE.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, len(header_bytes))
        out.write(preamble)
        out.write(header_bytes)
        out.write(fmt.CHECKSUM.pack(zlib.crc32(header_bytes, zlib.crc32(preamble))))
        written += len(preamble) + len(header_bytes) + fmt.CHECKSUM.size
        for key, value in zip(state.keys, state.values):
            for role, tensor in (("key", key), ("value", value)):
                payload = compress(chosen.encode(tensor.detach().cpu(), role))
                out.write(fmt.RECORD.pack(len(payload), zlib.crc32(payload)))
                out.write(payload)
                written += fmt.RECORD.size + len(payload)
        out.write(fmt.END_MARKER)
        written += len(fmt.END_MARKER)
    return written


def read_info(path: str | os.PathLike[str]) -> SnapshotInfo:
    """The header of the snapshot at ``path`` (checksummed and validated), no payloads."""
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        version, header = _read_header(f, size)
    return SnapshotInfo(
        path=Path(path),
        format_version=version,
        codec=header.codec.name,
        codec_params=dict(header.codec.params),
        dtype=DTYPE_NAMES[header.dtype],
        fingerprint=header.fingerprint,
        token_ids=header.token_ids,
        positions=header.positions,
        metadata=header.metadata,
        label=header.label,
        created=header.created,
        num_layers=len(header.layer_shapes),
        has_attention_scores=header.attention_scores is not None,
        raw_bytes=header.raw_bytes,
        file_bytes=size,
    )


def load(
    path: str | os.PathLike[str],
    *,
    expected: ModelFingerprint | None = None,
    max_bytes: int = fmt.DEFAULT_MAX_STATE_BYTES,
) -> KVState:
    """Read a snapshot; refuse it (``FingerprintMismatch``) when made by another model.

    ``max_bytes`` bounds the decoded state: a larger declaration is refused
    before anything is allocated.
    """
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        _, header = _read_header(f, size)
        if expected is not None:
            check_fingerprint(header.fingerprint, expected)
        sizes = header.payload_sizes()
        too_big = [s for _, _, s in sizes if s > fmt.MAX_PAYLOAD_BYTES]
        if too_big or sum(s for _, _, s in sizes) > max_bytes:
            raise SnapshotError(
                f"The snapshot declares {sum(s for _, _, s in sizes)} bytes of K/V data, more than "
                f"this reader accepts ({min(max_bytes, fmt.MAX_PAYLOAD_BYTES * len(sizes))})."
            )
        tensors: dict[str, list[torch.Tensor]] = {"key": [], "value": []}
        for layer, role, expected_size in sizes:
            what = f"layer {layer} {role}s"
            frame = _read_record(f, size, what)
            data = decompress(frame, expected_size, what)
            del frame
            tensors[role].append(
                header.codec.decode(data, header.shape(layer, role), header.dtype, role)
            )
        if _read_exact(f, len(fmt.END_MARKER), size, "the end marker") != fmt.END_MARKER:
            raise _corrupt("the end marker is wrong")
        if f.read(1):
            raise _corrupt("there are extra bytes after the end marker")
    state = KVState(
        keys=tensors["key"],
        values=tensors["value"],
        token_ids=header.token_ids,
        positions=header.positions,
        fingerprint=header.fingerprint,
        attention_scores=header.attention_scores,
        metadata=header.metadata,
    )
    try:
        state.validate()
    except ValueError as error:
        raise _corrupt(str(error)) from None
    return state


def check_fingerprint(found: ModelFingerprint, expected: ModelFingerprint) -> None:
    """``FingerprintMismatch`` naming every field that differs, when a snapshot does not fit a model."""
    differences = expected.differences(found)
    if differences:
        raise FingerprintMismatch(
            f"The snapshot was made by another model ({found.model_id}, not {expected.model_id}): "
            + "; ".join(differences) + "."
        )


def _open(path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise SnapshotError(f"No snapshot at {path}.") from None
    except IsADirectoryError:
        raise SnapshotError(f"{path} is a folder, not a snapshot file.") from None
    except PermissionError:
        raise SnapshotError(f"Permission denied reading {path}.") from None


def _read_header(f: BinaryIO, size: int) -> tuple[int, Header]:
    preamble = f.read(fmt.PREAMBLE.size)
    if len(preamble) < fmt.PREAMBLE.size or not preamble.startswith(fmt.MAGIC):
        if preamble[: len(fmt.MAGIC)] == fmt.MAGIC[: len(preamble)] and preamble:
            raise _corrupt("the file is truncated inside its preamble")
        raise SnapshotError(f"{getattr(f, 'name', 'The file')} is not a kvtrace snapshot (wrong magic bytes).")
    _, version, flags, header_len = fmt.PREAMBLE.unpack(preamble)
    if version != fmt.FORMAT_VERSION:
        raise SnapshotError(
            f"The snapshot has format version {version}; this kvtrace reads version {fmt.FORMAT_VERSION}."
        )
    if flags != 0:
        raise _corrupt(f"unknown flags {flags:#x} in the preamble")
    if header_len > fmt.MAX_HEADER_BYTES:
        raise _corrupt(f"the declared header length {header_len} exceeds the limit {fmt.MAX_HEADER_BYTES}")
    header_bytes = _read_exact(f, header_len, size, "the header")
    (checksum,) = fmt.CHECKSUM.unpack(_read_exact(f, fmt.CHECKSUM.size, size, "the header checksum"))
    if checksum != zlib.crc32(header_bytes, zlib.crc32(preamble)):
        raise _corrupt("the header checksum does not match")
    return version, decode_header(header_bytes)


def _read_record(f: BinaryIO, size: int, what: str) -> bytes:
    length, checksum = fmt.RECORD.unpack(_read_exact(f, fmt.RECORD.size, size, f"the record of {what}"))
    payload = _read_exact(f, length, size, what)
    if zlib.crc32(payload) != checksum:
        raise _corrupt(f"the checksum of {what} does not match")
    return payload


def _read_exact(f: BinaryIO, count: int, size: int, what: str) -> bytes:
    """``count`` bytes, after checking that the file still holds that many."""
    if count > size - f.tell():
        raise _corrupt(f"the file is truncated or declares too long a length for {what}")
    data = f.read(count)
    if len(data) != count:
        raise _corrupt(f"the file is truncated in {what}")
    return data


def _corrupt(reason: str) -> SnapshotError:
    return SnapshotError(f"The snapshot is corrupt: {reason}.")
