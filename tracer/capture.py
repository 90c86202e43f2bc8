"""What one forward pass tells us: the attention its layers reported, and for a generated token its
distribution and attention evidence.

``ForwardCapture`` is the recorder of one forward (``tracer.attention_hook``
hands it each layer's kernel inputs; the eager fallback hands it the weights
the model returned): per layer, the single new query's rows per head (a decode
step), or the attention each key received (a prefill). ``evidence`` turns a
decode step's rows into the compact ``AttentionEvidence`` of its record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tracer import attention_weights
from tracer.records import AttentionEvidence, Candidate, TopEntries

TOP_ENTRIES = 8  # strongest entries kept per layer, and per layer and head


def distribution(
    logits: torch.Tensor, chosen: int, top_k: int, text_of: Callable[[int], str]
) -> tuple[float, float, float, list[Candidate]]:
    """Probability and log-probability of ``chosen``, the entropy (nats), and the top-k candidates.

    Taken from the model's own distribution (temperature 1, no filtering), so the
    numbers describe the model, not the sampler settings.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    entropy = float(-(probs * log_probs).nan_to_num().sum())
    values, ids = torch.topk(probs, min(top_k, probs.numel()))
    top = [Candidate(int(i), text_of(int(i)), float(p)) for p, i in zip(values.tolist(), ids.tolist())]
    logprob = float(log_probs[chosen])
    return float(probs[chosen]), logprob, entropy, top


class ForwardCapture:
    """The attention one forward's layers reported, per layer (a ``tracer.attention_hook.Recorder``).

    ``rows[l]``: ``(heads, kv)`` float32, the one new query's attention (query length 1).
    ``received[l]``: ``(kv_heads, kv)`` float32, the attention each key received, summed
    over the queries and over the query heads sharing the key's head (longer queries).
    ``kv`` counts the keys the kernel saw: the layer's entries before the forward, then the fed ones.
    """

    def __init__(self, num_layers: int, budget: int) -> None:
        self.budget = budget  # bytes of scores one prefill chunk may hold
        self.rows: list[torch.Tensor | None] = [None] * num_layers
        self.received: list[torch.Tensor | None] = [None] * num_layers
        self.error: Exception | None = None  # why a layer could not be captured

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, *,
                scaling: float, softcap: float | None, window: int | None) -> None:
        if query.shape[2] == 1:
            self.rows[layer] = attention_weights.decode_rows(query, key, mask, scaling=scaling, softcap=softcap,
                                                             window=window)
        else:
            self.received[layer] = attention_weights.received(query, key, mask, scaling=scaling, softcap=softcap,
                                                              window=window, budget=self.budget)

    def failed(self, error: Exception) -> None:
        self.error = error

    def observe_weights(self, layer: int, weights: torch.Tensor, kv_heads: int) -> None:
        """The eager fallback: ``(1, heads, q, kv)`` weights the model returned itself."""
        heads, count, length = weights.shape[1:]
        if count == 1:
            self.rows[layer] = weights[0, :, 0].float()
        else:
            self.received[layer] = weights[0].float().sum(dim=1).view(kv_heads, heads // kv_heads, length).sum(dim=1)

    @property
    def complete(self) -> bool:
        return all(r is not None or s is not None for r, s in zip(self.rows, self.received))

    def layers(self, indices: list[int], kv_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For layers ``indices`` (equal key counts, one device): the received ``(layers, kv_heads, kv)`` and,
        at a decode step, the rows ``(layers, heads, kv)``."""
        if self.rows[indices[0]] is not None:
            rows = torch.stack([self.rows[i] for i in indices])
            count, heads, length = rows.shape
            return rows.view(count, kv_heads, heads // kv_heads, length).sum(dim=2), rows
        return torch.stack([self.received[i] for i in indices]), None


@dataclass
class GroupRows:
    """A decode step's rows for layers that hold the same entries."""

    layers: list[int]
    positions: torch.Tensor  # (kv_heads, kv) original position of every key the layers saw
    shared: bool  # every head holds the same positions (no per-head pruning)
    rows: torch.Tensor  # (layers, heads, kv) float32
    head_sums: torch.Tensor  # (layers, kv_heads, kv): rows summed over the query heads of each KV head


def evidence(groups: list[GroupRows], positions: np.ndarray, num_layers: int,
             top: int = TOP_ENTRIES) -> AttentionEvidence:
    """The evidence of one decode step; ``positions`` (int32, kept by the evidence as it is) lists every
    position some layer saw, in order."""
    heads = groups[0].rows.shape[1]
    first, last = int(positions[0]), int(positions[-1])
    total = torch.zeros(last - first + 1, dtype=torch.float64)
    head_positions = np.full((num_layers, heads, top), -1, dtype=np.int32)
    head_weights = np.zeros((num_layers, heads, top), dtype=np.float32)
    layer_positions = np.full((num_layers, top), -1, dtype=np.int32)
    layer_weights = np.zeros((num_layers, top), dtype=np.float32)
    for group in groups:
        count, _, length = group.rows.shape
        kv_heads = group.positions.shape[0]
        k = min(top, length)
        weights, index = torch.topk(group.rows, k, dim=-1)
        head_weights[group.layers, :, :k] = weights.cpu().numpy()
        if group.shared:
            held = group.positions[0]
            head_positions[group.layers, :, :k] = held[index].cpu().numpy()
            row = group.head_sums.sum(dim=1)  # (layers, kv): the heads' sum over the positions held
        else:  # each head its own positions: spread the heads' rows over the positions they span
            by_head = group.positions.repeat_interleave(heads // kv_heads, dim=0).expand(count, heads, length)
            head_positions[group.layers, :, :k] = by_head.gather(2, index).cpu().numpy()
            start = int(group.positions.min())
            held = torch.arange(start, last + 1, device=group.rows.device)
            row = torch.zeros(count, len(held), dtype=torch.float32, device=group.rows.device)
            row.scatter_add_(1, (group.positions - start).reshape(1, -1).expand(count, -1),
                             group.head_sums.reshape(count, -1))
        weights, index = torch.topk(row / heads, min(k, row.shape[1]), dim=-1)
        layer_positions[group.layers, : index.shape[1]] = held[index].cpu().numpy()
        layer_weights[group.layers, : index.shape[1]] = weights.cpu().numpy()
        total.index_add_(0, held.cpu() - first, row.sum(dim=0).cpu().double())
    if len(positions) != len(total):  # gaps (pruned positions): keep the ones some layer saw
        total = total[torch.from_numpy(positions.astype(np.int64)) - first]
    return AttentionEvidence(
        positions=positions,
        mean=(total / (num_layers * heads)).numpy(),
        per_layer=TopEntries(layer_positions, layer_weights),
        per_head=TopEntries(head_positions, head_weights),
    )
