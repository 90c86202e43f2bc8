"""Shrink a KV state by dropping cache entries, always keeping their original positions.

Every method returns a new ``KVState`` whose ``positions`` are a subset of
the input's, in order; ``token_ids`` (the transcript) is untouched, so the
pending token is still fed at its true position ``len(token_ids) - 1``, never
at "cache length". Budgets larger than the cache keep everything.

A ``PruneSpec`` names a method and its numbers; the CLI and the app both build
one, and its ``select`` (methods that keep the same positions in every layer
and head) or ``select_heads`` (per-head methods) is the only place the rules
live (the app's preview counts with them too).

Per-head methods: with RoPE applied to the cached keys, a KV head's cache is a
set of (key, value) pairs whose positions are only bookkeeping, so every
(layer, KV head) may keep its own entries, the same number per head: the
tensors keep their shape and the memory saved is the same as dropping whole
positions, while each head keeps what *it* attends to (on SmolLM2 this beats
any shared selection at the same budget; README, "Pruning").

Attention sinks: the first few tokens of a sequence collect a large share of
attention whatever their content; StreamingLLM (Xiao et al., 2023) shows a
window without them collapses (perplexity 5158 vs 5.40 with four sinks kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kvstore.errors import PruneError

if TYPE_CHECKING:  # the CLI reads the method table without importing torch
    import torch

    from kvstore.state import KVState

Needs = Literal["nothing", "scores", "window", "expected"]


@dataclass(frozen=True)
class Method:
    """A pruning method: what it keeps (one line for --help, the dialog and errors) and what it needs.

    ``needs``: "scores" the attention each entry received while traced (saved
    with the state); "window" and "expected" what the last queries attend to,
    which a state does not carry: ``tracer.observation`` computes them with one
    forward of those queries.
    """

    keeps: str
    per_head: bool = False
    needs: Needs = "nothing"


# The one table of pruning methods.
METHODS: dict[str, Method] = {
    "head_heavy_hitters": Method(
        "per layer and KV head: sinks and the entries that head attended to most per query that saw them "
        "(H2O per head; needs a traced state)", per_head=True, needs="scores"),
    "head_window": Method(
        "per layer and KV head: sinks and the entries the last WINDOW queries (the pending token's included; "
        "default BUDGET) attended to most, pooled over neighbours (SnapKV-style; one forward of the window)",
        per_head=True, needs="window"),
    "head_expected": Method(
        "per layer and KV head: sinks and the entries with the largest expected attention from future queries "
        "(a Gaussian fitted to the last WINDOW) times their value's norm (ExpectedAttention-style; one forward)",
        per_head=True, needs="expected"),
    "sinks_recent": Method("the first SINKS entries (attention sinks) and the most recent ones: BUDGET in all "
                           "(StreamingLLM)"),
    "heavy_hitters": Method("sinks, a recent window (a quarter of BUDGET) and the positions that received the most "
                            "attention per query that saw them, the same in every head (needs a traced state)",
                            needs="scores"),
    "keep_last": Method("the last BUDGET entries"),
}
ALIASES = {"attention": "heavy_hitters"}  # earlier command-line name
DEFAULT_SINKS = 4


POOL = 5  # window scores are max-pooled over this many neighbouring entries (SnapKV's kernel)


@dataclass(frozen=True)
class PruneSpec:
    """What to drop: optionally a span of original positions first, then a method at a budget.

    ``method`` None with a ``span`` only drops the span (e.g. one chat turn).
    ``recent`` defaults to ``budget - sinks`` for sinks_recent, a quarter of
    the budget for heavy_hitters and none for the per-head methods (each head
    keeps the recent entries it ranks high; on the issue's text a protected
    window cost perplexity, on others it helped: README, "Per-head pruning").
    ``window``: the queries the window methods observe, by default as many as
    the budget.
    """

    method: str | None
    budget: int = 0
    sinks: int = DEFAULT_SINKS
    recent: int | None = None
    span: tuple[int, int] | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise PruneError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method is None and self.span is None:
            raise PruneError("nothing to prune: name a method with a budget, or a span to drop")
        for name, value in (("budget", self.budget), ("sinks", self.sinks), ("recent", self.recent or 0)):
            if value < 0:
                raise PruneError(f"{name} must be zero or more, not {value}")
        if self.window is not None and self.window < 1:
            raise PruneError(f"the window must hold at least the pending token, not {self.window}")
        if self.span is not None and not 0 <= self.span[0] <= self.span[1]:
            raise PruneError(f"the span {self.span[0]}..{self.span[1]} is not a range of positions "
                             "(0 <= START <= END)")
        if self.method not in (None, "keep_last") and self.sinks + self.recent_entries > self.budget:
            raise PruneError(f"the budget {self.budget} is smaller than the sinks ({self.sinks}) plus the recent "
                             f"entries ({self.recent_entries}); raise the budget or lower the others")

    @property
    def per_head(self) -> bool:
        return self.method is not None and METHODS[self.method].per_head

    @property
    def needs(self) -> Needs:
        return "nothing" if self.method is None else METHODS[self.method].needs

    @property
    def runs_model(self) -> bool:
        """Whether the method scores entries with a forward of the last queries (it needs the model)."""
        return self.needs in ("window", "expected")

    @property
    def recent_entries(self) -> int:
        if self.recent is not None:
            return self.recent
        if self.method == "sinks_recent":
            return max(self.budget - self.sinks, 0)
        return self.budget // 4 if self.method == "heavy_hitters" else 0

    @property
    def observed_queries(self) -> int:
        """Queries the window methods observe (the pending token's included)."""
        return self.window if self.window is not None else max(self.budget, 1)

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
        elif self.per_head:
            what = {"scores": "attended most", "window": f"the last {self.observed_queries} queries attended most",
                    "expected": "future queries are expected to need most"}[self.needs]
            parts.append(f"keep {self.budget} entries per KV head: {self.sinks} sinks, the last "
                         f"{self.recent_entries} and those each head {what}")
        return "; ".join(parts)

    def select(self, positions: Sequence[int], next_position: int,
               scores: Sequence[float] | None = None) -> list[int]:
        """Indices into ``positions`` of the entries kept (sorted), for the methods that keep whole positions.

        For a per-head method, the positions left after the span (the method
        then chooses within each head: ``select_heads``).
        """
        indices = list(range(len(positions)))
        if self.span is not None:
            start, end = self.span
            indices = [i for i in indices if not start <= positions[i] < end]
        if self.method is None or self.per_head:
            return indices
        count = len(indices)
        if self.method == "keep_last":
            return indices[max(0, count - self.budget):]
        keep = set(indices[: min(self.sinks, count)]) | set(indices[max(0, count - self.recent_entries):])
        if self.method == "heavy_hitters":
            if scores is None:
                raise PruneError(NO_SCORES)
            if self.budget >= count:
                return indices

            def mean_received(i: int) -> float:
                return scores[i] / (next_position - positions[i])

            rest = sorted((i for i in indices if i not in keep), key=mean_received, reverse=True)
            keep.update(rest[: self.budget - len(keep)])
        return sorted(keep)

    def select_heads(self, state: KVState, observed: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per layer, the ``(kv_heads, m_l)`` sorted indices of the entries each head keeps (a per-head method).

        ``observed``: for the window methods, per layer the ``(kv_heads, n_l)`` scores of the observation
        window (``tracer.observation``). Sinks and recent entries are the first and last positions of the
        state's transcript order; they are kept in every head that holds them.
        """
        import torch

        kept = self.select(state.positions, state.next_position)
        allowed = torch.tensor([state.positions[i] for i in kept], dtype=torch.long)
        protected = torch.cat([allowed[: self.sinks], allowed[max(0, len(allowed) - self.recent_entries):]])
        scores = self._head_scores(state, observed)
        keep = []
        for layer in range(state.num_layers):
            held = state.layer_positions(layer)
            budget = min(self.budget, int(torch.isin(held, allowed).sum(dim=1).min()) if held.shape[1] else 0)
            rank = scores[layer].to(torch.float64).clone()
            rank[torch.isin(held, protected)] = float("inf")
            rank[~torch.isin(held, allowed)] = float("-inf")
            keep.append(torch.topk(rank, budget, dim=1).indices.sort(dim=1).values)
        return keep

    def _head_scores(self, state: KVState, observed: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Per layer ``(kv_heads, n_l)``: how much each head needs each entry (higher: keep)."""
        if self.runs_model:
            if observed is None:
                raise PruneError(f"{self.method} needs what the last queries attend to: prune through kvtrace "
                                 "(it runs one forward of the window), not kvstore alone")
            return observed
        if state.head_scores is None:
            raise PruneError(NO_SCORES)
        return [received / (state.next_position - state.layer_positions(layer)).to(received.dtype)
                for layer, received in enumerate(state.head_scores)]

    def apply(self, state: KVState, observed: list[torch.Tensor] | None = None) -> KVState:
        """A new state keeping what ``select`` (or, per head, ``select_heads``) chooses."""
        if self.per_head:
            return state.select_per_head(self.select_heads(state, observed))
        try:
            return state.select(self.select(state.positions, state.next_position, state.attention_scores))
        except ValueError as error:  # a per-head state whose heads would keep different numbers of entries
            raise PruneError(f"cannot prune this state by position: {error}") from None


NO_SCORES = ("this state carries no attention scores (it was saved without tracing attention); use sinks_recent, "
             "keep_last or head_window instead")


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
