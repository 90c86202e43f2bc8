"""The save dialog (ctrl+s): a file name and a codec; the app writes and reports the size.

The path is checked as the command line checks it (``kvstore.atomic.output_target``,
same words) before the dialog closes, and replacing an existing file is asked
first. When the save itself fails, the app opens the dialog again on the same
path with the error, so it can be corrected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, Select

from kvstore.atomic import output_target
from kvstore.errors import SnapshotError
from kvstore.format import CODECS, DEFAULT_CODEC
from tui_app.formatting import byte_count
from tui_app.screens.confirm import Answer, ConfirmScreen
from tui_app.screens.form import FormScreen

CHOICES = [(f"{name}: {text}", name) for name, text in CODECS.items()]
REPLACE = "replace"


@dataclass(frozen=True)
class SaveRequest:
    path: str
    codec: str


def default_name() -> str:
    return datetime.now().strftime("kvtrace-%Y%m%d-%H%M%S.kvs")


def existing(path: str) -> str | None:
    """A few words on the file ``path`` names, if there is one: its size and when it was written."""
    target = Path(path).expanduser()
    try:
        if not target.is_file():
            return None
        stat = target.stat()
    except OSError:
        return None
    return f"{byte_count(stat.st_size)}, written {time.strftime('%Y-%m-%d %H:%M', time.localtime(stat.st_mtime))}"


class SaveScreen(FormScreen[SaveRequest | None]):

    def __init__(self, summary: str, *, path: str | None = None, codec: str = DEFAULT_CODEC,
                 error: str | None = None) -> None:
        super().__init__()
        self.summary = summary
        self.path = path or default_name()
        self.codec = codec
        self.error = error

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Save a snapshot of the KV cache", classes="title")
            yield Label(self.summary, classes="muted")
            yield Label("File name")
            yield Input(self.path, id="path")
            yield Label("", id="exists", classes="muted")
            yield Label("", id="error")
            yield Label("Codec")
            yield Select(CHOICES, value=self.codec, allow_blank=False, id="codec")
            yield self.buttons("Save")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()
        self._error(self.error or "")

    def _error(self, text: str) -> None:
        """The reason the last try failed (a use-case message: a lowercase fragment), in red."""
        shown = text[:1].upper() + text[1:] + ("." if text and not text.endswith(".") else "")
        self.query_one("#error", Label).update(Text(shown, style="bold red"))

    def _submit(self) -> None:
        typed = self.query_one("#path", Input).value.strip()
        if not typed:
            self._error("type a file name first")
            return
        path = str(Path(typed).expanduser())
        try:
            output_target(path)
        except SnapshotError as error:
            self._error(str(error))
            return
        request = SaveRequest(path, str(self.query_one("#codec", Select).value))
        found = existing(path)
        if found is None:
            self.dismiss(request)
            return
        question = ConfirmScreen(f"Replace {Path(path).name}?", f"{path} exists ({found}); saving replaces it.",
                                 [Answer("y", "Replace", REPLACE, "warning")])

        def answered(answer: str | None) -> None:
            if answer == REPLACE:
                self.dismiss(request)

        self.app.push_screen(question, answered)

    def on_input_changed(self, event: Input.Changed) -> None:
        found = existing(event.value.strip())
        shown = f"A file with this name exists ({found}): Save asks before replacing it." if found else ""
        self.query_one("#exists", Label).update(shown)
