"""Snapshot store benchmark: a conversation saved after every turn, and resuming it, against the references.

With the default model (SmolLM2-135M-Instruct, or ``--model``) on this
machine, it holds a ``--turns``-turn conversation (real text as the user's
messages, ``--steps`` generated tokens a turn, traced as the app traces)
that reaches about ``--tokens`` tokens, and after every turn saves it into a
snapshot store (each entry the child of the turn before, as the app's
autosave does) and, for reference, as one lossless ``.kvs`` file. It prints:

* per turn, the bytes the store save added against the growth of the
  lossless file (the new tokens' share; target <= 1.1x), and in total the
  store's bytes against the final lossless file (target <= 1.15x);
* time to the first new token of the final state from a fresh session:
  recomputing the prefill (sdpa attention, the fastest path), loading the
  ``.kvs``, loading the store entry (best of ``--repeats``, measured
  interleaved; target <= 0.05x the prefill);
* that the store's state is bit for bit the file's, and that both continue
  with the token the uninterrupted run chose.

    python bench/store.py [--turns 10] [--tokens 4096] [--steps 16] [--repeats 3] [--model SPEC]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not another install

from kvstore import snapshot  # noqa: E402
from kvstore.store import Store  # noqa: E402
from tracer import usecases  # noqa: E402
from tracer.engine import Engine  # noqa: E402
from tracer.loading import load_model, quiet_transformers  # noqa: E402
from tracer.quality import sample_text  # noqa: E402
from tracer.sampling import SamplingSettings  # noqa: E402
from tracer.session import TraceSession  # noqa: E402
from resume_timing import timed_resume  # noqa: E402  (bench/, beside this script)

WRITE_TARGET = 1.10  # x the lossless file's growth, per save
TOTAL_TARGET = 1.15  # x the final lossless file
TTFT_TARGET = 0.05  # x recomputing the prefill


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def converse(loaded, args, store: Path, files: Path) -> tuple[TraceSession, list[dict[str, float]]]:
    """The conversation, saved after every turn into the store and as a lossless file."""
    tokenizer = loaded.tokenizer
    ids = tokenizer(sample_text())["input_ids"]
    per_turn = args.tokens // args.turns - args.steps - 12  # 12: the chat template's tokens per turn
    session = TraceSession(loaded, SamplingSettings(max_new_tokens=args.steps), capture_attention=not args.no_attention)
    rows, previous_file = [], 0
    for turn in range(args.turns):
        text = tokenizer.decode(ids[turn * per_turn:(turn + 1) * per_turn])
        started = time.perf_counter()
        session.start_turn(text)
        session.generate(args.steps)
        traced = time.perf_counter() - started
        before = folder_bytes(store)
        started = time.perf_counter()
        saved = usecases.save(session, f"{store}:t{turn}", parent=f"{store}:t{turn - 1}" if turn else None)
        seconds = time.perf_counter() - started
        written = folder_bytes(store) - before
        file_bytes = usecases.save(session, str(files / f"t{turn}.kvs")).written
        rows.append({"tokens": len(session.token_ids), "written": written, "growth": file_bytes - previous_file,
                     "file": file_bytes, "seconds": seconds, "traced": traced, "shared": saved.shared or 0})
        previous_file = file_bytes
    return session, rows


def time_to_first_token(loaded, state, kvs: Path, store: Path, name: str, repeats: int) -> dict[str, dict]:
    """Fresh session to first new token: by prefill, from the file, from the store (interleaved, best of N)."""
    def from_prefill() -> dict[str, float]:
        start = time.perf_counter()
        engine = Engine(loaded, capture_attention=False)
        engine.prefill(state.token_ids[:-1], 0)
        middle = time.perf_counter()
        engine.decode(state.token_ids[-1], state.next_position)
        return {"prefill": middle - start, "step": time.perf_counter() - middle}

    paths = {"prefill": from_prefill,
             ".kvs": timed_resume(loaded, lambda: snapshot.load(kvs, expected=loaded.fingerprint)),
             "store": timed_resume(loaded, lambda: Store.open(store).load(name, expected=loaded.fingerprint))}
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for label, run in paths.items():
            stages = run()
            stages["total"] = sum(stages.values())
            if label not in best or stages["total"] < best[label]["total"]:
                best[label] = stages
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096, help="about how long the conversation gets")
    parser.add_argument("--steps", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-attention", action="store_true", help="trace without attention (smaller traces)")
    args = parser.parse_args()
    quiet_transformers()
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory(prefix="kvtrace-bench-store-") as folder:
        store, files = Path(folder) / "store", Path(folder) / "files"
        files.mkdir()
        session, rows = converse(loaded, args, store, files)
        last = len(rows) - 1
        print(f"{loaded.name} on CPU ({torch.get_num_threads()} threads), {args.turns} turns of real text, "
              f"{args.steps} generated tokens a turn, attention {'off' if args.no_attention else 'traced'}")
        print(f"{'turn':>4}{'tokens':>8}{'store save B':>14}{'file growth B':>15}{'ratio':>7}{'save s':>8}"
              f"{'shared B':>14}")
        ratios = []
        for turn, row in enumerate(rows):
            ratio = row["written"] / row["growth"]
            ratios.append(ratio)
            print(f"{turn:>4}{row['tokens']:>8}{row['written']:>14,}{row['growth']:>15,}{ratio:>7.3f}"
                  f"{row['seconds']:>8.2f}{row['shared']:>14,}")
        worst = max(ratios[1:])
        total = folder_bytes(store)
        final = rows[last]["file"]
        print(f"each save after the first: at most {worst:.3f}x the lossless file's growth "
              f"(target <= {WRITE_TARGET}x: {verdict(worst <= WRITE_TARGET)})")
        print(f"the store after {args.turns} saves: {total:,} bytes = {total / final:.3f}x the final lossless file "
              f"of {final:,} bytes (target <= {TOTAL_TARGET}x: {verdict(total / final <= TOTAL_TARGET)}); "
              f"{sum(r['file'] for r in rows):,} bytes as {args.turns} separate files")

        state = session.export_state()
        from_file = snapshot.load(files / f"t{last}.kvs")
        from_store = Store.open(store).load(f"t{last}")
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(from_file.keys + from_file.values, from_store.keys + from_store.values))
        expected = session.generate(1)[0].token_id
        firsts, restored_records = [], 0
        for restored in (from_file, from_store):
            resumed = TraceSession(loaded, SamplingSettings(), capture_attention=False)
            resumed.import_state(restored)
            restored_records = len(resumed.records)
            firsts.append(resumed.step().token_id)
        print(f"the store's state is the file's bit for bit: {same}; both continue with the uninterrupted run's "
              f"next token: {firsts == [expected, expected]}; the store's entry brought back "
              f"{restored_records} of the {len(session.records) - 1} traced steps")

        loaded.model.set_attn_implementation("sdpa")  # the traced conversation switched it to eager: time the fast path
        ttft = time_to_first_token(loaded, state, files / f"t{last}.kvs", store, f"t{last}", args.repeats)
        prefill = ttft["prefill"]["total"]
        print(f"time to first token at {len(state.token_ids)} tokens (fresh session, best of {args.repeats}):")
        for label, stages in ttft.items():
            parts = ", ".join(f"{k} {v:.3f}" for k, v in stages.items() if k != "total")
            extra = "" if label == "prefill" else f" = {stages['total'] / prefill:.3f}x prefill"
            print(f"  {label:<8}{stages['total']:.3f} s{extra} ({parts})")
        ratio = ttft["store"]["total"] / prefill
        print(f"resume from the store: {ratio:.3f}x recomputing the prefill (target <= {TTFT_TARGET}x: "
              f"{verdict(ratio <= TTFT_TARGET)})")


if __name__ == "__main__":
    main()
