"""The session interface: what the runner, the use cases and the app may use of a trace session.

``TraceSession`` implements it for real models; the tests' fake implements it
too, and a test checks both against this Protocol member by member, so the
fake cannot drift from the real thing unnoticed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from kvstore.state import KVState, ModelFingerprint
from tracer.compare import LineComparison
from tracer.records import Attribution, LensLayer, StepRecord
from tracer.sampling import SamplingSettings


class ModelInfo(Protocol):
    """The parts of ``tracer.loading.LoadedModel`` a session's users read."""

    name: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: ModelFingerprint
    context_limit: int


class BranchInfo(Protocol):
    label: str
    records: list[StepRecord]


class Session(Protocol):
    """A stateful traced generation over one model (see ``tracer.session.TraceSession``)."""

    loaded: ModelInfo
    sampling: SamplingSettings
    top_k: int
    notices: list[str]
    messages: list[dict[str, str]]
    records: list[StepRecord]
    token_ids: list[int]
    stop_reason: str | None
    branches: Sequence[Any]

    @property
    def context_tokens(self) -> int: ...

    @property
    def kv_bytes(self) -> int: ...

    @property
    def positions(self) -> list[int]: ...

    @property
    def attention_scores(self) -> list[float] | None: ...

    @property
    def attention_available(self) -> bool: ...

    @property
    def lens_supported(self) -> bool: ...

    def start_turn(self, user_text: str, system: str | None = None) -> None: ...

    def step(self) -> StepRecord | None: ...

    def generate(self, max_new_tokens: int | None = None, *, cancel: threading.Event | None = None,
                 on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]: ...

    def reply_text(self) -> str: ...

    def token_text(self, position: int) -> str: ...

    def token_texts(self) -> list[str]: ...

    def lens(self, index: int) -> list[LensLayer]: ...

    def lens_many(self, indices: list[int]) -> list[list[LensLayer]]: ...

    def attribution(self, index: int) -> Attribution | None: ...

    def step_tensors(self, index: int) -> dict[str, torch.Tensor]: ...

    def compare_lines(self, a: int, b: int) -> LineComparison: ...

    def branch(self, index: int, token_id: int) -> StepRecord: ...

    def switch_branch(self, i: int) -> None: ...

    def export_state(self) -> KVState: ...

    def import_state(self, state: KVState) -> None: ...
