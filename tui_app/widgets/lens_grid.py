"""The lens grid pane: generated tokens across, layers down, each cell a layer's top-1 shaded by a metric.

Drawn with Textual's line API (a ``ScrollView`` that renders only the visible
rows and, in them, only the visible columns), so a reply of hundreds of
tokens costs the same per frame as one of ten. The token row and the layer
labels stay put while the cells scroll. The selected token's column follows
the timeline's selection, a layer cursor (↑ ↓ while the grid is shown) picks
the cell that Enter opens; cells fill in as the runner computes the lens of
the columns in view. Under the grid, sparklines of the chosen tokens'
probability and entropy over the whole reply.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from rich.segment import Segment
from rich.style import Style
from textual.app import ComposeResult
from textual.color import Color
from textual.containers import Horizontal, Vertical
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Label, Sparkline, Static
from textual import events

from tracer.lens_grid import METRICS, Metric, agrees, cell_text, clip
from tracer.records import StepRecord
from tracer.token_text import visible
from tui_app.widgets.timeline import shown_text, tint

CELL = 7  # cells per token column, the gap included
LABEL = 4  # the layer label column
LOW, HIGH = Color.parse("#20244a"), Color.parse("#2f9e5b")  # the shade of 0 and of 1
SHADES = [Style(bgcolor=LOW.blend(HIGH, i / 9).rich_color, color="white" if i < 6 else "black") for i in range(10)]
PENDING = Style(dim=True)
COLUMN = Style(bold=True, underline=True)
CURSOR = Style(reverse=True, bold=True)
LABEL_STYLE = Style(dim=True)
AGREES = Style(italic=True)


def shade_style(metric: Metric, value: float) -> Style:
    """The cell's colours: the metric's shade of ``value``, in ten steps from LOW to HIGH."""
    return SHADES[min(9, max(0, round(metric.shade(value) * 9)))]


class LensGrid(ScrollView, can_focus=False):
    """The grid itself; the app sets its records, selection, layer cursor and metric."""

    DEFAULT_CSS = """
    LensGrid { height: 1fr; scrollbar-size: 1 1; }
    """

    class Scrolled(Message):
        """Other columns came into view (scrolled, shown or resized): their lens may be wanted."""

    class CellClicked(Message):
        """A cell was clicked: select its token and layer."""

        def __init__(self, index: int, layer: int) -> None:
            super().__init__()
            self.index, self.cursor = index, layer

    def __init__(self, token_text: Callable[[int], str] | None = None, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.token_text = token_text or (lambda position: "")
        self.records: list[StepRecord] = []
        self.num_layers = 0
        self.selected: int | None = None
        self.cursor = 0
        self.metric_index = 0

    @property
    def metric(self) -> Metric:
        return METRICS[self.metric_index]

    # -- data -----------------------------------------------------------------------------------
    def set_records(self, records: list[StepRecord], num_layers: int) -> None:
        self.records, self.num_layers = list(records), num_layers
        self.cursor = min(self.cursor, max(num_layers - 1, 0))
        if self.selected is not None and self.selected >= len(records):  # a shorter line or a new transcript
            self.selected = None
        self._resize()

    def append(self, record: StepRecord) -> None:
        self.records.append(record)
        self._resize()

    def _resize(self) -> None:
        # blank room after the last column, so that scrolling to the end stops on whole columns too
        spare = (self.scrollable_content_region.width - LABEL - CELL * len(self.records)) % CELL
        self.virtual_size = Size(LABEL + CELL * len(self.records) + spare, self.num_layers + 1)
        self.refresh()

    def select(self, index: int | None) -> None:
        self.selected = index
        self._scroll_to_cursor()
        self.refresh()

    def move_layer(self, delta: int) -> None:
        if self.num_layers:
            self.cursor = min(max(self.cursor + delta, 0), self.num_layers - 1)
            self._scroll_to_cursor()
            self.refresh()

    def cycle_metric(self) -> None:
        self.metric_index = (self.metric_index + 1) % len(METRICS)
        self.refresh()

    def visible_indices(self) -> list[int]:
        """The records whose columns are in view (or next to it), the selected one first."""
        first = int(self.scroll_offset.x) // CELL
        count = max(self.scrollable_content_region.width - LABEL, 0) // CELL + 2
        shown = list(range(max(first - 1, 0), min(first + count, len(self.records))))
        if self.selected in shown:
            shown.remove(self.selected)
            shown.insert(0, self.selected)
        return shown

    def _scroll_to_cursor(self) -> None:
        region = self.scrollable_content_region
        x, y = self.scroll_offset
        if self.selected is not None:
            left = self.selected * CELL
            room = max(region.width - LABEL, CELL)
            if left < x:
                x = left
            elif left + CELL > x + room:  # whole columns on the left: the first one is never cut
                x = -(-(left + CELL - room) // CELL) * CELL
        rows = max(region.height - 1, 1)
        if self.cursor < y:
            y = self.cursor
        elif self.cursor >= y + rows:
            y = self.cursor - rows + 1
        self.scroll_to(x, y, animate=False, immediate=True)

    def on_resize(self) -> None:
        self._resize()
        self.call_after_refresh(self._scroll_to_cursor)
        self.post_message(self.Scrolled())  # shown, or resized: other columns are in view

    def watch_scroll_x(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_x(old_value, new_value)
        if int(old_value) // CELL != int(new_value) // CELL:
            self.post_message(self.Scrolled())

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.x < LABEL:
            return
        index = (int(self.scroll_offset.x) + offset.x - LABEL) // CELL
        layer = int(self.scroll_offset.y) + offset.y - 1
        if 0 <= index < len(self.records) and 0 <= layer < self.num_layers:
            self.cursor = layer
            self.post_message(self.CellClicked(index, layer))

    # -- drawing --------------------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        scroll_x, scroll_y = (int(v) for v in self.scroll_offset)
        row = None if y == 0 else scroll_y + y - 1
        if row is not None and row >= self.num_layers:
            return Strip.blank(width, base)
        label = " " * LABEL if row is None else f"{'out' if row == self.num_layers - 1 else row:>3} "
        first = scroll_x // CELL
        last = min(len(self.records), first + (width - LABEL) // CELL + 2)
        segments = []
        for index in range(first, last):
            record = self.records[index]
            text, style = self._cell(record, row)
            if index == self.selected:
                style += CURSOR if row is None or row == self.cursor else COLUMN
            segments += [Segment(text.ljust(CELL - 1), style), Segment(" ")]
        cells = Strip(segments).crop(scroll_x - first * CELL, scroll_x - first * CELL + width - LABEL)
        strip = Strip([Segment(label, LABEL_STYLE), *cells])
        return strip.extend_cell_length(width).crop(0, width).apply_style(base)

    def _cell(self, record: StepRecord, row: int | None) -> tuple[str, Style]:
        if row is None:  # the token row: the chosen tokens, tinted as in the timeline
            return clip(visible(shown_text(record, self.token_text(record.position))), CELL - 1), tint(record.prob)
        value = self.metric.read(record, row)
        if value is None:
            return "·", PENDING
        style = shade_style(self.metric, value)
        return cell_text(record, row, CELL - 1), style + AGREES if agrees(record, row) else style


class GridPane(Vertical):
    """The grid and, under it, the reply's probability and entropy sparklines."""

    DEFAULT_CSS = """
    GridPane { height: 1fr; }
    GridPane Horizontal { height: 1; }
    GridPane Label { width: 3; color: $text-muted; }
    GridPane Sparkline { height: 1; width: 1fr; }
    GridPane #grid-cell { height: 1; color: $text-muted; }
    """

    def __init__(self, token_text: Callable[[int], str] | None = None, *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._token_text = token_text
        self.border_title = "Lens grid"

    def compose(self) -> ComposeResult:
        yield LensGrid(self._token_text, id="lens-grid")
        yield Static(id="grid-cell")
        with Horizontal():
            yield Label("p")
            yield Sparkline([], summary_function=statistics.fmean, id="spark-prob")
        with Horizontal():
            yield Label("H")
            yield Sparkline([], summary_function=statistics.fmean, id="spark-entropy")

    @property
    def grid(self) -> LensGrid:
        return self.query_one(LensGrid)

    def set_records(self, records: list[StepRecord], num_layers: int) -> None:
        self.grid.set_records(records, num_layers)
        self._sparklines()
        self.describe()

    def append(self, record: StepRecord) -> None:
        self.grid.append(record)
        self._sparklines()

    def select(self, index: int | None) -> None:
        self.grid.select(index)
        self.describe()

    def move_layer(self, delta: int) -> None:
        self.grid.move_layer(delta)
        self.describe()

    def cycle_metric(self) -> None:
        self.grid.cycle_metric()
        self.describe()

    def filled(self) -> None:
        """Some columns' lens came in."""
        self.grid.refresh()
        self.describe()

    def _sparklines(self) -> None:
        records = self.grid.records
        self.query_one("#spark-prob", Sparkline).data = [r.prob for r in records]
        self.query_one("#spark-entropy", Sparkline).data = [r.entropy for r in records]

    def describe(self) -> None:
        """The title says the metric, the line under the grid the cell under the cursor."""
        grid = self.grid
        self.border_title = f"Lens grid · {grid.metric.name} (m)"
        record = grid.records[grid.selected] if grid.selected is not None and grid.records else None
        value = None if record is None else grid.metric.read(record, grid.cursor)
        cell = self.query_one("#grid-cell", Static)
        if record is None:
            cell.update("")
        elif value is None:
            cell.update(f"#{record.index} · layer {grid.cursor} · computing…")
        else:
            top = cell_text(record, grid.cursor, 16)
            cell.update(f"#{record.index} · layer {grid.cursor}: {top} · {grid.metric.name} "
                        f"{grid.metric.format.format(value)} · Enter: top-k")
