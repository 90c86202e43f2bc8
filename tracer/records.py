"""What one generation step leaves behind: plain data, shared by the app and the dump.

Records hold Python numbers, not tensors, so they cost a few kilobytes per token
whatever the context length, and serialise to JSON as they are (``to_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Candidate:
    """One entry of a top-k list."""

    token_id: int
    text: str
    prob: float


@dataclass(frozen=True)
class AttentionEvidence:
    """Which earlier tokens the new token looked at.

    Kept compact so memory per token stays flat: the mean over layers (and
    heads) as a full row over the cached positions, and per layer only the
    ``top`` strongest entries. Positions are original positions in the
    transcript, so the evidence stays meaningful after pruning.
    """

    positions: list[int]  # original position of each entry of ``mean``
    mean: list[float]  # mean over layers and heads; sums to 1 over ``positions``
    per_layer: list[list[tuple[int, float]]]  # per layer: (position, weight), strongest first


@dataclass(frozen=True)
class LensLayer:
    """What one layer would have predicted at the step (the logit lens)."""

    layer: int
    top: list[Candidate]


@dataclass
class StepRecord:
    """Everything captured for one generated token."""

    index: int  # 0-based among the generated tokens of the session
    position: int  # original position of the token in the transcript
    token_id: int
    text: str  # the token's own piece of text (incremental decode, may be "")
    prob: float
    logprob: float
    entropy: float  # of the full next-token distribution, in nats
    top: list[Candidate]
    attention: AttentionEvidence | None = None  # None when the model can't return weights
    lens: list[LensLayer] | None = None  # filled lazily (on request, or by the dump)
    forced: bool = False  # chosen by a branch, not by the sampler
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
