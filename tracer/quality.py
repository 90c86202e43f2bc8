"""How good a (pruned, quantized, restored) cache is: perplexity and greedy agreement on a fixed continuation.

Shared by the tests and ``bench/``: every variant of a cache is judged by
feeding the same continuation in one forward over a cache rebuilt from its
``KVState`` at the true positions (teacher forcing), so variants are compared
on exactly the same tokens.
"""

from __future__ import annotations

import torch

from kvstore.state import KVState
from tracer.engine import Engine
from tracer.loading import LoadedModel


def sample_text() -> str:
    """Long real English text every Python install carries: CPython's license (where the install keeps
    it), then the rendered documentation of a few stdlib modules. Deterministic for one Python version."""
    import argparse
    import json
    import pydoc
    import subprocess
    import sys
    from pathlib import Path

    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    license_file = Path(sys.base_prefix) / "lib" / version / "LICENSE.txt"
    parts = [license_file.read_text(encoding="utf-8")] if license_file.is_file() else []
    parts += [pydoc.render_doc(m, renderer=pydoc.plaintext) for m in (argparse, subprocess, json)]
    return "\n".join(parts)


def prefilled_state(loaded: LoadedModel, tokens: list[int], *, attention_scores: bool = False) -> KVState:
    """``tokens`` as a paused generation: all but the last prefilled, the last pending.

    With ``attention_scores`` the prefill records the attention each entry received, as a traced
    session does (attention-guided pruning needs it).
    """
    engine = Engine(loaded, capture_attention=attention_scores)
    engine.prefill(tokens[:-1], 0)
    return engine.state(tokens)


def continuation_logits(loaded: LoadedModel, state: KVState, continuation: list[int]) -> torch.Tensor:
    """Logits after the pending token and each of ``continuation[:-1]``, fed at their true positions."""
    engine = Engine(loaded, capture_attention=False)
    engine.restore(state)
    return engine.logits_after([state.token_ids[-1], *continuation[:-1]], state.next_position)


def perplexity(loaded: LoadedModel, state: KVState, continuation: list[int]) -> float:
    """Perplexity of ``continuation`` given the cache."""
    logits = continuation_logits(loaded, state, continuation)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(continuation, device=logits.device))
    return float(torch.exp(nll))


def greedy_choices(loaded: LoadedModel, state: KVState, continuation: list[int]) -> list[int]:
    """The greedy choice at every step of ``continuation`` (teacher forced)."""
    return continuation_logits(loaded, state, continuation).argmax(dim=-1).tolist()


def agreement(loaded: LoadedModel, state: KVState, continuation: list[int], reference: list[int]) -> float:
    """Share of steps whose greedy choice equals ``reference``'s, both fed ``continuation``.

    With ``continuation == reference`` = the lossless greedy run, this is the
    greedy agreement of a lossy cache with the lossless resume.
    """
    chosen = greedy_choices(loaded, state, continuation)
    return sum(a == b for a, b in zip(chosen, reference)) / len(reference)
