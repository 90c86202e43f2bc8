"""Capture attention from inside the model's own attention call, without changing what it computes.

transformers' attention modules look their kernel up by name
(``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``).
For each kernel kvtrace supports it registers a capturing function under
``kvtrace_<kernel>`` (and the kernel's mask builder under the same name, so the
model builds the very masks the kernel expects): it calls the kernel for the
output, then hands the kernel's inputs to the recorder of the forward in
progress. ``implementation`` selects it for one forward and puts the model's
own name back afterwards, so ``model.generate`` and other users of the model
never see it.

The recorder travels in a context variable, set for the duration of the
forward: nothing is left behind between forwards or sessions, and a forward
in another thread sees its own recorder (or none). One forward at a time per
model: the implementation name lives on the model's config.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PREFIX = "kvtrace_"
SUPPORTED = ("sdpa", "eager")  # kernels whose masks and arguments the capture understands


class Recorder(Protocol):
    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, *,
                scaling: float, softcap: float | None, window: int | None) -> None: ...

    def failed(self, error: Exception) -> None: ...


_RECORDER: ContextVar[Recorder | None] = ContextVar("kvtrace_attention_recorder", default=None)


def base_implementation(model: PreTrainedModel) -> str:
    """The kernel the model is configured with (its own name, even while a capture is under way)."""
    return str(model.config._attn_implementation).removeprefix(PREFIX)


def supports(model: PreTrainedModel) -> bool:
    """Whether the model's kernel is one the capture can wrap."""
    return base_implementation(model) in SUPPORTED


def _kernel(base: str, module: torch.nn.Module) -> Callable:
    if base == "eager":  # "eager" is each modeling file's own function, not a registered one
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise RuntimeError(f"{type(module).__name__} has no module-level eager_attention_forward")
        return function
    return ALL_ATTENTION_FUNCTIONS[base]


def _capturing(base: str) -> Callable:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
        output = _kernel(base, module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        recorder = _RECORDER.get()
        if recorder is not None:
            try:
                recorder.observe(
                    module.layer_idx, query.detach(), key.detach(), attention_mask,
                    scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
                    softcap=kwargs.get("softcap"), window=kwargs.get("sliding_window"),
                )
            except Exception as error:  # never break the model's forward: the layer goes unreported
                recorder.failed(error)
        return output

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def registered_name(base: str) -> str:
    """Register the capturing function for ``base`` (once) and return its name."""
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capturing(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def model_configs(model: PreTrainedModel) -> list[PretrainedConfig]:
    """Every config object the model's modules read their attention implementation from."""
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def implementation(configs: list[PretrainedConfig], name: str) -> Iterator[None]:
    """Run the enclosed forward with attention implementation ``name``; the model's own one after."""
    saved = [config._attn_implementation_internal for config in configs]
    for config in configs:
        config._attn_implementation_internal = name
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config._attn_implementation_internal = value


@contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Hand the enclosed forward's attention calls to ``recorder``."""
    token = _RECORDER.set(recorder)
    try:
        yield
    finally:
        _RECORDER.reset(token)
