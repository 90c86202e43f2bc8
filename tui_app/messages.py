"""Messages the worker threads post to the app: the only way model work reaches the screen.

Generation messages carry the ``run_id`` of the run that produced them, so the
app can drop anything from a run that was cancelled or superseded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message

from tracer.records import LensLayer, StepRecord


@dataclass
class LoadProgress(Message):
    """A stage of loading the model ("Dequantizing ...")."""

    text: str


@dataclass
class ModelReady(Message):
    session: Any  # tracer.session.TraceSession


@dataclass
class ModelFailed(Message):
    error: str


@dataclass
class TurnStarted(Message):
    """A new turn's prompt (or a branch's forced token) is in place; the reply continues from here.

    Everything the screen needs is read in the worker, under the session lock, so the event loop
    never touches the tokenizer while the model runs: the records so far, the messages, the reply
    text, and the text of every transcript position (for the attention pane's labels).
    """

    run_id: int
    records: list[StepRecord]
    messages: list[dict[str, str]]
    reply: str
    token_texts: list[str]


@dataclass
class StepTaken(Message):
    """One generated token, with the context size and KV bytes read in the worker right after it."""

    run_id: int
    record: StepRecord
    context_tokens: int
    kv_bytes: int


@dataclass
class RunFinished(Message):
    """A generation run ended (finished, stopped, or failed with ``error``)."""

    run_id: int
    stop_reason: str | None
    error: str | None = None


@dataclass
class LensReady(Message):
    index: int
    layers: list[LensLayer]


@dataclass
class TaskDone(Message):
    """A snapshot, export or prune task finished; ``text`` is the one line to tell the user."""

    text: str
    error: bool = False
    changed_session: bool = False
