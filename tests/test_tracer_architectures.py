"""The session and the lens on tiny models of each architecture family the lens knows."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM,
    MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from tests.conftest import CHATML, build_tokenizer, save_tiny
from tracer.lens import find_final_norm
from tracer.loading import load_model
from tracer.session import TraceSession

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, initializer_range=0.2)
ARCHITECTURES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2), "norm"),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2), "norm"),
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(num_key_value_heads=1, head_dim=16), "norm"),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(num_key_value_heads=2, head_dim=16), "norm"),
    "phi": (PhiConfig, PhiForCausalLM, dict(), "final_layernorm"),
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0), "norm"),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, dict(), "final_layer_norm"),
}


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_trace_and_lens_on_each_family(family, tmp_path):
    config_class, model_class, extra, norm_name = ARCHITECTURES[family]
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CHATML)
    config = config_class(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, **{**COMMON, **extra})
    loaded = load_model(str(save_tiny(tmp_path / family, model_class(config), tokenizer)), device="cpu")
    model = loaded.model
    assert find_final_norm(model) is getattr(model.base_model, norm_name)

    session = TraceSession(loaded)
    session.start_turn("Why is the sky blue?")
    records = session.generate(6)
    assert session.attention_available and session.lens_supported
    prompt = session.token_ids[: records[0].position]
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert [r.token_id for r in records] == reference[0, len(prompt):].tolist()[: len(records)]

    with torch.no_grad():
        full = model(torch.tensor([session.token_ids]), output_hidden_states=True)
    for record in records:
        layers = session.lens(record.index)
        assert len(layers) == config.num_hidden_layers and layers[-1].top[0].token_id == record.token_id
        middle = layers[1]
        with torch.no_grad():
            logits = model.get_output_embeddings()(
                getattr(model.base_model, norm_name)(full.hidden_states[2][0, record.position - 1])).float()
            if getattr(config, "final_logit_softcapping", None):
                logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
        assert [c.token_id for c in middle.top] == torch.topk(logits, len(middle.top)).indices.tolist()


def test_bfloat16_and_4bit_fallback_on_cpu(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="bfloat16", load_in_4bit=True)
    assert loaded.dtype == torch.bfloat16 and loaded.fingerprint.dtype == "bfloat16"
    assert any("4-bit" in notice for notice in loaded.notices)
    session = TraceSession(loaded)
    assert any("4-bit" in notice for notice in session.notices)
    session.start_turn("Hello")
    records = session.generate(3)
    assert len(records) == 3 and len(session.lens(2)) == 2
