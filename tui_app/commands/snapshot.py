"""``kvtrace save | resume | prune | info | import``: KV snapshots from the command line.

Every argument is checked before a model is loaded (a typo costs no load
time), every expected failure is a ``SnapshotError`` or ``TracerError`` that
the CLI prints as one line with exit code 2, and every file is written
atomically, so a failure never leaves a half-written snapshot or dump.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kvstore import pruning, snapshot
from kvstore.atomic import atomic_writer
from kvstore.errors import PruneError, SnapshotError
from kvstore.state import KVState


def run_snapshot_command(args: argparse.Namespace) -> int:
    handler = {"save": _save, "resume": _resume, "prune": _prune, "info": _info, "import": _import}
    return handler[args.command](args)


# ---------------------------------------------------------------- save


def _save(args: argparse.Namespace) -> int:
    _check_output(args.output)
    _check_count("--steps", args.steps)
    loaded = _load_model(args)
    session = _new_session(loaded, args, max_new_tokens=args.steps or 1)
    session.start_turn(args.prompt, system=args.system)
    if args.steps:
        session.generate(args.steps)
    state = session.export_state()
    if args.label:
        state.metadata["label"] = args.label
    written = snapshot.save(state, args.output, codec=args.codec)
    _report_saved(args.output, state, written, args.codec)
    if args.steps:
        print(session.reply_text())
    return 0


# ---------------------------------------------------------------- resume


def _resume(args: argparse.Namespace) -> int:
    info = snapshot.read_info(args.file)
    state = snapshot.load(args.file)  # a bad file fails here, before any model load
    _check_count("--steps", args.steps)
    if args.output:
        _check_output(args.output)
    if args.dump and args.dump != "-":
        _check_output(args.dump)
    if args.model is None and Path(info.fingerprint.model_id).is_dir():
        args.model = info.fingerprint.model_id  # a local folder named in the snapshot
    loaded = _load_model(args)
    snapshot.check_fingerprint(state.fingerprint, loaded.fingerprint)
    session = _new_session(loaded, args, max_new_tokens=max(args.steps, 1), top_k=args.top_k)
    session.import_state(state)
    if args.continue_text:
        session.start_turn(args.continue_text)
    session.generate(args.steps)
    print(session.reply_text())
    _say(f"resumed at position {state.next_position} from {state.cache_length} cached entries; "
         f"{len(session.records)} tokens generated ({session.stop_reason or 'paused'})")
    if args.dump:
        _write_dump(session, args.dump)
    if args.output:
        resumed = session.export_state()
        written = snapshot.save(resumed, args.output, codec=info.codec)
        _report_saved(args.output, resumed, written, info.codec)
    return 0


def _write_dump(session: Any, target: str) -> None:
    from tracer.dump import write_trace

    if target == "-":
        write_trace(session, sys.stdout)
        return
    with atomic_writer(target) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        write_trace(session, text)
        text.flush()
        text.detach()


# ---------------------------------------------------------------- prune


def _prune(args: argparse.Namespace) -> int:
    _check_output(args.output)
    methods = [m for m, given in (("--keep-last", args.keep_last is not None),
                                  ("--sinks/--recent", args.sinks is not None or args.recent is not None),
                                  ("--method attention", args.method is not None)) if given]
    if len(methods) > 1:
        raise PruneError(f"Choose one pruning method, not {' and '.join(methods)}.")
    if not methods and args.drop_span is None:
        raise PruneError("Nothing to prune: give --keep-last N, --sinks S --recent N, "
                         "--method attention --budget N, or --drop-span START END.")
    if (args.sinks is None) != (args.recent is None):
        raise PruneError("--sinks and --recent go together (e.g. --sinks 4 --recent 256).")
    if (args.method is None) != (args.budget is None):
        raise PruneError("--method attention and --budget go together (e.g. --method attention --budget 512).")
    for name in ("keep_last", "sinks", "recent", "budget"):
        value = getattr(args, name)
        if value is not None:
            _check_count("--" + name.replace("_", "-"), value)

    info = snapshot.read_info(args.file)
    state = snapshot.load(args.file)
    if args.drop_span is not None:
        state = pruning.drop_span(state, *args.drop_span)
    if args.keep_last is not None:
        state = pruning.keep_last(state, args.keep_last)
    elif args.sinks is not None:
        state = pruning.sinks_recent(state, args.sinks, args.recent)
    elif args.method == "attention":
        state = pruning.heavy_hitters(state, args.budget)
    codec = args.codec or info.codec
    written = snapshot.save(state, args.output, codec=codec)
    print(f"before: {info.cache_length} entries, {info.file_bytes} bytes ({info.codec})")
    print(f"after:  {state.cache_length} entries, {written} bytes ({codec}) -> {args.output}")
    print(f"resumes at position {state.next_position} (kept positions {_ranges(state.positions)})")
    return 0


# ---------------------------------------------------------------- info


def _info(args: argparse.Namespace) -> int:
    info = snapshot.read_info(args.file)
    fp = info.fingerprint
    summary: dict[str, Any] = {
        "file": str(info.path),
        "format_version": info.format_version,
        "codec": info.codec,
        "codec_params": info.codec_params,
        "dtype": info.dtype,
        "model": fp.to_dict(),
        "tokens": len(info.token_ids),
        "cache_entries": info.cache_length,
        "cached_positions": _ranges(info.positions),
        "next_position": info.next_position,
        "label": info.label,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.created)),
        "raw_bytes": info.raw_bytes,
        "file_bytes": info.file_bytes,
        "ratio": round(info.ratio, 4),
        "attention_scores": info.has_attention_scores,
        "messages": info.metadata.get("messages", []),
        "sampling": info.metadata.get("sampling"),
        "text": _transcript(info.metadata.get("token_texts"), info.positions, len(info.token_ids)),
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    print(f"{summary['file']}: kvtrace snapshot v{info.format_version}, {info.label or 'no label'}, "
          f"created {summary['created']}")
    print(f"model:    {fp.model_id} ({fp.architecture}, {fp.num_layers} layers, {fp.num_kv_heads} KV heads, "
          f"head dim {fp.head_dim}, {fp.dtype}, vocab {fp.vocab_size})")
    print(f"codec:    {info.codec}{_params(info.codec_params)}, stored from {info.dtype}")
    print(f"sizes:    {info.file_bytes} bytes on disk, {info.raw_bytes} bytes of K/V raw, "
          f"ratio {info.ratio:.3f}")
    print(f"tokens:   {len(info.token_ids)} in the transcript, {info.cache_length} cached "
          f"(positions {summary['cached_positions']}), next position {info.next_position}")
    print(f"messages: {len(summary['messages'])}; attention scores: "
          f"{'yes' if info.has_attention_scores else 'no'}")
    if summary["text"] is not None:
        print("text:")
        print(summary["text"])
    else:  # saved without per-token texts (e.g. by the app): show the chat instead
        for message in summary["messages"]:
            if isinstance(message, dict):
                print(f"{message.get('role', '?')}: {message.get('content', '')}")
    return 0


def _transcript(texts: Any, positions: list[int], count: int) -> str | None:
    """The transcript with uncached stretches marked, so pruning is visible (``None``: no texts)."""
    if not (isinstance(texts, list) and len(texts) == count and all(isinstance(t, str) for t in texts)):
        return None
    cached = set(positions)
    out, dropped = [], 0
    for position, text in enumerate(texts):
        if position in cached or position == count - 1:
            if dropped:
                out.append(f"[…{dropped} pruned…]")
                dropped = 0
            out.append(text if position < count - 1 else f"⟨{text}⟩")  # the pending token
        else:
            dropped += 1
    return "".join(out)


# ---------------------------------------------------------------- import


def _import(args: argparse.Namespace) -> int:
    from kvstore.legacy import read_legacy, to_state
    from tracer.session import TraceSession

    _check_output(args.output)
    if args.allow_pickle:
        print(f"kvtrace: warning: --allow-pickle unpickles {args.file}, which executes any code it "
              "contains; use it only on files you trust.", file=sys.stderr)
    legacy = read_legacy(args.file, allow_pickle=args.allow_pickle)
    token_ids = _read_token_file(args.tokens) if args.tokens else legacy.token_ids
    if token_ids is None:
        raise SnapshotError(f"{args.file} carries no token ids; pass --tokens FILE (a JSON list of ids).")
    loaded = _load_model(args)
    session = TraceSession(loaded)
    session.import_state(to_state(legacy, token_ids, loaded.fingerprint))  # checks it fits the model
    state = session.export_state()
    state.metadata["label"] = f"imported from {Path(args.file).name}"
    written = snapshot.save(state, args.output)
    _report_saved(args.output, state, written, "lossless")
    return 0


def _read_token_file(path: str) -> list[int]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"No token file at {path}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SnapshotError(f"{path} is not a JSON list of token ids ({error}).") from None
    if not (isinstance(data, list) and data and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in data)):
        raise SnapshotError(f"{path} is not a non-empty JSON list of integer token ids.")
    return data


# ---------------------------------------------------------------- shared


def _load_model(args: argparse.Namespace) -> Any:
    from tracer.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      load_in_4bit=args.load_in_4bit, progress=_say)


def _new_session(loaded: Any, args: argparse.Namespace, *, max_new_tokens: int, top_k: int = 10) -> Any:
    from tracer.sampling import SamplingSettings
    from tracer.session import TraceSession

    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.sample_top_k,
                                seed=args.seed, stop=tuple(args.stop), max_new_tokens=max_new_tokens)
    return TraceSession(loaded, sampling, top_k=top_k)


def _report_saved(path: str, state: KVState, written: int, codec: str) -> None:
    _say(f"saved {len(state.token_ids)} tokens ({state.cache_length} cached entries) to {path}: "
         f"{written} bytes, codec {codec}, {written / max(state.nbytes, 1):.3f} of the raw K/V")


def _check_output(path: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise SnapshotError(f"{path} is a folder; give a file name to write.")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SnapshotError(f"Cannot write {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise SnapshotError(f"Cannot write {path}: the folder {folder} is not writable.")


def _check_count(option: str, value: int) -> None:
    if value < 0:
        raise SnapshotError(f"{option} must be zero or more, not {value}.")


def _ranges(positions: list[int]) -> str:
    """``0-3, 20-39`` style summary of sorted positions."""
    if not positions:
        return "none"
    spans, start = [], positions[0]
    for a, b in zip(positions, positions[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans)


def _params(params: dict[str, Any]) -> str:
    """`` (sinks 4, recent 32, ...)``; nothing when every parameter is off (zero)."""
    return f" ({', '.join(f'{k} {v}' for k, v in params.items())})" if any(params.values()) else ""


def _say(message: str) -> None:
    print(f"kvtrace: {message}", file=sys.stderr)
