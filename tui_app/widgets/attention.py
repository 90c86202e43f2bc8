"""The attention pane: the earlier tokens the selected token looked at most.

Shows the mean over layers (and heads), one layer's strongest entries, or
that layer's heads side by side (``tui_app.widgets.heads``); ``a`` cycles
through the three, ``[``/``]`` pick the layer and ``{``/``}`` the head.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tracer.records import StepRecord
from tracer.token_text import visible
from tui_app.formatting import bar
from tui_app.widgets.heads import head_count, heads_table


def strongest(record: StepRecord, layer: int | None, limit: int) -> list[tuple[int, float]]:
    """The ``limit`` strongest (position, weight) pairs, for the mean (``layer=None``) or one layer."""
    evidence = record.attention
    if evidence is None:
        return []
    if layer is None:
        pairs = sorted(zip(evidence.positions, evidence.mean), key=lambda pw: -pw[1])
    else:
        pairs = list(evidence.per_layer[layer])
    return [(int(p), float(w)) for p, w in pairs[:limit]]


PLACEHOLDER = "Select a generated token to see what it attended to."


class AttentionPane(Static):
    DEFAULT_CSS = """
    AttentionPane { height: 1fr; }
    """

    def __init__(self, token_text: Callable[[int], str] | None = None, *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(PLACEHOLDER, id=id, classes=classes)
        self.token_text = token_text or (lambda position: "?")
        self.record: StepRecord | None = None
        self.shown_layer: int | None = None  # None: the mean over layers
        self._last_layer = 0  # the single layer shown when switching away from the mean
        self.by_head = False  # the shown layer's heads side by side
        self.head = 0  # the head cursor
        self.notice = "This model returned no attention weights."
        self.border_title = "Attention"

    @property
    def num_layers(self) -> int:
        if self.record is None or self.record.attention is None:
            return 0
        return len(self.record.attention.per_layer)

    def show(self, record: StepRecord | None) -> None:
        self.record = record
        self._draw()

    def toggle_mode(self) -> None:
        """Cycle: the mean over layers, a single layer (the last one chosen, else 0), that layer's heads."""
        if self.shown_layer is None:
            self.shown_layer = self._last_layer
        elif not self.by_head:
            self.by_head = True
        else:
            self.shown_layer, self.by_head = None, False
        self._draw()

    def shift_head(self, delta: int) -> None:
        """Move the head cursor (showing the heads of the layer in view first)."""
        if self.shown_layer is None:
            self.shown_layer = self._last_layer
        self.by_head = True
        count = head_count(self.record, self.shown_layer)
        self.head = (self.head + delta) % count if count else 0
        self._draw()

    def shift_layer(self, delta: int) -> None:
        layers = self.num_layers
        if layers == 0:
            return
        current = self._last_layer if self.shown_layer is None else self.shown_layer + delta
        self.shown_layer = current % layers
        self._last_layer = self.shown_layer
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        record = self.record
        if record is None:
            self.border_title = "Attention"
            self.update(PLACEHOLDER)
            return
        if self.shown_layer is not None and self.shown_layer >= self.num_layers:
            self.shown_layer = None if self.num_layers == 0 else self.num_layers - 1
        mode = "mean over layers" if self.shown_layer is None else f"layer {self.shown_layer}/{max(self.num_layers - 1, 0)}"
        heads = head_count(record, self.shown_layer) if self.by_head and self.shown_layer is not None else 0
        if heads:
            mode += f" · head {min(self.head, heads - 1)}/{heads - 1}"
        self.border_title = f"Attention · #{record.index} · {mode}"
        if record.attention is None:
            self.update(self.notice)
            return
        if self.by_head and self.shown_layer is not None:
            if not heads:
                self.update("No per-head attention was kept for this token.")
                return
            self.head = min(self.head, heads - 1)
            table, _ = heads_table(record, self.shown_layer, self.head, self.content_region.width,
                                   max(self.content_region.height - 1, 2), self.token_text)
            self.update(table)
            return
        limit = max(self.content_region.height, 3)
        pairs = strongest(record, self.shown_layer, limit)
        top = pairs[0][1] if pairs else 1.0
        table = Table.grid(padding=(0, 1))
        table.add_column(justify="right", no_wrap=True)
        table.add_column(ratio=2, no_wrap=True, overflow="ellipsis")
        table.add_column(ratio=3, no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        for position, weight in pairs:
            text = visible(self.token_text(position))
            table.add_row(Text(f"@{position}", style="dim"), Text(text), Text(bar(weight / top if top else 0, 12),
                          style="magenta"), Text(f"{weight:.3f}"))
        self.update(table)
