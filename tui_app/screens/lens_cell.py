"""One cell of the lens grid opened (Enter): that layer's top-k for the token, its whole-vocabulary numbers,
and what the layer added to the chosen token's logit."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from tracer.records import StepRecord
from tracer.token_text import visible
from tui_app.formatting import bar
from tui_app.screens.reading import ReadingScreen


def cell_body(record: StepRecord, layer: int) -> Table:
    """The layer's candidates with bars, then its numbers and the attribution's share."""
    table = Table(box=None, show_header=False, padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, overflow="ellipsis", max_width=24)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    top = record.lens[layer].top if record.lens is not None and layer < len(record.lens) else []
    for candidate in top:
        mark = "●" if candidate.token_id == record.token_id else " "
        table.add_row(mark, Text(visible(candidate.text)), Text(bar(candidate.prob, 16), style="cyan"),
                      f"{candidate.prob:.3f}")
    stats = record.lens_stats
    if stats is not None and layer < len(stats.entropy):
        table.add_row("", "", "", "")
        table.add_row("", Text("entropy", style="dim"), f"{stats.entropy[layer]:.3f} nats", "")
        table.add_row("", Text("KL(final ‖ layer)", style="dim"), f"{stats.kl[layer]:.3f} nats", "")
        table.add_row("", Text("p / rank of chosen", style="dim"),
                      f"{stats.chosen_prob[layer]:.3f} / {stats.chosen_rank[layer]}", "")
    attribution = record.attribution
    if attribution is not None and layer < len(attribution.layers):
        added = attribution.layers[layer]
        split = ("" if attribution.attention is None else
                 f" (attention {attribution.attention[layer]:+.3f}, MLP {added - attribution.attention[layer]:+.3f})")
        table.add_row("", Text("added to logit", style="dim"), f"{added:+.3f}{split}", "")
    return table


class LensCellScreen(ReadingScreen):
    def __init__(self, record: StepRecord, layer: int, token: str) -> None:
        last = record.lens is not None and layer == len(record.lens) - 1
        where = "the model's output" if last else f"layer {layer}"
        super().__init__(f"Token #{record.index} {token} · {where}", cell_body(record, layer),
                         "● the token finally chosen · Escape closes")
