"""Shrink a KV state by dropping cache entries, always keeping their original positions.

Every method returns a new ``KVState`` whose ``positions`` are a subset of
the input's, in order; ``token_ids`` (the transcript) is untouched, so the
pending token is still fed at its true position ``len(token_ids) - 1``, never
at "cache length". Budgets larger than the cache keep everything.

A ``PruneSpec`` names a method and its numbers; the CLI and the app both build
one, and its ``select`` is the only place the rules live (the app's preview
counts with it too).

Attention sinks: the first few tokens of a sequence collect a large share of
attention whatever their content; StreamingLLM (Xiao et al., 2023) shows a
window without them collapses (perplexity 5158 vs 5.40 with four sinks kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.errors import PruneError

if TYPE_CHECKING:  # the CLI reads the method table without importing torch
    from kvstore.state import KVState

# The one table of pruning methods: name -> what it keeps (for --help, the dialog and errors).
METHODS: dict[str, str] = {
    "sinks_recent": "the first SINKS entries (attention sinks) and the most recent ones: BUDGET in all (StreamingLLM)",
    "heavy_hitters": "sinks, a recent window (a quarter of BUDGET) and the entries that received the most "
                     "attention per query that saw them (H2O-style; needs a traced state)",
    "keep_last": "the last BUDGET entries",
}
ALIASES = {"attention": "heavy_hitters"}  # earlier command-line name
DEFAULT_SINKS = 4


@dataclass(frozen=True)
class PruneSpec:
    """What to drop: optionally a span of original positions first, then a method at a budget.

    ``method`` None with a ``span`` only drops the span (e.g. one chat turn).
    ``recent`` defaults to ``budget - sinks`` for sinks_recent and a quarter of
    the budget for heavy_hitters.
    """

    method: str | None
    budget: int = 0
    sinks: int = DEFAULT_SINKS
    recent: int | None = None
    span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise PruneError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method is None and self.span is None:
            raise PruneError("nothing to prune: name a method with a budget, or a span to drop")
        for name, value in (("budget", self.budget), ("sinks", self.sinks), ("recent", self.recent or 0)):
            if value < 0:
                raise PruneError(f"{name} must be zero or more, not {value}")
        if self.span is not None and not 0 <= self.span[0] <= self.span[1]:
            raise PruneError(f"the span {self.span[0]}..{self.span[1]} is not a range of positions "
                             "(0 <= START <= END)")
        if self.method in ("sinks_recent", "heavy_hitters") and self.sinks + self.recent_entries > self.budget:
            raise PruneError(f"the budget {self.budget} is smaller than the sinks ({self.sinks}) plus the recent "
                             f"entries ({self.recent_entries}); raise the budget or lower the others")

    @property
    def recent_entries(self) -> int:
        if self.recent is not None:
            return self.recent
        if self.method == "heavy_hitters":
            return self.budget // 4
        return max(self.budget - self.sinks, 0)

    def describe(self) -> str:
        """One line saying what is kept, for reports and the dialog."""
        parts = [] if self.span is None else [f"drop positions {self.span[0]}..{self.span[1] - 1}"]
        if self.method == "keep_last":
            parts.append(f"keep the last {self.budget} entries")
        elif self.method == "sinks_recent":
            parts.append(f"keep {self.sinks} sinks and the last {self.recent_entries} entries")
        elif self.method == "heavy_hitters":
            parts.append(f"keep {self.budget} entries: {self.sinks} sinks, the last {self.recent_entries} and "
                         "the most attended")
        return "; ".join(parts)

    def select(self, positions: Sequence[int], next_position: int,
               scores: Sequence[float] | None = None) -> list[int]:
        """Indices into ``positions`` of the entries kept (sorted)."""
        indices = list(range(len(positions)))
        if self.span is not None:
            start, end = self.span
            indices = [i for i in indices if not start <= positions[i] < end]
        if self.method is None:
            return indices
        count = len(indices)
        if self.method == "keep_last":
            return indices[max(0, count - self.budget):]
        keep = set(indices[: min(self.sinks, count)]) | set(indices[max(0, count - self.recent_entries):])
        if self.method == "heavy_hitters":
            if scores is None:
                raise PruneError("this state carries no attention scores (it was saved without tracing "
                                 "attention); use sinks_recent or keep_last instead")
            if self.budget >= count:
                return indices

            def mean_received(i: int) -> float:
                return scores[i] / (next_position - positions[i])

            rest = sorted((i for i in indices if i not in keep), key=mean_received, reverse=True)
            keep.update(rest[: self.budget - len(keep)])
        return sorted(keep)

    def apply(self, state: KVState) -> KVState:
        """A new state keeping what ``select`` chooses."""
        try:
            return state.select(self.select(state.positions, state.next_position, state.attention_scores))
        except ValueError as error:  # a per-head state whose heads would keep different numbers of entries
            raise PruneError(f"cannot prune this state by position: {error}") from None


def keep_last(state: KVState, n: int) -> KVState:
    """Keep the last ``n`` cache entries."""
    return PruneSpec("keep_last", budget=n).apply(state)


def sinks_recent(state: KVState, sinks: int, recent: int) -> KVState:
    """Keep the first ``sinks`` entries (attention sinks) and the last ``recent``."""
    return PruneSpec("sinks_recent", budget=sinks + recent, sinks=sinks, recent=recent).apply(state)


def heavy_hitters(state: KVState, budget: int, sinks: int = DEFAULT_SINKS, recent: int | None = None) -> KVState:
    """Keep ``budget`` entries: sinks, a recent window, and the most-attended of the rest.

    ``recent`` defaults to a quarter of the budget. Needs ``attention_scores``
    (the attention each entry has received while the session was traced).
    Entries are ranked by the attention they received *per query that could see
    them*: a raw sum favours early entries only because more queries came after
    them (on SmolLM2 at a budget of 64 the raw sum gave perplexity 5.95, the mean
    4.68; ``bench/snapshot.py``).
    """
    return PruneSpec("heavy_hitters", budget=budget, sinks=sinks, recent=recent).apply(state)


def drop_span(state: KVState, start: int, end: int) -> KVState:
    """Drop the entries at original positions ``start`` .. ``end - 1`` (e.g. one chat turn)."""
    return PruneSpec(None, span=(start, end)).apply(state)
