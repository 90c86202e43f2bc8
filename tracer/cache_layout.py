"""Where every cache entry sits, per layer and KV head, and the attention each entry received.

A cache layer holds its entries in the order they were fed. Beside them this
module keeps the original position of each entry per KV head (heads differ
after per-head pruning) and an accumulator of the attention the entry
received: summed over the queries that saw it and over the query heads that
share its KV head (float64; float32 on MPS, which has no float64). A
sliding-window layer drops its oldest entries; what they had received stays
counted per position (``evicted``), so the union scores keep the attention an
entry received in every layer while it was there, and ``dropped`` remembers
which positions went that way (not pruned: a rebuilt cache feeds them again).

Layers that hold the same entries (the full-attention layers on one device;
the sliding layers of one window) form a group with one position table and
one ``(layers, kv_heads, n)`` accumulator, so a decode step costs a few tensor
operations per group, not per layer. ``positions`` is the union over layers
and heads, in order: what ``KVState.positions`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvstore.state import KVState
from tracer.capture import ForwardCapture, GroupRows


class PositionLog:
    """The union positions as a growing int32 array: each decode step's evidence holds a read-only view of
    its prefix instead of a copy (the union only grows at the end between crops)."""

    def __init__(self) -> None:
        self._array = np.zeros(0, dtype=np.int32)
        self._known = 0  # leading entries known to equal the union's

    def seen(self, positions: list[int], position: int) -> np.ndarray:
        """``positions`` then ``position``; valid while ``positions`` only grew since the last ``forget``."""
        count = len(positions)
        if count + 1 > len(self._array):  # a new array: views handed out keep the old one
            grown = np.zeros(max(2 * (count + 1), 64), dtype=np.int32)
            grown[: self._known] = self._array[: self._known]
            self._array = grown
        self._array[self._known : count] = positions[self._known : count]
        self._array[count] = position  # beyond every earlier view; the next step's union repeats it here
        self._known = count
        view = self._array[: count + 1]
        view.flags.writeable = False
        return view

    def forget(self) -> None:
        """The union changed other than by growing: start a new array."""
        self._array, self._known = np.zeros(0, dtype=np.int32), 0


def accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _received_of(state: KVState, layer: int, held: torch.Tensor, union: torch.Tensor, heads: int) -> torch.Tensor:
    """``(kv_heads, n_l)`` float64 accumulator for layer ``layer`` of ``state`` (sums over query heads)."""
    group_size = heads // held.shape[0]
    if state.head_scores is not None:
        return state.head_scores[layer].to(torch.float64) * group_size
    if state.attention_scores is not None:
        per_position = torch.tensor(state.attention_scores, dtype=torch.float64) * group_size
        return per_position[torch.searchsorted(union, held.contiguous())]
    return torch.zeros(held.shape, dtype=torch.float64)


@dataclass
class LayerGroup:
    """Layers that hold the same entries, on one device."""

    layers: list[int]
    window: int | None  # sliding window of these layers; None: full attention
    positions: torch.Tensor  # (kv_heads, n) int64 on the layers' device
    received: torch.Tensor  # (len(layers), kv_heads, n) on the layers' device
    shared: bool = True  # every head holds the same positions (no per-head pruning)

    @property
    def length(self) -> int:
        return self.positions.shape[1]


class CacheLayout:
    """The positions and received attention of every layer's entries (see the module docstring)."""

    def __init__(self, groups: list[LayerGroup], positions: list[int], heads: int,
                 evicted: torch.Tensor | None = None) -> None:
        self.groups = groups
        self.positions = positions
        self.heads = heads
        self.num_layers = sum(len(group.layers) for group in groups)
        self.log = PositionLog()
        # per position: what entries sliding layers no longer hold had received (summed over layers and heads)
        self.evicted = torch.zeros(0, dtype=torch.float64) if evicted is None else evicted
        self.dropped = torch.zeros(len(self.evicted), dtype=torch.bool)  # per position: dropped by a sliding layer

    @classmethod
    def empty(cls, windows: list[int | None], devices: list[torch.device], heads: int, kv_heads: int) -> CacheLayout:
        """No entries yet; layers grouped by window and device."""
        keyed: dict[tuple, list[int]] = {}
        for layer, key in enumerate(zip(windows, devices)):
            keyed.setdefault(key, []).append(layer)
        groups = [
            LayerGroup(layers, window, torch.zeros(kv_heads, 0, dtype=torch.long, device=device),
                       torch.zeros(len(layers), kv_heads, 0, dtype=accumulator_dtype(device), device=device))
            for (window, device), layers in keyed.items()
        ]
        return cls(groups, [], heads)

    @classmethod
    def from_state(cls, state: KVState, windows: list[int | None], devices: list[torch.device],
                   heads: int) -> CacheLayout:
        """The layout of ``state``'s entries, layer ``l`` on ``devices[l]``; received attention from its
        ``head_scores`` (else its ``attention_scores``, spread evenly over layers and heads; else none)."""
        union = torch.tensor(state.positions, dtype=torch.long)
        groups: list[LayerGroup] = []
        for layer in range(state.num_layers):
            held, device = state.layer_positions(layer), devices[layer]
            scores = _received_of(state, layer, held, union, heads).to(device, accumulator_dtype(device))
            match = next((g for g in groups if g.window == windows[layer] and g.positions.device == device
                          and g.positions.shape == held.shape and torch.equal(g.positions.cpu(), held)), None)
            if match is None:
                shared = bool((held == held[:1]).all())
                groups.append(LayerGroup([layer], windows[layer], held.to(device).clone(), scores[None], shared))
            else:
                match.layers.append(layer)
                match.received = torch.cat([match.received, scores[None]])
        layout = cls(groups, list(state.positions), heads)
        layout._restore_dropped(state, windows, union)
        return layout

    def _restore_dropped(self, state: KVState, windows: list[int | None], union: torch.Tensor) -> None:
        """What sliding layers had dropped before ``state`` was made: the part of its union scores no held
        entry accounts for, and (when no layer keeps everything) the positions before the windows."""
        size = max(state.next_position, int(union.max()) + 1 if len(union) else 0)
        self.evicted = torch.zeros(size, dtype=torch.float64)
        self.dropped = torch.zeros(size, dtype=torch.bool)
        if state.attention_scores is not None and len(union):
            held = torch.tensor(self.attention_scores(), dtype=torch.float64)
            missing = (torch.tensor(state.attention_scores, dtype=torch.float64) - held).clamp_(min=0)
            self.evicted.index_add_(0, union, missing * (self.num_layers * self.heads))
        if all(window is not None for window in windows):  # fed, not pruned: a rebuild feeds them again
            self.dropped[: max(0, state.next_position - min(windows) + 1)] = True
            self.dropped[union] = False

    # ---------------------------------------------------------------- forwards
    def extend(self, fed: list[int], lengths: list[int], captured: ForwardCapture | None) -> list[GroupRows]:
        """Entries fed at positions ``fed`` were appended to every layer, which then kept its last
        ``lengths[l]`` entries; add what ``captured`` reports. At a decode step, the rows per group."""
        new = torch.tensor(fed, dtype=torch.long)
        rows: list[GroupRows] = []
        trimmed = False
        for group in self.groups:
            device = group.positions.device
            kv_heads = group.positions.shape[0]
            seen = torch.cat([group.positions, new.to(device).expand(kv_heads, len(fed))], dim=1)
            received = torch.cat([group.received, group.received.new_zeros(len(group.layers), kv_heads, len(fed))],
                                 dim=2)
            if captured is not None:
                sums, layer_rows = captured.layers(group.layers, kv_heads)
                if sums.shape[-1] != seen.shape[1]:
                    raise RuntimeError(f"layers {group.layers} saw {sums.shape[-1]} keys, the cache held "
                                       f"{seen.shape[1]}")
                received += sums
                if layer_rows is not None:
                    rows.append(GroupRows(group.layers, seen, group.shared, layer_rows, sums))
            dropped = seen.shape[1] - lengths[group.layers[0]]
            if dropped > 0:
                self._evict(seen[:, :dropped], received[..., :dropped])
                trimmed = True
            group.positions, group.received = seen[:, dropped:], received[..., dropped:]
        self.positions.extend(fed)
        if trimmed and not self._covered():
            self.positions = self._union()
            self.log.forget()
        return rows

    def remove_received(self, captured: ForwardCapture) -> None:
        """Take away what a replayed forward's queries gave the entries held (the keys it saw first)."""
        for group in self.groups:
            sums, _ = captured.layers(group.layers, group.positions.shape[0])
            group.received -= sums[..., : group.length]

    def keep_counts(self, before: int) -> list[int] | None:
        """Per layer, the entries at positions ``< before`` (they come first); ``None`` when the heads of a
        layer hold different numbers of them (per-head pruning put them apart)."""
        keep = [0] * self.num_layers
        for group in self.groups:
            counts = (group.positions < before).sum(dim=1).tolist()
            if len(set(counts)) > 1:
                return None
            for layer in group.layers:
                keep[layer] = counts[0] if counts else 0
        return keep

    def truncate(self, before: int) -> None:
        """Drop every entry at a position ``>= before`` (``keep_counts`` must allow it)."""
        for group in self.groups:
            count = int((group.positions[0] < before).sum()) if group.positions.shape[0] else 0
            group.positions, group.received = group.positions[:, :count], group.received[..., :count]
        self.positions = [p for p in self.positions if p < before]
        self.log.forget()
        self.evicted, self.dropped = self.evicted[:before], self.dropped[:before]

    def replay_positions(self, before: int) -> list[int]:
        """The positions below ``before`` a cache rebuilt from scratch must be fed: those held, and those a
        sliding layer dropped (pruned ones stay out)."""
        dropped = torch.nonzero(self.dropped[:before]).reshape(-1).tolist()
        return sorted({p for p in self.positions if p < before} | set(dropped))

    def _evict(self, positions: torch.Tensor, received: torch.Tensor) -> None:
        """Keep what entries a sliding group drops had received, per position."""
        flat = positions.reshape(-1).cpu()
        grow = int(flat.max()) + 1 - len(self.evicted)
        if grow > 0:
            self.evicted = torch.cat([self.evicted, torch.zeros(grow, dtype=torch.float64)])
            self.dropped = torch.cat([self.dropped, torch.zeros(grow, dtype=torch.bool)])
        self.evicted.index_add_(0, flat, received.sum(dim=0).reshape(-1).cpu().double())
        self.dropped[flat] = True

    def _covered(self) -> bool:
        """Whether one full-attention group holds every position of the union (so trimming others loses none)."""
        return any(g.window is None and g.length == len(self.positions) and bool((g.positions == g.positions[:1]).all())
                   for g in self.groups)

    def _union(self) -> list[int]:
        return torch.unique(torch.cat([g.positions.reshape(-1).cpu() for g in self.groups])).tolist()

    # ------------------------------------------------------------------ export
    def layer_positions(self) -> list[torch.Tensor | None]:
        """Per layer, the ``(kv_heads, n_l)`` positions, or ``None`` where they are ``KVState``'s default (the
        last ``n_l`` of the union in every head)."""
        table: list[torch.Tensor | None] = [None] * self.num_layers
        for group in self.groups:
            held = group.positions.cpu()
            default = torch.tensor(self.positions[len(self.positions) - group.length:], dtype=torch.long)
            explicit = None if torch.equal(held, default.expand_as(held)) else held.clone()
            for layer in group.layers:
                table[layer] = explicit
        return table

    def head_scores(self) -> list[torch.Tensor]:
        """Per layer ``(kv_heads, n_l)`` float32: received attention, averaged over each KV head's query heads."""
        scores: list[torch.Tensor] = [torch.empty(0)] * self.num_layers
        for group in self.groups:
            mean = (group.received * (group.positions.shape[0] / self.heads)).float().cpu()
            for i, layer in enumerate(group.layers):
                scores[layer] = mean[i]
        return scores

    def attention_scores(self) -> list[float]:
        """Per union position: the attention received in every layer, also while a sliding layer still held
        the entry, averaged over layers and query heads."""
        union = torch.tensor(self.positions, dtype=torch.long)
        total = torch.zeros(len(union), dtype=torch.float64)
        for group in self.groups:
            held = group.positions.cpu().contiguous()
            total.index_add_(0, torch.searchsorted(union, held).reshape(-1),
                             group.received.sum(dim=0).cpu().double().reshape(-1))
        known = union[union < len(self.evicted)]
        total[: len(known)] += self.evicted[known]
        return (total / (self.num_layers * self.heads)).tolist()
