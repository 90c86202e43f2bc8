"""Resuming from a snapshot continues the very same generation (API level, tiny real models)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvstore import pruning, snapshot
from kvstore_resume_checks import check_api_resume, pending_logits, uninterrupted
from tracer.loading import load_model
from tracer.session import TraceSession

PROMPT = "Tell me a story."


@pytest.fixture(params=["tiny_llama_dir", "tiny_gpt2_dir"])
def tiny(request):
    return load_model(str(request.getfixturevalue(request.param)), device="cpu")


def test_lossless_resume_is_exact_on_tiny_models(tiny, tmp_path):
    # GPT-2 (absolute positions) and Llama (RoPE, grouped-query attention); the SmolLM2
    # version shares its reference run with the command test in test_snapshot_commands.py
    reference = uninterrupted(tiny, PROMPT, 2 + 100)
    check_api_resume(tiny, tmp_path, PROMPT, reference, before=2)


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
