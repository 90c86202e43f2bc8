"""Codecs: how one layer's K or V tensor becomes the bytes of one payload, and back.

A codec turns a ``(kv_heads, seq, head_dim)`` tensor into uint8 chunks that are
compressed together as one zstd frame. The decoded payload size follows from
the header alone (``payload_size``), so a reader knows exactly how many bytes
to expect before it decompresses anything.

* ``lossless``: the tensor's own bytes, byte-shuffled. Bit exact for any dtype.
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

from kvstore.compression import shuffle, unshuffle
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
_FP16_MAX = 65504.0


def _nbytes(count: int, dtype: torch.dtype) -> int:
    return count * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CastCodec:
    """Store the tensor in ``store`` dtype, byte-shuffled (``None``: its own dtype, lossless)."""

    name: str
    store: torch.dtype | None
    params: dict[str, Any] = field(default_factory=dict)

    def payload_size(self, shape: tuple[int, int, int], dtype: torch.dtype, role: str) -> int:
        return _nbytes(shape[0] * shape[1] * shape[2], self.store or dtype)

    def encode(self, x: torch.Tensor, role: str) -> list[torch.Tensor]:
        return [shuffle(x if self.store is None else x.to(self.store))]

    def decode(self, data: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype,
               role: str) -> torch.Tensor:
        return unshuffle(data, self.store or dtype, shape).to(dtype)


@dataclass(frozen=True)
class QuantCodec:
    """Integer codes with float16 scales; ``sinks`` first and ``recent`` last entries exact."""

    name: str
    bits: int
    sinks: int = 0
    recent: int = 0
    key_group: int = 0  # tokens sharing one key scale per channel; 0 = all quantized tokens

    @property
    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "recent": self.recent, "key_group": self.key_group}

    def _key_groups(self, middle: int) -> int:
        return -(-middle // self.key_group) if self.key_group else 1

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
            scales = 2 * heads * dim * self._key_groups(middle) if role == "key" else heads * middle
            size += _nbytes(scales, torch.float16)
        return size

    def encode(self, x: torch.Tensor, role: str) -> list[torch.Tensor]:
        head, middle, tail = self._split(x.shape[1])
        chunks = [shuffle(x[:, :head]), shuffle(x[:, x.shape[1] - tail:])]
        if middle:
            body = x[:, head:head + middle].float()
            if role == "key":
                size = self.key_group or middle
                groups = [self._quantize_asym(body[:, g:g + size], dim=1) for g in range(0, middle, size)]
                codes = torch.cat([g[0] for g in groups], dim=1)
                extra = [torch.cat([g[1] for g in groups], dim=1), torch.cat([g[2] for g in groups], dim=1)]
            else:
                codes, scale = self._quantize_sym(body, dim=2)
                extra = [scale]
            chunks.append(self._pack(codes.reshape(-1)))
            chunks.extend(shuffle(s) for s in extra)
        return chunks

    def decode(self, data: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype,
               role: str) -> torch.Tensor:
        heads, seq, dim = shape
        head, middle, tail = self._split(seq)
        offset = 0

        def take(nbytes: int) -> torch.Tensor:
            nonlocal offset
            piece = data[offset:offset + nbytes]
            offset += nbytes
            return piece

        first = unshuffle(take(_nbytes(heads * head * dim, dtype)), dtype, (heads, head, dim))
        last = unshuffle(take(_nbytes(heads * tail * dim, dtype)), dtype, (heads, tail, dim))
        if not middle:
            return torch.cat([first, last], dim=1)
        count = heads * middle * dim
        codes = self._unpack(take(count if self.bits == 8 else (count + 1) // 2), count)
        codes = codes.reshape(heads, middle, dim)
        if role == "key":
            groups = self._key_groups(middle)
            size = self.key_group or middle

            def per_token() -> torch.Tensor:
                grouped = unshuffle(take(2 * heads * dim * groups), torch.float16, (heads, groups, dim))
                return grouped.float().repeat_interleave(size, dim=1)[:, :middle]

            scale = per_token()
            zero = per_token()
            body = codes.float() * scale + zero
        else:
            scale = unshuffle(take(2 * heads * middle), torch.float16, (heads, middle, 1)).float()
            body = (codes.float() - self._sym_offset) * scale
        return torch.cat([first, body.to(dtype), last], dim=1)

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
    """The codec called ``name``; ``params`` (from a header) must be the ones it uses."""
    params = dict(params or {})
    if name in ("lossless", "fp16", "bf16"):
        if params:
            raise SnapshotError(f"The snapshot is corrupt: codec {name} takes no parameters.")
        store = {"lossless": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
        return CastCodec(name, store)
    if name in ("int8", "int4"):
        default = (0, 0, 0) if name == "int8" else (DEFAULT_INT4_SINKS, DEFAULT_INT4_RECENT, DEFAULT_INT4_KEY_GROUP)
        values = [params.pop(key, d) for key, d in zip(("sinks", "recent", "key_group"), default)]
        if params or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 22
                             for v in values):
            raise SnapshotError(f"The snapshot is corrupt: bad parameters for codec {name}.")
        return QuantCodec(name, 8 if name == "int8" else 4, *values)
    raise SnapshotError(
        f"Unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}."
    )
