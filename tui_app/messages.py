"""The one message the runner's events travel in, from its worker thread to the app's event loop."""

from __future__ import annotations

from textual.message import Message

from tracer import events


class RunnerEvent(Message):
    """An event of the session runner (``tracer.events``), posted from the runner's thread."""

    def __init__(self, event: events.Event) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        """A loading stage not yet shown is superseded by the next one."""
        return (isinstance(message, RunnerEvent) and isinstance(self.event, events.Progress)
                and isinstance(message.event, events.Progress))
