"""One chunk file of the snapshot store: a checksummed header saying what the chunk holds, then its records.

The layout is a ``.kvs`` file's (preamble, msgpack header, CRC-32, records of
``u64 length | u32 CRC-32 | zstd frame``, end marker) with its own magic and
end marker, read by the same checked code (``kvstore.records``). Records: per
layer of the chunk, its keys, its values, then its per-head scores when the
header says so. A key or value record is one zstd frame holding, head after
head, the codec's encoding of that head's entries as a ``(1, count, head_dim)``
tensor (or one ``(heads, count, head_dim)`` tensor when every head holds the same
positions, encoded as a ``.kvs`` layer is), so every decoded size follows
from the layout, codec and dtype alone.

Integrity: the file is named by the chunk's key, which the header's fields
must hash to (see ``kvstore.chunking``); the store's entry lists the SHA-256
of the header bytes; the header lists the SHA-256 of every record's stored
bytes. Every read checks all three, and every record's CRC-32.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgpack
import torch

from kvstore import format as fmt
from kvstore.chunking import Group, Layout, chunk_key
from kvstore.codecs import DTYPE_NAMES, DTYPES, ROLES, Codec
from kvstore.compression import compress
from kvstore.header import HeaderDefect, codec_of, field_of, is_int, unpack_document
from kvstore.records import RecordSpec, write_header, write_record

CHUNK = fmt.Framing(b"\x89KVC\r\n\x1a\n", (1,), b"KVC-END\n", "kvtrace store chunk")
VERSION = 1
KIND = "kvtrace-store-chunk"
DIGEST_BYTES = 32  # SHA-256


@dataclass(frozen=True)
class ChunkHeader:
    """What a chunk's header declares."""

    key: bytes
    context: bytes
    link: bytes
    start: int
    end: int
    layers: tuple[int, ...]
    layout: Layout
    head_dim: int
    dtype: torch.dtype
    codec: Codec
    head_scores: bool
    content: bytes  # SHA-256 of the raw K/V (and scores) bytes the chunk was made from
    records: tuple[bytes, ...]  # SHA-256 of each record's stored bytes, in file order

    @cached_property
    def units(self) -> list[tuple[int, int]]:
        """``(heads, count)`` of each unit of a record: one for a shared layout, else one per head."""
        counts = self.layout.counts()
        return [(self.layout.heads, counts[0])] if self.layout.shared else [(1, count) for count in counts]

    @cached_property
    def unit_bytes(self) -> dict[str, list[int]]:
        """Per record kind ("key", "value", "scores"): the decoded bytes of each unit."""
        sizes = {role: [self.codec.payload_size((heads, count, self.head_dim), self.dtype, role)
                        for heads, count in self.units] for role in ROLES}
        sizes["scores"] = [4 * heads * count for heads, count in self.units]
        return sizes

    @cached_property
    def specs(self) -> list[RecordSpec]:
        """Every record in file order with its exact decoded size."""
        specs = []
        for layer in self.layers:
            for role in ROLES:
                specs.append(RecordSpec(f"layer {layer} {role}s", sum(self.unit_bytes[role]), role, layer))
            if self.head_scores:
                specs.append(RecordSpec(f"layer {layer} head scores", sum(self.unit_bytes["scores"]), "scores",
                                        layer))
        return specs

    def computed_key(self) -> bytes:
        return chunk_key(self.context, self.link, self.start, self.end, self.layers, self.layout, self.head_scores,
                         self.content)


def encode_frames(pieces: Sequence[tuple[int, str, list[torch.Tensor]]], codec: Codec
                  ) -> list[Callable[[], bytes]]:
    """One task per record of a chunk (see ``chunking.group_tensors``), each returning its zstd frame."""
    def frame(role: str, units: list[torch.Tensor]) -> Callable[[], bytes]:
        if role == "scores":
            return lambda: compress([u.contiguous().reshape(-1).view(torch.uint8) for u in units], codec.level)
        return lambda: compress([part for u in units for part in codec.encode(u, role)], codec.level)

    return [frame(role, tensors) for _, role, tensors in pieces]


def assemble(context: bytes, link: bytes, start: int, end: int, group: Group, head_dim: int,
             dtype: torch.dtype, codec: Codec, head_scores: bool, content: bytes,
             frames: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The chunk file's bytes and the SHA-256 of its header."""
    header = ChunkHeader(
        key=chunk_key(context, link, start, end, group.layers, group.layout, head_scores, content),
        context=context, link=link, start=start, end=end, layers=group.layers, layout=group.layout,
        head_dim=head_dim, dtype=dtype, codec=codec, head_scores=head_scores, content=content,
        records=tuple(hashlib.sha256(f).digest() for f in frames),
    )
    data = msgpack.packb(_document(header), use_bin_type=True)
    parse_header(data)  # never write a chunk this reader would refuse
    out = io.BytesIO()
    write_header(out, data, CHUNK, VERSION)
    for f in frames:
        write_record(out, f)
    out.write(CHUNK.end)
    return out.getvalue(), hashlib.sha256(data).digest()


def _document(header: ChunkHeader) -> dict[str, Any]:
    return {
        "kind": KIND,
        "key": header.key,
        "context": header.context,
        "link": header.link,
        "start": header.start,
        "end": header.end,
        "layers": list(header.layers),
        "heads": header.layout.heads,
        "layout": {"shared": header.layout.shared, "bits": header.layout.bits},
        "head_dim": header.head_dim,
        "dtype": DTYPE_NAMES[header.dtype],
        "codec": header.codec.name,
        "codec_params": header.codec.params,
        "head_scores": header.head_scores,
        "content": header.content,
        "records": list(header.records),
    }


def parse_header(data: bytes) -> ChunkHeader:
    """Validate and parse a chunk header's bytes; ``HeaderDefect`` naming the first defect."""
    doc = unpack_document(data)
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise HeaderDefect("the header is not a kvtrace store chunk header")
    digests = {name: _digest(doc, name) for name in ("key", "context", "link", "content")}
    start, end = _count(doc, "start", fmt.MAX_TOKENS - 1), _count(doc, "end", fmt.MAX_TOKENS)
    if end <= start:
        raise HeaderDefect(f"the chunk's range {start}..{end} is empty")
    layers = field_of(doc, "layers", list)
    if not layers or len(layers) > fmt.MAX_LAYERS or not all(is_int(v) and 0 <= v < fmt.MAX_LAYERS for v in layers):
        raise HeaderDefect("the chunk's layers are not a list of layer indices")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise HeaderDefect("the chunk's layers are not increasing")
    heads = _count(doc, "heads", fmt.MAX_HEADS)
    head_dim = _count(doc, "head_dim", fmt.MAX_HEAD_DIM)
    if not heads or not head_dim:
        raise HeaderDefect("the chunk declares no heads or a head dimension of 0")
    layout = _layout(field_of(doc, "layout", dict), heads, end - start)
    dtype = field_of(doc, "dtype", str)
    if dtype not in DTYPES:
        raise HeaderDefect(f"unsupported dtype {dtype!r}")
    codec = codec_of(doc)
    head_scores = field_of(doc, "head_scores", bool)
    records = field_of(doc, "records", list)
    if len(records) != len(layers) * (3 if head_scores else 2) or not all(
            isinstance(r, bytes) and len(r) == DIGEST_BYTES for r in records):
        raise HeaderDefect("the chunk's record digests do not match its layers")
    return ChunkHeader(key=digests["key"], context=digests["context"], link=digests["link"], start=start, end=end,
                       layers=tuple(layers), layout=layout, head_dim=head_dim, dtype=DTYPES[dtype], codec=codec,
                       head_scores=head_scores, content=digests["content"], records=tuple(records))


def _layout(doc: dict[str, Any], heads: int, width: int) -> Layout:
    shared = field_of(doc, "shared", bool)
    bits = field_of(doc, "bits", bytes)
    layout = Layout(heads, width, shared, bits)
    if len(bits) != layout.rows * layout.row_bytes:
        raise HeaderDefect("the chunk's layout does not have one bitmap row per head")
    if width % 8 and any(bits[(row + 1) * layout.row_bytes - 1] & (0xFF >> (width % 8)) for row in range(layout.rows)):
        raise HeaderDefect("the chunk's layout sets bits past its range")
    if not any(bits):
        raise HeaderDefect("the chunk's layout holds no entry")
    return layout


def _digest(doc: dict[str, Any], name: str) -> bytes:
    value = field_of(doc, name, bytes)
    if len(value) != DIGEST_BYTES:
        raise HeaderDefect(f"the header field {name!r} is not a {DIGEST_BYTES}-byte digest")
    return value


def _count(doc: dict[str, Any], name: str, limit: int) -> int:
    value = field_of(doc, name, int)
    if not 0 <= value <= limit:
        raise HeaderDefect(f"the header field {name!r} is outside 0..{limit}")
    return value
