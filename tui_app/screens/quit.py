"""The question before quitting with something to lose: unsaved changes, a reply being written, a task running.

``quit_reasons`` says what would be lost (nothing: quit at once); the screen
offers to save first. ``q`` again (or ctrl+q) quits anyway.
"""

from __future__ import annotations

from pathlib import Path

from tracer.events import SessionView
from tui_app.screens.confirm import Answer, ConfirmScreen

SAVE_FIRST = "save"
QUIT = "quit"


def quit_reasons(view: SessionView | None, *, generating: bool, task: str | None) -> list[str]:
    """What quitting now would lose, one phrase each; empty when nothing would."""
    reasons = []
    if generating:
        reasons.append("a reply is being generated (quitting stops it)")
    if task:
        reasons.append(f"{task} is still running")
    if view is not None and view.unsaved:
        since = f" since it was saved to {Path(view.saved_to).name}" if view.saved_to else ""
        reasons.append(f"the session has changes that are not saved{since}")
    return reasons


class QuitScreen(ConfirmScreen):
    def __init__(self, reasons: list[str], *, can_save: bool) -> None:
        body = "\n".join(f"• {reason[:1].upper()}{reason[1:]}." for reason in reasons)
        answers = [Answer("s", "Save first", SAVE_FIRST, "primary")] if can_save else []
        answers.append(Answer("q", "Quit", QUIT, "error"))
        super().__init__("Quit kvtrace?", body, answers)
