"""One entry file of the snapshot store: a named state as a chain of chunk references.

An entry holds a ``.kvs`` version 2 header (transcript, positions, metadata,
fingerprint, codec, per-layer entry counts; parsed by ``kvstore.header`` with
all its checks), its parent entry's name, its ranges (bounds, link and the
chunks of each: key, SHA-256 of the chunk's header, file size) and the blocks
of its trace, and when it was saved. The file is a preamble, a msgpack document, its CRC-32 and an
end marker; its name (``entries/NAME.kve``) is the entry's name.

Reading checks the document's types and sizes, that the ranges tile the
cached positions' span in order, and that every link is the hash of the
transcript it claims (so an entry cannot name chunks of another conversation).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from kvstore import format as fmt
from kvstore.blocks import MAX_BLOCK_BYTES
from kvstore.chunking import context_digest, next_link, root_link
from kvstore.codecs import DTYPE_NAMES
from kvstore.errors import CorruptError, SnapshotError
from kvstore.header import Header, HeaderDefect, decode_header, field_of, is_int, unpack_document
from kvstore.metadata import sane_time
from kvstore.records import write_header

ENTRY = fmt.Framing(b"\x89KVE\r\n\x1a\n", (1,), b"KVE-END\n", "kvtrace store entry")
VERSION = 1
KIND = "kvtrace-store-entry"
DIGEST_BYTES = 32
MAX_FILE_BYTES = 1 << 50  # a chunk or block size an entry may declare
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit, not ending in .kvs"


def valid_name(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and not name.endswith(".kvs")


def check_name(name: str) -> str:
    if not valid_name(name):
        raise SnapshotError(f"{name!r} is not a store entry name ({NAME_RULE})")
    return name


@dataclass(frozen=True)
class ChunkRef:
    key: bytes
    digest: bytes  # SHA-256 of the chunk's header bytes
    size: int  # bytes of the chunk file


@dataclass(frozen=True)
class RangeRef:
    start: int
    end: int
    link: bytes
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True)
class BlockRef:
    digest: bytes  # SHA-256 of the block's bytes (its address)
    length: int  # bytes of trace it holds
    size: int  # bytes of the block file


@dataclass(frozen=True)
class Entry:
    parent: str | None
    saved: float  # when the entry was written (Unix seconds; 0.0 when absurd)
    header: Header
    header_bytes: bytes
    ranges: tuple[RangeRef, ...]
    blocks: tuple[BlockRef, ...]

    @property
    def context(self) -> bytes:
        return entry_context(self.header)

    @property
    def chunk_refs(self) -> list[ChunkRef]:
        return [chunk for r in self.ranges for chunk in r.chunks]


def entry_context(header: Header) -> bytes:
    return context_digest(header.fingerprint.to_dict(), header.codec.name, header.codec.params,
                          DTYPE_NAMES[header.dtype])


def encode_entry(parent: str | None, saved: float, header_bytes: bytes, ranges: Sequence[RangeRef],
                 blocks: Sequence[BlockRef]) -> bytes:
    """The bytes of an entry file."""
    doc = {
        "kind": KIND,
        "parent": parent,
        "saved": saved,
        "header": header_bytes,
        "ranges": [[r.start, r.end, r.link, [[c.key, c.digest, c.size] for c in r.chunks]] for r in ranges],
        "trace": [[b.digest, b.length, b.size] for b in blocks],
    }
    data = msgpack.packb(doc, use_bin_type=True)
    parse_entry(data)  # never write an entry this reader would refuse
    out = io.BytesIO()
    write_header(out, data, ENTRY, VERSION)
    out.write(ENTRY.end)
    return out.getvalue()


def parse_entry(data: bytes) -> Entry:
    """Validate an entry document; ``CorruptError`` naming the first defect."""
    try:
        doc = unpack_document(data)
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise HeaderDefect("the document is not a kvtrace store entry")
        parent = doc.get("parent")
        if parent is not None and not (isinstance(parent, str) and valid_name(parent)):
            raise HeaderDefect("the parent is not an entry name")
        header_bytes = field_of(doc, "header", bytes)
        saved = sane_time(field_of(doc, "saved", (int, float))) or 0.0
    except HeaderDefect as defect:
        raise _corrupt(str(defect)) from None
    try:
        header = decode_header(header_bytes, fmt.FORMAT_VERSION)
    except CorruptError as error:
        raise _corrupt(error.reason) from None
    try:
        ranges = _ranges(field_of(doc, "ranges", list), header)
        blocks = _blocks(field_of(doc, "trace", list), header)
    except HeaderDefect as defect:
        raise _corrupt(str(defect)) from None
    return Entry(parent, saved, header, header_bytes, ranges, blocks)


def _corrupt(reason: str) -> CorruptError:
    return CorruptError(f"the store entry is corrupt: {reason}", reason)


def _ranges(items: list[Any], header: Header) -> tuple[RangeRef, ...]:
    tokens = np.asarray(header.token_ids, dtype=np.int64)
    stop = len(header.token_ids) - 1
    link, start, ranges = root_link(entry_context(header)), 0, []
    if len(items) > max(stop, 0):
        raise HeaderDefect("the entry has more ranges than cached positions")
    for item in items:
        if not (isinstance(item, list) and len(item) == 4 and is_int(item[0]) and is_int(item[1])
                and isinstance(item[2], bytes) and isinstance(item[3], list)):
            raise HeaderDefect("a range is not [start, end, link, chunks]")
        first, end, claimed, chunks = item
        if first != start or not start < end <= stop:
            raise HeaderDefect("the ranges do not cover the cached positions in order")
        link = next_link(link, start, end, tokens[start:end])
        if claimed != link:
            raise HeaderDefect(f"the link of positions {start}..{end - 1} does not match the transcript")
        if len(chunks) > len(header.layers):
            raise HeaderDefect(f"positions {start}..{end - 1} name more chunks than there are layers")
        ranges.append(RangeRef(start, end, link, tuple(_chunk(c) for c in chunks)))
        start = end
    if start != stop:
        raise HeaderDefect("the ranges do not cover the cached positions in order")
    return tuple(ranges)


def _chunk(item: Any) -> ChunkRef:
    if not (isinstance(item, list) and len(item) == 3 and all(_is_digest(v) for v in item[:2])
            and is_int(item[2]) and 0 <= item[2] <= MAX_FILE_BYTES):
        raise HeaderDefect("a chunk reference is not [key, digest, size]")
    return ChunkRef(*item)


def _blocks(items: list[Any], header: Header) -> tuple[BlockRef, ...]:
    blocks = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and _is_digest(item[0]) and is_int(item[1])
                and 1 <= item[1] <= MAX_BLOCK_BYTES and is_int(item[2]) and 0 <= item[2] <= MAX_FILE_BYTES):
            raise HeaderDefect("a trace block reference is not [digest, length, size]")
        blocks.append(BlockRef(*item))
    total = sum(b.length for b in blocks)
    if total != (header.trace_bytes or 0):
        raise HeaderDefect(f"the trace blocks hold {total} bytes, not the {header.trace_bytes or 0} its header "
                           "declares")
    return tuple(blocks)


def _is_digest(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == DIGEST_BYTES
