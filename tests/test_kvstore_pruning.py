"""Pruning keeps the chosen entries with their original positions, never renumbered."""

from __future__ import annotations

import pytest
import torch

from kvstore import pruning, snapshot
from kvstore.errors import PruneError
from kvstore_factory import make_state


def assert_selected(pruned, state, kept_positions):
    assert pruned.positions == kept_positions
    index = torch.tensor([state.positions.index(p) for p in kept_positions], dtype=torch.long)
    for a, b in zip(state.keys + state.values, pruned.keys + pruned.values):
        assert torch.equal(a.index_select(1, index), b)
    assert pruned.token_ids == state.token_ids
    assert pruned.next_position == state.next_position  # the pending token keeps its true position
    pruned.validate()


def test_keep_last():
    state = make_state(length=40)
    assert_selected(pruning.keep_last(state, 10), state, list(range(30, 40)))
    assert_selected(pruning.keep_last(state, 100), state, list(range(40)))
    assert_selected(pruning.keep_last(state, 0), state, [])


def test_sinks_recent():
    state = make_state(length=40)
    assert_selected(pruning.sinks_recent(state, 4, 8), state, [0, 1, 2, 3] + list(range(32, 40)))
    assert_selected(pruning.sinks_recent(state, 30, 30), state, list(range(40)))


def test_heavy_hitters_keeps_sinks_recent_and_the_most_attended():
    state = make_state(length=40)
    state.attention_scores = [0.0] * 40
    for p, score in ((10, 0.9), (20, 0.8), (15, 0.7), (25, 0.1)):
        state.attention_scores[p] = score
    pruned = pruning.heavy_hitters(state, budget=10, sinks=2, recent=5)
    assert_selected(pruned, state, [0, 1, 10, 15, 20, 35, 36, 37, 38, 39])
    assert pruned.attention_scores[2:5] == [0.9, 0.7, 0.8]


def test_heavy_hitters_rank_by_attention_per_query_that_saw_the_entry():
    """An early entry's larger sum, gathered from more queries, does not outrank a later, denser one."""
    state = make_state(length=40)  # next position 40
    state.attention_scores = [0.0] * 40
    state.attention_scores[5] = 0.7  # seen by 35 queries: 0.02 each
    state.attention_scores[30] = 0.3  # seen by 10 queries: 0.03 each
    pruned = pruning.heavy_hitters(state, budget=4, sinks=2, recent=1)
    assert_selected(pruned, state, [0, 1, 30, 39])


def test_heavy_hitters_needs_scores_and_a_budget_that_fits():
    with pytest.raises(PruneError, match="no attention scores"):
        pruning.heavy_hitters(make_state(scores=False), budget=10)
    with pytest.raises(PruneError, match="smaller than the sinks"):
        pruning.heavy_hitters(make_state(), budget=5, sinks=4, recent=4)


def test_drop_span_uses_original_positions_after_earlier_pruning():
    state = make_state(length=40)
    first = pruning.sinks_recent(state, 4, 20)  # positions 0-3, 20-39
    second = pruning.drop_span(first, 2, 25)
    assert_selected(second, state, [0, 1] + list(range(25, 40)))


def test_bad_arguments_are_refused():
    state = make_state()
    with pytest.raises(PruneError):
        pruning.keep_last(state, -1)
    with pytest.raises(PruneError):
        pruning.drop_span(state, 5, 2)


def test_pruned_positions_survive_a_snapshot(tmp_path):
    state = pruning.drop_span(make_state(length=40), 5, 30)
    snapshot.save(state, tmp_path / "p.kvs", codec="int4")
    loaded = snapshot.load(tmp_path / "p.kvs")
    assert loaded.positions == list(range(5)) + list(range(30, 40))
    assert loaded.next_position == 40


def test_a_spec_is_checked_when_built_and_names_what_is_wrong():
    with pytest.raises(PruneError, match="budget 2 is smaller than the sinks"):
        pruning.PruneSpec("sinks_recent", budget=2, sinks=4)
    with pytest.raises(PruneError, match="unknown pruning method 'nope'"):
        pruning.PruneSpec("nope", budget=8)
    with pytest.raises(PruneError, match="nothing to prune"):
        pruning.PruneSpec(None)
    with pytest.raises(PruneError, match="not a range"):
        pruning.PruneSpec(None, span=(9, 3))


def test_a_span_is_dropped_before_the_method_counts_its_budget():
    state = make_state(length=40)
    spec = pruning.PruneSpec("keep_last", budget=10, span=(30, 35))
    assert_selected(spec.apply(state), state, list(range(25, 30)) + list(range(35, 40)))
    assert spec.select(state.positions, state.next_position) == list(range(25, 30)) + list(range(35, 40))
