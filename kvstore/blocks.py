"""Trace blocks of the snapshot store: a state's trace cut into fixed-size pieces, each addressed by its SHA-256.

The tracer writes its trace as a stream that only grows at the end (records
are appended; a branch cuts the tail), so the trace of turn 5 begins with the
bytes of turn 4's: cut on a fixed grid, every block but the last is shared
with the save before. A block file is a preamble, a msgpack header (its
digest and length), its CRC-32, one record (a zstd frame) and an end marker;
its name is its digest, which a reader checks against the decoded bytes.
"""

from __future__ import annotations

import hashlib
import io

import msgpack
import zstandard

from kvstore import format as fmt
from kvstore.compression import ZSTD_LEVEL
from kvstore.header import HeaderDefect, field_of, unpack_document
from kvstore.records import write_header, write_record

BLOCK = fmt.Framing(b"\x89KVB\r\n\x1a\n", (1,), b"KVB-END\n", "kvtrace store block")
VERSION = 1
KIND = "kvtrace-store-block"
BLOCK_BYTES = 256 << 10  # what a save cuts the trace into
MAX_BLOCK_BYTES = 16 << 20  # what a reader accepts


def split(trace: bytes) -> list[bytes]:
    return [trace[i:i + BLOCK_BYTES] for i in range(0, len(trace), BLOCK_BYTES)]


def encode_block(data: bytes) -> tuple[bytes, bytes]:
    """``(digest, file bytes)`` of a block holding ``data``."""
    digest = hashlib.sha256(data).digest()
    header = msgpack.packb({"kind": KIND, "digest": digest, "length": len(data)}, use_bin_type=True)
    out = io.BytesIO()
    write_header(out, header, BLOCK, VERSION)
    write_record(out, zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
    out.write(BLOCK.end)
    return digest, out.getvalue()


def parse_header(data: bytes) -> tuple[bytes, int]:
    """``(digest, length)`` a block header declares; ``HeaderDefect`` when it is malformed."""
    doc = unpack_document(data)
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise HeaderDefect("the header is not a kvtrace store block header")
    digest, length = field_of(doc, "digest", bytes), field_of(doc, "length", int)
    if len(digest) != 32 or not 1 <= length <= MAX_BLOCK_BYTES:
        raise HeaderDefect("the block header's digest or length is malformed")
    return digest, length
