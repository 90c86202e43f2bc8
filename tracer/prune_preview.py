"""What pruning would do to the next token, before anything is pruned: one forward per method on a copy.

For each pruning method at one budget, the state is pruned into a new
``KVState`` (the input is never changed) and the pending token is fed once
against it in a scratch engine; its next-token distribution is compared with
the full cache's: the KL divergence KL(full || pruned) in nats, whether the
most likely token stays, and the top 5 before and after. A method the state
cannot serve (no attention scores, a budget below its sinks) gets its reason
instead of figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.errors import PruneError
from kvstore.pruning import DEFAULT_SINKS, METHODS, PruneSpec
from kvstore.state import KVState
from tracer.engine import Engine
from tracer.loading import LoadedModel
from tracer.observation import observed_for
from tracer.records import Candidate
from tracer.token_text import token_piece

TOP = 5


@dataclass(frozen=True)
class MethodPreview:
    """One method's effect on the next token (``error`` set, and no figures, when it cannot run)."""

    method: str
    entries: int = 0  # entries kept per head (the longest layer's)
    kl: float = 0.0  # KL(full || pruned) of the next-token distribution, nats
    top1_kept: bool = True
    top: tuple[Candidate, ...] = ()  # most likely first
    dropped: tuple[int, ...] = ()  # positions no layer or head keeps any more
    error: str | None = None


@dataclass(frozen=True)
class PrunePreview:
    budget: int
    full_top: tuple[Candidate, ...]
    methods: tuple[MethodPreview, ...]


def pruned_state(loaded: LoadedModel, state: KVState, spec: PruneSpec) -> KVState:
    """``spec`` applied to ``state`` (a new state), with what its method observes computed on ``loaded``."""
    return spec.apply(state, observed_for(loaded, state, spec))


def next_distribution(loaded: LoadedModel, state: KVState) -> torch.Tensor:
    """Log-probabilities of the token after the pending one, fed at its true position in a scratch engine."""
    engine = Engine(loaded, capture_attention=False)
    engine.restore(state)
    return torch.log_softmax(engine.logits_after([state.token_ids[-1]], state.next_position)[0], dim=-1)


def kl_divergence(full: torch.Tensor, pruned: torch.Tensor) -> float:
    """KL(full || pruned) in nats, from log-probabilities."""
    return float((full.exp() * (full - pruned)).sum().clamp_min(0.0))


def preview(loaded: LoadedModel, state: KVState, budget: int, *, sinks: int = DEFAULT_SINKS,
            span: tuple[int, int] | None = None) -> PrunePreview:
    """Every method of ``METHODS`` at ``budget`` (after dropping ``span``, if given), against the full cache."""
    full = next_distribution(loaded, state)
    rows = []
    for name in METHODS:
        try:
            spec = PruneSpec(name, budget=budget, sinks=sinks, span=span)
            pruned = pruned_state(loaded, state, spec)
        except PruneError as error:
            rows.append(MethodPreview(name, error=str(error)))
            continue
        after = next_distribution(loaded, pruned)
        kept = set(pruned.positions)
        rows.append(MethodPreview(
            name, entries=max(pruned.layer_length(layer) for layer in range(pruned.num_layers)),
            kl=kl_divergence(full, after), top1_kept=int(full.argmax()) == int(after.argmax()), top=_top(loaded, after),
            dropped=tuple(p for p in state.positions if p not in kept)))
    return PrunePreview(budget, _top(loaded, full), tuple(rows))


def _top(loaded: LoadedModel, log_probs: torch.Tensor) -> tuple[Candidate, ...]:
    values, ids = torch.topk(log_probs.exp(), TOP)
    return tuple(Candidate(i, token_piece(loaded.tokenizer, i), p) for i, p in zip(ids.tolist(), values.tolist()))
