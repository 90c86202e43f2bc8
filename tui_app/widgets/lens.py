"""The logit-lens table: what each layer would have predicted at the selected step.

One row per layer; ``◆`` marks the first layer from which the final choice
stays on top through the last layer. Filled lazily (the app computes the lens
in a worker when a token is selected and the session caches it).
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from tracer.records import LensLayer, StepRecord
from tracer.token_text import visible


def settling_layer(layers: list[LensLayer], token_id: int) -> int | None:
    """The first layer from which ``token_id`` is top-1 in every later layer (None: never)."""
    settled = None
    for layer in reversed(layers):
        if not layer.top or layer.top[0].token_id != token_id:
            break
        settled = layer.layer
    return settled


class LensPane(VerticalScroll, inherit_bindings=False):
    """Scrolls with up/down/page keys only, so left/right still move the token selection."""

    BINDINGS = [
        Binding("up", "scroll_up", "Scroll up", show=False),
        Binding("down", "scroll_down", "Scroll down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
    ]
    DEFAULT_CSS = """
    LensPane { height: 1fr; }
    LensPane > Static { width: 1fr; height: auto; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.body = Static("Select a generated token to see the per-layer lens.")
        self.record: StepRecord | None = None
        self.border_title = "Lens"

    def compose(self):
        yield self.body

    def show_pending(self, record: StepRecord | None, waiting: str) -> None:
        self.record = record
        if record is not None:
            self.border_title = f"Lens · #{record.index}"
        self.body.update(waiting)

    def show(self, record: StepRecord, layers: list[LensLayer]) -> None:
        self.record = record
        if not layers:
            self.border_title = f"Lens · #{record.index}"
            self.body.update("No logit lens for this model: its final norm or output head was not found.")
            return
        settle = settling_layer(layers, record.token_id)
        self.border_title = f"Lens · #{record.index}" + (f" · settles at layer {settle}" if settle is not None else "")
        table = Table(box=None, padding=(0, 1), expand=True, show_edge=False, header_style="bold")
        table.add_column("L", justify="right", no_wrap=True)
        table.add_column("top-1", ratio=2, no_wrap=True, overflow="ellipsis")
        table.add_column("p", justify="right", no_wrap=True)
        table.add_column("next", ratio=3, no_wrap=True, overflow="ellipsis")
        for layer in layers:
            if not layer.top:
                continue
            best = layer.top[0]
            mark = "◆" if layer.layer == settle else " "
            chosen = best.token_id == record.token_id
            style = "bold green" if chosen else ""
            rest = "  ".join(f"{visible(c.text)} {c.prob:.2f}" for c in layer.top[1:4])
            table.add_row(Text(f"{mark}{layer.layer}", style="bold" if mark != " " else "dim"),
                          Text(visible(best.text), style=style), Text(f"{best.prob:.3f}", style=style),
                          Text(rest, style="dim"))
        self.body.update(table)
