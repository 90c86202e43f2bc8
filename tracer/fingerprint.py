"""The model fingerprint: what must match for a saved KV cache to mean the same thing in a model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import get_layer_types_and_kwargs

from kvstore.state import ModelFingerprint


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary (token -> id, added tokens included): stable across loads and formats."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def _plain(value: Any) -> Any:
    """A JSON/msgpack-safe copy, so fingerprints compare equal after a round trip through a file."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def rope_settings(config: Any) -> dict[str, Any]:
    """The rotary settings that change what cached keys mean; empty for absolute-position models."""
    parameters = getattr(config, "rope_parameters", None)
    if parameters:
        return _plain(dict(parameters))
    settings = {}
    for name in ("rope_theta", "rope_scaling", "partial_rotary_factor", "rotary_pct"):
        value = getattr(config, name, None)
        if value is not None:
            settings[name] = value
    return _plain(settings)


def layer_layout(config: Any) -> tuple[tuple[str, ...], int | None]:
    """Per layer the cache kind transformers builds (``full_attention``, ``sliding_attention``, ...), and the
    window of the sliding layers (``None`` without any)."""
    types, kwargs = get_layer_types_and_kwargs(config)
    windows = {k["sliding_window"] for k in kwargs if "sliding_window" in k}
    return tuple(types), (min(windows) if windows else None)


def build_fingerprint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str, dtype: torch.dtype
) -> ModelFingerprint:
    config = model.config.get_text_config(decoder=True)
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types, sliding_window = layer_layout(config)
    return ModelFingerprint(
        model_id=model_id,
        architecture=architectures[0],
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        dtype=str(dtype).removeprefix("torch."),
        vocab_size=config.vocab_size,
        rope=rope_settings(config),
        tokenizer_hash=tokenizer_hash(tokenizer),
        layer_types=layer_types,
        sliding_window=sliding_window,
    )
