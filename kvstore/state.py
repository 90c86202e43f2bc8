"""The in-memory KV state: what a snapshot holds, independent of any model library.

A ``KVState`` is a paused generation. Its invariant, which every producer and
consumer relies on:

* ``token_ids`` is the whole transcript (prompt and generated tokens), token
  ``i`` sitting at original position ``i``.
* The **last** token of ``token_ids`` is *pending*: it has been chosen but not
  yet fed to the model, so it is not in the cache. Resuming feeds it at
  position ``len(token_ids) - 1`` and samples the next token from the logits.
* ``keys[l]`` and ``values[l]`` are layer ``l``'s tensors of shape
  ``(kv_heads, n_l, head_dim)`` (no batch dimension). ``n_l`` may differ per
  layer: a sliding-window layer holds only its window.
* ``positions`` is the sorted union of the original positions some layer and
  head still holds, each below ``len(token_ids) - 1``. Without pruning it is
  ``0 .. len(token_ids) - 2``; after pruning it has gaps, and generation still
  continues at the true next position, never at "cache length".
* Which positions layer ``l`` holds (``layer_positions(l)``): by default the
  last ``n_l`` of ``positions`` in every head (a full-attention layer holds all
  of them, a sliding-window layer its tail). After per-head pruning,
  ``head_positions[l]`` lists them per KV head, a ``(kv_heads, n_l)`` int64
  tensor, each row strictly increasing: every head keeps its own entries, the
  same number per head, so the tensors keep their shape.

Attention statistics (inputs of attention-guided pruning):

* ``attention_scores``: per entry of ``positions``, the attention it received
  while traced, averaged over layers and heads and summed over queries.
* ``head_scores``: per layer a ``(kv_heads, n_l)`` float32 tensor aligned with
  ``layer_positions(l)``: the attention each entry received, summed over the
  queries that saw it, averaged over the query heads that share the KV head.

``trace`` is the tracer's step records, serialized by the tracer (msgpack
bytes); kvstore stores it as an opaque, size-bounded blob.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

# Fingerprint fields an older file may lack; ``None`` there means "not recorded", not "different".
OPTIONAL_FINGERPRINT_FIELDS = ("layer_types", "sliding_window")


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
    # per layer "full_attention" / "sliding_attention" (transformers' names); None: not recorded
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None  # window of the sliding layers; None: no sliding layers (or not recorded)

    def differences(self, other: ModelFingerprint) -> list[str]:
        """Readable ``field: theirs in the snapshot, ours in the model`` lines; empty when compatible.

        ``self`` is the model, ``other`` the snapshot. ``model_id`` is
        informational (the same weights may be loaded from a hub id or a local
        folder), so it is not compared; fields an older snapshot did not record
        are not compared either.
        """
        lines = []
        for f in fields(self):
            if f.name == "model_id":
                continue
            ours, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in OPTIONAL_FINGERPRINT_FIELDS and theirs is None:
                continue
            if ours != theirs:
                lines.append(f"{f.name}: {theirs!r} in the snapshot, {ours!r} in the model")
        return lines

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.layer_types is not None:
            data["layer_types"] = list(self.layer_types)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("layer_types") is not None:
            values["layer_types"] = tuple(values["layer_types"])
        return cls(**values)


@dataclass
class KVState:
    """A paused generation: per-layer K/V, the transcript, and where each entry sits."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_ids: list[int]
    positions: list[int]
    fingerprint: ModelFingerprint
    attention_scores: list[float] | None = None
    # Free, msgpack-serialisable data: "messages", "sampling", "label", "created", ...
    metadata: dict[str, Any] = field(default_factory=dict)
    head_positions: list[torch.Tensor | None] | None = None
    head_scores: list[torch.Tensor] | None = None
    trace: bytes | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def cache_length(self) -> int:
        """Distinct original positions still cached somewhere (the union over layers and heads)."""
        return len(self.positions)

    def layer_length(self, layer: int) -> int:
        return self.keys[layer].shape[1]

    @property
    def next_position(self) -> int:
        """Original position at which the pending token is fed."""
        return len(self.token_ids) - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def per_head(self) -> bool:
        """True when some layer's heads hold different positions (after per-head pruning)."""
        return self.head_positions is not None and any(p is not None for p in self.head_positions)

    def layer_positions(self, layer: int) -> torch.Tensor:
        """``(kv_heads, n_l)`` int64: the original position of every entry of layer ``layer``, per head."""
        if self.head_positions is not None and self.head_positions[layer] is not None:
            return self.head_positions[layer]
        heads, length = self.keys[layer].shape[0], self.keys[layer].shape[1]
        tail = self.positions[len(self.positions) - length:] if length else []
        return torch.tensor(tail, dtype=torch.long).unsqueeze(0).expand(heads, length)

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
        for name, per_layer in (("head_positions", self.head_positions), ("head_scores", self.head_scores)):
            if per_layer is not None and len(per_layer) != len(self.keys):
                raise ValueError(f"{name} must have one entry per layer")
        known = set(self.positions)
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.dim() != 3 or v.dim() != 3:
                raise ValueError(f"layer {layer}: K and V must be (kv_heads, seq, head_dim)")
            length = k.shape[1]
            if v.shape[1] != length:
                raise ValueError(f"layer {layer}: K and V hold different numbers of entries")
            explicit = self.head_positions[layer] if self.head_positions is not None else None
            if explicit is None:
                if length > len(self.positions):
                    raise ValueError(f"layer {layer}: more entries than cached positions")
            else:
                _check_head_positions(layer, explicit, k.shape[0], length, known)
            if self.head_scores is not None and tuple(self.head_scores[layer].shape) != (k.shape[0], length):
                raise ValueError(f"layer {layer}: head_scores must be (kv_heads, entries)")

    def select(self, keep: list[int]) -> KVState:
        """A new state keeping only the entries at original positions ``positions[i]`` for ``i`` in ``keep``.

        ``keep`` indexes ``positions`` (sorted, unique). Every layer and head
        keeps exactly those of its entries whose position is kept, so a
        sliding-window layer keeps the kept part of its window.
        """
        kept_positions = [self.positions[i] for i in keep]
        wanted = torch.tensor(kept_positions, dtype=torch.long)
        keys, values, head_positions, head_scores = [], [], [], []
        for layer in range(self.num_layers):
            held = self.layer_positions(layer)
            mask = torch.isin(held, wanted)
            counts = mask.sum(dim=1)
            if counts.numel() and not bool((counts == counts[0]).all()):
                raise ValueError("a position selection must keep the same number of entries in every head")
            keys.append(_gather(self.keys[layer], mask))
            values.append(_gather(self.values[layer], mask))
            explicit = self.head_positions is not None and self.head_positions[layer] is not None
            head_positions.append(_gather_2d(held, mask) if explicit else None)
            if self.head_scores is not None:
                head_scores.append(_gather_2d(self.head_scores[layer], mask))
        return replace(
            self,
            keys=keys,
            values=values,
            positions=kept_positions,
            attention_scores=None if self.attention_scores is None else [self.attention_scores[i] for i in keep],
            metadata=dict(self.metadata),
            head_positions=head_positions if any(p is not None for p in head_positions) else None,
            head_scores=head_scores if self.head_scores is not None else None,
        )

    def select_per_head(self, keep: list[torch.Tensor]) -> KVState:
        """A new state where layer ``l``, head ``h`` keeps entries ``keep[l][h]`` (indices into its entries).

        ``keep[l]`` is a ``(kv_heads, m_l)`` int64 tensor of sorted entry
        indices. ``positions`` becomes the union of what any head keeps.
        """
        keys, values, head_positions, head_scores = [], [], [], []
        for layer in range(self.num_layers):
            index = keep[layer].to(torch.long)
            held = self.layer_positions(layer)
            keys.append(_take(self.keys[layer], index))
            values.append(_take(self.values[layer], index))
            head_positions.append(torch.gather(held, 1, index).clone())
            if self.head_scores is not None:
                head_scores.append(torch.gather(self.head_scores[layer], 1, index))
        union = sorted(set(torch.cat([p.reshape(-1) for p in head_positions]).tolist()))
        where = {p: i for i, p in enumerate(self.positions)}
        return replace(
            self,
            keys=keys,
            values=values,
            positions=union,
            attention_scores=None if self.attention_scores is None
            else [self.attention_scores[where[p]] for p in union],
            metadata=dict(self.metadata),
            head_positions=head_positions,
            head_scores=head_scores if self.head_scores is not None else None,
        )


def _check_head_positions(layer: int, table: torch.Tensor, heads: int, length: int, known: set[int]) -> None:
    if table.dtype != torch.long or tuple(table.shape) != (heads, length):
        raise ValueError(f"layer {layer}: head_positions must be an int64 (kv_heads, entries) tensor")
    if length > 1 and not bool((table[:, 1:] > table[:, :-1]).all()):
        raise ValueError(f"layer {layer}: each head's positions must be strictly increasing")
    if not set(table.reshape(-1).tolist()) <= known:
        raise ValueError(f"layer {layer}: head_positions name positions that are not cached")


def _gather(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entries of ``(heads, n, dim)`` where ``mask`` ``(heads, n)`` is set, the same count per head."""
    heads, _, dim = tensor.shape
    return tensor[mask].reshape(heads, -1, dim)


def _gather_2d(table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return table[mask].reshape(table.shape[0], -1)


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[h, index[h]]`` for every head ``h`` of a ``(heads, n, dim)`` tensor."""
    return torch.gather(tensor, 1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[2]))
