"""A dialog to read and close: a title, a scrolling body, a hint line; Escape, Enter or q closes it.

The views' detail screens (a lens grid cell, two lines compared) are this
with their own body, so they scroll and close alike.
"""

from __future__ import annotations

from rich.console import RenderableType
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class ReadingScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,enter,q", "close", "Close")]

    def __init__(self, title: str, body: RenderableType, hint: str, *, wide: bool = False) -> None:
        super().__init__()
        self._title, self._body, self._hint, self._wide = title, body, hint, wide

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide" if self._wide else ""):
            yield Label(self._title, classes="title")
            with VerticalScroll(id="help-body"):
                yield Static(self._body)
            yield Label(self._hint, classes="muted")

    def on_mount(self) -> None:
        self.query_one("#help-body").focus()

    def action_close(self) -> None:
        self.dismiss(None)
