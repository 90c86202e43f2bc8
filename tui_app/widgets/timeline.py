"""The token timeline: every generated token as a tinted cell strip, with one selected.

Drawn with Textual's line API (a ``ScrollView`` that renders only the visible
lines from a cached layout), so a reply of thousands of tokens costs the same
per frame as one of ten.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tracer.records import StepRecord
from tracer.token_text import visible

# Probability buckets, most confident first: (lower bound, style). Plain named colours so the
# tint stays readable when the terminal has 256 colours or only the 16 of the ANSI theme.
TINTS: list[tuple[float, Style]] = [
    (0.9, Style(color="black", bgcolor="green")),
    (0.6, Style(color="black", bgcolor="cyan")),
    (0.3, Style(color="black", bgcolor="yellow")),
    (0.1, Style(color="black", bgcolor="magenta")),
    (0.0, Style(color="white", bgcolor="red")),
]
SELECTED = Style(reverse=True, bold=True, underline=True)
FORCED = Style(italic=True)
GAP = Segment(" ")


def tint(prob: float) -> Style:
    for lower, style in TINTS:
        if prob >= lower:
            return style
    return TINTS[-1][1]


@dataclass(frozen=True)
class _Cell:
    index: int
    x: int
    text: str


class TokenTimeline(ScrollView, can_focus=True):
    """Generated tokens wrapped into lines; left/right/home/end (bound on the app) move the selection."""

    DEFAULT_CSS = """
    TokenTimeline { height: 5; overflow-x: hidden; scrollbar-gutter: stable; scrollbar-size-vertical: 1; }
    """

    class Selected(Message):
        """The selection moved (or the tokens under it changed): see ``selected_record``."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.records: list[StepRecord] = []
        self.selected: int | None = None
        self.follow = True  # keep the newest token selected while generating
        self._lines: list[list[_Cell]] = []
        self._layout_width = 0

    @property
    def selected_record(self) -> StepRecord | None:
        if self.selected is None or self.selected >= len(self.records):
            return None
        return self.records[self.selected]

    # -- data -----------------------------------------------------------------------------------
    def set_records(self, records: list[StepRecord]) -> None:
        """Show exactly ``records`` (after a resync, branch, or load)."""
        self.records = list(records)
        if self.selected is not None and self.selected >= len(self.records):
            self.selected = None
        if self.follow or self.selected is None:
            self.selected = len(self.records) - 1 if self.records else None
        self._relayout()
        self._announce()

    def append(self, record: StepRecord) -> None:
        self.records.append(record)
        self._place(len(self.records) - 1)
        self.virtual_size = Size(self._content_width(), len(self._lines))
        if self.follow or self.selected is None:
            self.selected = record.index
            self._announce()
        self.refresh()

    def select(self, index: int) -> None:
        if not self.records:
            return
        index = min(max(index, 0), len(self.records) - 1)
        self.follow = index == len(self.records) - 1
        if index != self.selected:
            self.selected = index
            self._announce()
            self.refresh()

    def move(self, delta: int) -> None:
        if self.selected is None:
            self.select(len(self.records) - 1)
        else:
            self.select(self.selected + delta)

    def _announce(self) -> None:
        self._scroll_to_selection()
        self.post_message(self.Selected())
        record = self.selected_record
        if record is not None:
            self.border_subtitle = f"#{record.index} p={record.prob:.3f}{' forced' if record.forced else ''}"
        else:
            self.border_subtitle = ""

    # -- layout ---------------------------------------------------------------------------------
    def _content_width(self) -> int:
        return max(self.scrollable_content_region.width, 8)

    def _relayout(self) -> None:
        self._lines = []
        self._layout_width = self._content_width()
        for index in range(len(self.records)):
            self._place(index)
        self.virtual_size = Size(self._layout_width, len(self._lines))
        self.refresh()

    def _place(self, index: int) -> None:
        text = visible(self.records[index].text)
        width = self._layout_width or self._content_width()
        text_width = cell_len(text)
        if text_width > width - 1:
            text = text[: max(width - 2, 1)] + "…"
            text_width = cell_len(text)
        if not self._lines:
            self._lines.append([])
        line = self._lines[-1]
        x = line[-1].x + cell_len(line[-1].text) + 1 if line else 0
        if line and x + text_width > width:
            self._lines.append([])
            line, x = self._lines[-1], 0
        line.append(_Cell(index, x, text))

    def on_resize(self) -> None:
        if self._content_width() != self._layout_width:
            self._relayout()

    def _scroll_to_selection(self) -> None:
        if self.selected is None:
            return
        for y, line in enumerate(self._lines):
            if line and line[0].index <= self.selected <= line[-1].index:
                if y < self.scroll_y:
                    self.scroll_to(y=y, animate=False)
                elif y >= self.scroll_y + self.scrollable_content_region.height:
                    self.scroll_to(y=y - self.scrollable_content_region.height + 1, animate=False)
                return

    # -- drawing --------------------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        line_no = scroll_y + y
        width = self.scrollable_content_region.width
        base = self.rich_style
        if line_no >= len(self._lines):
            return Strip.blank(width, base)
        segments: list[Segment] = []
        for cell in self._lines[line_no]:
            record = self.records[cell.index]
            style = tint(record.prob)
            if record.forced:
                style += FORCED
            if cell.index == self.selected:
                style += SELECTED
            if segments:
                segments.append(GAP)
            segments.append(Segment(cell.text, style))
        strip = Strip(segments).crop(scroll_x, scroll_x + width)
        return strip.extend_cell_length(width).apply_style(base)
