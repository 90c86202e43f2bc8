"""Time to first token from a saved state, the one way the snapshot and store benches both measure it.

A fresh (untraced) session imports what ``load`` returns and takes one step:
load, import and step are timed apart, so a bench can say where the time goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvstore.state import KVState
from tracer.loading import LoadedModel
from tracer.session import TraceSession


def timed_resume(loaded: LoadedModel, load: Callable[[], KVState]) -> Callable[[], dict[str, float]]:
    """A run (for ``best of N``) that loads, imports into a fresh session and steps once; seconds per stage."""
    def run() -> dict[str, float]:
        start = time.perf_counter()
        state = load()
        loaded_at = time.perf_counter()
        session = TraceSession(loaded, capture_attention=False)
        session.import_state(state)
        middle = time.perf_counter()
        session.step()
        return {"load": loaded_at - start, "import": middle - loaded_at, "step": time.perf_counter() - middle}
    return run
