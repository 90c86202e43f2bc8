"""The residual stream at a decode step's fed position: what the lens, the attribution and the export read.

transformers' ``hidden_states`` give the stream before the first layer and
after every layer but the last, whose output it only returns through the
final norm. Two cheap forward hooks fill the gaps at the one fed position:
what each layer's attention block added to the stream (the attention
module's output, or for Gemma-style layers its post-attention norm's), and
the stream entering the final norm. A few hidden-size vectors a step, kept
per record like the hidden states; nothing in the computation changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from tracer.lens import find_final_norm


@dataclass(frozen=True)
class StepTensors:
    """One decode step's residual stream at the fed position (detached, on the final norm's device)."""

    hidden: torch.Tensor  # (layers - 1, d): the stream after each layer but the last (what the lens reads)
    embedded: torch.Tensor | None = None  # (d,): the stream before the first layer (embedding, + position)
    final: torch.Tensor | None = None  # (d,): the stream entering the final norm (after the last layer)
    attention: torch.Tensor | None = None  # (layers, d): what each attention block added (None: not exposed)

    @property
    def complete(self) -> bool:
        """Whether every layer's input and output is known (what the attribution needs)."""
        return self.embedded is not None and self.final is not None

    def stream(self) -> torch.Tensor:
        """``(layers + 1, d)``: the stream before the first layer, after each layer, and entering the final norm."""
        assert self.embedded is not None and self.final is not None
        return torch.cat([self.embedded[None], self.hidden, self.final[None]])


def _attention_outputs(model: PreTrainedModel, num_layers: int) -> list[nn.Module] | None:
    """Per layer, the module whose output the layer adds to the stream for its attention; None when some
    layer's attention module is not found (the attribution then gives whole layers)."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        index = getattr(module, "layer_idx", None)
        if not (isinstance(index, int) and 0 <= index < num_layers and type(module).__name__.endswith("Attention")):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        # Gemma 2/3 normalize the attention's output before adding it: the norm's output is what is added
        post = getattr(parent, "post_attention_layernorm", None)
        found[index] = post if post is not None and hasattr(parent, "pre_feedforward_layernorm") else module
    return [found[i] for i in range(num_layers)] if len(found) == num_layers else None


class ResidualTaps:
    """The hooks of one model: attention outputs and the final norm's input, at the last fed position."""

    def __init__(self, model: PreTrainedModel, num_layers: int, device: torch.device) -> None:
        self.device = device
        self._attention = _attention_outputs(model, num_layers)
        self._norm = find_final_norm(model)
        self.attention: list[torch.Tensor | None] = []
        self.final: torch.Tensor | None = None

    def _last(self, value: object) -> torch.Tensor:
        tensor = value[0] if isinstance(value, tuple) else value
        return tensor[0, -1].detach().to(self.device)

    @contextmanager
    def tapping(self) -> Iterator[ResidualTaps]:
        """The hooks in place for one forward; what they saw stays readable afterwards."""
        self.attention = [None] * len(self._attention or [])
        self.final = None
        handles = []
        for i, module in enumerate(self._attention or []):
            handles.append(module.register_forward_hook(
                lambda _m, _args, output, i=i: self.attention.__setitem__(i, self._last(output))))
        if self._norm is not None:
            handles.append(self._norm.register_forward_pre_hook(
                lambda _m, args: setattr(self, "final", self._last(args[0]))))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def tensors(self, hidden_states: tuple[torch.Tensor, ...]) -> StepTensors:
        """The step's tensors from the forward's ``hidden_states`` and what the hooks saw."""
        hidden = torch.stack([h[0, -1].to(self.device) for h in hidden_states[1:-1]]).detach()
        attention = None
        if self.attention and all(a is not None for a in self.attention):
            attention = torch.stack(self.attention)  # type: ignore[arg-type]
        return StepTensors(hidden=hidden, embedded=self._last(hidden_states[0]), final=self.final,
                           attention=attention)
