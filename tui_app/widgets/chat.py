"""The chat pane: the conversation so far and the reply streaming in, with notes on how it ended.

Under the conversation, dim notes say why the reply stopped ("stopped: max
tokens (g continues)", "end of answer") and which stretches of the transcript
the cache no longer holds, so the chat never hides what the model can see.
The arrow keys are the app's; the chat scrolls with the wheel and PageUp/PageDown.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

ROLE_STYLE = {"user": "bold cyan", "assistant": "bold green", "system": "bold magenta"}


def _message(role: str, content: str) -> Text:
    return Text.assemble((f"{role}: ", ROLE_STYLE.get(role, "bold")), content)


class ChatView(VerticalScroll, inherit_bindings=False):
    """Past messages are fixed Statics; the live reply is one Static updated per token."""

    BINDINGS = [
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
    ]
    DEFAULT_CSS = """
    ChatView > Static { width: 1fr; height: auto; }
    ChatView > .note { color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.reply: Static | None = None
        self.progress: Static | None = None

    def show_progress(self, text: str | Text) -> None:
        """Loading progress: replaced at every stage."""
        if self.progress is None:
            self.progress = Static(classes="note")
            self.mount(self.progress)
        self.progress.update(text if isinstance(text, Text) else Text(text))

    def show_failure(self, error: str, hint: str) -> None:
        """A failure to open the model: the error in red (as plain text, never as markup) and what to do."""
        self.show_progress(Text.assemble((error, "bold red"), "\n", hint))

    def show_conversation(self, messages: list[dict[str, str]], reply: str | None, notes: list[str] = ()) -> None:
        """Redraw from the session: its messages, the reply being written (if any), then dim ``notes``."""
        for child in list(self.children):
            if child is not self.progress:
                child.remove()
        widgets = [Static(_message(m["role"], m["content"])) for m in messages]
        self.reply = None
        if reply is not None:
            self.reply = Static(_message("assistant", reply))
            widgets.append(self.reply)
        widgets += [Static(Text(f"― {note}"), classes="note ending") for note in notes]
        if widgets:
            self.mount(*widgets)
        self.call_after_refresh(self.scroll_end, animate=False)  # once the new paragraphs have their heights

    def clear_notes(self) -> None:
        """The reply goes on: notes on how it ended no longer hold."""
        for note in self.query(".ending"):
            note.remove()

    def update_reply(self, text: str) -> None:
        if self.reply is None:
            self.reply = Static()
            self.mount(self.reply)
        self.reply.update(_message("assistant", text))
        self.scroll_end(animate=False)
