"""The in-memory KV state: what a snapshot holds, independent of any model library.

A ``KVState`` is a paused generation. Its invariant, which every producer and
consumer relies on:

* ``token_ids`` is the whole transcript (prompt and generated tokens), token
  ``i`` sitting at original position ``i``.
* The **last** token of ``token_ids`` is *pending*: it has been chosen but not
  yet fed to the model, so it is not in the cache. Resuming feeds it at
  position ``len(token_ids) - 1`` and samples the next token from the logits.
* ``positions[j]`` is the original position of cache entry ``j``: strictly
  increasing, every one below ``len(token_ids) - 1``. Without pruning it is
  ``0 .. len(token_ids) - 2``; after pruning it has gaps, and generation still
  continues at the true next position, never at "cache length".
* ``keys[l]`` and ``values[l]`` are layer ``l``'s tensors of shape
  ``(kv_heads, len(positions), head_dim)`` (no batch dimension).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch


@dataclass(frozen=True)
class ModelFingerprint:
    """What must match for a cache to be meaningful in a model.

    Two models with the same fingerprint produce caches of the same shape and
    meaning; loading a snapshot into a model with another fingerprint is refused.
    """

    model_id: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int
    rope: dict[str, Any] = field(default_factory=dict)
    tokenizer_hash: str = ""

    def differences(self, other: ModelFingerprint) -> list[str]:
        """Readable ``field: ours != theirs`` lines; empty when compatible.

        ``model_id`` is informational (the same weights may be loaded from a
        hub id or a local folder), so it is not compared.
        """
        lines = []
        for f in fields(self):
            if f.name == "model_id":
                continue
            ours, theirs = getattr(self, f.name), getattr(other, f.name)
            if ours != theirs:
                lines.append(f"{f.name}: {theirs!r} in the snapshot, {ours!r} in the model")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class KVState:
    """A paused generation: per-layer K/V, the transcript, and where each entry sits."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_ids: list[int]
    positions: list[int]
    fingerprint: ModelFingerprint
    # Attention each cache entry has received so far (aligned with ``positions``);
    # the input of attention-guided pruning. ``None`` when nothing was traced.
    attention_scores: list[float] | None = None
    # Free, msgpack-serialisable data: "messages", "sampling", "label", "created", ...
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def cache_length(self) -> int:
        return len(self.positions)

    @property
    def next_position(self) -> int:
        """Original position at which the pending token is fed."""
        return len(self.token_ids) - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def validate(self) -> None:
        """Raise ``ValueError`` when the invariant in the module docstring is broken."""
        if not self.token_ids:
            raise ValueError("a KV state needs at least one token (the pending one)")
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError("keys and values must have the same, non-zero number of layers")
        if any(b <= a for a, b in zip(self.positions, self.positions[1:])):
            raise ValueError("positions must be strictly increasing")
        if self.positions and (self.positions[0] < 0 or self.positions[-1] >= self.next_position):
            raise ValueError("cached positions must lie before the pending token")
        if self.attention_scores is not None and len(self.attention_scores) != len(self.positions):
            raise ValueError("attention_scores must have one entry per cached position")
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.dim() != 3 or v.dim() != 3:
                raise ValueError(f"layer {layer}: K and V must be (kv_heads, seq, head_dim)")
            if k.shape[1] != len(self.positions) or v.shape[1] != len(self.positions):
                raise ValueError(f"layer {layer}: sequence length differs from the number of positions")

    def select(self, keep: list[int]) -> KVState:
        """A new state keeping only the cache entries at indices ``keep`` (sorted, unique)."""
        index = torch.tensor(keep, dtype=torch.long)
        return replace(
            self,
            keys=[k.index_select(1, index) for k in self.keys],
            values=[v.index_select(1, index) for v in self.values],
            positions=[self.positions[i] for i in keep],
            attention_scores=None
            if self.attention_scores is None
            else [self.attention_scores[i] for i in keep],
            metadata=dict(self.metadata),
        )
