"""The one place that knows transformers' cache classes: ``DynamicCache`` <-> ``kvstore.KVState`` tensors.

transformers keeps K/V as ``(batch, kv_heads, seq, head_dim)`` per layer, in
the layer class the model's config asks for: ``DynamicLayer`` (full
attention, grows with the transcript) or ``DynamicSlidingWindowLayer`` (keeps
the last ``window - 1`` entries; ``cumulative_length`` counts every token it
was fed, and the masks are sized from it). ``KVState`` drops the batch
dimension and lives on the CPU, detached from the running cache, so it can be
saved, pruned or handed to another session; every layer keeps its own length.

Caches are rebuilt through the public cache API (``DynamicCache(config=...)``
then ``update`` per layer, each layer on the device of its attention module),
with the sliding layers' ``cumulative_length`` set so the masks transformers
builds from it match the entries the layers hold.

Every cache kvtrace builds records its past (``activate_past_recording``): a
sliding layer keeps what a forward would evict until ``settle`` drops it, so
a forward can be taken back exactly (``take_back``) to replay queries.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer

from tracer.loading import module_device


def empty_cache(config: PretrainedConfig) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.activate_past_recording()
    return cache


def settle(cache: DynamicCache) -> None:
    """After a forward: sliding layers drop what falls out of their window."""
    cache.crop(0)


def take_back(cache: DynamicCache, count: int) -> None:
    """Undo the last, unsettled forward of ``count`` entries."""
    if count:
        cache.crop(-count)


def layer_windows(cache: DynamicCache) -> list[int | None]:
    """Per layer, the sliding window of a sliding-window layer, ``None`` for full attention."""
    return [layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None for layer in cache.layers]


def layer_lengths(cache: DynamicCache) -> list[int]:
    """Entries each layer holds."""
    return [layer.keys.shape[-2] if layer.is_initialized else 0 for layer in cache.layers]


def attention_devices(model: PreTrainedModel, num_layers: int, fallback: torch.device) -> list[torch.device]:
    """The device of each layer's attention module (the device its cache must live on), read from the model."""
    devices = [fallback] * num_layers
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and 0 <= index < num_layers and type(module).__name__.endswith("Attention"):
            devices[index] = module_device(model, module)
    return devices


def cache_tensors(
    cache: DynamicCache, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V as ``(kv_heads, n_l, head_dim)`` CPU copies (empty ones for layers not fed yet)."""
    keys, values = [], []
    for layer in cache.layers:
        if layer.is_initialized:
            keys.append(layer.keys[0].detach().to("cpu", copy=True))
            values.append(layer.values[0].detach().to("cpu", copy=True))
        else:
            keys.append(torch.zeros(kv_heads, 0, head_dim, dtype=dtype))
            values.append(torch.zeros(kv_heads, 0, head_dim, dtype=dtype))
    return keys, values


def sliding_cumulative_length(held: int, window: int, fed: int) -> int:
    """The ``cumulative_length`` a sliding layer holding ``held`` entries needs when ``fed`` entries were fed.

    A layer that holds less than ``window - 1`` entries must count exactly those (its
    masks span ``cumulative_length`` keys); a full window may count everything fed,
    as the uninterrupted run does.
    """
    return held if held < window - 1 else max(held, fed)


def cache_from_tensors(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    config: PretrainedConfig,
    devices: list[torch.device],
    dtype: torch.dtype,
    fed: int,
) -> DynamicCache:
    """A cache holding ``keys``/``values`` (layer ``l`` on ``devices[l]``); ``fed``: entries of the longest layer."""
    cache = empty_cache(config)
    for index, (k, v) in enumerate(zip(keys, values)):
        device = devices[index]
        cache.update(k.unsqueeze(0).to(device, dtype), v.unsqueeze(0).to(device, dtype), index)
        layer = cache.layers[index]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = sliding_cumulative_length(k.shape[1], layer.sliding_window, fed)
    return cache


def croppable(cache: DynamicCache) -> bool:
    """Whether every layer can drop its last entries (a sliding layer cannot once it has evicted some)."""
    return all(layer.cumulative_length < layer.sliding_window for layer in cache.layers
               if isinstance(layer, DynamicSlidingWindowLayer))


def crop_layers(cache: DynamicCache, keep: list[int]) -> None:
    """Keep the first ``keep[l]`` entries of layer ``l`` (in place); needs ``croppable(cache)``."""
    for layer, count in zip(cache.layers, keep):
        extra = (layer.keys.shape[-2] if layer.is_initialized else 0) - count
        if extra > 0:
            layer.crop(-extra)


def cache_nbytes(cache: DynamicCache | None) -> int:
    if cache is None:
        return 0
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if getattr(layer, "is_initialized", False)
        for t in (layer.keys, layer.values)
    )
