"""A question before something that cannot be taken back: a few answers, each a button and a key.

Escape (or Cancel) answers ``None``; the focus starts on the safe answer, so
Enter right after the question never destroys anything by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


@dataclass(frozen=True)
class Answer:
    key: str  # a Textual key name that gives this answer
    label: str
    value: str
    variant: str = "default"


CANCEL = Answer("escape", "Cancel", "")


class ConfirmScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, body: str, answers: list[Answer], *, focus: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.answers = [*answers, CANCEL]
        self.focus_value = focus

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.title_text), classes="title")
            yield Static(Text(self.body), id="question")
            with Horizontal(classes="buttons"):
                for answer in self.answers:
                    shown = "Esc" if answer.key == "escape" else answer.key
                    yield Button(f"{answer.label} ({shown})", variant=answer.variant, id=f"answer-{answer.value}"
                                 if answer.value else "cancel")

    def on_mount(self) -> None:
        self.query_one(f"#answer-{self.focus_value}" if self.focus_value else "#cancel", Button).focus()

    def on_key(self, event: events.Key) -> None:
        for answer in self.answers:
            if answer.value and event.key == answer.key:
                event.stop()
                self.dismiss(answer.value)
                return

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id.removeprefix("answer-") if event.button.id != "cancel" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)
