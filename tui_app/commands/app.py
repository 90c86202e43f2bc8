"""``kvtrace`` with no sub-command: open the app; the model loads inside it, with progress shown."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def session_loader(args: argparse.Namespace) -> Callable[[Callable[[str], None]], Any]:
    """A function the app calls in a worker thread to load the model and open a tracer session.

    The sampling options are checked here, before the app opens, so a bad value is one line on stderr.
    """
    from tui_app.commands.trace import sampling_from_args

    sampling = sampling_from_args(args)

    def load(progress: Callable[[str], None]) -> Any:
        from tracer.loading import load_model, quiet_transformers
        from tracer.session import TraceSession

        quiet_transformers()
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                            progress=progress)
        return TraceSession(loaded, sampling, top_k=args.top_k)

    return load


def run_app(args: argparse.Namespace) -> int:
    from tui_app.app import KvtraceApp

    app = KvtraceApp(loader=session_loader(args), system=args.system, prompt=args.prompt or "")
    app.run()
    if app.load_error is not None:
        print(f"kvtrace: error: {app.load_error}", file=sys.stderr)
        return 2
    return 0
