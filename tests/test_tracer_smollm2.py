"""End to end on the real embedded SmolLM2-135M-Instruct (slow: one shared load per test session)."""

from __future__ import annotations

import time

import pytest
import torch

from tracer import chat
from tracer.loading import load_model
from tracer.session import TraceSession

pytestmark = pytest.mark.slow


def test_greedy_64_tokens_equal_model_generate_and_lens_agrees(smollm2):
    session = TraceSession(smollm2)
    session.start_turn("Write a short poem about the sea.")
    records = session.generate(64)
    prompt = session.token_ids[: records[0].position]
    assert smollm2.model.config._attn_implementation == "sdpa"  # tracing left the stock kernel in place
    reference = smollm2.model.generate(
        torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )[0, len(prompt):].tolist()
    assert [r.token_id for r in records] == reference[: len(records)]
    assert len(records) == 64 or session.stop_reason == "eos"
    lenses = session.lens_many([r.index for r in records])
    assert all(len(layers) == 30 for layers in lenses)
    assert all(layers[-1].top[0].token_id == r.token_id for layers, r in zip(lenses, records))
    assert "".join(r.text for r in records).startswith(session.reply_text()[:20])


def test_bfloat16_greedy_tokens_equal_model_generate():
    """Traced through the model's own sdpa kernel, bf16 rounds as generate does (eager did not: issue 8)."""
    loaded = load_model(None, device="cpu", dtype="bfloat16")
    session = TraceSession(loaded)
    session.start_turn("Write a short poem about the sea.")
    records = session.generate(32)
    prompt = session.token_ids[: records[0].position]
    reference = loaded.model.generate(
        torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )[0, len(prompt):].tolist()
    assert session.engine.mode == "hook"
    assert [r.token_id for r in records] == reference[: len(records)]


def test_second_turn_reads_like_the_chat_template(smollm2):
    session = TraceSession(smollm2)
    session.start_turn("Name one color.", system="Answer in one word.")
    session.generate(16)
    session.start_turn("And another one?")
    rendered = chat.render(smollm2.tokenizer, session.messages, add_generation_prompt=True)
    transcript = smollm2.tokenizer.decode(session.token_ids)
    assert transcript == rendered
    assert session.generate(8)


def test_gguf_cache_second_load_is_fast_and_identical(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cold = load_model(None, device="cpu")
    assert list((tmp_path / "kvtrace").glob("gguf-*/model.safetensors"))
    start = time.perf_counter()
    warm = load_model(None, device="cpu")
    warm_seconds = time.perf_counter() - start
    assert warm_seconds < 5.0  # typically well under a second; generous for a busy CI machine
    assert warm.fingerprint == cold.fingerprint == smollm2.fingerprint
    ids = torch.tensor([cold.tokenizer("The sky is")["input_ids"]])
    assert warm.tokenizer("The sky is")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(cold.model(ids).logits, warm.model(ids).logits)
