"""The save dialog (ctrl+s): a file name and a codec; the app writes and reports the size."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

CODECS = [
    ("lossless: exact, zstd-compressed", "lossless"),
    ("fp16: half the size, tiny error", "fp16"),
    ("bf16: half the size", "bf16"),
    ("int8: a quarter, small error", "int8"),
    ("int4: an eighth, visible error", "int4"),
]


@dataclass(frozen=True)
class SaveRequest:
    path: str
    codec: str


def default_name() -> str:
    return datetime.now().strftime("kvtrace-%Y%m%d-%H%M%S.kvs")


class SaveScreen(ModalScreen[SaveRequest | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

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
            yield Select(CODECS, value="lossless", allow_blank=False, id="codec")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

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

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "save":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
