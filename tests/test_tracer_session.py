"""The step-wise session against plain transformers on tiny random-weight models."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from transformers import DynamicCache

from kvstore.errors import FingerprintMismatch
from tracer.errors import PromptError, TracerError
from tracer.loading import load_model
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession

MODELS = ["tiny_llama_dir", "tiny_gpt2_dir"]


@pytest.fixture(params=MODELS)
def loaded(request):
    return load_model(str(request.getfixturevalue(request.param)), device="cpu")


def prompt_ids(session: TraceSession) -> list[int]:
    return session.token_ids[: len(session.token_ids) - len(session.records)]


def test_greedy_tokens_equal_model_generate(loaded):
    session = TraceSession(loaded)
    session.start_turn("Tell me a story about a small robot.")
    records = session.generate(24)
    prompt = prompt_ids(session)
    assert loaded.model.config._attn_implementation == "sdpa"  # tracing left the stock kernel in place
    reference = loaded.model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )[0, len(prompt):].tolist()
    assert [r.token_id for r in records] == reference
    assert [r.position for r in records] == list(range(len(prompt), len(prompt) + len(records)))
    assert all(r.index == i for i, r in enumerate(session.records))


def test_attention_rows_are_distributions_over_earlier_tokens(loaded):
    session = TraceSession(loaded)
    session.start_turn("Why is the sky blue?")
    records = session.generate(5)
    assert session.attention_available
    for record in records:
        evidence = record.attention
        assert evidence.positions == list(range(record.position))  # every earlier token, the fed one included
        assert sum(evidence.mean) == pytest.approx(1.0, abs=1e-5)
        assert len(evidence.per_layer) == loaded.fingerprint.num_layers
        for layer in evidence.per_layer:
            weights = [w for _, w in layer]
            assert weights == sorted(weights, reverse=True)
    state = session.export_state()
    assert len(state.attention_scores) == len(state.positions)
    # every query's row sums to 1, so the total received equals the number of queries fed so far
    assert sum(state.attention_scores) == pytest.approx(len(state.positions), rel=1e-4)


def test_lens_last_layer_is_the_chosen_token_and_matches_plain_transformers(loaded):
    session = TraceSession(loaded)
    session.start_turn("Hello world")
    records = session.generate(6)
    model = loaded.model
    with torch.no_grad():
        full = model(torch.tensor([session.token_ids]), output_hidden_states=True)
    norm = model.base_model.norm if hasattr(model.base_model, "norm") else model.base_model.ln_f
    head = model.get_output_embeddings()
    for record in records:
        layers = session.lens(record.index)
        assert len(layers) == loaded.fingerprint.num_layers
        assert layers[-1].top[0].token_id == record.token_id
        fed = record.position - 1
        for layer in layers:
            hidden = full.hidden_states[layer.layer + 1][0, fed]
            if layer.layer < len(layers) - 1:
                hidden = norm(hidden)
            probs = torch.softmax(head(hidden).float(), dim=-1)
            values, ids = torch.topk(probs, len(layer.top))
            assert [c.token_id for c in layer.top] == ids.tolist()
            assert [c.prob for c in layer.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert session.lens(0) is session.records[0].lens  # computed once, then cached on the record


def test_seeded_sampling_is_reproducible(loaded):
    settings = SamplingSettings(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    runs = []
    for _ in range(2):
        session = TraceSession(loaded, settings)
        session.start_turn("Tell me a story")
        runs.append([r.token_id for r in session.generate(16)])
    assert runs[0] == runs[1]
    other = TraceSession(loaded, SamplingSettings(temperature=1.0, seed=8))
    other.start_turn("Tell me a story")
    assert [r.token_id for r in other.generate(16)] != runs[0]


def test_cancellation_stops_within_one_step(loaded):
    session = TraceSession(loaded)
    session.start_turn("Tell me a story")
    cancel = threading.Event()
    seen = []

    def on_step(record):
        seen.append(record)
        if len(seen) == 3:
            cancel.set()

    records = session.generate(50, cancel=cancel, on_step=on_step)
    assert len(records) == 3 and session.stop_reason == "cancelled"
    assert len(session.generate(2)) == 2  # a cancelled reply can go on


def test_empty_and_too_long_prompts_are_refused(loaded):
    session = TraceSession(loaded)
    with pytest.raises(PromptError, match="empty"):
        session.start_turn("   ")
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens long.* at most \d+ tokens"):
        session.start_turn("story " * 400)
    assert session.token_ids == [] and session.messages == []


def _reference_logits(model, tokens: list[int], keep: list[int]) -> torch.Tensor:
    """Plain transformers: cache the prefix at true positions, keep some entries, feed the pending token."""
    with torch.no_grad():
        prefix = model(torch.tensor([tokens[:-1]]), use_cache=True).past_key_values
        kept = DynamicCache(
            ddp_cache_data=[(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in prefix.layers],
            config=model.config,
        )
        out = model(
            torch.tensor([[tokens[-1]]]), past_key_values=kept,
            position_ids=torch.tensor([[len(tokens) - 1]]),
            attention_mask=torch.ones(1, len(keep) + 1, dtype=torch.long),
        )
    return torch.softmax(out.logits[0, -1].float(), dim=-1)


def test_pruned_state_continues_at_the_true_position(loaded):
    session = TraceSession(loaded)
    session.start_turn("Why is the sky blue? Tell me.")
    session.generate(4)
    state = session.export_state()
    n = state.cache_length
    keep = [i for i in range(n) if not 3 <= i < n // 2]
    pruned = state.select(keep)
    assert pruned.positions[-1] == n - 1 and pruned.cache_length < n

    uninterrupted = TraceSession(loaded)
    uninterrupted.import_state(state)
    whole = uninterrupted.step()
    resumed = TraceSession(loaded)
    resumed.import_state(pruned)
    record = resumed.step()
    # positions fed are the uninterrupted run's, not "cache length"
    assert record.position == whole.position == state.next_position + 1
    assert resumed.positions[-1] == uninterrupted.positions[-1] == state.next_position
    probs = _reference_logits(loaded.model, state.token_ids, keep)
    values, ids = torch.topk(probs, len(record.top))
    assert [c.token_id for c in record.top] == ids.tolist()
    assert [c.prob for c in record.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert record.attention.positions == [*pruned.positions, state.next_position]


def test_pruning_the_sessions_own_state_keeps_its_trace(loaded):
    """Importing a pruned copy of the same transcript only changes the cache; another one brings its own trace."""
    session = TraceSession(loaded)
    session.start_turn("Why is the sky blue? Tell me.")
    session.generate(4)
    before = [r.token_id for r in session.records]
    state = session.export_state()
    session.import_state(state.select(list(range(2, state.cache_length))))
    assert [r.token_id for r in session.records] == before
    assert len(session.lens(3)) == loaded.fingerprint.num_layers
    assert session.step().index == 4 and session.positions[0] == 2

    other = TraceSession(loaded)
    other.start_turn("Something else entirely")
    other.generate(2)
    session.import_state(other.export_state())  # another transcript: its own trace comes with it
    assert [r.to_dict() for r in session.records] == [r.to_dict() for r in other.records]
    assert session.token_ids == other.token_ids
    session.import_state(dataclasses.replace(state, trace=None))
    assert session.records == [] and session.token_ids == state.token_ids


def test_export_import_round_trip_continues_identically(loaded):
    straight = TraceSession(loaded)
    straight.start_turn("Hello world")
    straight.generate(3)
    state = straight.export_state()
    rest = [r.token_id for r in straight.generate(5)]
    resumed = TraceSession(loaded)
    resumed.import_state(state)
    assert resumed.token_ids == state.token_ids and resumed.messages == straight.messages
    assert [r.token_id for r in resumed.generate(5)] == rest


def test_import_of_another_models_state_is_refused(tiny_llama_dir, tiny_gpt2_dir):
    llama = TraceSession(load_model(str(tiny_llama_dir)))
    llama.start_turn("Hello")
    gpt2 = TraceSession(load_model(str(tiny_gpt2_dir)))
    gpt2.start_turn("Hello world")
    before = list(gpt2.token_ids)
    with pytest.raises(FingerprintMismatch, match="architecture"):
        gpt2.import_state(llama.export_state())
    assert gpt2.token_ids == before


def test_branch_forces_a_token_and_keeps_the_old_line(loaded):
    session = TraceSession(loaded)
    session.start_turn("Tell me a story")
    original = [r.token_id for r in session.generate(8)]
    second = session.records[3].top[1].token_id
    record = session.branch(3, second)
    assert record.forced and record.token_id == second and record.index == 3
    assert session.token_ids[-1] == second and len(session.records) == 4
    assert [r.token_id for r in session.records[:3]] == original[:3]
    assert len(session.branches) == 1 and [r.token_id for r in session.branches[0].records] == original
    # the forced record's distribution is the same step's as before
    assert record.top == session.branches[0].records[3].top
    # attention received counts only the queries of the line now held (each row sums to 1)
    assert sum(session.export_state().attention_scores) == pytest.approx(len(session.positions), rel=1e-4)
    # continuing after the branch equals a fresh run of the model on the edited transcript
    session.generate(4)
    prompt = session.token_ids[: session.records[0].position]
    edited = prompt + original[:3] + [second]
    reference = loaded.model.generate(torch.tensor([edited]), max_new_tokens=4, do_sample=False,
                                      attention_mask=torch.ones(1, len(edited), dtype=torch.long))
    assert session.token_ids == reference[0].tolist()[: len(session.token_ids)]
    session.switch_branch(0)
    assert [r.token_id for r in session.records] == original
    assert sum(session.export_state().attention_scores) == pytest.approx(len(session.positions), rel=1e-4)
    assert session.token_ids[-len(original):] == original


def test_second_turn_extends_the_transcript(loaded):
    session = TraceSession(loaded, SamplingSettings(max_new_tokens=6))
    session.start_turn("Hello", system="Be brief.")
    session.generate()
    first = list(session.token_ids)
    first_reply = session.reply_text()
    session.start_turn("Why is the sky blue?")
    prompt_end = len(session.token_ids)
    assert session.token_ids[: len(first)] == first
    assert [m["role"] for m in session.messages][-3:] == ["user", "assistant", "user"]
    assert session.messages[-2]["content"] == first_reply
    records = session.generate(4)
    assert records[0].position == prompt_end
    assert session.positions == list(range(len(session.token_ids) - 1))
    # branching back into the first turn restores its chat
    session.branch(1, session.records[1].top[1].token_id)
    assert session.messages[-1]["content"] == "Hello" and len(session.records) == 2
    assert sum(session.export_state().attention_scores) == pytest.approx(len(session.positions), rel=1e-4)


def test_state_pruned_to_nothing_continues_at_the_true_position(loaded):
    session = TraceSession(loaded)
    with pytest.raises(TracerError, match="start a turn"):
        session.export_state()
    session.start_turn("Hello world")
    state = session.export_state().select([])
    resumed = TraceSession(loaded)
    resumed.import_state(state)
    assert resumed.export_state().cache_length == 0
    record = resumed.step()
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[state.token_ids[-1]]]),
                              position_ids=torch.tensor([[state.next_position]])).logits[0, -1]
    assert record.top[0].token_id == int(logits.argmax())
    assert record.attention.positions == [state.next_position]


def test_generation_stops_when_the_context_window_is_full(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    session = TraceSession(loaded)
    words = 10
    while len(loaded.tokenizer("story " * words)["input_ids"]) < loaded.context_limit - 40:
        words += 5
    session.start_turn("story " * words)
    assert loaded.context_limit - len(session.token_ids) < 40
    records = session.generate(60)
    assert session.stop_reason == "context_full"
    assert max(session.positions) == loaded.context_limit - 1  # the last position the model has
    assert records[-1].position == loaded.context_limit and session.step() is None


def test_a_new_seed_in_replaced_settings_takes_effect(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    runs = []
    for _ in range(2):
        session = TraceSession(loaded, SamplingSettings(temperature=1.0, seed=1))
        session.start_turn("Tell me a story")
        session.generate(2)
        session.sampling = SamplingSettings(temperature=1.0, seed=5)
        runs.append([r.token_id for r in session.generate(12)])
    assert runs[0] == runs[1]
