"""The forward engine: the model's forward passes over a KV cache it owns, fed at original positions.

This is the part of a trace session that tests and benchmarks need on their
own (prefill a transcript, step one token, restore a saved state): it knows
the model, the cache and the original position of every cache entry, nothing
about chat turns, records or branches (``tracer.session`` builds those on it).

Every forward gets the *original* positions of what it feeds, so after pruning
(gaps in ``positions``) generation continues at the true next position, for
rotary and absolute-position models alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.state import KVState
from tracer import capture, kv_adapter
from tracer.loading import LoadedModel

PREFILL_ATTENTION_BYTES = 64 << 20  # attention weights one prefill chunk may hold while capturing


@dataclass
class Decoded:
    """What one decode step (query length 1) yields."""

    logits: torch.Tensor  # (vocab,) float32
    hidden: torch.Tensor  # (layers - 1, hidden): intermediate layers' states at the fed position
    attention: torch.Tensor | None  # (layers, entries): the new query's attention per layer, mean over heads


class Engine:
    """A model plus the KV cache it is building, and where each cache entry sits in the transcript."""

    def __init__(self, loaded: LoadedModel, *, capture_attention: bool = True,
                 notice: Callable[[str], None] = lambda text: None) -> None:
        self.loaded = loaded
        self._model = loaded.model
        self._config = loaded.model.config
        self._notice = notice
        self._forward_kwargs = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self._model.forward).parameters else {}
        )
        self.attention_available = capture_attention and self._switch_to_eager()
        self.reset()

    def reset(self) -> None:
        """An empty cache."""
        self._cache = kv_adapter.empty_cache(self._config)
        self.positions: list[int] = []  # original position of every cache entry
        self.received = torch.zeros(0, dtype=torch.float64)  # attention received per cache entry

    def _switch_to_eager(self) -> bool:
        """Attention weights need the eager implementation (sdpa silently returns none)."""
        if self._config._attn_implementation == "eager":
            return True
        try:
            self._model.set_attn_implementation("eager")
        except Exception:  # models without an eager path: trace without attention
            pass
        if self._config._attn_implementation != "eager":
            self._notice(f"{self.loaded.name} cannot return attention weights; tracing without attention")
            return False
        return True

    @property
    def kv_bytes(self) -> int:
        return kv_adapter.cache_nbytes(self._cache)

    # -------------------------------------------------------------- forward
    def _forward(self, ids: list[int], first_position: int, *, attention: bool, hidden: bool,
                 all_logits: bool = False):
        """Feed ``ids`` at original positions ``first_position..`` on top of the cache.

        Only the last position's logits are computed unless ``all_logits``.
        """
        device = self.loaded.device
        count = len(ids)
        if attention and self._config._attn_implementation != "eager":  # someone else switched the shared model
            self._model.set_attn_implementation("eager")
        with torch.no_grad():
            output = self._model(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.arange(first_position, first_position + count, device=device).unsqueeze(0),
                attention_mask=torch.ones(1, len(self.positions) + count, dtype=torch.long, device=device),
                past_key_values=self._cache,
                use_cache=True,
                output_attentions=attention,
                output_hidden_states=hidden,
                **({} if all_logits else self._forward_kwargs),
            )
        self._cache = output.past_key_values
        self.positions.extend(range(first_position, first_position + count))
        self.received = torch.cat([self.received, torch.zeros(count, dtype=torch.float64)])
        return output

    def prefill(self, ids: list[int], first_position: int) -> None:
        """Feed a prompt; with attention on, in chunks small enough to keep their weights."""
        if not ids:
            return
        if not self.attention_available:
            self._forward(ids, first_position, attention=False, hidden=False)
            return
        config = self._config.get_text_config(decoder=True)
        per_query = config.num_hidden_layers * config.num_attention_heads * (len(self.positions) + len(ids)) * 4
        chunk = max(16, PREFILL_ATTENTION_BYTES // per_query)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            output = self._forward(part, first_position + start, attention=True, hidden=False)
            if not self._attentions_ok(output):
                self._forward(ids[start + chunk :], first_position + start + chunk, attention=False, hidden=False)
                return
            received = capture.received_by_prompt(output.attentions)
            self.received[: received.numel()] += received.double()

    def decode(self, token: int, position: int) -> Decoded:
        """Feed one token at ``position``; its logits, hidden states and attention row per layer."""
        output = self._forward([token], position, attention=self.attention_available, hidden=True)
        rows = None
        if self.attention_available and self._attentions_ok(output):
            rows = capture.layer_rows(output.attentions)
            self.received += rows.mean(dim=0).double()
        # intermediate layers only: the last layer's lens is the step's own distribution
        hidden = torch.stack([h[0, -1] for h in output.hidden_states[1:-1]]).detach()
        return Decoded(logits=output.logits[0, -1].float(), hidden=hidden, attention=rows)

    def _attentions_ok(self, output) -> bool:
        attentions = getattr(output, "attentions", None)
        if attentions and all(a is not None for a in attentions):
            return True
        self.attention_available = False
        self._notice(f"{self.loaded.name} returned no attention weights; tracing without attention")
        return False

    # ---------------------------------------------------------------- state
    def crop(self, keep_entries: int, received: torch.Tensor) -> None:
        """Keep the first ``keep_entries`` cache entries, with ``received`` as their attention received."""
        kv_adapter.crop_cache(self._cache, keep_entries)
        del self.positions[keep_entries:]
        self.received = received

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer K and V as detached CPU copies (``KVState`` layout)."""
        fingerprint = self.loaded.fingerprint
        return kv_adapter.cache_tensors(
            self._cache, fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim, self.loaded.dtype
        )

    def restore(self, state: KVState) -> None:
        """Rebuild the cache from ``state`` (its positions and attention received come along)."""
        self._cache = kv_adapter.cache_from_tensors(
            state.keys, state.values, self._config, self.loaded.device, self.loaded.dtype
        )
        self.positions = list(state.positions)
        scores = state.attention_scores or [0.0] * len(state.positions)
        self.received = torch.tensor(scores, dtype=torch.float64)

    def logits_after(self, ids: list[int], first_position: int) -> torch.Tensor:
        """Logits at every fed position, ``(len(ids), vocab)``: teacher forcing over the cache."""
        output = self._forward(ids, first_position, attention=False, hidden=False, all_logits=True)
        return output.logits[0].float()
