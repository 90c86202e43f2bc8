"""A small deterministic stand-in for ``tracer.session.TraceSession`` (the contract's API).

The app's Pilot tests drive every key flow against it in milliseconds, without
a model. It keeps a real (tiny) ``KVState`` so snapshots and pruning go through
the real kvstore code, and ``step_delay`` makes generation slow enough to test
cancelling and responsiveness.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from kvstore.errors import FingerprintMismatch
from kvstore.state import KVState, ModelFingerprint
from tracer.errors import PromptError
from tracer.sampling import SamplingSettings
from tracer.compare import LayerAtBranch, LineComparison, PairedStep, aligned
from tracer.lines import divergence
from tracer.records import (AttentionEvidence, Attribution, Candidate, LensLayer, LensStats, StepRecord,
                            TopEntries)

VOCAB = ["<eos>", "Hello", " world", ",", " the", " cat", " sat", " on", " mat", ".", "\n", " a",
         " dog", " ran", " far", " away", " and", " then", " it", " slept"]
EOS = 0
LAYERS = 4
KV_HEADS = 2
HEADS = 3  # query heads per layer in the attention evidence
HEAD_DIM = 4


def fake_fingerprint(model_id: str = "fake-model") -> ModelFingerprint:
    return ModelFingerprint(model_id=model_id, architecture="FakeForCausalLM", num_layers=LAYERS,
                            num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="float32",
                            vocab_size=len(VOCAB))


@dataclass
class FakeBranch:
    records: list[StepRecord]
    state: KVState
    label: str = ""


def _distribution(position: int, previous: int) -> list[float]:
    """A fixed, peaked distribution over VOCAB for a (position, previous token) pair."""
    favourite = 1 + (previous * 7 + position * 3) % (len(VOCAB) - 1)
    logits = [-abs(i - favourite) * (0.6 + 0.1 * (position % 3)) for i in range(len(VOCAB))]
    logits[EOS] = -8.0
    peak = max(logits)
    weights = [math.exp(x - peak) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


@dataclass
class FakeSession:
    step_delay: float = 0.0
    top_k: int = 5
    model_id: str = "fake-model"
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_new_tokens=8))

    def __post_init__(self) -> None:
        self.loaded = SimpleNamespace(name="fake-model", device=torch.device("cpu"), dtype=torch.float32,
                                      fingerprint=fake_fingerprint(self.model_id), context_limit=256,
                                      model=None, tokenizer=None)
        self.messages: list[dict[str, str]] = []
        self.records: list[StepRecord] = []
        self.token_ids: list[int] = []
        self.positions: list[int] = []
        self.stop_reason: str | None = None
        self.attention_available = True
        self.lens_supported = True
        self.notices: list[str] = []
        self.branches: list[FakeBranch] = []
        self.lens_calls = 0
        self._turn_start = 0

    # -- the contract's properties ------------------------------------------------------------
    @property
    def context_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def kv_bytes(self) -> int:
        return 2 * LAYERS * KV_HEADS * len(self.positions) * HEAD_DIM * 4

    @property
    def attention_scores(self) -> list[float]:
        return [1.0 / (1 + p) for p in self.positions]

    # -- turns and steps -------------------------------------------------------------------------
    def start_turn(self, user_text: str, system: str | None = None) -> None:
        if not user_text.strip():
            raise PromptError("The prompt is empty: type a message first.")
        words = user_text.split()
        if len(self.token_ids) + len(words) + 2 > self.loaded.context_limit:
            raise PromptError(f"The prompt needs {len(words) + 2} more tokens than the context window holds.")
        if self.token_ids and self.records and self.reply_text():
            self.messages.append({"role": "assistant", "content": self.reply_text()})
        if system and not self.messages:
            self.messages.append({"role": "system", "content": system})
        self.messages.append({"role": "user", "content": user_text})
        ids = [1 + sum(map(ord, w)) % (len(VOCAB) - 1) for w in words]
        # The previously pending token (if any) and the prompt go into the cache; the last is pending.
        first_new = len(self.token_ids) - 1 if self.token_ids else 0
        self.token_ids.extend(ids)
        self.positions = self.positions + list(range(first_new, len(self.token_ids) - 1))
        self._turn_start = len(self.records)
        self.stop_reason = None

    def step(self) -> StepRecord | None:
        if self.stop_reason in ("eos", "context_full") or not self.token_ids:
            return None
        if self.step_delay:
            time.sleep(self.step_delay)
        position = len(self.token_ids)
        probs = _distribution(position, self.token_ids[-1])
        order = sorted(range(len(VOCAB)), key=lambda i: -probs[i])
        chosen = order[0]
        if len(self.records) - self._turn_start >= 40:
            chosen = EOS
        cached = self.positions + [position - 1]
        raw = [1.0 / (1 + (position - 1 - p)) + (0.5 if p == 0 else 0.0) for p in cached]
        total = sum(raw)
        mean = [r / total for r in raw]
        per_layer = [sorted(((p, w * (1 + 0.1 * layer)) for p, w in zip(cached, mean)),
                            key=lambda pw: -pw[1])[:5] for layer in range(LAYERS)]
        # head h of layer l looks hardest at the h-th strongest entry of the layer, then at the rest
        per_head = [[[row[h % len(row)], *(pair for j, pair in enumerate(row) if j != h % len(row))]
                     for h in range(HEADS)] for row in per_layer]
        record = StepRecord(
            index=len(self.records), position=position, token_id=chosen, text=VOCAB[chosen],
            prob=probs[chosen], logprob=math.log(probs[chosen]),
            entropy=-sum(p * math.log(p) for p in probs if p > 0),
            top=[Candidate(i, VOCAB[i], probs[i]) for i in order[: self.top_k]],
            attention=AttentionEvidence(positions=cached, mean=mean, per_layer=per_layer,
                                        per_head=TopEntries(
                                            [[[p for p, _ in head] for head in layer] for layer in per_head],
                                            [[[w for _, w in head] for head in layer] for layer in per_head])),
        )
        self.positions = cached
        self.token_ids.append(chosen)
        self.records.append(record)
        if chosen == EOS:
            self.stop_reason = "eos"
        return record

    def generate(self, max_new_tokens: int | None = None, *, cancel: threading.Event | None = None,
                 on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
        limit = self.sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        out: list[StepRecord] = []
        self.stop_reason = None
        while len(out) < limit:
            if cancel is not None and cancel.is_set():
                self.stop_reason = "cancelled"
                return out
            record = self.step()
            if record is None:
                return out
            out.append(record)
            if on_step is not None:
                on_step(record)
            if self.stop_reason == "eos":
                return out
        self.stop_reason = "max_tokens"
        return out

    def reply_text(self) -> str:
        return "".join(r.text for r in self.records[self._turn_start:] if r.token_id != EOS)

    def token_text(self, position: int) -> str:
        return VOCAB[self.token_ids[position]]

    def token_texts(self) -> list[str]:
        return [VOCAB[t] for t in self.token_ids]

    def lens_many(self, indices: list[int]) -> list[list[LensLayer]]:
        return [self.lens(i) for i in indices]

    def lens(self, index: int) -> list[LensLayer]:
        record = self.records[index]
        if record.lens is None:
            self.lens_calls += 1
            layers = []
            for layer in range(LAYERS):
                top = list(record.top) if layer >= LAYERS // 2 else list(reversed(record.top))
                layers.append(LensLayer(layer=layer, top=top[:3]))
            record.lens_stats = LensStats(
                entropy=[record.entropy * (1 + (LAYERS - 1 - layer) / LAYERS) for layer in range(LAYERS)],
                kl=[(LAYERS - 1 - layer) * 0.5 for layer in range(LAYERS)],
                chosen_prob=[record.prob * (layer + 1) / LAYERS for layer in range(LAYERS)],
                chosen_rank=[0 if layer >= LAYERS // 2 else len(record.top) - 1 for layer in range(LAYERS)])
            record.lens = layers
        return record.lens

    def attribution(self, index: int) -> Attribution | None:
        """Each layer adds a fixed share of the chosen token's log-probability (attention a third of it)."""
        record = self.records[index]
        if record.attribution is None:
            layers = [(layer + 1) * 0.5 * (-1) ** (layer + index) for layer in range(LAYERS)]
            record.attribution = Attribution(
                token_id=record.token_id, embedding=0.25, layers=layers, attention=[x / 3 for x in layers],
                bias=0.0, total=0.25 + sum(layers), error=0.0)
        return record.attribution

    def step_tensors(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        return {"hidden_states": torch.full((LAYERS + 1, HEAD_DIM), float(record.position)),
                "logits": torch.tensor(_distribution(record.position, self.token_ids[record.position - 1])).log()}

    def compare_lines(self, a: int, b: int) -> LineComparison:
        """As the real session, with the fake's exact distributions (token under the other line's prefix)."""
        lines = [self.records if i == -1 else self.branches[i].records for i in (a, b)]
        ra, rb = lines
        start = divergence(ra, rb)
        indices = aligned(ra, rb, start)

        def prob(records: list[StepRecord], i: int, token: int) -> float:
            previous = records[i - 1].token_id if i and records[i - 1].position == records[i].position - 1 else 1
            return _distribution(records[i].position, previous)[token]

        steps = tuple(PairedStep(i, ra[i].position, ra[i].token_id, VOCAB[ra[i].token_id], ra[i].prob,
                                 prob(rb, i, ra[i].token_id), rb[i].token_id, VOCAB[rb[i].token_id], rb[i].prob,
                                 prob(ra, i, rb[i].token_id)) for i in indices)
        layers = tuple(LayerAtBranch(layer, steps[0].a_prob * (layer + 1) / LAYERS,
                                     steps[0].b_prob * (layer + 1) / LAYERS, VOCAB[ra[start].token_id])
                       for layer in range(LAYERS)) if steps and steps[0].index == start else ()
        after = start + 1 < len(ra) and start + 1 < len(rb)
        return LineComparison(a, b, len(ra), len(rb), start, "".join(r.text for r in ra[:start])[-80:], steps,
                              layers, tuple(VOCAB[ra[start + 1].token_id] for _ in range(LAYERS)) if after else (),
                              tuple(VOCAB[rb[start + 1].token_id] for _ in range(LAYERS)) if after else ())

    # -- branching ------------------------------------------------------------------------------
    def branch(self, index: int, token_id: int) -> StepRecord:
        old = self.records[index]
        self.branches.append(FakeBranch(records=list(self.records), state=self.export_state(),
                                        label=f"from token {index}"))
        keep = old.position
        self.records = self.records[:index]
        self.token_ids = self.token_ids[:keep] + [token_id]
        self.positions = [p for p in self.positions if p < keep]
        top = [c for c in old.top if c.token_id == token_id]
        prob = top[0].prob if top else 0.0
        record = StepRecord(index=index, position=old.position, token_id=token_id, text=VOCAB[token_id],
                            prob=prob, logprob=math.log(prob) if prob else -math.inf, entropy=old.entropy,
                            top=old.top, attention=old.attention, forced=True)
        self.records.append(record)
        self.stop_reason = None
        return record

    def switch_branch(self, i: int) -> None:
        other = self.branches[i]
        self.branches[i] = FakeBranch(records=list(self.records), state=self.export_state(),
                                      label=other.label)
        self.records = list(other.records)
        self.token_ids = list(other.state.token_ids)
        self.positions = list(other.state.positions)
        self.stop_reason = other.state.metadata.get("stop_reason")

    # -- state ----------------------------------------------------------------------------------
    def export_state(self) -> KVState:
        n = len(self.positions)
        keys = [torch.arange(KV_HEADS * n * HEAD_DIM, dtype=torch.float32).reshape(KV_HEADS, n, HEAD_DIM)
                + layer for layer in range(LAYERS)]
        values = [k * 0.5 for k in keys]
        return KVState(keys=keys, values=values, token_ids=list(self.token_ids), positions=list(self.positions),
                       fingerprint=self.loaded.fingerprint, attention_scores=self.attention_scores,
                       metadata={"messages": list(self.messages), "reply": self.reply_text(),
                                 "stop_reason": self.stop_reason})

    def import_state(self, state: KVState) -> None:
        differences = self.loaded.fingerprint.differences(state.fingerprint)
        if differences:
            raise FingerprintMismatch("The snapshot was made by another model: " + "; ".join(differences))
        same_transcript = state.token_ids == self.token_ids  # as the real session: only the cache changes
        self.token_ids = list(state.token_ids)
        self.positions = list(state.positions)
        self.messages = list(state.metadata.get("messages", []))
        if not same_transcript:
            self.records, self.branches = [], []
            self._turn_start = 0
        self.stop_reason = None
