"""Save, load and describe ``.kvs`` snapshot files.

Writing encodes and compresses the records on a thread pool and streams them,
in file order, into an atomic temporary file. Reading checks the magic,
version and header checksum, validates the header (fields, their agreement
with each other and with the fingerprint), compares the fingerprint with the
expected model, checks the decoded size against a memory budget and every
record's length against the file, and only then allocates the output tensors
and decodes the payloads into them in parallel, each to exactly the size the
header implies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from kvstore import format as fmt
from kvstore.atomic import atomic_writer
from kvstore.codecs import DTYPE_NAMES, ROLES, make_codec
from kvstore.errors import FingerprintMismatch, SnapshotError, one_line
from kvstore.header import Header, decode_header, encode_header
from kvstore.pipeline import decode_records, default_threads, encoded_frames
from kvstore.records import RecordSpec, corrupt, locate_records, read_header, write_header, write_record
from kvstore.safe_io import open_regular
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
    created: float  # Unix seconds; 0.0 when the file does not say (or says something absurd)
    num_layers: int
    has_attention_scores: bool
    raw_bytes: int  # the K/V tensors uncompressed, in their own dtype
    file_bytes: int
    layer_entries: list[int] = field(repr=False)  # entries per layer (a sliding-window layer holds its window)
    per_head: bool = False  # some layer stores per-head positions (per-head pruning)
    has_head_scores: bool = False
    trace_bytes: int | None = None  # size of the stored trace; None: no trace
    state_bytes: int = 0  # memory the decoded state takes (what load's max_bytes is compared with)
    container: str = "kvtrace snapshot"  # what ``path`` names: a file, or "kvtrace store entry" DIR:NAME

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


def check_savable(state: KVState) -> None:
    """``SnapshotError`` (one line) unless ``state`` is consistent and its trace fits the format: checked
    before a ``.kvs`` file or a store entry is written, so nothing half-valid is ever published."""
    try:
        state.validate()
    except ValueError as error:
        raise SnapshotError(f"cannot save an inconsistent kv state: {error}") from None
    if state.trace is not None and len(state.trace) > fmt.MAX_TRACE_BYTES:
        raise SnapshotError(f"cannot save a trace of {len(state.trace)} bytes: the format allows "
                            f"{fmt.MAX_TRACE_BYTES}")


def save(state: KVState, path: str | os.PathLike[str], *, codec: str = fmt.DEFAULT_CODEC,
         threads: int | None = None) -> int:
    """Write ``state`` to ``path`` atomically (format version 2); returns the bytes written.

    ``path`` may be a new file, an existing regular file or a symlink to one
    (its target is replaced); see ``kvstore.atomic``. ``threads`` compress
    payloads in parallel (default: one per core, at most 8).
    """
    check_savable(state)
    chosen = make_codec(codec)
    header = encode_header(state, chosen)
    with atomic_writer(path) as out:
        written = write_header(out, header)
        for frame in encoded_frames(state, chosen, threads or default_threads()):
            written += write_record(out, frame)
        out.write(fmt.END_MARKER)
        written += len(fmt.END_MARKER)
    return written


def read_info(path: str | os.PathLike[str]) -> SnapshotInfo:
    """The header of the snapshot at ``path`` (checksummed and validated); no payload is read.

    Fast and header-only: damage in the payloads shows only in
    ``kvstore.verify.verify`` or ``load``.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, _ = _header(f, size, path)
    return SnapshotInfo(
        path=Path(path),
        format_version=header.version,
        codec=header.codec.name,
        codec_params=dict(header.codec.params),
        dtype=DTYPE_NAMES[header.dtype],
        fingerprint=header.fingerprint,
        token_ids=header.token_ids,
        positions=header.positions,
        metadata=header.metadata,
        label=header.label,
        created=header.created,
        num_layers=len(header.layers),
        has_attention_scores=header.attention_scores is not None,
        raw_bytes=header.raw_bytes,
        file_bytes=size,
        layer_entries=[spec.entries for spec in header.layers],
        per_head=any(spec.head_positions for spec in header.layers),
        has_head_scores=any(spec.head_scores for spec in header.layers),
        trace_bytes=header.trace_bytes,
        state_bytes=header.state_bytes,
    )


def load(
    path: str | os.PathLike[str],
    *,
    expected: ModelFingerprint | None = None,
    max_bytes: int | None = None,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
) -> KVState:
    """Read a snapshot, refusing it before any payload is decoded when it cannot fit.

    * ``expected``: the model's fingerprint; another model's snapshot raises
      ``FingerprintMismatch``.
    * ``max_bytes``: memory budget for the decoded state plus the decoders'
      buffers (default ``format.default_max_bytes()``: 8 GiB or half the
      physical memory); fewer threads are used when that lets a load fit.
    * ``max_tokens``: refuse transcripts longer than this (the model's context).
    * ``device``: where K and V end up (default CPU); for CUDA they are decoded
      into pinned memory and copied asynchronously, layer by layer.
    * ``threads``: decoding threads (default one per core, at most 8).
    """
    target = _device(device)
    budget = fmt.default_max_bytes() if max_bytes is None else max_bytes
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _header(f, size, path)
        if expected is not None:
            check_fingerprint(header.fingerprint, expected)
        if max_tokens is not None and len(header.token_ids) > max_tokens:
            raise SnapshotError(f"the snapshot's transcript is {len(header.token_ids)} tokens long, more than "
                                f"the {max_tokens} tokens the model takes")
        specs = header.records()
        threads = _threads_within(header, specs, budget, threads or default_threads())
        records = locate_records(f.fileno(), start, size, specs)
        decoded = decode_records(f.fileno(), header, records, threads, target)
    state = KVState(
        keys=decoded.keys,
        values=decoded.values,
        token_ids=header.token_ids,
        positions=header.positions,
        fingerprint=header.fingerprint,
        attention_scores=header.attention_scores,
        metadata=header.metadata,
        head_positions=decoded.head_positions,
        head_scores=decoded.head_scores,
        trace=decoded.trace,
    )
    try:
        state.validate()
    except ValueError as error:
        raise corrupt(str(error)) from None
    return state


def check_fingerprint(found: ModelFingerprint, expected: ModelFingerprint) -> None:
    """``FingerprintMismatch`` naming every field that differs, when a snapshot does not fit a model."""
    differences = expected.differences(found)
    if differences:
        raise FingerprintMismatch(
            f"the snapshot was made by another model ({found.model_id}, not {expected.model_id}): "
            + "; ".join(differences)
        )


def _header(f: BinaryIO, size: int, path: str | os.PathLike[str]) -> tuple[Header, int]:
    """The validated header and the offset of the first record."""
    version, data, start = read_header(f, size, path)
    return decode_header(data, version), start


def _threads_within(header: Header, specs: list[RecordSpec], budget: int, threads: int) -> int:
    """As many threads (up to ``threads``) as the memory budget allows; ``SnapshotError`` if not even one.

    The budget covers the decoded state and, per thread, the largest decode's
    transient buffers.
    """
    too_big = [spec for spec in specs if spec.decoded > fmt.MAX_PAYLOAD_BYTES]
    if too_big:
        raise SnapshotError(f"the snapshot declares {_size(too_big[0].decoded)} for {too_big[0].name}, more than "
                            f"the format's {_size(fmt.MAX_PAYLOAD_BYTES)} per record")
    work = max((header.codec.work_bytes(header.shape(layer, role), header.dtype, role)
                for layer in range(len(header.layers)) for role in ROLES), default=0)
    work = max(work, max((12 * spec.key[0] * spec.entries for spec in header.layers), default=0))  # u32 to int64
    need = header.state_bytes
    if need + work > budget:
        raise SnapshotError(f"loading the snapshot needs {_size(need + work)} of memory, more than the "
                            f"limit of {_size(budget)}")
    threads = max(1, min(threads, len(specs)))
    while threads > 1 and need + threads * work > budget:
        threads -= 1
    return threads


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 1 << 30 else f"{count / 2**20:.1f} MiB"


def _device(device: str | torch.device | None) -> torch.device:
    try:
        target = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as error:
        raise SnapshotError(f"cannot load onto {device!r}: {one_line(error)}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise SnapshotError(f"cannot load onto {target}: this torch has no usable CUDA device")
    return target
