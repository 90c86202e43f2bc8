"""What one generation step leaves behind: plain data, shared by the app and the dump.

Records cost a few kilobytes per token and serialise to JSON through
``to_dict``. The attention evidence grows with the context and the model
(a row per transcript position, entries per layer and head), so it keeps its
numbers in numpy arrays behind read-only sequences that index, iterate and
compare like the lists they replace: 4 bytes a number instead of a Python
object each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np


class PackedRow(Sequence):
    """A read-only row of numbers kept as one numpy array; items come out as Python ``int``/``float``."""

    __slots__ = ("array",)

    def __init__(self, values: Any, dtype: type) -> None:
        self.array = np.asarray(values, dtype=dtype)  # an array of that dtype is kept, not copied
        if self.array is values:
            self.array = self.array.view()  # the flag below must not freeze the caller's array
        self.array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.array[index].tolist()
        return self.array[index].item()

    def __iter__(self) -> Iterator:
        return iter(self.array.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PackedRow, list, tuple)):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, so unhashable like them

    def tolist(self) -> list:
        return self.array.tolist()

    def __repr__(self) -> str:
        return f"PackedRow({self.tolist()!r})"


class TopEntries(Sequence):
    """The strongest ``(position, weight)`` entries of many rows, strongest first, in two arrays ``(..., k)``.

    ``entries[i]`` is row ``i``'s list of pairs when the arrays are 2-D, and the
    ``TopEntries`` below ``i`` otherwise (``per_head[layer][head]``). A negative
    position pads a row that had fewer than ``k`` entries; it never comes out.
    """

    __slots__ = ("positions", "weights")

    def __init__(self, positions: np.ndarray, weights: np.ndarray) -> None:
        self.positions = np.asarray(positions, dtype=np.int32)
        self.weights = np.asarray(weights, dtype=np.float32)

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[tuple[int, float]]]) -> TopEntries:
        width = max((len(row) for row in rows), default=0)
        positions = np.full((len(rows), width), -1, dtype=np.int32)
        weights = np.zeros((len(rows), width), dtype=np.float32)
        for i, row in enumerate(rows):
            for j, (position, weight) in enumerate(row):
                positions[i, j], weights[i, j] = position, weight
        return cls(positions, weights)

    def __len__(self) -> int:
        return self.positions.shape[0]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        if self.positions.ndim > 2:
            return TopEntries(self.positions[index], self.weights[index])
        return [(p, w) for p, w in zip(self.positions[index].tolist(), self.weights[index].tolist()) if p >= 0]

    def tolist(self) -> list:
        """Nested lists of ``[position, weight]`` pairs (what JSON gets)."""
        return [entries.tolist() if isinstance(entries, TopEntries) else [list(pair) for pair in entries]
                for entries in self]

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.weights.nbytes

    def __repr__(self) -> str:
        return f"TopEntries(shape={self.positions.shape})"


@dataclass(frozen=True)
class Candidate:
    """One entry of a top-k list."""

    token_id: int
    text: str
    prob: float


@dataclass(frozen=True)
class AttentionEvidence:
    """Which earlier tokens the new token looked at.

    Kept compact so memory per token stays flat: the mean over layers and heads
    as a full row over the transcript positions (float32), per layer only the
    ``k`` strongest entries of the head mean, and per layer and query head the
    ``k`` strongest entries (``per_head``, int32 positions and float32 weights:
    8 bytes an entry, so ``layers x heads x k x 8`` bytes a step). Positions are
    original positions in the transcript, so the evidence stays meaningful
    after pruning; a sliding-window layer's rows cover its window only.
    Lists given to the constructor are packed.
    """

    positions: Sequence[int]  # original position of each entry of ``mean``
    mean: Sequence[float]  # mean over layers and heads; sums to 1 over ``positions``
    per_layer: Sequence[list[tuple[int, float]]]  # per layer: (position, weight), strongest first
    per_head: TopEntries | None = None  # per layer, per query head: (position, weight), strongest first

    def __post_init__(self) -> None:
        if not isinstance(self.positions, PackedRow):
            object.__setattr__(self, "positions", PackedRow(self.positions, np.int32))
        if not isinstance(self.mean, PackedRow):
            object.__setattr__(self, "mean", PackedRow(self.mean, np.float32))
        if not isinstance(self.per_layer, TopEntries):
            object.__setattr__(self, "per_layer", TopEntries.from_lists(self.per_layer))

    @property
    def nbytes(self) -> int:
        """Bytes of the numbers held (the arrays; object headers come on top)."""
        heads = self.per_head.nbytes if self.per_head is not None else 0
        return self.positions.array.nbytes + self.mean.array.nbytes + self.per_layer.nbytes + heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``per_layer`` as ``[[position, weight], ...]`` per layer, ``per_head`` one level deeper."""
        return {
            "positions": self.positions.tolist(),
            "mean": self.mean.tolist(),
            "per_layer": self.per_layer.tolist(),
            "per_head": None if self.per_head is None else self.per_head.tolist(),
        }


@dataclass(frozen=True)
class LensLayer:
    """What one layer would have predicted at the step (the logit lens)."""

    layer: int
    top: list[Candidate]


@dataclass(frozen=True)
class LensStats:
    """Per layer (the last being the model's output), what the lens says over the whole vocabulary, which its
    top-k cannot: the entropy (nats), the KL divergence of the final distribution from the layer's
    (``KL(final || layer)``, nats; 0 at the last layer), and the probability and rank (0 = top-1) of the token
    finally chosen. Four packed numbers a layer; lists given to the constructor are packed."""

    entropy: Sequence[float]
    kl: Sequence[float]
    chosen_prob: Sequence[float]
    chosen_rank: Sequence[int]

    def __post_init__(self) -> None:
        for name, dtype in (("entropy", np.float32), ("kl", np.float32), ("chosen_prob", np.float32),
                            ("chosen_rank", np.int32)):
            value = getattr(self, name)
            if not isinstance(value, PackedRow):
                object.__setattr__(self, name, PackedRow(value, dtype))


@dataclass(frozen=True)
class Attribution:
    """What each layer added to one token's logit (direct logit attribution, ``tracer.attribution``).

    In logit units, relative to the mean logit over the vocabulary (adding the same amount to every logit
    changes no probability): ``embedding + sum(layers) + bias == total - error``. ``attention[l]`` is the
    part of ``layers[l]`` its attention block added (the rest is the MLP); None where the architecture does
    not expose it.
    """

    token_id: int
    embedding: float  # the token's embedding (and position embedding) through the final norm and head
    layers: Sequence[float]  # per layer: attention and MLP together
    attention: Sequence[float] | None  # per layer: the attention block's part
    bias: float  # the final norm's and the output head's bias terms
    total: float  # the model's own logit of the token minus the mean logit (before any final softcap)
    error: float  # what the parts leave unexplained (float rounding: the decomposition is linear)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, PackedRow):
            object.__setattr__(self, "layers", PackedRow(self.layers, np.float32))
        if self.attention is not None and not isinstance(self.attention, PackedRow):
            object.__setattr__(self, "attention", PackedRow(self.attention, np.float32))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the dump writes it (``attention``: null when not exposed)."""
        return {"token_id": self.token_id, "embedding": self.embedding, "layers": self.layers.tolist(),
                "attention": None if self.attention is None else self.attention.tolist(), "bias": self.bias,
                "total": self.total, "error": self.error}


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
    lens_stats: LensStats | None = None  # filled with the lens
    attribution: Attribution | None = None  # filled lazily (on request, or by the dump with --attribution)

    def to_dict(self) -> dict[str, Any]:
        """The dump's step fields (the lens's whole-vocabulary numbers and the attribution, derived on
        request, are left out: the dump adds the attribution when asked)."""
        data = asdict(replace(self, attention=None, lens_stats=None, attribution=None))
        del data["lens_stats"], data["attribution"]
        data["attention"] = None if self.attention is None else self.attention.to_dict()
        return data
