"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from tracer.errors import SettingsError


MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen; checked when built, so a session never holds settings it cannot use."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        """Refuse values the sampler cannot use (NaN included), with one clear line."""
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:  # also false for NaN
            raise SettingsError(f"temperature must be 0 (greedy) to {MAX_TEMPERATURE:g}, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SettingsError(f"top-p must be above 0 and at most 1, not {self.top_p}")
        if self.top_k < 0:
            raise SettingsError(f"sampling top-k must be 0 (off) or above, not {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SettingsError(f"the seed must be 0 to 2**63-1, not {self.seed}")
        if self.max_new_tokens < 0:
            raise SettingsError(f"max new tokens must be 0 or above, not {self.max_new_tokens}")
        if not all(isinstance(s, str) for s in self.stop):
            raise SettingsError("stop strings must be text")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> SamplingSettings:
        """Settings saved in a snapshot; fields of the wrong type or out of range are left at their defaults."""
        settings = cls()
        if not isinstance(data, dict):
            return settings
        for f in fields(cls):
            value = data.get(f.name)
            if f.name == "stop" and isinstance(value, list):
                value = tuple(value)
            if value is None or isinstance(value, bool) or not _fits(f.name, value):
                continue
            try:
                settings = replace(settings, **{f.name: value})
            except SettingsError:
                continue
        return settings

    def overridden(self, **changes: Any) -> SamplingSettings:
        """These settings with the given fields replaced (``None`` values mean "not given", left as they are)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _fits(name: str, value: Any) -> bool:
    if name in ("temperature", "top_p"):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if name == "stop":
        return isinstance(value, tuple)
    return isinstance(value, int)


def make_generator(seed: int | None) -> torch.Generator:
    """A private random stream: the same seed gives the same tokens, whatever else uses torch's RNG."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def choose_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """Pick the next token id from a 1-D float tensor of logits."""
    if settings.greedy:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(scores, min(settings.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token once the mass before it reaches top_p (the most likely token always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= settings.top_p
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
