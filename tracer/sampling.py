"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from tracer.errors import SettingsError


@dataclass
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings
    max_new_tokens: int = 64

    def validate(self) -> None:
        """Refuse values the sampler cannot use, with one clear line."""
        if self.temperature < 0:
            raise SettingsError(f"temperature must be 0 (greedy) or above, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SettingsError(f"top-p must be above 0 and at most 1, not {self.top_p}")
        if self.top_k < 0:
            raise SettingsError(f"sampling top-k must be 0 (off) or above, not {self.top_k}")
        if self.max_new_tokens < 0:
            raise SettingsError(f"max new tokens must be 0 or above, not {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingSettings:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            known["stop"] = tuple(known["stop"])
        return cls(**known)


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
