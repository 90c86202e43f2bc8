"""The step-wise generation session: chat turns, step records, the lens and branches over a forward engine.

The session follows the pending-token invariant of ``kvstore.state``: the last
transcript token is chosen but not yet in the cache. Prefill feeds all prompt
tokens but the last; every step feeds the one pending token (query length 1,
so attention rows and hidden states are cheap), samples the next one and makes
it pending. The model, the cache and the original positions live in
``tracer.engine.Engine``; this module adds what a person traces: turns,
records, sampling and stop rules, the lens cache, branches, export/import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import torch

from kvstore.errors import SnapshotError
from kvstore.snapshot import check_fingerprint
from kvstore.state import KVState
from tracer import capture, chat, compare, tensor_export, trace_codec
from tracer.detokenize import IncrementalDecoder
from tracer.engine import Engine
from tracer.attribution import Attributor
from tracer.compare import LineComparison
from tracer.errors import PromptError, TracerError
from tracer.lens import LogitLens
from tracer.loading import LoadedModel
from tracer.records import Attribution, LensLayer, StepRecord
from tracer.residual import StepTensors
from tracer.sampling import SamplingSettings, choose_token, make_generator
from tracer.token_text import token_piece
DECODER_CONTEXT = 4  # tokens before a reply that seed its incremental decoder
CONTINUABLE = ("max_tokens", "cancelled")  # stop reasons after which ``generate`` goes on


@dataclass
class TurnMark:
    """Where a user turn began, so a branch into an earlier turn restores that turn's chat."""

    first_record: int
    message_count: int
    rendered: str
    reply_start: int


@dataclass
class Branch:
    """A line of generation set aside by ``branch`` (or ``switch_branch``)."""

    records: list[StepRecord]
    state: KVState
    label: str
    hidden: list[StepTensors | None] = field(default_factory=list, repr=False)
    turns: list[TurnMark] = field(default_factory=list, repr=False)


class TraceSession:
    def __init__(
        self,
        loaded: LoadedModel,
        sampling: SamplingSettings | None = None,
        *,
        top_k: int = 10,
        capture_attention: bool = True,
    ):
        self.loaded = loaded
        self.sampling = sampling or SamplingSettings()
        self.top_k = top_k
        self.notices: list[str] = list(loaded.notices)
        self.messages: list[dict[str, str]] = []
        self.records: list[StepRecord] = []
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None
        self.branches: list[Branch] = []
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self.engine = Engine(loaded, capture_attention=capture_attention, notice=self._notice)
        self._hidden: list[StepTensors | None] = []  # per record: the residual stream at the fed position (None:
        # restored from a snapshot's trace, which does not keep it)
        self._turns: list[TurnMark] = []
        self._rendered = ""
        self._reply_start = 0
        self._decoder = IncrementalDecoder(self._tokenizer)
        self._generator = make_generator(self.sampling.seed)
        self._generator_seed = self.sampling.seed
        self._lens_lock = threading.Lock()
        self._pieces: dict[int, str] = {}
        self._eos_ids = self._find_eos_ids()
        self._lens = LogitLens.for_model(self._model)
        if self._lens is None:
            self._notice(f"{loaded.name}: no final norm and output head found, so the logit lens is skipped")
        self._attributor = None if self._lens is None else Attributor(self._lens)

    # ----------------------------------------------------------------- setup
    def _notice(self, text: str) -> None:
        if text not in self.notices:
            self.notices.append(text)

    def _find_eos_ids(self) -> set[int]:
        configured = getattr(self._model.generation_config, "eos_token_id", None)
        if configured is None:
            configured = self._tokenizer.eos_token_id
        if configured is None:
            return set()
        return {configured} if isinstance(configured, int) else set(configured)

    # ---------------------------------------------------------- properties
    @property
    def context_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def kv_bytes(self) -> int:
        return self.engine.kv_bytes

    @property
    def attention_available(self) -> bool:
        return self.engine.attention_available

    @property
    def attention_scores(self) -> list[float] | None:
        """Attention received so far by each cache entry (what heavy-hitter pruning ranks); None untraced."""
        return self.engine.layout.attention_scores() if self.attention_available else None

    @property
    def lens_supported(self) -> bool:
        """False when the model's final norm or output head was not found (a notice says so)."""
        return self._lens is not None

    @property
    def positions(self) -> list[int]:
        """Original position of every cache entry (a copy)."""
        return list(self.engine.positions)

    # ---------------------------------------------------------------- turns
    def start_turn(self, user_text: str, system: str | None = None) -> None:
        """Add a user message and prefill it; the assistant's reply then comes from ``step``/``generate``."""
        if not user_text.strip():
            raise PromptError("the prompt is empty; write a message for the model to answer")
        user = {"role": "user", "content": user_text}
        tokenizer = self._tokenizer
        if not self.token_ids:
            messages = ([{"role": "system", "content": system}] if system else []) + [user]
            rendered = chat.render(tokenizer, messages, add_generation_prompt=True)
            new_ids = chat.encode(tokenizer, rendered, first=True)
        else:
            reply = self.reply_text()
            messages = [*self.messages, {"role": "assistant", "content": reply}, user]
            pending = self.token_ids[-1]
            eos_text = self._tokenizer.decode([pending]) if pending in self._eos_ids else None
            text, rendered = chat.continuation(tokenizer, self._rendered, reply, eos_text, messages[:-1], user)
            new_ids = chat.encode(tokenizer, text, first=False)
        total = len(self.token_ids) + len(new_ids)
        limit = self.loaded.context_limit
        if total >= limit:
            raise PromptError(
                f"the prompt is {total} tokens long, but {self.loaded.name} reads at most {limit} tokens "
                "(and needs room to answer); shorten it"
            )
        if not new_ids:
            raise PromptError("the prompt produced no tokens; write a message for the model to answer")
        first_position = len(self.token_ids) - 1 if self.token_ids else 0
        feed = ([self.token_ids[-1]] if self.token_ids else []) + new_ids[:-1]
        self.messages = messages
        self._rendered = rendered
        self.token_ids = self.token_ids + new_ids
        self.engine.prefill(feed, first_position)
        self._begin_reply()
        self._mark_turn()
        if self.sampling.seed is not None:
            self._reseed()

    def _reseed(self) -> None:
        self._generator = make_generator(self.sampling.seed)
        self._generator_seed = self.sampling.seed

    def _mark_turn(self) -> None:
        self._turns.append(TurnMark(len(self.records), len(self.messages), self._rendered, self._reply_start))

    def _begin_reply(self) -> None:
        self._reply_start = len(self.token_ids)
        self._decoder = IncrementalDecoder(self._tokenizer, self.token_ids[-DECODER_CONTEXT:])
        self.stop_reason = None

    # ---------------------------------------------------------------- steps
    def step(self) -> StepRecord | None:
        """One forward of the pending token, then sample and capture; ``None`` once stopped."""
        if self.stop_reason is not None or not self.token_ids:
            return None
        if self.sampling.seed != self._generator_seed:  # settings replaced with another seed
            self._reseed()
        return self._advance(forced=None)

    def _advance(self, forced: int | None) -> StepRecord | None:
        position = len(self.token_ids) - 1
        if position >= self.loaded.context_limit:
            self.stop_reason = "context_full"
            return None
        step = self.engine.decode(self.token_ids[-1], position)
        token = forced if forced is not None else choose_token(step.logits, self.sampling, self._generator)
        prob, logprob, entropy, top = capture.distribution(step.logits, token, self.top_k, self._piece)
        self.token_ids.append(token)
        record = StepRecord(
            index=len(self.records),
            position=len(self.token_ids) - 1,
            token_id=token,
            text=self._decoder.push(token),
            prob=prob,
            logprob=logprob,
            entropy=entropy,
            top=top,
            attention=step.attention,
            forced=forced is not None,
        )
        self.records.append(record)
        self._hidden.append(step.tensors)
        self._check_stop(token, record.text)
        return record

    def _check_stop(self, token: int, piece: str) -> None:
        if token in self._eos_ids:
            self.stop_reason = "eos"
        elif self.sampling.stop:
            tail_length = max(len(s) for s in self.sampling.stop) + len(piece)
            tail = self.reply_text()[-tail_length:]
            if any(s and s in tail for s in self.sampling.stop):
                self.stop_reason = "stop"

    def generate(
        self,
        max_new_tokens: int | None = None,
        *,
        cancel: threading.Event | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> list[StepRecord]:
        """Step until a stop condition, ``max_new_tokens`` (default: the sampling settings'), or ``cancel``.

        After "max_tokens" or "cancelled" a new call goes on with the same reply.
        """
        limit = self.sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        if self.stop_reason in CONTINUABLE:
            self.stop_reason = None
        produced: list[StepRecord] = []
        while self.stop_reason is None:
            if cancel is not None and cancel.is_set():
                self.stop_reason = "cancelled"
                break
            if len(produced) >= limit:
                self.stop_reason = "max_tokens"
                break
            record = self.step()
            if record is None:
                break
            produced.append(record)
            if on_step is not None:
                on_step(record)
        return produced

    # ----------------------------------------------------------------- text
    def _piece(self, token_id: int) -> str:
        """A token's text on its own, memoized: top-k lists and the lens ask for the same ids over and over."""
        text = self._pieces.get(token_id)
        if text is None:
            text = token_piece(self._tokenizer, token_id)
            self._pieces[token_id] = text
        return text

    def reply_text(self) -> str:
        """The assistant text being written (or last written), special tokens left out."""
        return self._tokenizer.decode(self.token_ids[self._reply_start :], skip_special_tokens=True)

    def token_text(self, position: int) -> str:
        """The transcript token at ``position``, as stored (``tracer.token_text``; show it with ``visible``)."""
        return self._piece(self.token_ids[position])

    def token_texts(self) -> list[str]:
        """Every transcript token's text, in order."""
        return [self._piece(token_id) for token_id in self.token_ids]

    # ----------------------------------------------------------------- lens
    def lens(self, index: int) -> list[LensLayer]:
        """The logit lens of generated token ``index`` (computed once, then cached on the record)."""
        return self.lens_many([index])[0]

    def lens_many(self, indices: list[int]) -> list[list[LensLayer]]:
        """The lens of several records, computed in batched matrix products (the dump uses this)."""
        with self._lens_lock:
            if self._lens is None:
                return [[] for _ in indices]
            # records restored from a snapshot's trace have no hidden states: only a lens computed before the save
            missing = [i for i in indices if self.records[i].lens is None and self._hidden[i] is not None]
            if missing:
                stream = torch.stack([torch.cat([self._hidden[i].hidden, self._hidden[i].final[None]])
                                      for i in missing])
                chosen = [self.records[i].token_id for i in missing]
                last = stream.shape[1] - 1
                for i, (layers, stats) in zip(missing, self._lens.read(stream, chosen, self.top_k, self._piece)):
                    self.records[i].lens_stats = stats
                    self.records[i].lens = [*layers, LensLayer(last, list(self.records[i].top))]
            return [self.records[i].lens or [] for i in indices]

    def attribution(self, index: int) -> Attribution | None:
        """What each layer added to generated token ``index``'s logit (``tracer.attribution``; computed once,
        then cached on the record); None when the model's final norm is not one the attribution understands, or
        the record was restored without its hidden states."""
        record = self.records[index]
        if record.attribution is None and self._attributor is not None and self._hidden[index] is not None:
            record.attribution = self._attributor.attribute(self._hidden[index], record.token_id)
        return record.attribution

    def step_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Generated token ``index``'s tensors for a notebook (``tracer.tensor_export``): the residual stream,
        the attention kept and the logits, recomputed from the stream entering the final norm."""
        tensors = self._hidden[index]
        if tensors is None:
            raise TracerError(f"token {index} was restored from a snapshot, which keeps no hidden states to export")
        logits = None
        if self._lens is not None and tensors.final is not None:
            with self._lens_lock:
                logits = self._lens.logits(tensors.final[None])[0]
        return tensor_export.step_tensors(self.records[index], tensors, logits, self._lens)

    def compare_lines(self, a: int, b: int) -> LineComparison:
        """Lines ``a`` and ``b`` (-1: the current line, else an index into ``branches``) side by side from
        where they part (``tracer.compare``)."""
        lines = [(self.records, self._hidden) if i == -1 else (self.branches[i].records, self.branches[i].hidden)
                 for i in (a, b)]
        with self._lens_lock:
            return compare.compare(a, b, lines[0], lines[1], self._lens, self._piece)

    # --------------------------------------------------------------- branch
    def _crop(self, keep_tokens: int, keep_records: int) -> None:
        """Go back to the transcript's first ``keep_tokens`` tokens (the last one pending).

        ``keep_records`` must lie in a turn still held; that turn's chat comes back. The engine
        takes back the cache entries and the attention the dropped tokens gave.
        """
        self.engine.crop(keep_tokens - 1, self.token_ids)
        del self.token_ids[keep_tokens:]
        while len(self._turns) > 1 and self._turns[-1].first_record > keep_records:
            self._turns.pop()
        mark = self._turns[-1]
        self.messages = self.messages[: mark.message_count]
        self._rendered = mark.rendered
        self._reply_start = mark.reply_start
        del self.records[keep_records:]
        del self._hidden[keep_records:]
        context = self.token_ids[max(0, self._reply_start - DECODER_CONTEXT) : self._reply_start]
        self._decoder = IncrementalDecoder(self._tokenizer, context)
        for token in self.token_ids[self._reply_start :]:
            self._decoder.push(token)

    def branch(self, index: int, token_id: int) -> StepRecord:
        """Go back to generated token ``index`` and put ``token_id`` there instead; it becomes pending.

        The abandoned line is kept in ``branches`` (switch back with ``switch_branch``).
        """
        if not 0 <= index < len(self.records):
            raise IndexError(f"no generated token {index}")
        old = self.records[index]
        label = f"#{index} {self._piece(old.token_id)!r}"
        self.branches.append(self._current_line(label))
        self._crop(old.position, index)
        self.stop_reason = None
        record = self._advance(forced=token_id)
        assert record is not None  # the position was reachable before
        return record

    def _current_line(self, label: str) -> Branch:
        return Branch(
            records=list(self.records),
            state=self.export_state(),
            label=label,
            hidden=list(self._hidden),
            turns=list(self._turns),
        )

    def switch_branch(self, i: int) -> None:
        """Swap the current line with ``branches[i]``."""
        other = self.branches[i]
        label = f"#{len(self.records)} tokens {self.reply_text()[-24:]!r}"
        self.branches[i] = self._current_line(label)
        self._restore(other.state)
        self.records, self._hidden, self._turns = list(other.records), list(other.hidden), list(other.turns)
        self.stop_reason = other.state.metadata.get("stop_reason")  # the line ended as it did when set aside

    # ------------------------------------------------------- export / import
    def export_state(self) -> KVState:
        """The paused generation (cache, transcript, positions, received attention, chat metadata)."""
        if not self.token_ids:
            raise TracerError("there is nothing to save yet: start a turn first")
        return replace(
            self.engine.state(self.token_ids),
            metadata={
                "messages": [dict(m) for m in self.messages],
                "reply": self.reply_text(),
                "reply_start": self._reply_start,
                "rendered": self._rendered,
                "sampling": self.sampling.to_dict(),
                # where the seeded sampler stands, so a resumed run draws what the uninterrupted one would
                "sampler_state": self._generator.get_state().numpy().tobytes(),
                "stop_reason": self.stop_reason,
                "model": self.loaded.name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                # so ``kvtrace info`` can show the transcript without loading a model
                "token_texts": self.token_texts(),
            },
            trace=trace_codec.encode(self.records, self._turns),
        )

    def import_state(self, state: KVState) -> None:
        """Continue from ``state``; refused (session unchanged) when it was made by another model.

        A state of the very transcript the session holds (this session's own state,
        pruned) keeps the step records, their lens and the branches: only the cache
        changes. Any other state brings back the trace it carries (records and turns;
        a damaged trace is ignored, with a notice), or starts a fresh one.
        """
        check_fingerprint(state.fingerprint, self.loaded.fingerprint)
        try:
            state.validate()
        except ValueError as error:
            raise SnapshotError(f"the KV state is inconsistent: {error}") from error
        same_transcript = state.token_ids == self.token_ids
        self._restore(state)
        if not same_transcript:
            self.records, self._hidden, self.branches = [], [], []
            self._turns = []
            self._restore_trace(state)

    def _restore_trace(self, state: KVState) -> None:
        """The records and turn marks of ``state``'s trace (no hidden states: see ``lens_many``)."""
        trace = None
        if state.trace is not None:
            try:
                trace = trace_codec.decode(state.trace, self.token_ids, self.loaded.fingerprint.vocab_size,
                                           len(self.messages))
            except trace_codec.TraceError as error:
                self._notice(f"{error}; the timeline starts empty")
        if trace is None or not trace.turns:
            self._mark_turn()
            return
        self.records = trace.records
        self._hidden = [None] * len(trace.records)
        self._turns = [TurnMark(*turn) for turn in trace.turns]

    def _restore(self, state: KVState) -> None:
        self.engine.restore(state)
        self.token_ids = list(state.token_ids)
        meta = state.metadata
        self.messages = [dict(m) for m in meta.get("messages", [])]
        self._rendered = meta.get("rendered") or ""
        self._reply_start = min(int(meta.get("reply_start", len(self.token_ids))), len(self.token_ids))
        self._decoder = IncrementalDecoder(self._tokenizer, self.token_ids[-DECODER_CONTEXT:])
        self.stop_reason = None
        self._restore_sampler(meta)

    def _restore_sampler(self, meta: dict) -> None:
        """Put the seeded sampler where the saved run left it, when this session samples with that seed."""
        saved = meta.get("sampling")
        state = meta.get("sampler_state")
        if self.sampling.seed is None or not isinstance(saved, dict) or saved.get("seed") != self.sampling.seed:
            return
        if not isinstance(state, bytes) or len(state) != self._generator.get_state().numel():
            return
        self._generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        self._generator_seed = self.sampling.seed
