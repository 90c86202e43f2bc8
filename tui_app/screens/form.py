"""What every kvtrace dialog shares: Enter or the primary button submits, Escape or Cancel closes."""

from __future__ import annotations

from typing import TypeVar

from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.widgets import Button, Input

ResultType = TypeVar("ResultType")


class FormScreen(ModalScreen[ResultType]):
    """A modal form; subclasses compose their fields and ``buttons(...)`` and implement ``_submit``."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    @staticmethod
    def buttons(label: str) -> Horizontal:
        return Horizontal(Button(label, variant="primary", id="submit"), Button("Cancel", id="cancel"),
                          classes="buttons")

    def _submit(self) -> None:
        raise NotImplementedError

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "submit":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
