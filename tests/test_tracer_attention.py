"""Attention captured inside the model's own kernel equals the eager computation, and changes nothing.

The reference is plain transformers: the whole transcript through the eager
implementation with ``output_attentions=True`` (full ``queries x keys``
matrices, sliding windows and softcapping applied by the model itself), and
``model.generate`` with the model's default implementation for the tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import FAMILIES, build_tiny
from tracer import attention_hook, attention_weights, engine
from tracer.dump import step_line
from tracer.loading import load_model
from tracer.session import TraceSession

PROMPT = "Tell me a story about a small robot and the sky."  # longer than the tiny models' window
STEPS = 24


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {family: build_tiny(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


@pytest.fixture(params=[*FAMILIES, "gpt2"])
def loaded(request, tiny_dirs):
    folder = request.getfixturevalue("tiny_gpt2_dir") if request.param == "gpt2" else tiny_dirs[request.param]
    return load_model(str(folder), device="cpu")


def traced(loaded, steps: int = STEPS) -> TraceSession:
    session = TraceSession(loaded)
    session.start_turn(PROMPT)
    session.generate(steps)
    return session


def eager_attentions(model, tokens: list[int]) -> list[torch.Tensor]:
    """Per layer ``(heads, queries, keys)`` float64, from the model's own eager path."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            output = model(torch.tensor([tokens]), output_attentions=True)
    finally:
        model.set_attn_implementation(saved)
    return [a[0].double() for a in output.attentions]


def generate_reference(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_rows_and_received_attention_equal_eager(loaded):
    session = traced(loaded)
    assert session.engine.mode == "hook" and session.notices == []
    state = session.export_state()
    fed = state.next_position
    reference = eager_attentions(loaded.model, state.token_ids[:fed])
    layers, heads = len(reference), reference[0].shape[0]
    for record in session.records:
        query = record.position - 1
        evidence = record.attention
        expected = torch.stack([a[:, query, evidence.positions.tolist()] for a in reference]).mean(dim=(0, 1))
        assert torch.allclose(torch.tensor(evidence.mean.tolist(), dtype=torch.float64), expected, atol=1e-4)
        for layer in range(layers):
            mean_row = reference[layer][:, query].mean(dim=0)
            for position, weight in evidence.per_layer[layer]:
                assert weight == pytest.approx(mean_row[position].item(), abs=1e-4)
            for head in range(heads):
                entries = evidence.per_head[layer][head]
                strongest = torch.topk(reference[layer][head, query], len(entries)).values
                assert [w for _, w in entries] == pytest.approx(strongest.tolist(), abs=1e-4)
                for position, weight in entries:
                    assert weight == pytest.approx(reference[layer][head, query, position].item(), abs=1e-4)
    # received: column sums over every query that saw the entry, query heads folded into their KV head
    group = heads // state.keys[0].shape[0]
    for layer in range(layers):
        per_kv_head = reference[layer].sum(dim=1).view(-1, group, fed).mean(dim=1)
        expected = per_kv_head.gather(1, state.layer_positions(layer))
        assert torch.allclose(state.head_scores[layer].double(), expected, atol=1e-4)
    union = torch.stack([a.sum(dim=1) for a in reference]).mean(dim=(0, 1))[torch.tensor(state.positions)]
    assert torch.allclose(torch.tensor(state.attention_scores, dtype=torch.float64), union, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_equal_generate_with_the_default_implementation(loaded, dtype):
    model = load_model(str(loaded.model.name_or_path), device="cpu", dtype=dtype)
    default = model.model.config._attn_implementation
    session = traced(model)
    prompt = session.token_ids[: session.records[0].position]
    assert model.model.config._attn_implementation == default  # the capture put the model's own kernel back
    tokens = [r.token_id for r in session.records]
    assert tokens == generate_reference(model.model, prompt, STEPS)[: len(tokens)]


def test_the_capture_leaves_nothing_behind(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama"]), device="cpu")
    session = traced(loaded, 4)
    assert loaded.model.config._attn_implementation == "sdpa"
    assert attention_hook._RECORDER.get() is None
    # a plain forward of the same model, after the session, is untouched by the capture
    with torch.no_grad():
        plain = loaded.model(torch.tensor([session.token_ids])).logits
    assert torch.isfinite(plain).all() and attention_hook._RECORDER.get() is None


def test_prefill_capture_works_in_chunks_within_its_budget(tiny_dirs, monkeypatch):
    loaded = load_model(str(tiny_dirs["gemma2"]), device="cpu")
    scored: list[int] = []
    original = attention_weights._scores

    def recording(*args, **kwargs):
        scores = original(*args, **kwargs)
        scored.append(scores.numel() * scores.element_size())
        return scores

    whole = traced(loaded, 1).export_state()
    monkeypatch.setattr(attention_weights, "_scores", recording)
    budget = 4 * 4 * 40 * 4  # a few queries' scores at a time, whatever the prompt length
    monkeypatch.setattr(engine, "CAPTURE_BYTES", {"cpu": budget})
    chunked = traced(loaded, 1).export_state()
    assert max(scored) <= budget and len(scored) > 3 * loaded.fingerprint.num_layers
    for a, b in zip(whole.head_scores, chunked.head_scores):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_kernel_the_capture_does_not_wrap_falls_back_to_eager_with_one_notice(tiny_dirs, monkeypatch):
    loaded = load_model(str(tiny_dirs["qwen2"]), device="cpu")
    in_place = traced(loaded)
    monkeypatch.setattr(attention_hook, "SUPPORTED", ())
    session = traced(loaded)
    assert session.engine.mode == "eager" and len(session.notices) == 1 and "eager" in session.notices[0]
    assert loaded.model.config._attn_implementation == "sdpa"
    for ours, theirs in zip(session.records, in_place.records):
        assert ours.token_id == theirs.token_id
        assert torch.allclose(torch.tensor(ours.attention.mean.tolist()), torch.tensor(theirs.attention.mean.tolist()),
                              atol=1e-5)
    for a, b in zip(session.export_state().head_scores, in_place.export_state().head_scores):
        assert torch.allclose(a, b, atol=1e-4)


def test_a_layer_the_capture_cannot_read_degrades_to_eager(tiny_dirs, monkeypatch):
    loaded = load_model(str(tiny_dirs["llama"]), device="cpu")
    reference = [r.token_id for r in traced(loaded, 6).records]

    def unreadable(*args, **kwargs):
        raise ValueError("an unknown kernel argument")

    monkeypatch.setattr(attention_weights, "received", unreadable)
    session = traced(loaded, 6)
    assert session.engine.mode == "eager" and session.attention_available
    assert len(session.notices) == 1 and "unknown kernel argument" in session.notices[0]
    assert [r.token_id for r in session.records] == reference
    assert sum(session.export_state().attention_scores) == pytest.approx(len(session.positions), rel=1e-4)


def test_evidence_is_compact_and_serialises(tiny_dirs):
    loaded = load_model(str(tiny_dirs["gemma2"]), device="cpu")
    session = traced(loaded, 3)
    record = session.records[-1]
    evidence = record.attention
    layers, heads = loaded.fingerprint.num_layers, loaded.model.config.num_attention_heads
    assert evidence.per_head.positions.shape == (layers, heads, 8)
    # 8 bytes an entry (int32 position, float32 weight), 8 per layer and head; 8 bytes a transcript position
    assert evidence.nbytes == 8 * layers * heads * 8 + 8 * layers * 8 + 8 * len(evidence.positions)
    line = json.loads(json.dumps(step_line(record)))
    assert line == json.loads(json.dumps({"type": "step", **record.to_dict()}))
    assert len(line["attention"]["per_head"]) == layers and len(line["attention"]["per_head"][0]) == heads
    assert line["attention"]["per_head"][1][2] == [list(pair) for pair in evidence.per_head[1][2]]


def dense_reference(query, key, allowed, scaling, softcap):
    """Plain softmax over every score, ``allowed`` ``(queries, keys)`` True where a query sees a key."""
    group = query.shape[1] // key.shape[1]
    keys = key[0].repeat_interleave(group, dim=0)
    scores = query[0].double() @ keys.double().transpose(1, 2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs  # (heads, queries, keys)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_weights_equal_a_dense_softmax_in_any_chunking(window, mask_kind, softcap):
    torch.manual_seed(0)
    heads, kv_heads, past, count, dim = 6, 2, 7, 13, 8
    length = past + count
    query, key = torch.randn(1, heads, count, dim), torch.randn(1, kv_heads, length, dim)
    rows = torch.arange(count).unsqueeze(1) + past
    keys = torch.arange(length)
    allowed = keys <= rows
    if window is not None:
        allowed &= keys > rows - window
    # without a mask from the model the capture applies causality and the window itself
    mask = {"none": None, "bool": allowed[None, None],
            "float": torch.zeros(1, 1, count, length).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    expected = dense_reference(query, key, allowed, 0.3, softcap)
    for budget in (1, 4 * heads * length * 3, 1 << 20):  # one query, three queries, everything per chunk
        got = attention_weights.received(query, key, mask, scaling=0.3, softcap=softcap, window=window, budget=budget)
        summed = expected.sum(dim=1).view(kv_heads, heads // kv_heads, length).sum(dim=1)
        assert torch.allclose(got.double(), summed, atol=1e-5)
    last = attention_weights.decode_rows(query[:, :, -1:], key, None if mask is None else mask[:, :, -1:],
                                         scaling=0.3, softcap=softcap, window=window)
    assert torch.allclose(last.double(), expected[:, -1], atol=1e-6)
