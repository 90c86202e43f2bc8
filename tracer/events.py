"""What the runner tells its listener: plain dataclasses, no UI types.

``SessionView`` is a cheap, immutable summary of a session taken in the
runner's worker thread after each job: everything a screen or a dialog needs
(records, chat, token texts, sizes, cached positions) without touching the
session, so the UI never waits for the model and never reads state that a
worker is changing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.state import ModelFingerprint
from tracer.protocol import Session
from tracer.records import LensLayer, StepRecord


@dataclass(frozen=True)
class SessionView:
    model: str
    device: str
    dtype: str
    context_limit: int
    fingerprint: ModelFingerprint
    records: tuple[StepRecord, ...]
    messages: tuple[dict[str, str], ...]
    reply: str
    token_texts: tuple[str, ...]
    positions: tuple[int, ...]  # cached original positions
    kv_bytes: int
    stop_reason: str | None
    branch_labels: tuple[str, ...]
    notices: tuple[str, ...]
    attention_available: bool
    lens_supported: bool
    autosaved: str | None = None  # where the runner last saved the session (DIR:NAME), if it autosaves

    @property
    def context_tokens(self) -> int:
        return len(self.token_texts)

    @classmethod
    def of(cls, session: Session, autosaved: str | None = None) -> SessionView:
        """Read once, in the thread that owns the session."""
        loaded = session.loaded
        return cls(
            model=loaded.name,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            context_limit=loaded.context_limit,
            fingerprint=loaded.fingerprint,
            records=tuple(session.records),
            messages=tuple(dict(m) for m in session.messages),
            reply=session.reply_text(),
            token_texts=tuple(session.token_texts()),
            positions=tuple(session.positions),
            kv_bytes=session.kv_bytes,
            stop_reason=session.stop_reason,
            branch_labels=tuple(getattr(b, "label", "") or f"branch {i}" for i, b in enumerate(session.branches)),
            notices=tuple(session.notices),
            attention_available=session.attention_available,
            lens_supported=session.lens_supported,
            autosaved=autosaved,
        )


@dataclass(frozen=True)
class Progress:
    """A stage of opening the session ("Dequantizing ...")."""

    text: str


@dataclass(frozen=True)
class Opened:
    view: SessionView


@dataclass(frozen=True)
class OpenFailed:
    error: str


@dataclass(frozen=True)
class TurnStarted:
    """A new turn's prompt (or a branch's forced token) is in place; the reply continues from here."""

    run_id: int
    view: SessionView


@dataclass(frozen=True)
class Stepped:
    """One generated token, with the context size and KV bytes read right after it."""

    run_id: int
    record: StepRecord
    context_tokens: int
    kv_bytes: int


@dataclass(frozen=True)
class RunEnded:
    """A generation run ended (finished, stopped, or failed with ``error``); ``view`` is the session now."""

    run_id: int
    stop_reason: str | None
    error: str | None
    view: SessionView


@dataclass(frozen=True)
class LensReady:
    index: int
    layers: list[LensLayer]


@dataclass(frozen=True)
class TaskEnded:
    """A save, load, prune, export or branch switch finished; ``message`` is the one line to tell the user.

    ``view`` is set when the session changed.
    """

    task: str
    message: str
    error: bool = False
    view: SessionView | None = None


@dataclass(frozen=True)
class AutoSaved:
    """The runner saved the session to its store after a turn or a branch (or failed to: ``error``)."""

    reference: str | None  # DIR:NAME written; None when the save failed
    message: str
    error: bool = False


Event = Progress | Opened | OpenFailed | TurnStarted | Stepped | RunEnded | LensReady | TaskEnded | AutoSaved
