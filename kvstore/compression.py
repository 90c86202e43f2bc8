"""Byte shuffling and bounded streaming zstd: the primitives every codec and record uses.

Byte shuffling groups the n-th byte of every element together (all exponents,
then all high mantissa bytes, ...), which is what lets zstd find redundancy in
floating point data. Both directions copy one byte plane at a time (a strided
copy per plane), several times faster than transposing the whole byte matrix,
with numpy: its copies release the GIL and never fork torch's intra-op threads,
which for the many mid-sized copies of the snapshot store's chunks cost more
than they save (ten times more on a busy two-core machine).

Decompression never trusts a frame's declared content size: it streams from
the file into a buffer of exactly the size the header promised and asks for
one byte more to detect a frame that expands further, so memory and time are
bounded by the header, not by the frame.
"""

from __future__ import annotations

from typing import Protocol

import torch
import zstandard

from kvstore import format as fmt
from kvstore.errors import one_line

ZSTD_LEVEL = 1  # measured on SmolLM2 caches: levels 1-9 give the same ratio, 1 is fastest
READ_SIZE = 1 << 20  # compressed bytes read from the file per step of a streaming decompression
BLOCK_CHUNK = 8192  # a chunk this long to ``compress`` ends a zstd block (shorter ones gain less than tables cost)


class FrameError(ValueError):
    """A payload that does not decompress to exactly the declared size (the caller names the record)."""


class Source(Protocol):
    def read(self, size: int = -1) -> bytes: ...


def shuffle_planes(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``shuffle``'s output as one uint8 tensor per byte plane (``compress`` keeps each in its own blocks)."""
    return list(shuffle(tensor).reshape(tensor.element_size(), -1))


def shuffle(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, byte-plane by byte-plane, as a flat uint8 tensor."""
    flat = tensor.contiguous().reshape(-1)
    size = flat.element_size()
    matrix = flat.view(torch.uint8).numpy().reshape(-1, size)
    planes = torch.empty(size, flat.numel(), dtype=torch.uint8)
    target = planes.numpy()
    for plane in range(size):
        target[plane] = matrix[:, plane]
    return planes.reshape(-1)


def unshuffle_into(data: torch.Tensor, out: torch.Tensor) -> None:
    """Inverse of ``shuffle``: the uint8 byte planes ``data`` written into ``out``.

    ``out`` may be a strided view (a slice of a larger tensor) as long as its
    last dimension is contiguous: the snapshot store decodes a chunk straight
    into its place in the layer.
    """
    if out.numel() == 0:
        return
    size = out.element_size()
    matrix = byte_matrix(out).numpy()
    planes = data.numpy().reshape(size, *out.shape)
    for plane in range(size):
        matrix[..., plane] = planes[plane]


def byte_matrix(out: torch.Tensor) -> torch.Tensor:
    """``out``'s bytes as a ``(*out.shape, element_size)`` uint8 view (its last dimension must be contiguous)."""
    return out.view(torch.uint8).unflatten(-1, (out.shape[-1], out.element_size()))


def unshuffle(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A new tensor of ``dtype`` and ``shape`` from shuffled bytes."""
    out = torch.empty(shape, dtype=dtype)
    unshuffle_into(data, out)
    return out


def compress(chunks: list[torch.Tensor], level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame holding the uint8 ``chunks`` one after the other.

    A chunk of ``BLOCK_CHUNK`` bytes or more ends a zstd block, so a block
    never mixes, say, the exponent bytes of one byte plane with the mantissa
    bytes of the next: each block's entropy tables fit one kind of byte (the
    snapshot store's chunks hold 16 KiB planes, where this saves 8 percent).
    The bytes decoded are the same either way.
    """
    total = sum(c.numel() for c in chunks)
    compressor = zstandard.ZstdCompressor(level=level).compressobj(size=total)
    parts = []
    for chunk in chunks:
        if chunk.numel():
            parts.append(compressor.compress(chunk.numpy()))
            if chunk.numel() >= BLOCK_CHUNK:
                parts.append(compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    parts.append(compressor.flush())
    return b"".join(parts)


def decompress_into(source: Source, out: memoryview | None, expected: int) -> None:
    """Stream ``source`` (zstd frames) into ``out``, which must end up holding exactly ``expected`` bytes.

    With ``out=None`` the output is decoded into a small rolling buffer and
    discarded (verification in constant memory). ``FrameError`` when the data
    does not decompress, or to fewer or more bytes than ``expected``.
    """
    rolling = out is None
    view = memoryview(bytearray(min(expected, READ_SIZE) or 1)) if rolling else out
    decompressor = zstandard.ZstdDecompressor(max_window_size=fmt.MAX_WINDOW_BYTES)
    filled = 0
    try:
        with decompressor.stream_reader(source, read_size=READ_SIZE, read_across_frames=True,
                                        closefd=False) as reader:
            while filled < expected:
                want = min(len(view), expected - filled) if rolling else expected - filled
                n = reader.readinto(view[:want] if rolling else view[filled:])
                if n == 0:
                    break
                filled += n
            overflow = reader.read(1)
    except zstandard.ZstdError as error:
        raise FrameError(f"does not decompress ({one_line(error)})") from None
    if overflow:
        raise FrameError(f"decompresses to more bytes than the {expected} its header declares")
    if filled != expected:
        raise FrameError(f"decompresses to {filled} bytes, not the {expected} its header declares")
