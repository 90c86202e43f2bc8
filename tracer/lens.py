"""The logit lens: what each layer would predict if the model stopped there.

Each intermediate layer's hidden state at the predicted position goes through
the model's final norm and output head. The last layer needs no lens of its
own: its prediction *is* the model's output distribution, which the step has
already computed. (transformers' last ``hidden_states`` entry has already been
through the final norm, so normalizing it again, as a peer tool does, makes the
last layer disagree with the model; taking the step's own distribution avoids
the question altogether.)

In a model split across devices the final norm and the head may sit on other
devices than the last layer: the lens moves the hidden states to each in turn.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from tracer.loading import module_device
from tracer.records import Candidate, LensLayer

# Where architectures keep their final norm, on the base model (Llama, Qwen2, Mistral, Gemma, Phi-3: norm;
# GPT-2: ln_f; GPT-NeoX: final_layer_norm; Phi-1/2: final_layernorm).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
ROWS_PER_BATCH = 512  # lens rows per matrix product: bounds memory at rows x vocab floats


def settling_layer(layers: list[LensLayer], token_id: int) -> int | None:
    """The first layer from which ``token_id`` is top-1 in every later layer (None: never): where the model
    made up its mind."""
    settled = None
    for layer in reversed(layers):
        if not layer.top or layer.top[0].token_id != token_id:
            break
        settled = layer.layer
    return settled


def find_final_norm(model: PreTrainedModel) -> nn.Module | None:
    base = model.base_model
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


class LogitLens:
    """The final norm and output head of one model, applied to stacks of intermediate hidden states."""

    def __init__(self, norm: nn.Module, head: nn.Module, softcap: float | None,
                 devices: tuple[torch.device, torch.device]):
        self.norm = norm
        self.head = head
        self.softcap = softcap
        self.norm_device, self.head_device = devices  # where each computes (a split model may differ)

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> LogitLens | None:
        norm, head = find_final_norm(model), model.get_output_embeddings()
        if norm is None or head is None:
            return None
        config = model.config.get_text_config(decoder=True)
        devices = (module_device(model, norm), module_device(model, head))
        return cls(norm, head, getattr(config, "final_logit_softcapping", None), devices)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Lens logits of intermediate hidden states (``(..., hidden)`` -> ``(..., vocab)``)."""
        logits = self.head(self.norm(hidden.to(self.norm_device)).to(self.head_device)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def top(self, hidden: torch.Tensor, k: int, text_of: Callable[[int], str]) -> list[list[LensLayer]]:
        """Top-k per layer for ``(steps, layers, hidden)`` states, in row batches to bound memory."""
        steps, layers, width = hidden.shape
        flat = hidden.reshape(steps * layers, width)
        tops: list[tuple[list[float], list[int]]] = []
        for start in range(0, flat.shape[0], ROWS_PER_BATCH):
            logits = self.logits(flat[start : start + ROWS_PER_BATCH])
            # the top logits are the top probabilities: normalize k of them, not the whole vocabulary
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
