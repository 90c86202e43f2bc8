"""The forward engine: the model's forward passes over a KV cache it owns, fed at original positions.

This is the part of a trace session that tests and benchmarks need on their
own (prefill a transcript, step one token, restore a saved state): it knows
the model, the cache, where each entry of each layer sits in the transcript
and the attention it received (``tracer.cache_layout``), nothing about chat
turns, records or branches (``tracer.session`` builds those on it).

Every forward gets the *original* positions of what it feeds, so after pruning
(gaps in ``positions``) generation continues at the true next position, for
rotary and absolute-position models alike.

Attention is captured without changing the computation: the model runs its
own kernel through ``tracer.attention_hook``, and the statistics are computed
beside it (``tracer.attention_weights``). A model whose attention does not go
through transformers' attention interface falls back, with one notice, to
eager attention returning its weights (``output_attentions``), prefilled in
chunks small enough to hold them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kvstore.state import KVState
from tracer import attention_hook, capture, kv_adapter
from tracer.cache_layout import CacheLayout
from tracer.capture import ForwardCapture
from tracer.lens import find_final_norm
from tracer.loading import LoadedModel, module_device
from tracer.records import AttentionEvidence
from tracer.residual import ResidualTaps, StepTensors

CAPTURE_BYTES = {"cpu": 4 << 20}  # scores one prefill chunk may hold: cache-sized on CPU ...
ACCELERATOR_CAPTURE_BYTES = 256 << 20  # ... larger on accelerators, where launches cost more than memory
EAGER_PREFILL_BYTES = 64 << 20  # attention weights one prefill chunk may return in the eager fallback


@dataclass
class Decoded:
    """What one decode step (query length 1) yields."""

    logits: torch.Tensor  # (vocab,) float32
    tensors: StepTensors  # the residual stream at the fed position (the lens, attribution and export read it)
    attention: AttentionEvidence | None  # the new query's attention, per layer and head


class Engine:
    """A model plus the KV cache it is building, where each cache entry sits, and the attention it received."""

    def __init__(self, loaded: LoadedModel, *, capture_attention: bool = True,
                 notice: Callable[[str], None] = lambda text: None) -> None:
        self.loaded = loaded
        self._model = loaded.model
        self._config = loaded.model.config
        self._notice = notice
        text = self._config.get_text_config(decoder=True)
        self.num_layers = loaded.fingerprint.num_layers
        self.heads = text.num_attention_heads
        self.kv_heads = loaded.fingerprint.num_kv_heads
        self._forward_kwargs = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self._model.forward).parameters else {}
        )
        self._configs = attention_hook.model_configs(self._model)
        self._devices = kv_adapter.attention_devices(self._model, self.num_layers, loaded.device)
        norm = find_final_norm(self._model)  # the lens reads the hidden states there
        hidden_device = loaded.device if norm is None else module_device(self._model, norm)
        self._taps = ResidualTaps(self._model, self.num_layers, hidden_device)  # read at decode steps only
        self._budget = CAPTURE_BYTES.get(loaded.device.type, ACCELERATOR_CAPTURE_BYTES)
        self.reset()
        self.mode = self._initial_mode() if capture_attention else None  # "hook", "eager" or None

    def reset(self) -> None:
        """An empty cache."""
        self._cache = kv_adapter.empty_cache(self._config)
        windows = kv_adapter.layer_windows(self._cache)
        self.layout = CacheLayout.empty(windows, self._devices, self.heads, self.kv_heads)
        self.next_position = 0  # where the next fed token sits

    @property
    def attention_available(self) -> bool:
        return self.mode is not None

    @property
    def positions(self) -> list[int]:
        """Original position of every cache entry, the union over layers and heads (the engine's own list)."""
        return self.layout.positions

    @property
    def kv_bytes(self) -> int:
        return kv_adapter.cache_nbytes(self._cache)

    # -------------------------------------------------------------- capture
    def _initial_mode(self) -> str:
        """The capture to start with: in place ("hook") when the model's kernel is one it wraps, else "eager"."""
        if attention_hook.supports(self._model):
            return "hook"
        self._notice(f"{self.loaded.name}: its '{attention_hook.base_implementation(self._model)}' attention "
                     "cannot be traced in place; tracing with eager attention instead (slower, may round differently)")
        return "eager"

    def _degrade(self, recorder: ForwardCapture) -> None:
        """A forward's capture came back incomplete: hook -> eager fallback -> no attention, one notice each."""
        if self.mode == "hook":
            reason = f" ({recorder.error})" if recorder.error else ""
            self._notice(f"{self.loaded.name}: its attention does not go through transformers' attention "
                         f"interface{reason}; tracing with eager attention instead (slower, may round differently)")
            self.mode = "eager"
        else:
            self._notice(f"{self.loaded.name} returned no attention weights; tracing without attention")
            self.mode = None

    @contextlib.contextmanager
    def _capturing(self, recorder: attention_hook.Recorder | None) -> Iterator[dict]:
        """The forward's extra arguments, with the capture in place when ``recorder`` is given."""
        if recorder is None:
            yield {}
        elif self.mode == "hook":
            name = attention_hook.registered_name(attention_hook.base_implementation(self._model))
            with attention_hook.implementation(self._configs, name), attention_hook.recording(recorder):
                yield {}
        else:
            with attention_hook.implementation(self._configs, "eager"):
                yield {"output_attentions": True}

    # -------------------------------------------------------------- forward
    def _forward(self, ids: list[int], positions: list[int], recorder: attention_hook.Recorder | None, *,
                 hidden: bool = False, all_logits: bool = False):
        """Feed ``ids`` at original ``positions`` on top of the cache (not settled: ``take_back`` can undo it).

        Only the last position's logits are computed unless ``all_logits``.
        """
        device = self.loaded.device
        with torch.no_grad(), self._capturing(recorder) as extra:
            output = self._model(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.tensor([positions], device=device),
                past_key_values=self._cache,
                use_cache=True,
                output_hidden_states=hidden,
                **extra,
                **({} if all_logits else self._forward_kwargs),
            )
        if recorder is not None and self.mode == "eager":
            for layer, weights in enumerate(output.attentions or ()):
                if weights is not None:
                    recorder.observe_weights(layer, weights, self.kv_heads)
        return output

    def _feed(self, ids: list[int], positions: list[int], *, hidden: bool = False):
        """Feed into the engine's cache: the output and, at a decode step with attention, the rows per group;
        ``None`` when the capture failed (the forward is taken back and the capture degraded: feed again)."""
        recorder = ForwardCapture(self.num_layers, self._budget) if self.attention_available else None
        output = self._forward(ids, positions, recorder, hidden=hidden)
        if recorder is not None and not recorder.complete:
            kv_adapter.take_back(self._cache, len(ids))
            self._degrade(recorder)
            return None
        kv_adapter.settle(self._cache)
        rows = self.layout.extend(positions, kv_adapter.layer_lengths(self._cache), recorder)
        self.next_position = positions[-1] + 1
        return output, rows

    def prefill(self, ids: list[int], first_position: int) -> None:
        """Feed a prompt at positions ``first_position..``."""
        self._prefill(ids, list(range(first_position, first_position + len(ids))))

    def _prefill(self, ids: list[int], positions: list[int]) -> None:
        """Feed ``ids`` at ``positions``; in the eager fallback in chunks small enough to return their weights."""
        start = 0
        while start < len(ids):
            count = len(ids) - start
            if self.mode == "eager":
                per_query = self.num_layers * self.heads * (len(self.positions) + count) * 4
                count = min(count, max(16, EAGER_PREFILL_BYTES // per_query))
            if self._feed(ids[start : start + count], positions[start : start + count]) is not None:
                start += count

    def decode(self, token: int, position: int) -> Decoded:
        """Feed one token at ``position``; its logits, hidden states and attention evidence."""
        seen = self.layout.log.seen(self.positions, position)
        fed = None
        while fed is None:
            with self._taps.tapping():
                fed = self._feed([token], [position], hidden=True)
        output, rows = fed
        attention = capture.evidence(rows, seen, self.num_layers) if rows else None
        return Decoded(logits=output.logits[0, -1].float(), tensors=self._taps.tensors(output.hidden_states),
                       attention=attention)

    # ---------------------------------------------------------------- state
    def crop(self, before: int, token_ids: list[int]) -> None:
        """Go back to where position ``before`` was the next to feed: drop every later entry and the attention
        the dropped queries gave. ``token_ids``: the transcript, at least up to the last fed token.

        Layers that can drop their last entries do (and the dropped tokens are replayed, capture only,
        to take back the attention they gave). A sliding layer that has already evicted entries it needs
        again cannot, nor can heads that per-head pruning left with different counts before ``before``:
        then the kept transcript (held or evicted, not pruned) is prefilled anew.
        """
        replay = list(range(before, self.next_position))
        keep = self.layout.keep_counts(before) if kv_adapter.croppable(self._cache) else None
        if keep is None:
            kept = self.layout.replay_positions(before)
            self.reset()
            if kept:
                self._prefill([token_ids[p] for p in kept], kept)
            self.next_position = before
            return
        self.layout.truncate(before)
        kv_adapter.crop_layers(self._cache, keep)
        self.next_position = before
        if replay and self.attention_available:
            recorder = ForwardCapture(self.num_layers, self._budget)
            self._forward([token_ids[p] for p in replay], replay, recorder)
            kv_adapter.take_back(self._cache, len(replay))
            if recorder.complete:
                self.layout.remove_received(recorder)

    def state(self, token_ids: list[int]) -> KVState:
        """The cache as a ``KVState`` of transcript ``token_ids`` (detached CPU copies), with the positions each
        layer and head holds and, when attention is traced, the attention every entry received."""
        fingerprint = self.loaded.fingerprint
        keys, values = kv_adapter.cache_tensors(self._cache, fingerprint.num_kv_heads, fingerprint.head_dim,
                                                self.loaded.dtype)
        held = self.layout.layer_positions()
        traced = self.attention_available
        return KVState(
            keys=keys,
            values=values,
            token_ids=list(token_ids),
            positions=list(self.positions),
            fingerprint=fingerprint,
            attention_scores=self.layout.attention_scores() if traced else None,
            head_positions=held if any(p is not None for p in held) else None,
            head_scores=self.layout.head_scores() if traced else None,
        )

    def restore(self, state: KVState) -> None:
        """Rebuild the cache from ``state``, each layer on its attention module's device, with its positions
        per layer and head and the attention its entries received."""
        self._cache = kv_adapter.cache_from_tensors(
            state.keys, state.values, self._config, self._devices, self.loaded.dtype, state.cache_length
        )
        windows = kv_adapter.layer_windows(self._cache)
        self.layout = CacheLayout.from_state(state, windows, self._devices, self.heads)
        self.next_position = state.next_position

    def observe(self, ids: list[int], positions: list[int], recorder: attention_hook.Recorder) -> bool:
        """Feed ``ids`` at ``positions`` with ``recorder`` given every layer's attention inputs, then take the
        forward back (the cache is left as it was). False when attention cannot be captured in place."""
        if self.mode != "hook":
            return False
        self._forward(ids, positions, recorder)
        kv_adapter.take_back(self._cache, len(ids))
        return True

    def logits_after(self, ids: list[int], first_position: int) -> torch.Tensor:
        """Logits at every fed position, ``(len(ids), vocab)``: teacher forcing over the cache (left as it was)."""
        positions = list(range(first_position, first_position + len(ids)))
        output = self._forward(ids, positions, None, all_logits=True)
        kv_adapter.take_back(self._cache, len(ids))
        return output.logits[0].float()
