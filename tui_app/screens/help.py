"""The help screen (f1 or ?): every key, where the command palette is, and how focus works."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

INTRO = (
    "\nType a message in the input box and press Enter: the reply streams in and every generated token "
    "appears in the token timeline. Tab moves the focus between the input, the timeline and the chat; "
    "letter keys act when the input box does not have the focus (i goes back to it), F1 and ctrl+q work "
    "everywhere. The arrow keys always move the selection and the ▶ candidate; the mouse selects too (a "
    "double click on a candidate branches) and its wheel scrolls any pane.\n"
    "Timeline tints: green p≥0.9, cyan ≥0.6, yellow ≥0.3, magenta ≥0.1, red below; italic = forced by a "
    "branch; struck through = pruned from the cache; each turn starts after 'turn N ▸'."
)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,question_mark,q", "close", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        with Vertical(id="dialog", classes="wide"):
            yield Label("kvtrace — keys (Escape closes)", classes="title")
            with VerticalScroll(id="help-body"):
                yield Static(table)
                yield Static(Text(INTRO), id="help-intro")

    def on_mount(self) -> None:
        self.query_one("#help-body").focus()

    def action_close(self) -> None:
        self.dismiss(None)
