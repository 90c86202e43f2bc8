"""The logit lens: what each layer would predict if the model stopped there.

Each layer's hidden state at the predicted position goes through the model's
final norm and output head. transformers' last ``hidden_states`` entry has
already been through the final norm, so it goes through the head only: normalizing
it twice is the classic bug that makes the last layer disagree with the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from tracer.records import Candidate, LensLayer

# Where architectures keep their final norm, on the base model (Llama, Qwen2, Mistral, Gemma, Phi-3: norm;
# GPT-2: ln_f; GPT-NeoX: final_layer_norm; Phi-1/2: final_layernorm).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
ROWS_PER_BATCH = 256  # lens rows per matrix product: bounds memory at rows x vocab floats


def find_final_norm(model: PreTrainedModel) -> nn.Module | None:
    base = model.base_model
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


class LogitLens:
    """The final norm and output head of one model, applied to stacks of per-layer hidden states."""

    def __init__(self, norm: nn.Module, head: nn.Module, softcap: float | None = None):
        self.norm = norm
        self.head = head
        self.softcap = softcap
        self.last_is_normed = True  # transformers' convention; checked against real logits by ``calibrate``

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> LogitLens | None:
        norm, head = find_final_norm(model), model.get_output_embeddings()
        if norm is None or head is None:
            return None
        config = model.config.get_text_config(decoder=True)
        return cls(norm, head, getattr(config, "final_logit_softcapping", None))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def calibrate(self, last_hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Decide from one real step whether the last layer's state is already normalized.

        Some models record the pre-norm state instead; whichever reading
        reproduces the model's own logits is the right one.
        """
        as_is = (self._logits(last_hidden) - logits.float()).abs().max()
        normed = (self._logits(self.norm(last_hidden)) - logits.float()).abs().max()
        self.last_is_normed = bool(as_is <= normed)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden``: ``(steps, layers, hidden)`` -> ``(steps, layers, vocab)`` lens logits."""
        normed = self.norm(hidden)
        if self.last_is_normed:
            normed[:, -1] = hidden[:, -1]
        return self._logits(normed)

    @torch.no_grad()
    def top(self, hidden: torch.Tensor, k: int, text_of: Callable[[int], str]) -> list[list[LensLayer]]:
        """Top-k per layer for each of ``steps`` stacked hidden states, in row batches to bound memory."""
        steps, layers, width = hidden.shape
        flat = hidden.reshape(steps * layers, width)
        tops: list[tuple[list[float], list[int]]] = []
        rows_per_batch = max(layers, ROWS_PER_BATCH // layers * layers)
        for start in range(0, flat.shape[0], rows_per_batch):
            chunk = flat[start : start + rows_per_batch].reshape(-1, layers, width)
            logits = self.logits(chunk)
            logits = logits.reshape(-1, logits.shape[-1])
            values, ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
            probs = (values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
            tops.extend(zip(probs.tolist(), ids.tolist()))
        return [
            [
                LensLayer(layer, [Candidate(i, text_of(i), p) for p, i in zip(*tops[step * layers + layer])])
                for layer in range(layers)
            ]
            for step in range(steps)
        ]
