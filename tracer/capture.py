"""What one forward pass tells us about the chosen token: its distribution and its attention evidence.

Everything leaves here as plain Python numbers so a record costs a few kilobytes
whatever the context length; the full attention row survives only as the mean
over layers and heads (see ``AttentionEvidence``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tracer.records import AttentionEvidence, Candidate

PER_LAYER_TOP = 8  # strongest entries kept per layer


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


def layer_rows(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(layers, kv_len)``: the last query's attention per layer, averaged over heads."""
    return torch.stack([a[0, :, -1, :].float().mean(dim=0) for a in attentions]).cpu()


def evidence(rows: torch.Tensor, positions: list[int], per_layer_top: int = PER_LAYER_TOP) -> AttentionEvidence:
    """Compact evidence from ``layer_rows``; ``positions`` are the original positions of the kv entries."""
    count = min(per_layer_top, rows.shape[1])
    weights, indices = torch.topk(rows, count, dim=1)
    per_layer = [
        [(positions[i], w) for i, w in zip(layer_indices, layer_weights)]
        for layer_indices, layer_weights in zip(indices.tolist(), weights.tolist())
    ]
    return AttentionEvidence(positions=list(positions), mean=rows.mean(dim=0).tolist(), per_layer=per_layer)


def received_by_prompt(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention each kv entry received from a chunk of queries: mean over layers and heads, summed over queries."""
    return torch.stack([a[0].float().mean(dim=0).sum(dim=0) for a in attentions]).mean(dim=0).cpu()
