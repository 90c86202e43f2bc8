"""The one place that knows transformers' cache class: ``DynamicCache`` <-> ``kvstore.KVState`` tensors.

transformers keeps K/V as ``(batch, kv_heads, seq, head_dim)`` per layer;
``KVState`` drops the batch dimension and lives on the CPU, detached from the
running cache, so it can be saved, pruned or handed to another session.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig


def empty_cache(config: PretrainedConfig) -> DynamicCache:
    return DynamicCache(config=config)


def cache_tensors(
    cache: DynamicCache, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V as ``(kv_heads, seq, head_dim)`` CPU copies (empty ones before anything was fed)."""
    if cache.get_seq_length() == 0:
        empty = [torch.zeros(kv_heads, 0, head_dim, dtype=dtype) for _ in range(num_layers)]
        return empty, [t.clone() for t in empty]
    keys = [layer.keys[0].detach().to("cpu", copy=True) for layer in cache.layers]
    values = [layer.values[0].detach().to("cpu", copy=True) for layer in cache.layers]
    return keys, values


def cache_from_tensors(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> DynamicCache:
    data = [(k.unsqueeze(0).to(device, dtype), v.unsqueeze(0).to(device, dtype)) for k, v in zip(keys, values)]
    return DynamicCache(ddp_cache_data=data, config=config)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` entries of every layer (in place)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def cache_nbytes(cache: DynamicCache | None) -> int:
    if cache is None:
        return 0
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if getattr(layer, "is_initialized", False)
        for t in (layer.keys, layer.values)
    )
