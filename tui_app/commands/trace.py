"""Headless traces: ``kvtrace --dump`` writes JSON Lines, ``kvtrace --print`` a readable rich table.

Both run on the same session runner as the app, without a UI; never imports
textual (a test checks it): scripts get a trace without a UI stack.
"""

from __future__ import annotations

import argparse

from tracer.errors import SettingsError
from tui_app.commands.options import model_choice, sampling, say, trace_options

DEMO_PROMPT = "Why is the sky blue? Answer in two sentences."
DEMO_TOKENS = 48


def run_dump(args: argparse.Namespace) -> int:
    """Trace one prompt and write JSON Lines to ``args.dump`` (and each step's tensors to ``args.tensors``)."""
    from tracer import usecases

    if not args.prompt:
        raise SettingsError("--dump needs the prompt to answer: add --prompt TEXT")
    if args.tensors is not None:  # a folder that cannot be written fails before the model loads
        usecases.tensors_folder(args.tensors)
    settings, options, choice = sampling(args, args.max_new_tokens), trace_options(args), model_choice(args)
    from tracer.dump import TraceWriter
    from tracer.runner import SessionRunner

    with usecases.trace_output(args.dump) as out:  # a bad path fails before the model loads
        runner = SessionRunner.headless(lambda progress: usecases.open_session(choice, settings, options, progress),
                                        say)

        def trace(session) -> list[str]:
            session.start_turn(args.prompt, system=args.system)
            writer = TraceWriter(session, out, with_lens=not args.no_lens, with_attribution=args.attribution,
                                 tensors=args.tensors)
            writer.header()
            session.generate(on_step=writer.step)
            writer.end()
            return list(session.notices)

        with runner:
            notices = runner.call(trace).result()
    for notice in notices:
        say(f"note: {notice}")
    return 0


def run_print(args: argparse.Namespace) -> int:
    """``--print``: trace ``--prompt`` (or a demo prompt) and show it with rich, for where the app can't run."""
    from rich.console import Console

    from tracer import usecases
    from tracer.render import trace_view
    from tracer.runner import SessionRunner

    console = Console()
    prompt = args.prompt or DEMO_PROMPT
    tokens = DEMO_TOKENS if args.max_new_tokens == 64 and not args.prompt else args.max_new_tokens
    settings, options, choice = sampling(args, tokens), trace_options(args), model_choice(args)
    with console.status("Loading the model…") as status:
        runner = SessionRunner.headless(lambda progress: usecases.open_session(choice, settings, options, progress),
                                        lambda text: status.update(f"Loading: {text}"))

    def trace(session):
        session.start_turn(prompt, system=args.system)
        with console.status("Generating…") as status:
            session.generate(on_step=lambda r: status.update(
                f"Generating… {r.index + 1} tokens: {session.reply_text()[-60:]!r}"))
        return trace_view(session, prompt, console.width)

    with runner:
        view = runner.call(trace).result()
    console.print(view)
    return 0
