"""The ``kvtrace`` command line.

With no sub-command it opens the app (or, with ``--dump``, writes a headless
trace). Sub-commands work on snapshots. Each command lives in its own module,
imported only when chosen, so headless commands never import textual and
``--help`` answers instantly without importing torch.

Every expected failure (bad input, a missing or corrupt file, an unknown model)
is reported as one line on stderr with exit code 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from kvstore.format import CODEC_NAMES, CODECS, DEFAULT_CODEC
from kvstore.pruning import ALIASES, DEFAULT_SINKS, METHODS

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by SIGPIPE

CODEC_HELP = "; ".join(f"{name}: {text}" for name, text in CODECS.items())

EPILOG = """\
commands:
  kvtrace                         open the app on the embedded SmolLM2-135M-Instruct
  kvtrace --dump FILE --prompt T  trace headlessly, JSON Lines to FILE ('-' = stdout)
  kvtrace --print [--prompt T]    trace headlessly and print a readable step table
  kvtrace save|resume|prune|info|import ...   work with KV snapshots;
                                  'kvtrace COMMAND --help' for each
  kvtrace ls|gc|export|rm ...     work with a snapshot store

snapshots: REF is a .kvs file or DIR:NAME, entry NAME of the snapshot store in
folder DIR (split at the last ':'; ':NAME' is the default store,
$XDG_DATA_HOME/kvtrace/store). Writing to DIR:NAME creates the store and
writes only the chunks it does not hold yet. The app saves every turn and
branch there (--no-autosave turns it off).

examples:
  kvtrace --dump trace.jsonl --prompt "Why is the sky blue?" --max-new-tokens 32
  kvtrace save --prompt "Tell me a story." -o story.kvs
  kvtrace resume story.kvs --steps 50
  kvtrace prune story.kvs -o small.kvs --sinks 4 --recent 256
  kvtrace save --prompt "Q1" --steps 64 -o mem:t1
  kvtrace resume mem:t1 --continue "Q2" --steps 64 -o mem:t2
  kvtrace ls mem
"""

REF_HELP = "a .kvs file or DIR:NAME (an entry of the snapshot store in DIR)"


def add_model_options(parser: argparse.ArgumentParser, default_help: str = "the embedded SmolLM2-135M-Instruct"
                      ) -> None:
    """Options that choose and place the model; shared by every command that loads one."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="SPEC",
        default=None,
        help="a local model folder, a .gguf file, or a Hugging Face id already in the local "
        f"cache (default: {default_help})",
    )
    group.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                       help="where to run the model (default: auto)")
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="weight dtype (default: auto: float32 on CPU, bfloat16 on GPU)")
    group.add_argument("--load-in-4bit", action="store_true",
                       help="quantize weights to 4 bits with bitsandbytes (CUDA only; elsewhere a "
                       "notice and the chosen dtype)")


def add_sampling_options(parser: argparse.ArgumentParser, *, resuming: bool = False) -> None:
    """Options of the sampler; greedy unless a temperature above 0 is given.

    Defaults are ``None`` (not given), so ``resume`` can keep a snapshot's own settings for what is not given.
    """
    default = " (default: the snapshot's)" if resuming else ""
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, metavar="T",
                       help=f"0 = greedy{default or ' (default)'}; above 0 samples")
    group.add_argument("--top-p", type=float, metavar="P", help=f"nucleus sampling mass{default or ' (default 1.0)'}")
    group.add_argument("--sample-top-k", type=int, metavar="K",
                       help=f"sample only among the K most likely tokens{default or ' (default 0 = all)'}")
    group.add_argument("--seed", type=int, metavar="N", help=f"seed: the same seed gives the same tokens{default}")
    group.add_argument("--stop", action="append", metavar="TEXT",
                       help=f"stop when the reply ends with TEXT (repeatable){default}")


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_size(text: str) -> int:
    """``8G``, ``512M``, ``1.5G`` or plain bytes (an argparse type)."""
    number, unit = text.strip().upper().rstrip("IB"), ""
    if number and number[-1] in SIZE_UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8G or 512M") from None
    if not 0 < value < 1 << 50:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8G or 512M")
    return int(value)


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                        help="refuse snapshots whose decoded K/V would take more than SIZE (e.g. 16G; default: "
                        "8G or half the machine's memory, whichever is less)")


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one line (``kvtrace: error: ...``) and exit code 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kvtrace: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvtrace",
        description="See what a local language model does at every step and every layer while it "
        "writes; save, prune and restore its KV cache.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)
    add_sampling_options(parser)
    trace = parser.add_argument_group("headless trace")
    trace.add_argument("--dump", metavar="FILE",
                       help="write the trace as JSON Lines to FILE ('-' = stdout) instead of opening the app")
    trace.add_argument("--prompt", metavar="TEXT", help="the user message to answer")
    trace.add_argument("--system", metavar="TEXT", help="an optional system prompt")
    trace.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                       help="generate at most N tokens (default 64)")
    trace.add_argument("--top-k", type=int, default=10, metavar="K",
                       help="candidates recorded per step and per lens layer (default 10)")
    trace.add_argument("--no-lens", action="store_true", help="skip the per-layer logit lens in the dump")
    trace.add_argument("--attribution", action="store_true",
                       help="with --dump: each step also says what each layer (attention, MLP) added to its token's "
                       "logit (direct logit attribution, the final norm's scale frozen: the usual linear "
                       "approximation)")
    trace.add_argument("--tensors", metavar="DIR",
                       help="with --dump: also write each step's tensors (hidden states, attention outputs, logits, "
                       "attention kept) to DIR/step-NNNNN.safetensors with a JSON sidecar, for TransformerLens or "
                       "nnsight")
    trace.add_argument("--print", dest="print_trace", action="store_true",
                       help="trace headlessly and print a readable step table (for logs, pipes and terminals "
                       "where the app can't run); without --prompt a demo prompt is used")
    app = parser.add_argument_group("app")
    app.add_argument("--store", metavar="DIR", default=None,
                     help="the snapshot store the app saves every turn and branch to and lists in its history "
                     "(default: $XDG_DATA_HOME/kvtrace/store)")
    app.add_argument("--no-autosave", action="store_true",
                     help="do not save turns and branches to the store (the history still lists it)")

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    _add_snapshot_commands(commands)
    return parser


def _add_snapshot_commands(commands: argparse._SubParsersAction) -> None:
    save = commands.add_parser("save", help="prefill a prompt and save the KV cache",
                               description="Prefill a prompt (and optionally generate) and save the KV cache.")
    save.add_argument("--prompt", required=True, metavar="TEXT", help="the user message")
    save.add_argument("--system", metavar="TEXT", help="an optional system prompt")
    save.add_argument("-o", "--output", required=True, metavar="REF", help=f"where to save: {REF_HELP}")
    save.add_argument("--codec", default=DEFAULT_CODEC, choices=CODEC_NAMES, metavar="CODEC",
                      help=f"payload codec (default {DEFAULT_CODEC}): {CODEC_HELP}")
    save.add_argument("--steps", type=int, default=0, metavar="N", help="generate N tokens before saving (default 0)")
    save.add_argument("--label", default="", help="a free label stored in the snapshot")
    add_model_options(save)
    add_sampling_options(save)

    resume = commands.add_parser("resume", help="load a snapshot and continue generating",
                                 description="Load a snapshot into its model and continue exactly where it stopped.")
    resume.add_argument("file", metavar="REF", help=f"snapshot to resume: {REF_HELP}")
    resume.add_argument("--continue", dest="continue_text", metavar="TEXT",
                        help="add a user message before continuing")
    resume.add_argument("--steps", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    resume.add_argument("--dump", metavar="FILE", help="also write the trace as JSON Lines ('-' = stdout)")
    resume.add_argument("--top-k", type=int, default=10, metavar="K", help="candidates per step (default 10)")
    resume.add_argument("-o", "--output", metavar="REF",
                        help="save the state after resuming to REF (in the same store, REF shares its chunks)")
    add_memory_option(resume)
    add_model_options(resume)
    add_sampling_options(resume, resuming=True)

    prune = commands.add_parser(
        "prune", help="shrink a snapshot's KV cache", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Drop cache entries; original positions are kept, so resuming continues at the true next "
        "position. --preview shows what each method at --budget would do to the next token, writing nothing.",
        epilog="methods (--method NAME --budget N):\n" + "\n".join(
            textwrap.fill(f"{name}: {method.keeps}", width=100, initial_indent="  ", subsequent_indent="      ")
            for name, method in METHODS.items()) + "\n  'attention' is heavy_hitters")
    prune.add_argument("file", metavar="REF", help=f"snapshot to prune: {REF_HELP}")
    prune.add_argument("-o", "--output", metavar="OUT", help="pruned snapshot to write (a REF; not with --preview)")
    prune.add_argument("--keep-last", type=int, metavar="N", help="keep the last N entries")
    prune.add_argument("--sinks", type=int, metavar="S", help="keep the first S entries (attention sinks; "
                       f"with --method: default {DEFAULT_SINKS})")
    prune.add_argument("--recent", type=int, metavar="N", help="with --sinks: also keep the last N entries")
    prune.add_argument("--method", choices=[*METHODS, *ALIASES], metavar="METHOD",
                       help="keep BUDGET entries (per KV head for the head_ methods) with METHOD: see below")
    prune.add_argument("--budget", type=int, metavar="N", help="with --method: entries to keep")
    prune.add_argument("--window", type=int, metavar="W", help="queries head_window and head_expected observe "
                       "(default: BUDGET)")
    prune.add_argument("--preview", action="store_true",
                       help="print, for every method at --budget, the next token's KL to the full cache, whether "
                       "the top-1 stays and the top 5; runs the model, writes nothing")
    prune.add_argument("--drop-span", nargs=2, type=int, metavar=("START", "END"),
                       help="drop the entries at original positions START..END-1 (e.g. one chat turn)")
    prune.add_argument("--codec", choices=CODEC_NAMES, metavar="CODEC",
                       help=f"codec of the output (default: the input's): {', '.join(CODEC_NAMES)}")
    add_memory_option(prune)
    add_model_options(prune, default_help="the snapshot's model")

    info = commands.add_parser("info", help="check and describe a snapshot",
                               description="Check every record's checksum, then show the snapshot's header, model, "
                               "tokens as text, codec and sizes; a damaged file is one error line and exit code 2.")
    info.add_argument("file", metavar="REF", help=f"snapshot to describe: {REF_HELP}")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    checks = info.add_mutually_exclusive_group()
    checks.add_argument("--header", action="store_true", help="read the header only (fast; checks no payload)")
    checks.add_argument("--deep", action="store_true", help="also decompress every payload and check its size")

    legacy = commands.add_parser("import", help="convert a KV cache saved the old way",
                                 description="Convert a tuple of (K, V) per layer saved with torch.save "
                                 "(read with weights_only=True) into a .kvs snapshot.")
    legacy.add_argument("file", metavar="LEGACY", help="the old file (torch.save, or pickle with --allow-pickle)")
    legacy.add_argument("-o", "--output", required=True, metavar="REF", help="snapshot to write (a REF)")
    legacy.add_argument("--tokens", metavar="FILE",
                        help="the token ids the cache was built from, as a JSON list (required unless the "
                        "legacy file carries them)")
    legacy.add_argument("--allow-pickle", action="store_true",
                        help="also read pickle / gzip-pickle files; WARNING: this executes code from the file")
    add_model_options(legacy)
    _add_store_commands(commands)


def _add_store_commands(commands: argparse._SubParsersAction) -> None:
    store_help = "the store's folder (default: $XDG_DATA_HOME/kvtrace/store)"
    ls = commands.add_parser("ls", help="list a snapshot store's entries",
                             description="List the entries of a snapshot store, newest first: tokens, the bytes only "
                             "the entry uses and those it shares with others, its parent entry, age and label.")
    ls.add_argument("store", metavar="DIR", nargs="?", help=store_help)
    gc = commands.add_parser("gc", help="delete the chunks no entry of a store uses",
                             description="Delete the chunks and trace blocks no entry uses, and temporaries of "
                             "killed saves; waits for saves in progress, which wait for it.")
    gc.add_argument("store", metavar="DIR", nargs="?", help=store_help)
    export = commands.add_parser("export", help="copy a store entry into a single .kvs file",
                                 description="Copy a snapshot (a store entry DIR:NAME, usually) into one portable "
                                 "file.")
    export.add_argument("ref", metavar="REF", help=f"the snapshot to copy: {REF_HELP}")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write (.kvs), or a REF")
    export.add_argument("--codec", choices=CODEC_NAMES, metavar="CODEC",
                        help=f"codec of the copy (default: the snapshot's): {', '.join(CODEC_NAMES)}")
    rm = commands.add_parser("rm", help="remove store entries",
                             description="Remove entries from their store; 'kvtrace gc DIR' then frees the chunks "
                             "no other entry uses.")
    rm.add_argument("refs", metavar="DIR:NAME", nargs="+", help="the entries to remove")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already reported in one line
        return int(done.code or 0)
    from tracer.errors import UserError  # light: no torch

    try:
        if args.command is None and args.dump is None and (args.attribution or args.tensors is not None):
            from tracer.errors import SettingsError

            raise SettingsError("--attribution and --tensors go with --dump FILE")
        if args.command is not None:
            from tui_app.commands.snapshot import run_snapshot_command

            return run_snapshot_command(args)
        if args.dump is not None:
            from tui_app.commands.trace import run_dump

            return run_dump(args)
        if args.print_trace:
            from tui_app.commands.trace import run_print

            return run_print(args)
        from tui_app.commands.app import run_app

        return run_app(args)
    except UserError as error:
        print(f"kvtrace: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvtrace: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``kvtrace --dump - | head``): not an error worth a message. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
