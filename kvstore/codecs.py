"""Codecs: how one layer's K or V tensor becomes the bytes of one payload, and back.

A codec turns a ``(kv_heads, n, head_dim)`` tensor into uint8 chunks that are
compressed together as one zstd frame. The decoded payload size follows from
the header alone (``payload_size``), so a reader knows exactly how many bytes
to expect before it decompresses anything, and decoding writes into a tensor
the reader allocated up front (``decode_into``).

* ``lossless``: the tensor's own bytes, byte-shuffled. Bit exact for any dtype.
* ``raw``: the tensor's own bytes as they are, at zstd's fastest level: bit
  exact, larger files, and the reader decompresses straight into the output
  tensor (no shuffle, no intermediate buffer). The speed end of the trade-off.
* ``fp16`` / ``bf16``: cast, then byte-shuffled.
* ``int8``: keys quantized per channel (asymmetric, one scale and zero per
  head and channel over all tokens: keys carry per-channel outliers), values
  per token (symmetric, one scale per head and token).
* ``int4``: the same scheme with 4-bit codes packed two per byte, key scales
  per group of ``key_group`` tokens (a channel's range drifts along a long
  context); the first ``sinks`` and the last ``recent`` entries are stored
  exactly, because attention concentrates on them and errors there cost the
  most (KIVI, Liu et al. 2024, uses the same split).

Scales and zeros are float16. Payload layout and formulas: docs/FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvstore.compression import ZSTD_LEVEL, shuffle, shuffle_planes, unshuffle, unshuffle_into
from kvstore.errors import SnapshotError
from kvstore.format import CODEC_NAMES

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ROLES = ("key", "value")
DEFAULT_INT4_SINKS = 4
DEFAULT_INT4_RECENT = 32
DEFAULT_INT4_KEY_GROUP = 256
MAX_CODEC_PARAM = 1 << 22  # sinks, recent and key_group beyond any sequence a snapshot can hold
RAW_ZSTD_LEVEL = -1  # measured in bench/snapshot.py: see the README's frontier table
_FP16_MAX = 65504.0


def _nbytes(count: int, dtype: torch.dtype) -> int:
    return count * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CastCodec:
    """Store the tensor in ``store`` dtype (``None``: its own dtype, lossless), shuffled or as is."""

    name: str
    store: torch.dtype | None
    shuffled: bool = True
    level: int = ZSTD_LEVEL
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def direct(self) -> bool:
        """The payload is exactly the output tensor's bytes: decompress straight into it."""
        return self.store is None and not self.shuffled

    def payload_size(self, shape: tuple[int, int, int], dtype: torch.dtype, role: str) -> int:
        return _nbytes(shape[0] * shape[1] * shape[2], self.store or dtype)

    def work_bytes(self, shape: tuple[int, int, int], dtype: torch.dtype, role: str) -> int:
        """Transient memory of one decode besides its output: the payload buffer and a cast's copy."""
        if self.direct:
            return 0
        size = self.payload_size(shape, dtype, role)
        return size if self.store is None else 2 * size

    def encode(self, x: torch.Tensor, role: str) -> list[torch.Tensor]:
        stored = x if self.store is None else x.to(self.store)
        return shuffle_planes(stored) if self.shuffled else [stored.contiguous().reshape(-1).view(torch.uint8)]

    def decode_into(self, data: torch.Tensor, out: torch.Tensor, role: str) -> None:
        if self.direct:
            out.view(torch.uint8).copy_(data.view(*out.shape[:-1], -1))
        elif self.store is None:
            unshuffle_into(data, out)
        else:
            out.copy_(unshuffle(data, self.store, tuple(out.shape)))


@dataclass(frozen=True)
class QuantCodec:
    """Integer codes with float16 scales; ``sinks`` first and ``recent`` last entries exact."""

    name: str
    bits: int
    sinks: int = 0
    recent: int = 0
    key_group: int = 0  # tokens sharing one key scale per channel; 0 = all quantized tokens
    level: int = ZSTD_LEVEL
    direct = False

    @property
    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "recent": self.recent, "key_group": self.key_group}

    def _group(self, middle: int) -> int:
        """Tokens per key group; a group larger than the quantized block is the block itself."""
        return min(self.key_group, middle) if self.key_group else middle

    def _split(self, seq: int) -> tuple[int, int, int]:
        """Entries kept exact at the start, quantized in the middle, exact at the end."""
        head = min(self.sinks, seq)
        tail = min(self.recent, seq - head)
        return head, seq - head - tail, tail

    def payload_size(self, shape: tuple[int, int, int], dtype: torch.dtype, role: str) -> int:
        heads, seq, dim = shape
        head, middle, tail = self._split(seq)
        size = _nbytes(heads * (head + tail) * dim, dtype)
        if middle:
            codes = heads * middle * dim
            size += codes if self.bits == 8 else (codes + 1) // 2
            groups = -(-middle // self._group(middle))
            scales = 2 * heads * dim * groups if role == "key" else heads * middle
            size += _nbytes(scales, torch.float16)
        return size

    def work_bytes(self, shape: tuple[int, int, int], dtype: torch.dtype, role: str) -> int:
        """The payload buffer plus float32 intermediates of the quantized block (codes, scale, zero, body)."""
        heads, seq, dim = shape
        return self.payload_size(shape, dtype, role) + 16 * heads * self._split(seq)[1] * dim

    def encode(self, x: torch.Tensor, role: str) -> list[torch.Tensor]:
        head, middle, tail = self._split(x.shape[1])
        chunks = [shuffle(x[:, :head]), shuffle(x[:, x.shape[1] - tail:])]
        if middle:
            body = x[:, head:head + middle].float()
            if role == "key":
                size = self._group(middle)
                groups = [self._quantize_asym(body[:, g:g + size], dim=1) for g in range(0, middle, size)]
                codes = torch.cat([g[0] for g in groups], dim=1)
                extra = [torch.cat([g[1] for g in groups], dim=1), torch.cat([g[2] for g in groups], dim=1)]
            else:
                codes, scale = self._quantize_sym(body, dim=2)
                extra = [scale]
            chunks.append(self._pack(codes.reshape(-1)))
            chunks.extend(shuffle(s) for s in extra)
        return chunks

    def decode_into(self, data: torch.Tensor, out: torch.Tensor, role: str) -> None:
        heads, seq, dim = out.shape
        head, middle, tail = self._split(seq)
        offset = 0

        def take(nbytes: int) -> torch.Tensor:
            nonlocal offset
            piece = data[offset:offset + nbytes]
            offset += nbytes
            return piece

        out[:, :head] = unshuffle(take(_nbytes(heads * head * dim, out.dtype)), out.dtype, (heads, head, dim))
        out[:, seq - tail:] = unshuffle(take(_nbytes(heads * tail * dim, out.dtype)), out.dtype, (heads, tail, dim))
        if not middle:
            return
        count = heads * middle * dim
        codes = self._unpack(take(count if self.bits == 8 else (count + 1) // 2), count)
        body = codes.reshape(heads, middle, dim).float()
        if role == "key":
            size = self._group(middle)
            groups = -(-middle // size)
            group_of = torch.arange(middle) // size  # middle entry t uses group t // size
            scale = unshuffle(take(2 * heads * dim * groups), torch.float16, (heads, groups, dim))
            zero = unshuffle(take(2 * heads * dim * groups), torch.float16, (heads, groups, dim))
            body.mul_(scale.float().index_select(1, group_of)).add_(zero.float().index_select(1, group_of))
        else:
            scale = unshuffle(take(2 * heads * middle), torch.float16, (heads, middle, 1)).float()
            body.sub_(self._sym_offset).mul_(scale)
        out[:, head:head + middle] = body

    @property
    def _levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def _sym_offset(self) -> int:
        """Symmetric codes -q..q are stored as 1..2q+1 (unsigned)."""
        return self._levels // 2 + 1

    def _quantize_asym(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
        low = x.amin(dim=dim, keepdim=True).clamp(-_FP16_MAX, _FP16_MAX).half()
        high = x.amax(dim=dim, keepdim=True)
        scale = ((high - low.float()) / self._levels).clamp(max=_FP16_MAX).half()
        step = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = torch.round((x - low.float()) / step).clamp(0, self._levels)
        return codes.to(torch.uint8), scale, low

    def _quantize_sym(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._levels // 2 if self.bits == 4 else 127
        scale = (x.abs().amax(dim=dim, keepdim=True) / q).clamp(max=_FP16_MAX).half()
        step = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = torch.round(x / step).clamp(-q, q) + self._sym_offset
        return codes.to(torch.uint8), scale

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return codes
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        pairs = codes.reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    def _unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        if self.bits == 8:
            return packed
        return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]


Codec = CastCodec | QuantCodec


def make_codec(name: str, params: dict[str, Any] | None = None) -> Codec:
    """The codec called ``name``; ``params`` (from a header) must be the ones it uses.

    ``SnapshotError`` for an unknown name; ``ValueError`` for parameters the
    codec does not take or values out of range (the header reader reports it
    as a corrupt file).
    """
    params = dict(params or {})
    if name in ("lossless", "raw", "fp16", "bf16"):
        if params:
            raise ValueError(f"codec {name} takes no parameters")
        if name == "raw":
            return CastCodec(name, None, shuffled=False, level=RAW_ZSTD_LEVEL)
        return CastCodec(name, {"lossless": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name])
    if name in ("int8", "int4"):
        default = (0, 0, 0) if name == "int8" else (DEFAULT_INT4_SINKS, DEFAULT_INT4_RECENT, DEFAULT_INT4_KEY_GROUP)
        values = [params.pop(key, d) for key, d in zip(("sinks", "recent", "key_group"), default)]
        if params or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CODEC_PARAM
                             for v in values):
            raise ValueError(f"bad parameters for codec {name}")
        return QuantCodec(name, 8 if name == "int8" else 4, *values)
    raise SnapshotError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
