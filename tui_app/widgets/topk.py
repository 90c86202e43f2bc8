"""The top-k pane: the candidates of the selected step, their probabilities as bars.

The chosen token is marked ``●``; the cursor ``▶`` (up/down, or a click)
picks the candidate that ``b`` branches with; a double click branches at once.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import events
from textual.message import Message
from textual.widgets import Static

from tracer.records import Candidate, StepRecord
from tracer.token_text import visible
from tui_app.formatting import bar


PLACEHOLDER = "Select a generated token to see its candidates."


class TopKPane(Static):
    DEFAULT_CSS = """
    TopKPane { height: 1fr; }
    """

    class BranchRequested(Message):
        """A candidate was double-clicked: branch with it (the cursor is on it)."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(PLACEHOLDER, id=id, classes=classes)
        self.record: StepRecord | None = None
        self.cursor = 0
        self.border_title = "Top-k"

    def show(self, record: StepRecord | None) -> None:
        """Show ``record``'s candidates; the cursor starts on the best alternative to the choice."""
        self.record = record
        self.cursor = 0
        if record is not None:
            alternatives = [i for i, c in enumerate(record.top) if c.token_id != record.token_id]
            self.cursor = alternatives[0] if alternatives else 0
        self._draw()

    def move_cursor(self, delta: int) -> None:
        if self.record is not None and self.record.top:
            self.cursor = (self.cursor + delta) % len(self.record.top)
            self._draw()

    def on_click(self, event: events.Click) -> None:
        """A click puts the cursor on the candidate of that row (one row each); a double click branches."""
        offset = event.get_content_offset(self)
        if offset is None or self.record is None or not 0 <= offset.y < len(self.record.top):
            return
        self.cursor = offset.y
        self._draw()
        if event.chain >= 2:
            self.post_message(self.BranchRequested())

    @property
    def candidate(self) -> Candidate | None:
        if self.record is None or not self.record.top:
            return None
        return self.record.top[self.cursor]

    def _draw(self) -> None:
        record = self.record
        if record is None:
            self.border_title = "Top-k"
            self.update(PLACEHOLDER)
            return
        self.border_title = f"Top-k · token #{record.index}"
        table = Table.grid(padding=(0, 1))
        table.add_column(width=2, no_wrap=True)
        table.add_column(no_wrap=True, overflow="ellipsis", max_width=20)
        table.add_column(justify="right", no_wrap=True)
        table.add_column(no_wrap=True)
        for i, cand in enumerate(record.top):
            chosen = cand.token_id == record.token_id
            mark = ("▶" if i == self.cursor else " ") + ("●" if chosen else " ")
            style = "bold" if chosen else ""
            table.add_row(Text(mark, style="bold"), Text(visible(cand.text), style=style),
                          Text(f"{cand.prob:.3f}", style=style), Text(bar(cand.prob, 12), style="green" if chosen else "blue"))
        if not any(c.token_id == record.token_id for c in record.top):
            table.add_row(Text(" ●", style="bold"), Text(visible(record.text), style="bold"),
                          Text(f"{record.prob:.3f}", style="bold"), Text(bar(record.prob, 12), style="green"))
        self.update(table)
