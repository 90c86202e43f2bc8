"""What the runner tells its listener: plain dataclasses, no UI types.

``SessionView`` is a cheap, immutable summary of a session taken in the
runner's worker thread after each job: everything a screen or a dialog needs
(records, chat, token texts, sizes, cached positions) without touching the
session, so the UI never waits for the model and never reads state that a
worker is changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.state import ModelFingerprint
from tracer.lines import LineNumbers, LineSummary
from tracer.protocol import Session
from tracer.compare import LineComparison
from tracer.records import StepRecord

if TYPE_CHECKING:  # the preview's module imports torch; the UI reads these events without it
    from tracer.prune_preview import PrunePreview


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
    attention_scores: tuple[float, ...] | None  # attention received per cached entry (the prune preview)
    kv_bytes: int
    stop_reason: str | None
    line: int  # the current line's number (``tracer.lines``)
    branches: tuple[LineSummary, ...]  # the other lines, in the session's branch order
    notices: tuple[str, ...]
    attention_available: bool
    lens_supported: bool
    unsaved: bool = False  # changed since it was last saved or loaded
    saved_to: str | None = None  # where it was last saved or loaded from (changed since if ``unsaved``)
    can_undo_prune: bool = False  # the state before the last prune is kept (until the next turn)
    line_name: str = ""  # the name given to the current line
    autosaved: str | None = None  # where the runner last autosaved the session (DIR:NAME), if it autosaves

    @property
    def context_tokens(self) -> int:
        return len(self.token_texts)

    @property
    def next_position(self) -> int:
        """The pending token's position: the one the next step feeds."""
        return len(self.token_texts) - 1

    @classmethod
    def of(cls, session: Session, lines: LineNumbers | None = None, *, unsaved: bool = False,
           saved_to: str | None = None, can_undo_prune: bool = False, autosaved: str | None = None) -> SessionView:
        """Read once, in the thread that owns the session; the runner adds what it tracks beside it."""
        loaded = session.loaded
        lines = lines or LineNumbers()
        scores = session.attention_scores
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
            attention_scores=None if scores is None else tuple(scores),
            kv_bytes=session.kv_bytes,
            stop_reason=session.stop_reason,
            line=lines.current,
            branches=lines.summaries([b.records for b in session.branches], session.records),
            notices=tuple(session.notices),
            attention_available=session.attention_available,
            lens_supported=session.lens_supported,
            unsaved=unsaved,
            saved_to=saved_to,
            can_undo_prune=can_undo_prune,
            line_name=lines.names.get(lines.current, ""),
            autosaved=autosaved,
        )


@dataclass(frozen=True)
class Progress:
    """A stage of opening the session ("Dequantizing ..."); ``expected``: the seconds the work starting
    here should take (a first GGUF load), for a progress bar and the time left."""

    text: str
    expected: float | None = None


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
    piece: str = ""  # the token's stored text (``tracer.token_text``): byte fragments as <0xNN> escapes


@dataclass(frozen=True)
class RunEnded:
    """A generation run ended (finished, stopped, or failed with ``error``); ``view`` is the session now."""

    run_id: int
    stop_reason: str | None
    error: str | None
    view: SessionView


@dataclass(frozen=True)
class LensReady:
    """The lens of these records is computed: each carries its ``lens``, ``lens_stats`` and ``attribution`` now."""

    indices: tuple[int, ...]


@dataclass(frozen=True)
class Compared:
    """Two lines, by number, side by side from where they part."""

    a: int
    b: int
    comparison: LineComparison


@dataclass(frozen=True)
class PrunePreviewed:
    """What every pruning method at ``budget`` would do to the next token (``error``: why there is no preview)."""

    budget: int
    sinks: int
    span: tuple[int, int] | None
    preview: PrunePreview | None
    error: str | None = None


@dataclass(frozen=True)
class TaskProgress:
    """``done`` of ``total`` items of a long task (the export's lens)."""

    task: str
    done: int
    total: int


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
    view: SessionView | None = None  # the session now (saved: ``unsaved`` is False), when the save succeeded


Event = (Progress | Opened | OpenFailed | TurnStarted | Stepped | RunEnded | LensReady | Compared | PrunePreviewed
         | TaskProgress | TaskEnded | AutoSaved)
