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
from tracer.records import Candidate, LensLayer, LensStats

# Where architectures keep their final norm, on the base model (Llama, Qwen2, Mistral, Gemma, Phi-3: norm;
# GPT-2: ln_f; GPT-NeoX: final_layer_norm; Phi-1/2: final_layernorm).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
ROWS_PER_BATCH = 256  # lens rows per matrix product: bounds memory at a few times rows x vocab floats


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
    def logits(self, hidden: torch.Tensor, *, softcap: bool = True) -> torch.Tensor:
        """Lens logits of intermediate hidden states (``(..., hidden)`` -> ``(..., vocab)``); without
        ``softcap``, before the final logit softcap of models that have one."""
        logits = self.head(self.norm(hidden.to(self.norm_device)).to(self.head_device)).float()
        if self.softcap and softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def read(self, stream: torch.Tensor, chosen: list[int], k: int,
             text_of: Callable[[int], str]) -> list[tuple[list[LensLayer], LensStats]]:
        """For ``(steps, layers, hidden)`` states, the intermediate layers' then the stream entering the final
        norm, per step: the top-k of every layer but the last (whose top-k is the step's own), and the
        whole-vocabulary numbers of every layer against the final distribution and the ``chosen`` token.

        Steps go in batches of about ``ROWS_PER_BATCH`` rows, to bound memory at rows x vocab floats.
        """
        steps, layers, _ = stream.shape
        per_batch = max(1, ROWS_PER_BATCH // layers)
        out: list[tuple[list[LensLayer], LensStats]] = []
        for start in range(0, steps, per_batch):
            logits = self.logits(stream[start : start + per_batch])  # (s, layers, vocab)
            log_probs = torch.log_softmax(logits, dim=-1)
            probs = log_probs.exp()
            entropy = -(probs * log_probs).nan_to_num().sum(-1)
            final = log_probs[:, -1:]
            kl = (final.exp() * (final - log_probs)).nan_to_num().sum(-1)
            ids = torch.tensor(chosen[start : start + per_batch], device=logits.device)[:, None, None]
            chosen_logit = logits.gather(-1, ids.expand(-1, layers, 1))
            rank = (logits > chosen_logit).sum(-1)
            chosen_prob = probs.gather(-1, ids.expand(-1, layers, 1))[..., 0]
            # the top logits are the top probabilities: k of them per intermediate layer
            values, top_ids = torch.topk(log_probs[:, :-1], min(k, logits.shape[-1]), dim=-1)
            for s, (p, i) in enumerate(zip(values.exp().tolist(), top_ids.tolist())):
                tops = [LensLayer(layer, [Candidate(t, text_of(t), q) for q, t in zip(p[layer], i[layer])])
                        for layer in range(layers - 1)]
                out.append((tops, LensStats(entropy[s].cpu().numpy(), kl[s].cpu().numpy(),
                                            chosen_prob[s].cpu().numpy(), rank[s].cpu().numpy())))
        return out
