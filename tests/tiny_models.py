"""Tiny random-weight models of the attention layouts transformers builds, saved like real ones.

Each family stresses a part of the capture: grouped-query heads (2 KV heads for
4 query heads), a sliding window short enough to pass in a test (16), layers
of both kinds (Gemma 2: sliding and full alternating, with its own query
scaling and attention softcapping; Qwen2 with ``use_sliding_window``) or
sliding layers only (Mistral with a window).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from tests.conftest import CHATML, build_tokenizer, save_tiny

WINDOW = 16
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
FAMILIES = {
    # softcap 5 so the tanh really bends these scores; query_pre_attn_scalar makes scaling != head_dim ** -0.5
    "gemma2": (Gemma2Config, Gemma2ForCausalLM,
               dict(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0, query_pre_attn_scalar=64)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict()),
}


def build_tiny(folder: Path, family: str, **overrides) -> Path:
    """Save a tiny ``family`` model with a ChatML tokenizer in ``folder``."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CHATML)
    config = config_class(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, **{**COMMON, **extra, **overrides})
    return save_tiny(folder, model_class(config), tokenizer)
