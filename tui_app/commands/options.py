"""Command-line flags turned into the use-case layer's arguments: one place per kind of flag."""

from __future__ import annotations

import argparse
import sys
from typing import Any

SAMPLING_FLAGS = {"temperature": "temperature", "top_p": "top_p", "sample_top_k": "top_k", "seed": "seed",
                  "stop": "stop"}  # flag dest -> SamplingSettings field


def say(message: str) -> None:
    """A progress or notice line on stderr (stdout is for results)."""
    print(f"kvtrace: {message}", file=sys.stderr, flush=True)


def model_choice(args: argparse.Namespace):
    from tracer.usecases import ModelChoice

    return ModelChoice(args.model, args.device, args.dtype, args.load_in_4bit)


def sampling_given(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the user gave (``SamplingSettings`` field -> value); absent flags are left out."""
    from tracer.sampling import SamplingSettings

    given = {field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    SamplingSettings(**given)  # checked now: a bad value is one line before anything is read or loaded
    return given


def sampling(args: argparse.Namespace, max_new_tokens: int):
    """Sampler settings from the flags (checked: a bad value is one line before anything loads)."""
    from tracer.sampling import SamplingSettings

    return SamplingSettings(**sampling_given(args), max_new_tokens=max_new_tokens)


def trace_options(args: argparse.Namespace):
    from tracer.usecases import TraceOptions

    return TraceOptions(top_k=getattr(args, "top_k", 10))


def check_count(option: str, value: int) -> None:
    from tracer.errors import SettingsError

    if value < 0:
        raise SettingsError(f"{option} must be zero or more, not {value}")
