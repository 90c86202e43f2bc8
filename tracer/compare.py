"""Two lines of generation side by side from where they part: plain data, built by the session.

Lines that leave a shared prefix at generated token ``branch`` share every
hidden state up to it, so at the branch point both tokens were candidates of
one distribution and one lens: ``layers`` says, per layer, how likely each
line's token was there. After it each line reads its own tokens; ``steps``
pairs the lines' tokens at the same transcript positions (the same turn) and
gives each token's probability under its own line's distribution and under
the other's, which says how far the lines have drifted apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tracer.lens import LogitLens
from tracer.lines import divergence
from tracer.records import StepRecord
from tracer.residual import StepTensors

MAX_STEPS = 256  # aligned steps compared (a few screens' worth)
CHUNK = 64  # steps per distribution product: bounds memory at 2 x CHUNK x vocab floats
PREFIX_CHARS = 80  # of the shared reply text before the branch point


@dataclass(frozen=True)
class PairedStep:
    """Both lines' tokens at one generated index from the branch point on."""

    index: int
    position: int
    a_token: int
    a_text: str
    a_prob: float  # under line A's own distribution
    a_under_b: float  # A's token under line B's distribution at the same position
    b_token: int
    b_text: str
    b_prob: float
    b_under_a: float


@dataclass(frozen=True)
class LayerAtBranch:
    """One layer at the branch point: the lens's probability of each line's token, and its top-1 there."""

    layer: int
    a_prob: float
    b_prob: float
    top_text: str


@dataclass(frozen=True)
class LineComparison:
    """Lines A and B (session line indices: -1 the current line, else a branch) compared from the branch."""

    a: int
    b: int
    a_steps: int  # generated tokens on each line
    b_steps: int
    branch: int  # the first generated index where the lines differ (== the shorter length: one extends the other)
    prefix_text: str  # the shared reply text before the branch point (its end)
    steps: tuple[PairedStep, ...]
    layers: tuple[LayerAtBranch, ...]  # empty without a lens, or when a line has no token at the branch point
    a_after: tuple[str, ...]  # per layer, the lens's top-1 on each line one step after the branch point
    b_after: tuple[str, ...]

    @property
    def first_difference(self) -> PairedStep | None:
        return self.steps[0] if self.steps and self.steps[0].index == self.branch else None


def aligned(a: Sequence[StepRecord], b: Sequence[StepRecord], start: int, limit: int = MAX_STEPS) -> list[int]:
    """Generated indices from ``start`` where both lines have a token at the same position (they stop
    pairing where a turn boundary moves one of them)."""
    indices = []
    for i in range(start, min(len(a), len(b), start + limit)):
        if a[i].position != b[i].position:
            break
        indices.append(i)
    return indices


def _log_probs(lens: LogitLens, rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.log_softmax(lens.logits(torch.stack(rows)), dim=-1)


def _stream(tensors: StepTensors) -> torch.Tensor:
    assert tensors.final is not None
    return torch.cat([tensors.hidden, tensors.final[None]])


@torch.no_grad()
def compare(a: int, b: int, line_a: tuple[Sequence[StepRecord], Sequence[StepTensors | None]],
            line_b: tuple[Sequence[StepRecord], Sequence[StepTensors | None]], lens: LogitLens | None,
            text_of: Callable[[int], str]) -> LineComparison:
    """Lines ``a`` and ``b`` (their records and residual streams) compared from where they part; without a
    lens, or with records restored without their residual stream, a token's probability under the other line
    is NaN and the lens at the branch point is left out."""
    (ra, ta), (rb, tb) = line_a, line_b
    start = divergence(ra, rb)
    indices = aligned(ra, rb, start)
    kept = indices + [start + 1] if start + 1 < min(len(ra), len(rb)) else indices
    if any(ta[i] is None or tb[i] is None for i in kept):
        lens = None
    a_under_b = b_under_a = [math.nan] * len(indices)
    layers: list[LayerAtBranch] = []
    a_after: list[str] = []
    b_after: list[str] = []
    if lens is not None and indices:
        a_under_b, b_under_a = [], []
        for chunk in range(0, len(indices), CHUNK):
            part = indices[chunk : chunk + CHUNK]
            on_a = _log_probs(lens, [ta[i].final for i in part])
            on_b = _log_probs(lens, [tb[i].final for i in part])
            b_ids = torch.tensor([[rb[i].token_id] for i in part], device=on_a.device)
            a_ids = torch.tensor([[ra[i].token_id] for i in part], device=on_b.device)
            b_under_a += on_a.gather(1, b_ids)[:, 0].exp().tolist()
            a_under_b += on_b.gather(1, a_ids)[:, 0].exp().tolist()
        if indices[0] == start:  # both lines have a token at the branch point: one lens holds both
            probs = _log_probs(lens, [_stream(ta[start])])[0].exp()
            tops = probs.argmax(-1).tolist()
            pair = probs[:, [ra[start].token_id, rb[start].token_id]].tolist()
            layers = [LayerAtBranch(layer, p[0], p[1], text_of(top)) for layer, (p, top) in enumerate(zip(pair, tops))]
        if start + 1 < len(ra) and start + 1 < len(rb):
            after = _log_probs(lens, [_stream(ta[start + 1]), _stream(tb[start + 1])]).argmax(-1).tolist()
            a_after, b_after = [text_of(t) for t in after[0]], [text_of(t) for t in after[1]]
    steps = tuple(
        PairedStep(i, ra[i].position, ra[i].token_id, text_of(ra[i].token_id), ra[i].prob, ab,
                   rb[i].token_id, text_of(rb[i].token_id), rb[i].prob, ba)
        for i, ab, ba in zip(indices, a_under_b, b_under_a))
    shared = "".join(r.text for r in ra[:start])
    return LineComparison(a, b, len(ra), len(rb), start, shared[-PREFIX_CHARS:], steps, tuple(layers),
                          tuple(a_after), tuple(b_after))
