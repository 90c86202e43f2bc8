"""What tracing costs: plain ``model.generate`` (sdpa) against the traced session, with and without the lens.

On the default model (SmolLM2-135M-Instruct), CPU, greedy, 128 new tokens, in
one run and interleaved (so machine load hits every variant alike), median of
``--repeats``:

* plain: ``model.generate(do_sample=False)`` with sdpa attention;
* traced: ``TraceSession`` prefill + 128 steps with attention, top-k and hidden-state capture;
* traced + lens: the same plus the full logit lens for every layer and token, written as
  JSON Lines (what ``kvtrace --dump`` does).

Also model load time: cold (empty temporary cache: dequantize GGUF + write the
cache) against warm (from that cache).

Targets: traced >= 0.90x plain throughput; traced + lens <= 1.5x the time (printed against
both the traced run and plain generate).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tracer.dump import TraceWriter  # noqa: E402
from tracer.loading import load_model, quiet_transformers  # noqa: E402
from tracer.sampling import SamplingSettings  # noqa: E402
from tracer.session import TraceSession  # noqa: E402

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a talking crab."


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def plain_generate(loaded, prompt_ids: list[int], tokens: int) -> int:
    loaded.model.set_attn_implementation("sdpa")
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False)
    return out.shape[1] - ids.shape[1]


def traced(loaded, tokens: int, with_lens: bool) -> int:
    session = TraceSession(loaded, SamplingSettings(max_new_tokens=tokens))
    session.start_turn(PROMPT)
    if not with_lens:
        return len(session.generate())
    writer = TraceWriter(session, io.StringIO(), with_lens=True)
    writer.header()
    session.generate(on_step=writer.step)
    writer.end()
    return len(session.records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        cold, _ = timed(lambda: load_model(None, device="cpu"))
        warm, loaded = timed(lambda: load_model(None, device="cpu"))
    print(f"load  cold (dequantize + cache): {cold:6.2f} s   warm (from cache): {warm:5.2f} s   "
          f"ratio {cold / warm:.0f}x")

    probe = TraceSession(loaded)
    probe.start_turn(PROMPT)
    prompt_ids = list(probe.token_ids)
    plain_generate(loaded, prompt_ids, 8)  # warm-up of both paths
    traced(loaded, 8, with_lens=True)

    times: dict[str, list[float]] = {"plain": [], "traced": [], "lens": []}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in (
            ("plain", lambda: plain_generate(loaded, prompt_ids, args.tokens)),
            ("traced", lambda: traced(loaded, args.tokens, with_lens=False)),
            ("lens", lambda: traced(loaded, args.tokens, with_lens=True)),
        ):
            seconds, count = timed(run)
            times[name].append(seconds)
            counts[name] = count
    median = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: counts[name] / median[name] for name in median}
    print(f"prompt {len(prompt_ids)} tokens, {args.tokens} new tokens, greedy, median of {args.repeats}")
    for name, label in (("plain", "plain generate (sdpa)"), ("traced", "traced, no lens"),
                        ("lens", "traced + full lens (dump)")):
        print(f"  {label:26s} {counts[name]:4d} tokens  {median[name]:6.2f} s  {rate[name]:6.1f} tok/s")
    print(f"traced / plain throughput: {rate['traced'] / rate['plain']:.2f}x  (target >= 0.90x)")
    print(f"lens / traced time:        {median['lens'] / median['traced']:.2f}x  (target <= 1.50x)")
    print(f"lens / plain time:         {median['lens'] / median['plain']:.2f}x  (the same target, read strictly)")


if __name__ == "__main__":
    main()
