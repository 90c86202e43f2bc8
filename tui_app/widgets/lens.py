"""The logit-lens table: what each layer would have predicted at the selected step.

One row per layer; ``◆`` marks the first layer from which the final choice
stays on top through the last layer. Beside it, signed bars of what each
layer's attention block and MLP added to the chosen token's logit (direct
logit attribution, ``tracer.attribution``), where the runner computed it. When the pane is shorter than the model
is deep, it shows as many layers as fit, spread over the depth, always with
the first and last layers and the settling layer and the one before it, so
where the model made up its mind is always on screen. Filled lazily (the app
computes the lens in the runner when a token is selected and the session
caches it).
"""

from __future__ import annotations

import textwrap

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tracer.lens import settling_layer
from tracer.records import Attribution, LensLayer, StepRecord
from tracer.token_text import visible
from tui_app.formatting import signed_bar

PLACEHOLDER = "Select a generated token to see the per-layer lens."
BAR_HALF = 2  # cells on each side of an attribution bar's centre
NEXT_ROOM = 50  # content cells from which the next candidates show beside the attribution bars


def rows_to_show(count: int, room: int, settle: int | None) -> list[int]:
    """Which of ``count`` rows to show in ``room`` lines: all if they fit; else the last, the settling row
    and the one before it, the first, and the rest spread evenly over the depth."""
    if count <= room:
        return list(range(count))
    room = max(room, 1)
    must = [count - 1, *([settle, settle - 1] if settle is not None else []), 0]
    spread = [round(k * (count - 1) / (room - 1)) for k in range(room)] if room > 1 else []
    chosen: list[int] = []
    for row in [*must, *spread, *range(count)]:
        if len(chosen) == room:
            break
        if 0 <= row < count and row not in chosen:
            chosen.append(row)
    return sorted(chosen)


class LensPane(Static):
    DEFAULT_CSS = """
    LensPane { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(PLACEHOLDER, id=id, classes=classes)
        self.record: StepRecord | None = None
        self.lens_layers: list[LensLayer] | None = None
        self.border_title = "Lens"

    def show_pending(self, record: StepRecord | None, waiting: str) -> None:
        self.record, self.lens_layers = record, None
        self.border_title = "Lens" if record is None else f"Lens · #{record.index}"
        self.update(waiting)

    def show(self, record: StepRecord, layers: list[LensLayer]) -> None:
        self.record, self.lens_layers = record, layers
        self._draw()

    def on_resize(self) -> None:
        if self.lens_layers is not None:
            self._draw()

    def _draw(self) -> None:
        record, layers = self.record, [layer for layer in self.lens_layers or [] if layer.top]
        assert record is not None
        if not layers:
            self.border_title = f"Lens · #{record.index}"
            self.update("No logit lens for this model: its final norm or output head was not found.")
            return
        settle = settling_layer(layers, record.token_id)
        settle_row = next((i for i, layer in enumerate(layers) if layer.layer == settle), None)
        bars, caption = bars_of(record.attribution, len(layers))
        caption_lines = len(textwrap.wrap(caption, max(self.content_region.width, 1))) if caption else 0
        shown = rows_to_show(len(layers), max(self.content_region.height - 1 - caption_lines, 3), settle_row)
        count = "" if len(shown) == len(layers) else f" · {len(shown)} of {len(layers)} layers"
        self.border_title = (f"Lens · #{record.index}" + (f" · settles at layer {settle}" if settle is not None else "")
                             + count)
        table = Table(box=None, padding=(0, 1), expand=True, show_edge=False, header_style="bold", caption=caption)
        table.add_column("L", justify="right", no_wrap=True)
        table.add_column("top-1", ratio=2, no_wrap=True, overflow="ellipsis", min_width=6)
        table.add_column("p", justify="right", no_wrap=True)
        for title in bars:
            table.add_column(title, no_wrap=True)
        # the next candidates only where they fit beside the bars, so the top-1 stays readable
        show_next = not bars or self.content_region.width >= NEXT_ROOM
        if show_next:
            table.add_column("next", ratio=3, no_wrap=True, overflow="ellipsis")
        for row in shown:
            layer = layers[row]
            best = layer.top[0]
            mark = "◆" if layer.layer == settle else " "
            chosen = best.token_id == record.token_id
            style = "bold green" if chosen else ""
            rest = "  ".join(f"{visible(c.text)} {c.prob:.2f}" for c in layer.top[1:4])
            table.add_row(Text(f"{mark}{layer.layer}", style="bold" if mark != " " else "dim"),
                          Text(visible(best.text), style=style), Text(f"{best.prob:.3f}", style=style),
                          *(column[layer.layer] for column in bars.values()),
                          *([Text(rest, style="dim")] if show_next else []))
        self.update(table)


def bars_of(attribution: Attribution | None, count: int) -> tuple[dict[str, list[Text]], str | None]:
    """Per bar column (attention and MLP, or the whole layer), a signed bar per layer, and a caption that says
    what the bars add up to (none without an attribution of ``count`` layers)."""
    if attribution is None or len(attribution.layers) != count:
        return {}, None
    layers = attribution.layers.tolist()
    parts = ({"attn": attribution.attention.tolist(),
              "mlp": [t - a for t, a in zip(layers, attribution.attention.tolist())]}
             if attribution.attention is not None else {"added": layers})
    scale = max((abs(v) for values in parts.values() for v in values), default=0.0) or 1.0
    caption = (f"added to logit−mean {attribution.total:+.2f}: embedding {attribution.embedding:+.2f}, "
               f"bars ±{scale:.2f}")
    return {title: [Text(signed_bar(v / scale, BAR_HALF), style="green" if v >= 0 else "red") for v in values]
            for title, values in parts.items()}, caption
