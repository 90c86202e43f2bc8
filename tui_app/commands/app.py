"""``kvtrace`` with no sub-command: open the app; the model loads inside it, with progress shown."""

from __future__ import annotations

import argparse
import sys

from tui_app.commands.options import model_choice, sampling, trace_options


def session_opener(args: argparse.Namespace):
    """What the app's runner calls in its worker to open the session (flags are checked here, before the app opens)."""
    from tracer import usecases

    choice, settings, options = model_choice(args), sampling(args, args.max_new_tokens), trace_options(args)
    return lambda progress: usecases.open_session(choice, settings, options, progress)


def run_app(args: argparse.Namespace) -> int:
    from tracer.usecases import store_folder
    from tui_app.app import KvtraceApp

    app = KvtraceApp(opener=session_opener(args), system=args.system, prompt=args.prompt or "",
                     store=str(store_folder(args.store)), autosave=not args.no_autosave)
    app.run()
    if app.load_error is not None:
        print(f"kvtrace: error: {app.load_error}", file=sys.stderr)
        return 2
    if app.view is not None and app.view.autosaved:
        print(f"kvtrace: the session is saved as {app.view.autosaved} ('kvtrace resume {app.view.autosaved}', or h "
              "in the app)", file=sys.stderr)
    return 0
