"""Resuming from a snapshot continues the very same generation (API level, real models).

References are independent of the snapshot path: an uninterrupted session, and
plain transformers forwards over the whole transcript without any cache.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvstore import pruning, snapshot
from tracer import kv_adapter
from tracer.loading import load_model
from tracer.session import TraceSession

PROMPT = "Tell me a story."
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm. Use at least 400 words."


@pytest.fixture(params=["tiny_llama_dir", "tiny_gpt2_dir"])
def tiny(request):
    return load_model(str(request.getfixturevalue(request.param)), device="cpu")


def plain_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """log-softmax at every position of one cache-free forward over ``token_ids``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def pending_logits(loaded, state) -> torch.Tensor:
    """Logits for the pending token, fed at its true position over the state's cache."""
    cache = kv_adapter.cache_from_tensors(state.keys, state.values, loaded.model.config,
                                          loaded.device, loaded.dtype)
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([[state.token_ids[-1]]]),
                           position_ids=torch.tensor([[state.next_position]]),
                           attention_mask=torch.ones(1, state.cache_length + 1, dtype=torch.long),
                           past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float()


def check_exact_resume(loaded, tmp_path, prompt: str, before: int, after: int) -> None:
    reference = TraceSession(loaded)
    reference.start_turn(prompt)
    reference.generate(before + after)
    assert len(reference.records) == before + after, reference.stop_reason

    first = TraceSession(loaded)
    first.start_turn(prompt)
    first.generate(before)
    path = tmp_path / "s.kvs"
    snapshot.save(first.export_state(), path)
    del first

    state = snapshot.load(path, expected=loaded.fingerprint)
    full = plain_logprobs(loaded.model, reference.token_ids[:-1])
    at_resume = torch.log_softmax(pending_logits(loaded, state), dim=-1)
    assert torch.allclose(at_resume, full[state.next_position], atol=1e-4)

    resumed = TraceSession(loaded)
    resumed.import_state(state)
    records = resumed.generate(after)
    assert [r.token_id for r in records] == [r.token_id for r in reference.records[before:]]
    assert resumed.token_ids == reference.token_ids
    for record, ref in zip(records, reference.records[before:]):
        assert record.position == ref.position
        assert record.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert record.logprob == pytest.approx(full[record.position - 1, record.token_id].item(), abs=1e-4)


def test_lossless_resume_is_exact_on_tiny_models(tiny, tmp_path):
    # GPT-2 (absolute positions) and Llama (RoPE, grouped-query attention)
    check_exact_resume(tiny, tmp_path, PROMPT, before=2, after=100)


@pytest.mark.slow
def test_lossless_resume_is_exact_on_smollm2(smollm2, tmp_path):
    check_exact_resume(smollm2, tmp_path, LONG_PROMPT, before=6, after=100)


def test_pruned_resume_feeds_true_positions(tiny, tmp_path):
    session = TraceSession(tiny)
    session.start_turn("Why is the sky blue? Because of Rayleigh scattering of sunlight.")
    session.generate(6)
    reference_positions = [r.position for r in continue_from(tiny, session.export_state(), 8)]
    pruned = pruning.sinks_recent(session.export_state(), 2, 6)
    snapshot.save(pruned, tmp_path / "p.kvs")
    state = snapshot.load(tmp_path / "p.kvs", expected=tiny.fingerprint)
    assert state.next_position == len(session.token_ids) - 1 > state.cache_length

    fed: list[int] = []
    hook = tiny.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.extend(kwargs["position_ids"][0].tolist()), with_kwargs=True)
    try:
        resumed = TraceSession(tiny)
        resumed.import_state(state)
        records = resumed.generate(8)
    finally:
        hook.remove()
    assert fed == [p - 1 for p in reference_positions]  # each step feeds the token before the new one
    assert [r.position for r in records] == reference_positions
    # and the first step's logits are those of the true position, not of "cache length"
    true = torch.log_softmax(pending_logits(tiny, state), dim=-1)
    assert records[0].logprob == pytest.approx(true[records[0].token_id].item(), abs=1e-4)
    shifted = replace(state, token_ids=state.token_ids[: state.cache_length] + [state.token_ids[-1]])
    wrong = torch.log_softmax(pending_logits(tiny, shifted), dim=-1)
    assert not torch.allclose(true, wrong, atol=1e-3)  # the position really matters


def continue_from(loaded, state, steps):
    session = TraceSession(loaded)
    session.import_state(state)
    return session.generate(steps)
