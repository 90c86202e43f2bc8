"""Every cache layout transformers builds: sliding windows (alone or beside full layers), per-head
positions after per-head pruning, and layers placed by a device map, through export, import, crop and
branch. References: the uninterrupted session, ``model.generate`` on the same transcript, and the
model's own eager attention weights."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstore import snapshot
from tests.tiny_models import WINDOW, build_tiny
from tracer import kv_adapter
from tracer.lens import LogitLens
from tracer.loading import load_model
from tracer.session import TraceSession

PROMPT = "Tell me a story about a small robot and the sky."  # longer than the window
SLIDING = ["gemma2", "qwen2", "mistral"]  # hybrid (eager, softcapped), hybrid (sdpa), sliding only


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    dirs = {family: build_tiny(tmp_path_factory.mktemp(family), family) for family in [*SLIDING, "llama"]}
    # a window wider than prompt and reply: sliding layers that never evict, so they crop like full ones
    dirs["wide"] = build_tiny(tmp_path_factory.mktemp("wide"), "gemma2", sliding_window=128)
    return dirs


@pytest.fixture(params=SLIDING)
def sliding(request, tiny_dirs):
    return load_model(str(tiny_dirs[request.param]), device="cpu")


def started(loaded, steps: int) -> TraceSession:
    session = TraceSession(loaded)
    session.start_turn(PROMPT)
    session.generate(steps)
    return session


def reference_tokens(model, transcript: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([transcript]), max_new_tokens=steps, do_sample=False,
                         attention_mask=torch.ones(1, len(transcript), dtype=torch.long))
    return out[0].tolist()


def check_received_against_eager(loaded, state) -> None:
    """``head_scores`` and ``attention_scores`` equal column sums of the eager weights over the transcript fed."""
    model = loaded.model
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(torch.tensor([state.token_ids[: state.next_position]]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(saved)
    heads = attentions[0].shape[1]
    group = heads // state.keys[0].shape[0]
    for layer, weights in enumerate(attentions):
        received = weights[0].double().sum(dim=1).view(-1, group, state.next_position).mean(dim=1)
        assert torch.allclose(state.head_scores[layer].double(), received.gather(1, state.layer_positions(layer)),
                              atol=1e-4)
    union = torch.stack([w[0].double().sum(dim=1) for w in attentions]).mean(dim=(0, 1))
    assert torch.allclose(torch.tensor(state.attention_scores, dtype=torch.float64),
                          union[torch.tensor(state.positions)], atol=1e-4)


def test_sliding_layers_hold_their_window_and_the_fingerprint_says_so(sliding):
    state = started(sliding, 8).export_state()
    types = sliding.fingerprint.layer_types
    assert sliding.fingerprint.sliding_window == WINDOW and "sliding_attention" in types
    for layer, kind in enumerate(types):
        expected = WINDOW - 1 if kind == "sliding_attention" else state.next_position
        assert state.layer_length(layer) == expected
    check_received_against_eager(sliding, state)


def test_export_import_continue_past_the_window_is_exact(sliding):
    straight = started(sliding, 4)
    state = straight.export_state()
    rest = straight.generate(20)
    resumed = TraceSession(sliding)
    resumed.import_state(state)
    again = resumed.generate(20)
    assert [r.token_id for r in again] == [r.token_id for r in rest]
    for ours, theirs in zip(again, rest):
        assert ours.attention.positions == theirs.attention.positions
        assert ours.attention.mean == theirs.attention.mean  # the same computation, bit for bit
        assert (ours.attention.per_head.positions == theirs.attention.per_head.positions).all()
    a, b = straight.export_state(), resumed.export_state()
    assert a.positions == b.positions and a.attention_scores == pytest.approx(b.attention_scores, abs=1e-6)
    for x, y in zip(a.head_scores, b.head_scores):
        assert torch.allclose(x, y, atol=1e-6)


def test_a_kvs_file_of_a_sliding_model_resumes_exactly(sliding, tmp_path):
    straight = started(sliding, 4)
    state = straight.export_state()
    rest = [r.token_id for r in straight.generate(12)]
    snapshot.save(state, tmp_path / "s.kvs")
    resumed = TraceSession(sliding)
    resumed.import_state(snapshot.load(tmp_path / "s.kvs", expected=sliding.fingerprint))
    assert [r.token_id for r in resumed.generate(12)] == rest


@pytest.mark.parametrize("family", [*SLIDING, "wide", "llama"])
def test_branch_back_continues_like_a_fresh_run_and_takes_back_the_attention(tiny_dirs, family):
    """Past the window the kept transcript is prefilled anew; otherwise the cache is cropped and the dropped
    tokens' attention taken back. Both agree with the model run on the edited transcript."""
    loaded = load_model(str(tiny_dirs[family]), device="cpu")
    session = started(loaded, 12)
    if len(session.records) < 12:
        pytest.skip("the random model ended its reply early")
    other = session.records[5].top[1].token_id
    session.branch(5, other)
    check_received_against_eager(loaded, session.export_state())
    edited = list(session.token_ids)
    session.generate(6)
    assert session.token_ids == reference_tokens(loaded.model, edited, 6)[: len(session.token_ids)]
    check_received_against_eager(loaded, session.export_state())
    session.switch_branch(0)
    assert len(session.records) == 12
    check_received_against_eager(loaded, session.export_state())


def test_a_sliding_only_state_imported_then_branched_feeds_the_whole_transcript_again(tiny_dirs):
    loaded = load_model(str(tiny_dirs["mistral"]), device="cpu")
    state = started(loaded, 4).export_state()
    assert state.cache_length == WINDOW - 1 < state.next_position  # only the window is cached
    session = TraceSession(loaded)
    session.import_state(state)
    session.generate(8)
    session.branch(2, session.records[2].top[1].token_id)
    edited = list(session.token_ids)
    session.generate(6)
    assert session.token_ids == reference_tokens(loaded.model, edited, 6)[: len(session.token_ids)]


def test_per_head_positions_survive_import_and_continue_at_the_true_positions(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama"]), device="cpu")
    state = started(loaded, 3).export_state()
    n = state.cache_length
    # each KV head keeps its own entries, as many in every head: head 0 the first ones, head 1 every other one
    keep = [torch.stack([torch.arange((n + 1) // 2), torch.arange(0, n, 2)]) for _ in range(state.num_layers)]
    pruned = state.select_per_head(keep)
    session = TraceSession(loaded)
    session.import_state(pruned)
    again = session.export_state()
    assert all(torch.equal(a, b) for a, b in zip(again.head_positions, pruned.head_positions))
    assert all(torch.allclose(a, b) for a, b in zip(again.head_scores, pruned.head_scores))
    assert again.attention_scores == pytest.approx(pruned.attention_scores, abs=1e-6)
    record = session.step()
    # plain transformers over the same per-head entries
    cache = DynamicCache(config=loaded.model.config)
    for layer in range(pruned.num_layers):
        cache.update(pruned.keys[layer].unsqueeze(0), pruned.values[layer].unsqueeze(0), layer)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[pruned.token_ids[-1]]]), past_key_values=cache,
                              position_ids=torch.tensor([[pruned.next_position]])).logits[0, -1]
    assert record.top[0].token_id == int(logits.argmax())
    assert record.top[0].prob == pytest.approx(torch.softmax(logits.float(), -1).max().item(), abs=1e-5)
    # the evidence names each head's own positions
    held = set(torch.cat([p.reshape(-1) for p in pruned.head_positions]).tolist()) | {pruned.next_position}
    assert {p for layer in record.attention.per_head for head in layer for p, _ in head} <= held


def test_layers_live_where_the_device_map_put_their_attention(tiny_dirs):
    folder = tiny_dirs["gemma2"]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(3)}}
    loaded = load_model(str(folder), device="cpu", device_map=device_map)
    model = loaded.model
    # read from the model itself, not from loaded.device
    assert kv_adapter.attention_devices(model, 3, fallback=torch.device("meta")) == [torch.device("cpu")] * 3
    lens = LogitLens.for_model(model)
    assert (lens.norm_device, lens.head_device) == (torch.device("cpu"), torch.device("cpu"))
    plain = load_model(str(folder), device="cpu")
    ours, theirs = started(loaded, 6), started(plain, 6)
    assert [r.token_id for r in ours.records] == [r.token_id for r in theirs.records]
    assert [c.token_id for c in ours.lens(2)[1].top] == [c.token_id for c in theirs.lens(2)[1].top]
    resumed = TraceSession(loaded)
    resumed.import_state(ours.export_state())
    assert [r.token_id for r in resumed.generate(4)] == [r.token_id for r in theirs.generate(4)]
