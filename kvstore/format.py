"""The binary layout of a ``.kvs`` snapshot file and the limits a reader enforces.

Layout (all integers little-endian; docs/FORMAT.md is the full description)::

    preamble   8s magic | u16 version | u16 flags (0) | u32 header_len
    header     header_len bytes of msgpack (see kvstore.header)
    u32        CRC-32 of preamble + header
    records    per layer: K, V, then P (per-head positions) and S (per-head
               scores) when the header flags them; then the trace when the
               header declares one (version 1: K and V only, no trace).
               Each: u64 payload_len | u32 CRC-32 of payload | payload (zstd)
    8s         end marker

Every size read from a file is checked against these limits, against what the
header implies and against the bytes actually left in the file before
anything is allocated or decompressed.
"""

from __future__ import annotations

import os
import resource
import struct
from dataclasses import dataclass

MAGIC = b"\x89KVS\r\n\x1a\n"  # PNG-style: catches text-mode and truncation damage
END_MARKER = b"KVS-END\n"
FORMAT_VERSION = 2  # what save() writes
READABLE_VERSIONS = (1, 2)

# The one table of codec names: what each stores, for --help, the save dialog and error messages.
CODECS: dict[str, str] = {
    "lossless": "exact: the tensors' own bytes, byte-shuffled, zstd (bit for bit, any dtype)",
    "raw": "exact and fastest: the tensors' own bytes, fast zstd, no shuffle (larger files)",
    "fp16": "float16, shuffled, zstd: about 2.5x smaller, tiny error",
    "bf16": "bfloat16, shuffled, zstd: about 3x smaller, small error",
    "int8": "8-bit codes (keys per channel, values per token): about 4x smaller",
    "int4": "4-bit codes, sinks and recent entries exact: about 7-8x smaller, visible error",
}
CODEC_NAMES = tuple(CODECS)
DEFAULT_CODEC = "lossless"



@dataclass(frozen=True)
class Framing:
    """What tells one kind of kvtrace file from another: its magic, readable versions and end marker.

    ``.kvs`` snapshots and the store's files share the preamble, header checksum
    and record layout (and the reader that checks them); only these differ.
    """

    magic: bytes  # 8 bytes
    versions: tuple[int, ...]
    end: bytes  # 8 bytes
    what: str  # how messages name the kind: "kvtrace snapshot"


SNAPSHOT = Framing(MAGIC, READABLE_VERSIONS, END_MARKER, "kvtrace snapshot")

PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header length
CHECKSUM = struct.Struct("<I")  # CRC-32 (zlib.crc32)
RECORD = struct.Struct("<QI")  # payload length, CRC-32 of the payload

# Sane limits: far above any real model, far below what would exhaust memory.
MAX_HEADER_BYTES = 64 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 16384
MAX_TOKENS = 1 << 22
MAX_VOCAB = 1 << 32  # token ids are u32
MAX_NESTING = 32  # depth of msgpack containers in the header (metadata included)
MAX_CONTAINER_LEN = 1 << 22  # entries of one msgpack array or map (per-token texts fit)
MAX_STRING_BYTES = 16 << 20
MAX_PAYLOAD_BYTES = 4 << 30  # decoded bytes of one record
MAX_TRACE_BYTES = 512 << 20  # decoded bytes of the trace record
MAX_WINDOW_BYTES = 1 << 25  # zstd back-reference window a reader accepts (bounds decoder memory per thread)
# A record may decode to at most MAX_EXPANSION times its compressed length plus EXPANSION_SLACK:
# real caches compress 1.2-8x, so only a crafted frame (a zstd bomb) comes near it, and a small
# file can never make the reader grind through gigabytes.
MAX_EXPANSION = 1024
EXPANSION_SLACK = 1 << 20
# Unix times a header may carry as ``created``: 1970 to the end of year 9999 (what datetime handles).
MAX_CREATED = 253402300799.0


def default_max_bytes() -> int:
    """The default budget for a decoded state: 8 GiB, or half the memory this process may use if less.

    "May use": the physical memory, and the address-space limit (``ulimit -v``) when one is set.
    """
    limits = [8 << 30]
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):  # platforms without these names
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft // 2)
    return min(limits)


def max_frame_bytes(decoded: int) -> int:
    """The longest zstd frame a writer can need for ``decoded`` bytes (ZSTD_compressBound plus headers)."""
    return decoded + (decoded >> 8) + (128 << 10)


def max_decoded_bytes(frame: int) -> int:
    """The most a record of ``frame`` compressed bytes may decode to (see MAX_EXPANSION)."""
    return frame * MAX_EXPANSION + EXPANSION_SLACK
