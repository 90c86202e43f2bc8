"""The lines of generation (``l``): every line by number and name; pick two to compare, name one, switch.

Enter marks the highlighted line as the first of a comparison, Enter on
another compares the two; ``n`` names the highlighted line, ``s`` switches to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from tracer.events import SessionView

HINT = "Enter: compare (pick two) · n: name · s: switch to it · Escape: close"


@dataclass(frozen=True)
class LinesChoice:
    action: str  # "compare", "name" or "switch"
    numbers: tuple[int, ...]
    name: str = ""


@dataclass(frozen=True)
class LineEntry:
    number: int
    name: str
    steps: int
    label: str
    current: bool


def line_entries(view: SessionView) -> list[LineEntry]:
    """Every line, by number: the current one and the others the session keeps."""
    entries = [LineEntry(view.line, view.line_name, len(view.records), "the line you are on", True)]
    entries += [LineEntry(b.number, b.name, b.steps, b.label, False) for b in view.branches]
    return sorted(entries, key=lambda e: e.number)


def entry_text(entry: LineEntry, marked: bool) -> Text:
    text = Text("A " if marked else "  ", style="bold reverse" if marked else "")
    text.append(f"{'▶' if entry.current else ' '} line {entry.number}", style="bold")
    if entry.name:
        text.append(f" “{entry.name}”", style="cyan")
    text.append(f" · {entry.steps} tokens · {entry.label}", style="dim" if not entry.current else "")
    return text


class LinesScreen(ModalScreen[LinesChoice | None]):
    BINDINGS = [Binding("escape", "close", "Close"), Binding("n", "name", "Name"), Binding("s", "switch", "Switch")]

    def __init__(self, view: SessionView) -> None:
        super().__init__()
        self.entries = line_entries(view)
        self.marked: int | None = None  # the line number picked first

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Lines of generation", classes="title")
            yield OptionList(*self._options(), id="lines")
            yield Input(placeholder="a name for the line (Enter keeps it, empty removes it)", id="line-name")
            yield Label(HINT, classes="muted", id="lines-hint")

    def _options(self) -> list[Option]:
        return [Option(entry_text(e, e.number == self.marked), id=str(e.number)) for e in self.entries]

    def on_mount(self) -> None:
        self.query_one("#line-name").display = False
        self.query_one(OptionList).focus()

    @property
    def highlighted(self) -> int | None:
        lines = self.query_one(OptionList)
        return None if lines.highlighted is None else self.entries[lines.highlighted].number

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        number = int(event.option.id or 0)
        if self.marked is None or self.marked == number:
            self.marked = None if self.marked == number else number
            lines = self.query_one(OptionList)
            index = lines.highlighted
            lines.clear_options()
            lines.add_options(self._options())
            lines.highlighted = index
            self.query_one("#lines-hint", Label).update(
                f"line {number} is A: Enter on another line compares them" if self.marked else HINT)
            return
        self.dismiss(LinesChoice("compare", (self.marked, number)))

    def action_name(self) -> None:
        number = self.highlighted
        if number is None:
            return
        field = self.query_one("#line-name", Input)
        field.value = next(e.name for e in self.entries if e.number == number)
        field.display = True
        field.focus()

    @on(Input.Submitted, "#line-name")
    def _named(self, event: Input.Submitted) -> None:
        number = self.highlighted
        if number is not None:
            self.dismiss(LinesChoice("name", (number,), event.value))

    def action_switch(self) -> None:
        number = self.highlighted
        if number is not None:
            self.dismiss(LinesChoice("switch", (number,)))

    def action_close(self) -> None:
        self.dismiss(None)
