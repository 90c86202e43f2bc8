"""The lens grid: generated tokens across, layers down, each cell a layer's top-1 shaded by a metric.

Shared by the app's grid and ``kvtrace --print``: which numbers a cell can be
shaded by (read from the record's lens and its whole-vocabulary numbers,
``LensStats``), how a number becomes a shade between 0 (the layer is unsure,
or far from the final answer) and 1 (sure, or agreeing with it), and what a
cell says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size

from tracer.records import StepRecord
from tracer.token_text import visible


@dataclass(frozen=True)
class Metric:
    """One way to shade the grid: a number per (record, layer) and its shade in [0, 1]."""

    name: str  # short, for titles
    help: str
    value: Callable[[StepRecord, int], float]  # needs the record's lens and lens_stats
    shade: Callable[[float], float]
    format: str  # how the value is written

    def read(self, record: StepRecord, layer: int) -> float | None:
        """The value at ``layer``, None while the record's lens is not computed."""
        if record.lens is None or record.lens_stats is None or layer >= len(record.lens):
            return None
        return self.value(record, layer)


METRICS: tuple[Metric, ...] = (
    Metric("p top-1", "the probability of the layer's own top-1 token", lambda r, l: r.lens[l].top[0].prob
           if r.lens[l].top else 0.0, lambda v: v, "{:.2f}"),
    Metric("p chosen", "the probability the layer gives the token finally chosen",
           lambda r, l: r.lens_stats.chosen_prob[l], lambda v: v, "{:.2f}"),
    Metric("rank chosen", "the rank the layer gives the token finally chosen (0 = its top-1)",
           lambda r, l: float(r.lens_stats.chosen_rank[l]), lambda v: 1 / math.sqrt(1 + v), "{:.0f}"),
    Metric("KL to final", "KL(final || layer) in nats: how far the layer's distribution is from the output's",
           lambda r, l: r.lens_stats.kl[l], lambda v: math.exp(-v), "{:.2f}"),
    Metric("entropy", "the entropy of the layer's distribution in nats (low: the layer is sure)",
           lambda r, l: r.lens_stats.entropy[l], lambda v: math.exp(-v / 2), "{:.2f}"),
)


def clip(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells, ``…`` where it was cut."""
    return text if cell_len(text) <= width else set_cell_size(text, max(width - 1, 0)) + "…"


def cell_text(record: StepRecord, layer: int, width: int) -> str:
    """A cell: the layer's top-1 token, made visible and clipped ('' while the lens is not computed)."""
    if record.lens is None or layer >= len(record.lens) or not record.lens[layer].top:
        return ""
    return clip(visible(record.lens[layer].top[0].text), width)


def agrees(record: StepRecord, layer: int) -> bool:
    """Whether the layer's top-1 is the token finally chosen."""
    return bool(record.lens and record.lens[layer].top and record.lens[layer].top[0].token_id == record.token_id)
