"""Headless traces: ``kvtrace --dump`` writes JSON Lines, ``kvtrace --print`` a readable rich table.

Never imports textual (a test checks it): scripts get a trace without a UI stack.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tracer.errors import SettingsError, TracerError

DEMO_PROMPT = "Why is the sky blue? Answer in two sentences."
DEMO_TOKENS = 48


def sampling_from_args(args: argparse.Namespace):
    """The sampler settings of the shared command-line options (checked: one clear line on bad values)."""
    from tracer.sampling import SamplingSettings

    settings = SamplingSettings(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.sample_top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        max_new_tokens=getattr(args, "max_new_tokens", 64),
    )
    settings.validate()
    return settings


def load_from_args(args: argparse.Namespace):
    """Load the model the shared options name, reporting progress on stderr."""
    from tracer.loading import load_model, quiet_transformers

    quiet_transformers()
    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        progress=lambda message: print(f"kvtrace: {message}", file=sys.stderr, flush=True),
    )


@contextmanager
def output_stream(target: str) -> Iterator[TextIO]:
    """stdout for ``-``; otherwise a temporary file renamed over ``target`` only once complete."""
    if target == "-":
        yield sys.stdout
        return
    path = Path(target)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    except OSError as error:
        raise TracerError(f"cannot write the trace to {target}: {error.strerror}") from error
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            yield out
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def run_dump(args: argparse.Namespace) -> int:
    """Trace one prompt and write JSON Lines to ``args.dump``."""
    if not args.prompt:
        raise SettingsError("--dump needs the prompt to answer: add --prompt TEXT")
    if args.top_k < 1:
        raise SettingsError("--top-k must be at least 1")
    settings = sampling_from_args(args)
    from tracer.dump import TraceWriter
    from tracer.session import TraceSession

    with output_stream(args.dump) as out:  # opened first: a bad path fails before the model loads
        loaded = load_from_args(args)
        session = TraceSession(loaded, settings, top_k=args.top_k)
        session.start_turn(args.prompt, system=args.system)
        writer = TraceWriter(session, out, with_lens=not args.no_lens)
        writer.header()
        session.generate(on_step=writer.step)
        writer.end()
    for notice in session.notices:
        print(f"kvtrace: note: {notice}", file=sys.stderr)
    return 0


def run_print(args: argparse.Namespace) -> int:
    """``--print``: trace ``--prompt`` (or a demo prompt) and show it with rich, for where the app can't run."""
    from rich.console import Console

    from tracer.render import trace_view
    from tracer.session import TraceSession

    console = Console()
    prompt = args.prompt or DEMO_PROMPT
    settings = sampling_from_args(args)
    if args.max_new_tokens == 64 and not args.prompt:
        settings.max_new_tokens = DEMO_TOKENS
    with console.status("Loading the model…"):
        loaded = load_from_args(args)
    session = TraceSession(loaded, settings, top_k=args.top_k)
    session.start_turn(prompt, system=args.system)
    with console.status("Generating…") as status:
        session.generate(on_step=lambda r: status.update(f"Generating… {r.index + 1} tokens: {session.reply_text()[-60:]!r}"))
    console.print(trace_view(session, prompt, console.width))
    return 0
