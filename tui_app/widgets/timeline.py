"""The token timeline: every generated token as a tinted cell strip, with one selected.

Drawn with Textual's line API (a ``ScrollView`` that renders only the visible
lines from a cached layout), so a reply of thousands of tokens costs the same
per frame as one of ten. Each turn starts on a new line after a ``turn N ▸``
mark (a turn begins where the positions jump over a prompt); tokens whose
cache entries were pruned are struck through. The arrow keys are the app's
(they move the selection and the candidate, whatever the scroll position);
the timeline itself scrolls with the wheel and PageUp/PageDown, and a click
selects a token.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Callable

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tracer.records import StepRecord
from tracer.token_text import REPLACEMENT, visible

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
PRUNED = Style(strike=True, dim=True)
SEPARATOR = Style(dim=True, bold=True)
GAP = Segment(" ")
TURN = -1  # the index of a turn separator cell


def tint(prob: float) -> Style:
    for lower, style in TINTS:
        if prob >= lower:
            return style
    return TINTS[-1][1]


@dataclass(frozen=True)
class _Cell:
    index: int  # the record's index, or TURN for a turn separator
    x: int
    text: str


def shown_text(record: StepRecord, piece: str) -> str:
    """What a token's cell says: its text in the reply, or its stored piece (``<0xE2>`` for a byte fragment)."""
    return record.text if record.text and REPLACEMENT not in record.text else piece or record.text


class TokenTimeline(ScrollView, can_focus=True, inherit_bindings=False):
    """Generated tokens wrapped into lines; left/right/home/end (bound on the app) move the selection."""

    BINDINGS = [
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
    ]
    DEFAULT_CSS = """
    TokenTimeline { height: 5; overflow-x: hidden; scrollbar-gutter: stable; scrollbar-size-vertical: 1; }
    """

    class Selected(Message):
        """The selection moved (or the tokens under it changed): see ``selected_record``."""

    def __init__(self, token_text: Callable[[int], str] | None = None, *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.token_text = token_text or (lambda position: "")
        self.records: list[StepRecord] = []
        self.selected: int | None = None
        self.follow = True  # keep the newest token selected while generating
        self.pruned: frozenset[int] = frozenset()  # positions of generated tokens no longer cached
        self._lines: list[list[_Cell]] = []
        self._line_of: list[int] = []  # per record: the line it is on
        self._layout_width = 0
        self._turns = 1

    @property
    def selected_record(self) -> StepRecord | None:
        if self.selected is None or self.selected >= len(self.records):
            return None
        return self.records[self.selected]

    # -- data -----------------------------------------------------------------------------------
    def set_records(self, records: list[StepRecord], pruned: frozenset[int] = frozenset()) -> None:
        """Show exactly ``records`` (after a resync, branch, load or prune), ``pruned`` positions struck through."""
        self.records = list(records)
        self.pruned = pruned
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
        self._lines, self._line_of = [], []
        self._turns = 1
        self._layout_width = self._content_width()
        for index in range(len(self.records)):
            self._place(index)
        self.virtual_size = Size(self._layout_width, len(self._lines))
        self.refresh()

    def _place(self, index: int) -> None:
        record = self.records[index]
        if index and record.position != self.records[index - 1].position + 1:  # a prompt came between
            self._turns += 1
            self._lines.append([])
            self._put(TURN, f"turn {self._turns} ▸")
        self._put(index, visible(shown_text(record, self.token_text(record.position))))

    def _put(self, index: int, text: str) -> None:
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
        if index != TURN:
            self._line_of.append(len(self._lines) - 1)

    def on_resize(self) -> None:
        if self._content_width() != self._layout_width:
            self._relayout()
        self.call_after_refresh(self._scroll_to_selection)  # a new height may leave it out of view

    def on_click(self, event: events.Click) -> None:
        """Select the token under the mouse."""
        offset = event.get_content_offset(self)
        if offset is None:
            return
        line_no = self.scroll_offset.y + offset.y
        if line_no >= len(self._lines):
            return
        for cell in self._lines[line_no]:
            if cell.index != TURN and cell.x <= offset.x < cell.x + cell_len(cell.text):
                self.select(cell.index)
                return

    def _scroll_to_selection(self) -> None:
        if self.selected is None:
            return
        if self.selected >= len(self._line_of):
            return
        y = self._line_of[self.selected]
        if y < self.scroll_y:
            self.scroll_to(y=y, animate=False)
        elif y >= self.scroll_y + self.scrollable_content_region.height:
            self.scroll_to(y=y - self.scrollable_content_region.height + 1, animate=False)

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
            if cell.index == TURN:
                style = SEPARATOR
            else:
                record = self.records[cell.index]
                style = tint(record.prob)
                if record.forced:
                    style += FORCED
                if record.position in self.pruned:
                    style += PRUNED
                if cell.index == self.selected:
                    style += SELECTED
            if segments:
                segments.append(GAP)
            segments.append(Segment(cell.text, style))
        strip = Strip(segments).crop(scroll_x, scroll_x + width)
        return strip.extend_cell_length(width).apply_style(base)
