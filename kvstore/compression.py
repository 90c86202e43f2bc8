"""Byte shuffling and zstd with a bounded output: the two primitives every codec uses.

Byte shuffling groups the n-th byte of every element together (all exponents,
then all high mantissa bytes, ...), which is what lets zstd find redundancy in
floating point data. Decompression never trusts a frame's declared content
size: it reads at most the size the header promised, plus one byte to detect
a frame that expands further.
"""

from __future__ import annotations

import io

import torch
import zstandard

from kvstore.errors import SnapshotError

ZSTD_LEVEL = 1  # measured on SmolLM2 caches: levels 1-9 give the same ratio, 1 is fastest
# Largest back-reference window a reader accepts (bounds decoder memory).
MAX_WINDOW_BYTES = 1 << 27


def shuffle(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, byte-plane by byte-plane, as a flat uint8 tensor."""
    flat = tensor.contiguous().reshape(-1)
    size = flat.element_size()
    return flat.view(torch.uint8).reshape(-1, size).t().contiguous().reshape(-1)


def unshuffle(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``shuffle``: uint8 byte planes back to a tensor of ``dtype`` and ``shape``."""
    size = torch.empty((), dtype=dtype).element_size()
    if data.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return data.reshape(size, -1).t().contiguous().view(dtype).reshape(shape)


def compress(chunks: list[torch.Tensor]) -> bytes:
    """One zstd frame holding the uint8 ``chunks`` one after the other."""
    total = sum(c.numel() for c in chunks)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj(size=total)
    parts = [compressor.compress(c.numpy()) for c in chunks]
    parts.append(compressor.flush())
    return b"".join(parts)


def decompress(frame: bytes, expected: int, what: str) -> torch.Tensor:
    """Exactly ``expected`` bytes from one zstd frame, as uint8; ``SnapshotError`` otherwise."""
    out = bytearray(expected)
    view = memoryview(out)
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    try:
        with decompressor.stream_reader(io.BytesIO(frame), read_across_frames=False) as reader:
            filled = 0
            while filled < expected:
                n = reader.readinto(view[filled:])
                if n == 0:
                    break
                filled += n
            overflow = reader.read(1)
    except zstandard.ZstdError as error:
        raise SnapshotError(f"The snapshot is corrupt: {what} does not decompress ({error}).") from None
    if filled != expected or overflow:
        raise SnapshotError(
            f"The snapshot is corrupt: {what} decompresses to "
            f"{'more' if overflow else filled} bytes, not the {expected} its header declares."
        )
    return torch.frombuffer(out, dtype=torch.uint8) if expected else torch.empty(0, dtype=torch.uint8)
