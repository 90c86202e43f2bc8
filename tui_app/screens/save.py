"""The save dialog (ctrl+s): a file name and a codec; the app writes and reports the size."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, Select

from kvstore.format import CODECS, DEFAULT_CODEC
from tui_app.screens.form import FormScreen

CHOICES = [(f"{name}: {text}", name) for name, text in CODECS.items()]


@dataclass(frozen=True)
class SaveRequest:
    path: str
    codec: str


def default_name() -> str:
    return datetime.now().strftime("kvtrace-%Y%m%d-%H%M%S.kvs")


class SaveScreen(FormScreen[SaveRequest | None]):

    def __init__(self, summary: str) -> None:
        super().__init__()
        self.summary = summary

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Save a snapshot of the KV cache", classes="title")
            yield Label(self.summary, classes="muted")
            yield Label("File name")
            yield Input(default_name(), id="path")
            yield Label("", id="exists", classes="muted")
            yield Label("Codec")
            yield Select(CHOICES, value=DEFAULT_CODEC, allow_blank=False, id="codec")
            yield self.buttons("Save")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    def _submit(self) -> None:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            self.notify("Type a file name first.", severity="warning")
            return
        self.dismiss(SaveRequest(str(Path(path).expanduser()), str(self.query_one("#codec", Select).value)))

    def on_input_changed(self, event: Input.Changed) -> None:
        exists = Path(event.value.strip()).expanduser().is_file()
        self.query_one("#exists", Label).update("A file with this name exists: Save replaces it." if exists else "")
