"""Per-head pruning: exact budgets, exact resume against a hand-built transformers cache, and the preview.

The references never go through kvtrace's engine: selections are recomputed
here from the scores with plain sorting, and the pruned cache is rebuilt with
a plain ``DynamicCache`` of gathered tensors, fed at the true positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstore import snapshot
from kvstore.errors import PruneError
from kvstore.pruning import METHODS, PruneSpec
from kvstore.store import Store
from kvstore_factory import make_state
from tracer import usecases
from tracer.engine import Engine
from tracer.loading import load_model
from tracer.prune_preview import kl_divergence, preview, pruned_state
from tracer.quality import continuation_logits, prefilled_state

PER_HEAD = [name for name, method in METHODS.items() if method.per_head]


def with_head_scores(state, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    state.head_scores = [torch.rand(k.shape[:2], generator=g) for k in state.keys]
    return state


def reference_keep(scores: torch.Tensor, held: torch.Tensor, protected: set[int], budget: int) -> list[list[int]]:
    """Per head, by plain sorting: the protected entries, then the highest scores, in entry order."""
    keep = []
    for head in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda i: (int(held[head, i]) not in protected,
                                                              -float(scores[head, i])))
        keep.append(sorted(order[:budget]))
    return keep


@pytest.mark.parametrize("method", PER_HEAD)
def test_each_head_keeps_exactly_the_budget_with_its_sinks_and_its_best_entries(method):
    state = with_head_scores(make_state(length=40))
    g = torch.Generator().manual_seed(2)
    observed = [torch.rand(k.shape[:2], generator=g) for k in state.keys]
    spec = PruneSpec(method, budget=10, sinks=3)
    pruned = spec.apply(state, observed)
    pruned.validate()
    assert pruned.per_head and pruned.token_ids == state.token_ids and pruned.next_position == 40
    for layer in range(state.num_layers):
        held = state.layer_positions(layer)
        scores = observed[layer] if spec.needs != "scores" else \
            state.head_scores[layer] / (state.next_position - held).float()
        expected = reference_keep(scores, held, {0, 1, 2}, 10)
        assert pruned.keys[layer].shape == (2, 10, 8) and pruned.values[layer].shape == (2, 10, 8)
        for head, entries in enumerate(expected):
            assert pruned.head_positions[layer][head].tolist() == [int(held[head, i]) for i in entries]
            assert pruned.head_positions[layer][head, :3].tolist() == [0, 1, 2]
            assert torch.equal(pruned.keys[layer][head], state.keys[layer][head, entries])
            assert torch.equal(pruned.values[layer][head], state.values[layer][head, entries])
            assert torch.equal(pruned.head_scores[layer][head], state.head_scores[layer][head, entries])
    assert not torch.equal(pruned.head_positions[0][0], pruned.head_positions[0][1])  # heads really differ


def test_a_per_head_method_refuses_what_it_cannot_do_in_one_line():
    with pytest.raises(PruneError, match="no attention scores"):
        PruneSpec("head_heavy_hitters", budget=10).apply(make_state())
    with pytest.raises(PruneError, match="one forward"):
        PruneSpec("head_expected", budget=10).apply(make_state())
    with pytest.raises(PruneError, match="smaller than the sinks"):
        PruneSpec("head_window", budget=3, sinks=4)


def test_a_span_is_dropped_before_each_head_chooses():
    state = with_head_scores(make_state(length=40))
    pruned = PruneSpec("head_heavy_hitters", budget=8, span=(0, 20)).apply(state)
    for table in pruned.head_positions:
        assert table.shape == (2, 8) and bool((table >= 20).all())
        assert table[:, :4].tolist() == [[20, 21, 22, 23]] * 2  # the first positions left are the sinks


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(5, loaded.fingerprint.vocab_size, (60,), generator=g).tolist()
    return loaded, prefilled_state(loaded, tokens[:50], attention_scores=True), tokens[50:]


def manual_logits(loaded, state, spec, continuation):
    """The reference: the selection recomputed by sorting, a plain DynamicCache of gathered tensors."""
    cache = DynamicCache(config=loaded.model.config)
    for layer in range(state.num_layers):
        held = state.layer_positions(layer)
        scores = state.head_scores[layer] / (state.next_position - held).float()
        keep = reference_keep(scores, held, set(state.positions[: spec.sinks]), spec.budget)
        keys = torch.stack([state.keys[layer][h, entries] for h, entries in enumerate(keep)])
        values = torch.stack([state.values[layer][h, entries] for h, entries in enumerate(keep)])
        cache.update(keys[None], values[None], layer)
    feed = [state.token_ids[-1], *continuation[:-1]]
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([feed]), past_key_values=cache, use_cache=True,
                           position_ids=torch.arange(state.next_position, state.next_position + len(feed))[None])
    return out.logits[0].float()


def test_continuing_after_a_per_head_prune_equals_the_manual_forward_through_files_and_the_store(tiny, tmp_path):
    loaded, state, continuation = tiny
    spec = PruneSpec("head_heavy_hitters", budget=12)
    expected = manual_logits(loaded, state, spec, continuation)
    pruned = usecases.prune_state(state, spec, loaded).state
    assert torch.allclose(continuation_logits(loaded, pruned, continuation), expected, atol=1e-5)
    assert not torch.allclose(continuation_logits(loaded, state, continuation), expected, atol=1e-3)

    snapshot.save(pruned, tmp_path / "p.kvs")
    from_file = snapshot.load(tmp_path / "p.kvs", expected=loaded.fingerprint)
    usecases.save_state(pruned, f"{tmp_path / 'store'}:pruned")
    from_store = usecases.read_state(f"{tmp_path / 'store'}:pruned")
    assert Store.open(tmp_path / "store").entries()[0].name == "pruned"
    for loaded_state in (from_file, from_store):
        assert loaded_state.per_head and loaded_state.next_position == state.next_position
        for a, b in zip(loaded_state.head_positions, pruned.head_positions):
            assert torch.equal(a, b)
        assert torch.equal(continuation_logits(loaded, loaded_state, continuation),
                           continuation_logits(loaded, pruned, continuation))


def decode_log_probs(loaded, state) -> torch.Tensor:
    """The next-token distribution by stepping a restored engine (the session's own decode path)."""
    engine = Engine(loaded, capture_attention=False)
    engine.restore(state)
    return torch.log_softmax(engine.decode(state.token_ids[-1], state.next_position).logits, dim=-1)


def test_the_preview_kl_is_the_kl_of_pruning_and_stepping_and_touches_nothing(tiny):
    loaded, state, _ = tiny
    keys_before = [k.clone() for k in state.keys]
    result = preview(loaded, state, 12)
    assert [row.method for row in result.methods] == list(METHODS)
    full = decode_log_probs(loaded, state)
    for row in result.methods:
        assert row.error is None, row.error
        stepped = decode_log_probs(loaded, pruned_state(loaded, state, PruneSpec(row.method, budget=12)))
        assert row.kl == pytest.approx(kl_divergence(full, stepped), abs=1e-5)
        assert row.kl > 1e-4  # dropping 37 of 49 entries changes a random model's next token
        assert row.top1_kept == (int(full.argmax()) == int(stepped.argmax()))
        assert [c.token_id for c in row.top] == torch.topk(stepped, 5).indices.tolist()
        assert row.entries == 12 and len(row.dropped) > 0
    assert all(torch.equal(a, b) for a, b in zip(state.keys, keys_before))


def kvtrace_here(capsys, *args: object):
    from tui_app.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def saved(tiny, tiny_llama_dir, tmp_path_factory):
    loaded, state, _ = tiny
    state.fingerprint = loaded.fingerprint
    path = tmp_path_factory.mktemp("saved") / "s.kvs"
    snapshot.save(state, path)
    return path


def test_prune_preview_prints_every_method_and_writes_nothing(saved, tiny_llama_dir, capsys):
    before = set(saved.parent.iterdir())
    code, out, err = kvtrace_here(capsys, "prune", saved, "--budget", 12, "--preview", "--model", tiny_llama_dir)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("budget 12 entries of 49; next token with the full cache: ")
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(METHODS)
    for name, line in rows.items():
        kept, kl, top1 = line.split()[1:4]
        assert kept == "12" and float(kl) > 0 and top1 in ("same", "CHANGED") and "/5 kept:" in line, line
    assert set(saved.parent.iterdir()) == before


def test_prune_with_a_window_method_loads_the_model_and_writes_a_per_head_snapshot(saved, tiny_llama_dir,
                                                                                   tmp_path, capsys):
    code, out, err = kvtrace_here(capsys, "prune", saved, "-o", tmp_path / "p.kvs", "--method", "head_expected",
                                  "--budget", 12, "--model", tiny_llama_dir)
    assert code == 0, err
    assert "after:  12 entries per KV head" in out
    assert snapshot.load(tmp_path / "p.kvs").per_head
    code, out, err = kvtrace_here(capsys, "info", tmp_path / "p.kvs")
    assert code == 0 and "per head: each KV head keeps its own 12 entries" in out, err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--method", "nope", "--budget", "8", "-o", "x.kvs"], "invalid choice: 'nope'"),
    (["--method", "head_heavy_hitters", "--budget", "2", "-o", "x.kvs"], "budget 2 is smaller than the sinks"),
    (["--method", "head_heavy_hitters", "--budget", "-1", "-o", "x.kvs"], "budget must be zero or more"),
    (["--budget", "0", "--preview"], "--budget must be at least 1"),
    (["--preview"], "--preview needs --budget"),
    (["--method", "head_heavy_hitters", "--budget", "8"], "give -o OUT"),
])
def test_bad_prune_arguments_are_one_line_and_exit_2(saved, capsys, args, fragment):
    code, out, err = kvtrace_here(capsys, "prune", saved, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


def test_help_lists_every_method_with_one_line(capsys):
    code, text, _ = kvtrace_here(capsys, "prune", "--help")
    assert code == 0
    for name, method in METHODS.items():
        assert f"\n  {name}: {method.keeps.split()[0]}" in text


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    """The same tiny model loaded by plain transformers with eager attention (returns its weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), attn_implementation="eager",
                                                 dtype=torch.float32)
    return model.eval()


def test_window_scores_are_the_last_queries_attention_pooled(tiny, plain):
    from tracer.observation import window_scores

    loaded, state, _ = tiny
    window, group = 8, 2  # 4 query heads share 2 KV heads
    with torch.no_grad():
        attentions = plain(input_ids=torch.tensor([state.token_ids]), output_attentions=True).attentions
    scores = window_scores(loaded, state, window)
    for layer, weights in enumerate(attentions):
        rows = weights[0, :, -window:, : state.cache_length]  # the last queries, the pending token's included
        expected = torch.stack([rows[h * group:(h + 1) * group].mean(dim=(0, 1)) for h in range(2)])
        padded = torch.nn.functional.pad(expected, (2, 2), value=float("-inf"))
        pooled = torch.stack([padded[:, i:i + 5].amax(dim=1) for i in range(state.cache_length)], dim=1)
        assert torch.allclose(scores[layer], pooled, atol=1e-5)


def test_expected_scores_follow_the_gaussian_of_the_pre_rope_queries(tiny, plain):
    """The reference takes the queries before RoPE from the hidden states (the code un-rotates captured ones)."""
    from tracer.observation import FUTURE, expected_scores

    loaded, state, _ = tiny
    window, heads, dim = 8, 4, 16
    with torch.no_grad():
        hidden = plain(input_ids=torch.tensor([state.token_ids]), output_hidden_states=True).hidden_states
        future = torch.arange(state.next_position, state.next_position + FUTURE)[None]
        cos, sin = plain.model.rotary_emb(hidden[0], future)
    cos, sin = cos[0].mean(dim=0), sin[0].mean(dim=0)
    half = dim // 2
    rotation = torch.zeros(dim, dim)
    for i in range(dim):  # x -> x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        rotation[i, i] = cos[i]
        rotation[i, (i + half) % dim] = -sin[i] if i < half else sin[i]
    scores = expected_scores(loaded, state, window)
    for layer, block in enumerate(plain.model.layers):
        with torch.no_grad():
            queries = block.self_attn.q_proj(block.input_layernorm(hidden[layer][0, -window:]))
        queries = queries.view(window, heads, dim)
        keys, values = state.keys[layer], state.values[layer]
        for kv_head in range(2):
            weights = []
            for head in (2 * kv_head, 2 * kv_head + 1):
                q = queries[:, head]
                mean, centred = q.mean(dim=0), q - q.mean(dim=0)
                covariance = centred.T @ centred / window
                mean, covariance = rotation @ mean, rotation @ covariance @ rotation.T
                k = keys[kv_head]
                logits = k @ mean / dim ** 0.5 + ((k @ covariance) * k).sum(dim=1) / dim / 2
                logits[:4] = float("-inf")
                weights.append(logits.softmax(dim=0))
            expected = (weights[0] + weights[1]) / 2 * values[kv_head].norm(dim=1)
            assert torch.allclose(scores[layer][kv_head], expected, atol=1e-5, rtol=1e-4)
