"""The headless trace as JSON Lines: a header, a line per generated token (and per later prompt), an end line.

Every transcript token is in the file once: the header's ``prompt_tokens`` up to
the first step, each step's own token, and a ``prompt`` line for the tokens of
each later turn (schema version 2; ``tracer.trace_schema`` checks a file).

Lines are written as records arrive, the logit lens computed in batches of
records (one matrix product per batch instead of one per token), so ``-`` can be
piped while the model writes. The schema is documented in the README; a
step's ``attention`` (``AttentionEvidence.to_dict``) holds ``positions``,
``mean`` and ``per_layer`` (``[[position, weight], ...]`` per layer) and, since
kvtrace traces heads, ``per_head``: per layer, per query head, the strongest
``[position, weight]`` pairs (``null`` when not captured). Readers of the
older lines find every key they knew.

Two opt-ins add to that: with ``attribution`` each step line carries what each
layer added to its token's logit (``Attribution.to_dict``; ``null`` where the
model's final norm is not one the attribution understands), and with a
``tensors`` folder each step's tensors are written there
(``step-NNNNN.safetensors`` and its JSON sidecar) before its line. The header's
``settings`` say both.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TextIO

import torch

from tracer.records import Candidate, StepRecord
from tracer.session import TraceSession

SCHEMA_VERSION = 2
LENS_BATCH = 16  # records per lens batch: big enough for efficient products, small enough for a short tail
PAUSED = "paused"  # the end line's stop reason when no generation ended on this line (e.g. just loaded)


def token_entries(session: TraceSession, start: int, end: int) -> list[dict[str, Any]]:
    """Transcript tokens ``start`` .. ``end - 1`` as ``{position, id, text}`` (stored text: ``tracer.token_text``)."""
    return [{"position": p, "id": session.token_ids[p], "text": session.token_text(p)} for p in range(start, end)]


def header(session: TraceSession, *, with_lens: bool, with_attribution: bool = False,
           tensors: str | None = None) -> dict[str, Any]:
    """The first line; ``prompt_tokens`` holds the transcript up to the first step (later prompts: ``prompt`` lines)."""
    loaded = session.loaded
    prompt_length = session.records[0].position if session.records else len(session.token_ids)
    return {
        "type": "header",
        "version": SCHEMA_VERSION,
        "model": loaded.name,
        "fingerprint": loaded.fingerprint.to_dict(),
        "device": str(loaded.device),
        "settings": {"sampling": session.sampling.to_dict(), "top_k": session.top_k, "lens": with_lens,
                     "attention": session.attention_available, "attribution": with_attribution,
                     "tensors": tensors},
        "messages": session.messages,
        "prompt_tokens": token_entries(session, 0, prompt_length),
        "notices": session.notices,
    }


def _candidates(top: list[Candidate]) -> list[dict[str, Any]]:
    return [{"token_id": c.token_id, "text": c.text, "prob": c.prob} for c in top]


def step_line(record: StepRecord, *, with_lens: bool = True) -> dict[str, Any]:
    """The same fields as ``StepRecord.to_dict``, built directly (``asdict`` deep-copies: slow at lens size).

    Without ``with_lens`` the lens is ``null`` even where one was computed, as the header says.
    """
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
        "lens": None if record.lens is None or not with_lens else [
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

    def __init__(self, session: TraceSession, out: TextIO, *, with_lens: bool = True, background: bool | None = None,
                 on_batch: Callable[[int], None] | None = None, with_attribution: bool = False,
                 tensors: str | None = None):
        self.session = session
        self.out = out
        self.with_lens = with_lens and session.lens_supported
        self.with_attribution = with_attribution
        self.tensors = tensors  # the folder each step's tensors go to
        self.on_batch = on_batch  # told the number of steps written after each batch
        self.written = 0
        self._next_position = 0  # the first transcript position not yet in the file
        run_beside = spare_cores() if background is None else background
        derived = self.with_lens or self.with_attribution
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvtrace-lens") if derived and run_beside else None
        self._pending: list[StepRecord] = []
        self._batches: deque[tuple[Future | None, list[StepRecord]]] = deque()

    def _write(self, line: dict[str, Any]) -> None:
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")

    def header(self) -> None:
        line = header(self.session, with_lens=self.with_lens, with_attribution=self.with_attribution,
                      tensors=self.tensors)
        self._next_position = len(line["prompt_tokens"])
        self._write(line)

    def _prompt_up_to(self, end: int) -> None:
        """A ``prompt`` line for the transcript tokens no step produced before ``end`` (a later turn's prompt)."""
        if end > self._next_position:
            self._write({"type": "prompt", "tokens": token_entries(self.session, self._next_position, end)})
            self._next_position = end

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
        if not (self.with_lens or self.with_attribution):
            self._batches.append((None, batch))
        elif self._worker is not None:
            self._batches.append((self._worker.submit(self._derive, indices), batch))
        else:
            self._derive(indices)
            self._batches.append((None, batch))

    def _derive(self, indices: list[int]) -> None:
        """What the lines of these records need beyond the records: the lens, the attribution."""
        if self.with_lens:
            self.session.lens_many(indices)
        if self.with_attribution:
            for index in indices:
                self.session.attribution(index)

    def _write_ready(self, *, wait: bool) -> None:
        while self._batches and (wait or self._batches[0][0] is None or self._batches[0][0].done()):
            future, batch = self._batches.popleft()
            if future is not None:
                future.result()
            for record in batch:
                self._prompt_up_to(record.position)
                if self.tensors is not None:
                    from tracer.usecases import export_tensors, tensors_path  # usecases imports this module

                    export_tensors(self.session, record.index, tensors_path(self.tensors, record.index))
                line = step_line(record, with_lens=self.with_lens)
                if self.with_attribution:
                    line["attribution"] = None if record.attribution is None else record.attribution.to_dict()
                self._write(line)
                self._next_position = record.position + 1
            self.written += len(batch)
            self.out.flush()
            if self.on_batch is not None:
                self.on_batch(self.written)

    def end(self) -> None:
        """Write what is left and the end line; waits for the lens still being computed."""
        self._submit()
        try:
            self._write_ready(wait=True)
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
        self._prompt_up_to(len(self.session.token_ids))  # a turn begun whose reply has no step yet
        self._write({
            "type": "end",
            "stop_reason": self.session.stop_reason or PAUSED,
            "generated": len(self.session.records),
            "transcript_tokens": len(self.session.token_ids),
            "reply": self.session.reply_text(),
        })
        self.out.flush()


def write_trace(session: TraceSession, out: TextIO, *, with_lens: bool = True,
                progress: Callable[[int, int], None] | None = None) -> None:
    """Write the trace of everything the session generated so far; ``progress(steps written, steps)``."""
    total = len(session.records)
    writer = TraceWriter(session, out, with_lens=with_lens,
                         on_batch=None if progress is None else lambda written: progress(written, total))
    writer.header()
    for record in session.records:
        writer.step(record)
    writer.end()
