"""The headless trace as JSON Lines: a header, one line per generated token, an end line.

Lines are written as records arrive, the logit lens computed in batches of
records (one matrix product per batch instead of one per token), so ``-`` can be
piped while the model writes. The schema is documented in the README; a
step's ``attention`` (``AttentionEvidence.to_dict``) holds ``positions``,
``mean`` and ``per_layer`` (``[[position, weight], ...]`` per layer) and, since
kvtrace traces heads, ``per_head``: per layer, per query head, the strongest
``[position, weight]`` pairs (``null`` when not captured). Readers of the
older lines find every key they knew.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TextIO

import torch

from tracer.records import Candidate, StepRecord
from tracer.session import TraceSession

SCHEMA_VERSION = 1
LENS_BATCH = 16  # records per lens batch: big enough for efficient products, small enough for a short tail


def header(session: TraceSession, *, with_lens: bool) -> dict[str, Any]:
    loaded = session.loaded
    prompt_length = session.records[0].position if session.records else len(session.token_ids)
    return {
        "type": "header",
        "version": SCHEMA_VERSION,
        "model": loaded.name,
        "fingerprint": loaded.fingerprint.to_dict(),
        "device": str(loaded.device),
        "settings": {"sampling": session.sampling.to_dict(), "top_k": session.top_k, "lens": with_lens,
                     "attention": session.attention_available},
        "messages": session.messages,
        "prompt_tokens": [
            {"position": p, "id": session.token_ids[p], "text": session.token_text(p)} for p in range(prompt_length)
        ],
        "notices": session.notices,
    }


def _candidates(top: list[Candidate]) -> list[dict[str, Any]]:
    return [{"token_id": c.token_id, "text": c.text, "prob": c.prob} for c in top]


def step_line(record: StepRecord) -> dict[str, Any]:
    """The same fields as ``StepRecord.to_dict``, built directly (``asdict`` deep-copies: slow at lens size)."""
    attention = record.attention
    return {
        "type": "step",
        "index": record.index,
        "position": record.position,
        "token_id": record.token_id,
        "text": record.text,
        "prob": record.prob,
        "logprob": record.logprob,
        "entropy": record.entropy,
        "top": _candidates(record.top),
        "attention": None if attention is None else attention.to_dict(),
        "lens": None if record.lens is None else [
            {"layer": layer.layer, "top": _candidates(layer.top)} for layer in record.lens
        ],
        "forced": record.forced,
        "extra": record.extra,
    }


def spare_cores() -> bool:
    """True when torch leaves CPU cores idle, so the lens can run beside decoding without oversubscribing."""
    return torch.get_num_threads() < (os.cpu_count() or 1)


class TraceWriter:
    """Streams a session's trace to ``out``; call ``header``, then ``step`` as records come, then ``end``.

    The lens of each batch of records is computed while the model goes on
    decoding (in one worker thread) when torch leaves a core idle; otherwise in
    line, where its matrix products already use every core. Lines are written in
    order either way.
    """

    def __init__(self, session: TraceSession, out: TextIO, *, with_lens: bool = True, background: bool | None = None):
        self.session = session
        self.out = out
        self.with_lens = with_lens and session.lens_supported
        run_beside = spare_cores() if background is None else background
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvtrace-lens") if self.with_lens and run_beside else None
        self._pending: list[StepRecord] = []
        self._batches: deque[tuple[Future | None, list[StepRecord]]] = deque()

    def _write(self, line: dict[str, Any]) -> None:
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")

    def header(self) -> None:
        self._write(header(self.session, with_lens=self.with_lens))

    def step(self, record: StepRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= LENS_BATCH:
            self._submit()
        self._write_ready(wait=False)

    def _submit(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        indices = [r.index for r in batch]
        if not self.with_lens:
            self._batches.append((None, batch))
        elif self._worker is not None:
            self._batches.append((self._worker.submit(self.session.lens_many, indices), batch))
        else:
            self.session.lens_many(indices)
            self._batches.append((None, batch))

    def _write_ready(self, *, wait: bool) -> None:
        while self._batches and (wait or self._batches[0][0] is None or self._batches[0][0].done()):
            future, batch = self._batches.popleft()
            if future is not None:
                future.result()
            for record in batch:
                self._write(step_line(record))
            self.out.flush()

    def end(self) -> None:
        """Write what is left and the end line; waits for the lens still being computed."""
        self._submit()
        try:
            self._write_ready(wait=True)
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
        self._write({
            "type": "end",
            "stop_reason": self.session.stop_reason,
            "generated": len(self.session.records),
            "reply": self.session.reply_text(),
        })
        self.out.flush()


def write_trace(session: TraceSession, out: TextIO, *, with_lens: bool = True) -> None:
    """Write the trace of everything the session generated so far."""
    writer = TraceWriter(session, out, with_lens=with_lens)
    writer.header()
    for record in session.records:
        writer.step(record)
    writer.end()
