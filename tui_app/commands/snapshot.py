"""``kvtrace save | resume | prune | info | import``: thin adapters from flags to ``tracer.usecases``.

Every snapshot argument is a reference: a ``.kvs`` file or ``DIR:NAME``, an
entry of a snapshot store (``tracer.references``); ``ls``, ``gc``, ``export``
and ``rm`` work on stores (``tui_app.commands.store``).

Every argument is checked before a model is loaded (a typo costs no load
time); every expected failure is a ``SnapshotError`` or ``TracerError`` that
the CLI prints as one line with exit code 2; results go to stdout, progress to
stderr.
"""

from __future__ import annotations

import argparse
import json

from kvstore.errors import PruneError
from tui_app.commands.options import check_count, model_choice, sampling, sampling_given, say, trace_options


def run_snapshot_command(args: argparse.Namespace) -> int:
    from tui_app.commands import store

    handler = {"save": _save, "resume": _resume, "prune": _prune, "info": _info, "import": _import,
               **store.HANDLERS}
    return handler[args.command](args)


def _save(args: argparse.Namespace) -> int:
    from tracer import usecases
    from tracer.runner import SessionRunner

    check_count("--steps", args.steps)
    settings, choice = sampling(args, max(args.steps, 1)), model_choice(args)
    usecases.check_output(args.output)
    runner = SessionRunner.headless(
        lambda progress: usecases.open_session(choice, settings, usecases.TraceOptions(), progress), say)

    def save(session) -> tuple[usecases.Saved, str]:
        session.start_turn(args.prompt, system=args.system)
        if args.steps:
            session.generate(args.steps)
        return usecases.save(session, args.output, args.codec, args.label), session.reply_text()

    with runner:
        saved, reply = runner.call(save).result()
    say(saved.describe())
    if args.steps:
        print(reply)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from tracer import usecases
    from tracer.dump import write_trace
    from tracer.runner import SessionRunner

    check_count("--steps", args.steps)
    request = usecases.ResumeRequest(args.file, model_choice(args), sampling_given(args), args.steps,
                                     args.continue_text, trace_options(args), args.max_memory)
    if args.output:
        usecases.check_output(args.output)
    if args.dump and args.dump != "-":
        usecases.output_target(args.dump)
    runner = SessionRunner.headless(lambda progress: usecases.resume(request, progress), say)

    def go_on(session) -> str:
        next_position, entries = len(session.token_ids) - 1, len(session.positions)
        generated = session.generate(args.steps)
        message = (f"resumed at position {next_position} from {entries} cached entries; {len(generated)} "
                   f"tokens generated ({session.stop_reason or 'paused'})")
        if args.dump:
            with usecases.trace_output(args.dump) as out:
                write_trace(session, out)
        if args.output:
            codec = usecases.read_info(args.file).codec
            message += "\n" + "kvtrace: " + usecases.save(session, args.output, codec, parent=args.file).describe()
        print(session.reply_text())
        return message

    with runner:
        say(runner.call(go_on).result())
    return 0


def prune_spec(args: argparse.Namespace):
    """The ``PruneSpec`` the flags describe (the app's dialog builds the same object)."""
    from kvstore.pruning import ALIASES, PruneSpec

    chosen = [name for name, given in (("--keep-last", args.keep_last is not None),
                                       ("--method", args.method is not None)) if given]
    if args.recent is not None and args.method is None:
        chosen.append("--sinks/--recent")
    if len(chosen) > 1:
        raise PruneError(f"choose one pruning method, not {' and '.join(chosen)}")
    span = tuple(args.drop_span) if args.drop_span is not None else None
    if args.keep_last is not None:
        return PruneSpec("keep_last", budget=args.keep_last, span=span)
    if args.recent is not None and args.method is None:
        if args.sinks is None:
            raise PruneError("--recent goes with --sinks (e.g. --sinks 4 --recent 256)")
        return PruneSpec("sinks_recent", budget=args.sinks + args.recent, sinks=args.sinks, recent=args.recent,
                         span=span)
    if args.method is not None:
        if args.budget is None:
            raise PruneError(f"--method {args.method} needs --budget N (the entries to keep)")
        extra = {} if args.sinks is None else {"sinks": args.sinks}
        return PruneSpec(ALIASES.get(args.method, args.method), budget=args.budget, recent=args.recent, span=span,
                         window=args.window, **extra)
    if args.sinks is not None:
        raise PruneError("--sinks goes with --recent N or --method METHOD --budget N")
    if span is None:
        raise PruneError("nothing to prune: give --method METHOD --budget N, --keep-last N, --sinks S --recent N, "
                         "or --drop-span START END")
    return PruneSpec(None, span=span)


def _prune(args: argparse.Namespace) -> int:
    from tracer import usecases
    from tui_app.snapshot_info import ranges

    if args.preview:
        return _prune_preview(args)
    spec = prune_spec(args)
    if args.output is None:
        raise PruneError("give -o OUT, the pruned snapshot to write (or --preview to only look)")
    usecases.check_output(args.output)
    info = usecases.read_info(args.file)
    loaded = _snapshot_model(args, info) if spec.runs_model else None
    state = usecases.read_state(args.file, max_bytes=args.max_memory)
    result = usecases.prune_state(state, spec, loaded)
    saved = usecases.save_state(result.state, args.output, args.codec or info.codec, parent=args.file)
    print(f"before: {info.cache_length} entries, {info.file_bytes:,} bytes ({info.codec})")
    shared = "" if saved.shared is None else f" new, {saved.shared:,} shared"
    per_head = " per KV head" if result.state.per_head else ""
    entries = max(result.state.layer_length(layer) for layer in range(result.state.num_layers))
    print(f"after:  {entries} entries{per_head}, {saved.written:,} bytes{shared} ({saved.codec}) -> {args.output}")
    print(f"resumes at position {result.state.next_position} (kept positions {ranges(result.state.positions)})")
    return 0


def _prune_preview(args: argparse.Namespace) -> int:
    """``kvtrace prune REF --budget N --preview``: one table, every method, nothing written."""
    from tracer import usecases
    from kvstore.pruning import DEFAULT_SINKS
    from tracer.prune_preview import preview
    from tui_app.prune_table import preview_lines

    if args.budget is None:
        raise PruneError("--preview needs --budget N (the entries each method keeps)")
    if args.output is not None or args.keep_last is not None or args.recent is not None:
        raise PruneError("--preview compares every method at --budget and writes nothing: drop -o, --keep-last "
                         "and --recent")
    if args.budget < 1:
        raise PruneError(f"--budget must be at least 1, not {args.budget}")
    info = usecases.read_info(args.file)
    loaded = _snapshot_model(args, info)
    state = usecases.read_state(args.file, max_bytes=args.max_memory)
    sinks = DEFAULT_SINKS if args.sinks is None else args.sinks
    result = preview(loaded, state, args.budget, sinks=sinks,
                     span=tuple(args.drop_span) if args.drop_span is not None else None)
    print("\n".join(preview_lines(result, state.cache_length)))
    return 0


def _snapshot_model(args: argparse.Namespace, info):
    """The model the snapshot was made with (or ``--model``), loaded and checked against it."""
    from tracer import usecases
    from tui_app.commands.options import model_choice

    plan = usecases.model_for_snapshot(info, args.model)
    say(f"loading {plan.reason}")
    choice = model_choice(args)
    loaded = usecases.load(usecases.ModelChoice(plan.spec, choice.device, choice.dtype, choice.load_in_4bit), say)
    differences = loaded.fingerprint.differences(info.fingerprint)
    if differences:
        raise PruneError(f"{args.file} was made by another model: {differences[0]}")
    return loaded


def _info(args: argparse.Namespace) -> int:
    from kvstore.errors import SnapshotError
    from tracer.usecases import model_for_snapshot, read_info, verify
    from tui_app.snapshot_info import lines, summary

    info = read_info(args.file)
    checked = "header only" if args.header else verify(args.file, deep=args.deep)
    try:
        resume_model = model_for_snapshot(info, None).reason
    except SnapshotError as error:
        resume_model = f"nothing by itself: {error}"
    if args.json:
        print(json.dumps({**summary(info, resume_model), "checked": checked}, ensure_ascii=False, indent=2))
    else:
        print("\n".join(lines(info, resume_model=resume_model, checked=checked)))
    return 0


def _import(args: argparse.Namespace) -> int:
    from tracer import usecases

    if args.allow_pickle:
        say(f"warning: --allow-pickle unpickles {args.file}, which executes any code it contains; use it only on "
            "files you trust")
    saved = usecases.import_legacy(args.file, args.output, model_choice(args), tokens_file=args.tokens,
                                   allow_pickle=args.allow_pickle, progress=say)
    say(saved.describe())
    return 0
