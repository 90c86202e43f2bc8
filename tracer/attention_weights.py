"""The attention weights kvtrace records, recomputed beside the kernel from the very tensors it was given.

The model's own kernel (sdpa, eager) computes the layer's output and never
returns its weights (sdpa) or returns them as a full ``queries x keys`` matrix
(eager). kvtrace needs much less: at a decode step the one new query's row per
head, and at a prefill the attention each key *received*, summed over the
queries. Both are computed here from the kernel's own inputs: ``query``
``(1, heads, q, dim)`` after RoPE, ``key`` ``(1, kv_heads, kv, dim)`` (the
grouped-query heads are expanded by viewing the query heads as groups, not by
copying keys), the module's ``scaling``, the mask the model built for the
kernel, ``softcap`` and the sliding window.

Queries sit at the end of the keys (query ``i`` at key index ``kv - q + i``),
as in every cache transformers builds: a missing mask means "causal" (plus the
sliding window when the layer has one), a 4-D mask is taken as given (boolean:
True attends; float: added to the scores).

Prefill work goes in chunks of queries sized by ``budget`` bytes of scores,
never a whole ``q x kv`` matrix, and each chunk only reads the keys its
queries can see (causal upper triangle and window left out).
"""

from __future__ import annotations

import torch


def decode_rows(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, *, scaling: float,
                softcap: float | None, window: int | None) -> torch.Tensor:
    """``(heads, kv)`` float32: the single query's attention over every key, per query head.

    Runs once per layer and step, so it is kept to a handful of tensor operations.
    """
    heads, dim = query.shape[1], query.shape[3]
    kv_heads, length = key.shape[1], key.shape[2]
    scores = torch.bmm(query.reshape(kv_heads, heads // kv_heads, dim), key[0].transpose(1, 2)).float()
    scores.mul_(scaling)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    if mask is not None or window is not None:
        _apply_mask(scores.view(kv_heads, heads // kv_heads, 1, length), mask, length - 1, 0, 1, 0, length, window)
    return torch.softmax(scores, dim=-1).view(heads, length)


def received(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, *, scaling: float,
             softcap: float | None, window: int | None, budget: int) -> torch.Tensor:
    """``(kv_heads, kv)`` float32: the attention each key received, summed over the queries and the query
    heads that share the key's head.

    ``budget`` bounds the bytes of one chunk of scores (at least one query per chunk).
    """
    heads, count = query.shape[1], query.shape[2]
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    offset = length - count
    total = torch.zeros(kv_heads, length, dtype=torch.float32, device=query.device)
    rows = max(1, budget // (heads * length * 4))
    for start in range(0, count, rows):
        end = min(count, start + rows)
        high = offset + end  # the chunk's last query sees keys below this
        low = 0 if window is None else max(0, offset + start - window + 1)
        scores = _scores(query[0], key[0], start, end, low, high, scaling, softcap)
        _apply_mask(scores, mask, offset, start, end, low, high, window)
        # softmax row by row (one pass in cache), then the sum over the chunk's queries and grouped heads
        probs = torch.softmax(scores, dim=-1).view(kv_heads, group * (end - start), high - low)
        total[:, low:high] += probs.sum(dim=1)
    return total


def _scores(query: torch.Tensor, key: torch.Tensor, start: int, end: int, low: int, high: int,
            scaling: float, softcap: float | None) -> torch.Tensor:
    """``(kv_heads, group, end - start, high - low)`` float32 scores of queries ``start:end`` for keys ``low:high``
    (the scaling applied to the queries, before the product: a chunk of queries is smaller than its scores)."""
    heads, _, dim = query.shape
    kv_heads = key.shape[0]
    group = heads // kv_heads
    queries = (query[:, start:end] * scaling).reshape(kv_heads, group * (end - start), dim)
    scores = torch.bmm(queries, key[:, low:high].transpose(1, 2)).float()
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    return scores.view(kv_heads, group, end - start, high - low)


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor | None, offset: int, start: int, end: int,
                low: int, high: int, window: int | None) -> None:
    """Mask ``scores`` in place (queries ``start:end`` at key indices ``offset + i``, keys ``low:high``).

    A 4-D mask from the model covers the whole block; without one only two small
    corners can be hidden: the chunk's own keys above the diagonal (causal), and
    the keys a sliding window has already left behind at the chunk's first rows.
    """
    if mask is not None and mask.dim() == 4:
        block = mask[0, :, start:end, low:high]
        block = block.view(scores.shape[0], scores.shape[1], *block.shape[1:]) if block.shape[0] > 1 else block
        if block.dtype == torch.bool:
            scores.masked_fill_(~block, float("-inf"))
        else:
            scores.add_(block)
        return
    count = end - start
    if count > 1:  # query i sees keys up to offset + start + i
        own = scores[..., offset + start - low :]
        own.masked_fill_(torch.ones(count, count, dtype=torch.bool, device=scores.device).triu_(1), float("-inf"))
    if window is not None:  # query i stops seeing keys below offset + start + i - window + 1
        shift = offset + start - window + 1 - low  # row i hides the block's first i + shift keys
        width = min(high - low, count - 1 + shift)
        if width > 0:
            left = scores[..., :width]
            left.masked_fill_(torch.ones(count, width, dtype=torch.bool, device=scores.device).tril_(shift - 1),
                              float("-inf"))
