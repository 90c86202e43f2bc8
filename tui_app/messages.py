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
        """This loading stage, not yet shown, gives way to the next one ``message`` (unless it starts timed work).

        Textual asks the message at the head of the queue whether the one after it supersedes it.
        """
        return (isinstance(message, RunnerEvent) and isinstance(self.event, events.Progress)
                and self.event.expected is None and isinstance(message.event, events.Progress))
