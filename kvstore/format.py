"""The binary layout of a ``.kvs`` snapshot file and the limits a reader enforces.

Layout (all integers little-endian; docs/FORMAT.md is the full description)::

    preamble   8s magic | u16 version | u16 flags (0) | u32 header_len
    header     header_len bytes of msgpack (see kvstore.header)
    u32        CRC-32 of preamble + header
    2 x L records, layer by layer, K then V:
        u64 payload_len | u32 CRC-32 of payload | payload (one zstd frame)
    8s         end marker

Every size read from a file is checked against these limits and against the
bytes actually left in the file before anything is allocated.
"""

from __future__ import annotations

import struct

MAGIC = b"\x89KVS\r\n\x1a\n"  # PNG-style: catches text-mode and truncation damage
END_MARKER = b"KVS-END\n"
FORMAT_VERSION = 1

# The one table of codec names: what each stores, for --help, the save dialog and error messages.
CODECS: dict[str, str] = {
    "lossless": "exact: the tensors' own bytes, byte-shuffled, zstd (bit for bit, any dtype)",
    "fp16": "float16, shuffled, zstd: about 2.5x smaller, tiny error",
    "bf16": "bfloat16, shuffled, zstd: about 3x smaller, small error",
    "int8": "8-bit codes (keys per channel, values per token): about 4x smaller",
    "int4": "4-bit codes, sinks and recent entries exact: about 7-8x smaller, visible error",
}
CODEC_NAMES = tuple(CODECS)
DEFAULT_CODEC = "lossless"

PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header length
CHECKSUM = struct.Struct("<I")  # CRC-32 (zlib.crc32)
RECORD = struct.Struct("<QI")  # payload length, CRC-32 of the payload

# Sane limits: far above any real model, far below what would exhaust memory.
MAX_HEADER_BYTES = 64 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 16384
MAX_TOKENS = 1 << 22
MAX_NESTING = 32  # depth of msgpack containers in the header (metadata included)
MAX_CONTAINER_LEN = 1 << 22  # entries of one msgpack array or map (per-token texts fit)
MAX_STRING_BYTES = 16 << 20
MAX_PAYLOAD_BYTES = 4 << 30  # decoded bytes of one layer's K or V
DEFAULT_MAX_STATE_BYTES = 32 << 30  # decoded bytes of the whole state (load(max_bytes=...))
