"""Key press to screen update in the app, while the model generates versus while it is idle.

The app runs headless (Textual's ``run_test``) at 80×24 on a real model. Each
sample posts a key event (as the terminal driver does), then times the first
frame the app composes in which the token selection has moved. The idle
figures are the reference measured in the same run; the target is a p95 under
100 ms while generating. A third condition shows the lens grid (key 4) during
a long reply (``--grid-tokens``, 500 by default): the samples start once the
reply is that long, near its end, while the model goes on writing and the
runner fills the grid's columns between its steps.

    python bench/ui_latency.py [--model SPEC] [--presses N] [--grid-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracer.loading import load_model, quiet_transformers  # noqa: E402
from tracer.sampling import SamplingSettings  # noqa: E402
from tracer.session import TraceSession  # noqa: E402
from tui_app.app import KvtraceApp  # noqa: E402

TARGET_MS = 100.0
GRID_PROMPT = "Write the numbers from 1 to 400, separated by commas."  # goes on for hundreds of tokens


class FrameWatch:
    """Hooked into the app's display call: notes the first frame that shows a moved selection."""

    def __init__(self, app: KvtraceApp) -> None:
        self.app = app
        self.before: int | None = None
        self.shown_at = 0.0
        self.shown = asyncio.Event()
        original = app._display

        def display(screen, renderable) -> None:
            if renderable is not None and not self.shown.is_set() and app.timeline.selected != self.before:
                self.shown_at = time.perf_counter()
                self.shown.set()
            original(screen, renderable)

        app._display = display

    async def press(self, key: str) -> float:
        """Milliseconds from posting ``key`` to the first composed frame showing the moved selection."""
        self.before = self.app.timeline.selected
        self.shown.clear()
        start = time.perf_counter()
        self.app.simulate_key(key)
        await asyncio.wait_for(self.shown.wait(), timeout=10)
        return (self.shown_at - start) * 1000


async def sample(watch: FrameWatch, count: int) -> list[float]:
    """``count`` presses alternating right/left around the first tokens, at random intervals."""
    results = []
    for i in range(count):
        results.append(await watch.press("right" if i % 2 == 0 else "left"))
        await asyncio.sleep(random.uniform(0.02, 0.08))
    return results


async def sample_generating(app: KvtraceApp, pilot, watch: FrameWatch, count: int
                            ) -> tuple[list[float], float, bool]:
    """``count`` presses while the model writes, then Escape: the samples, the tokens per second meanwhile, and
    whether it was still writing when the samples ended (else they do not all count as "while generating")."""
    steps_before, t0 = len(app.timeline.records), time.perf_counter()
    samples = await sample(watch, count)
    rate = (len(app.timeline.records) - steps_before) / (time.perf_counter() - t0)
    still_generating = app.generating
    await pilot.press("escape")
    while app.generating:
        await asyncio.sleep(0.05)
    return samples, rate, still_generating


def summary(label: str, values: list[float]) -> tuple[str, float, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    median = statistics.median(values)
    line = f"  {label:<11} n={len(values):<3} median {median:6.1f} ms   p95 {p95:6.1f} ms   max {values[-1]:6.1f} ms"
    return line, median, p95


async def run(args: argparse.Namespace) -> int:
    quiet_transformers()
    loaded = load_model(args.model, device="cpu")
    session = TraceSession(loaded, SamplingSettings(max_new_tokens=12))
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        watch = FrameWatch(app)
        app.query_one("#prompt").focus()
        await pilot.press(*"Tell me a long story about a robot.", "enter")
        while app.generating:
            await asyncio.sleep(0.05)
        app.timeline.focus()
        await pilot.press("home")
        idle = await sample(watch, args.presses)

        session.sampling = replace(session.sampling, max_new_tokens=100_000)
        await pilot.press("g")
        while len(app.timeline.records) < 16:
            await asyncio.sleep(0.05)
        await pilot.press("home")
        busy, rate, still_generating = await sample_generating(app, pilot, watch, args.presses)
    if not still_generating:
        print("ui_latency: the generation ended before the samples did; use more presses or a longer reply")
        return 1
    grid, grid_rate, grid_generating, reached = await grid_sample(loaded, args)
    if not grid_generating:
        print(f"ui_latency: the long reply ended after {reached} tokens, before the grid samples did")
        return 1

    print(f"ui_latency: key press (←/→) to screen update, 80×24, {loaded.name} on {loaded.device}")
    line, idle_median, idle_p95 = summary("idle", idle)
    print(line)
    line, busy_median, busy_p95 = summary("generating", busy)
    print(line + f"   ({rate:.1f} tok/s meanwhile)")
    print(f"  ratio generating/idle: median {busy_median / idle_median:.2f}x, p95 {busy_p95 / idle_p95:.2f}x")
    line, _, grid_p95 = summary("grid", grid)
    print(line + f"   ({grid_rate:.1f} tok/s meanwhile; lens grid shown, reply past {args.grid_tokens} tokens)")
    verdict = "PASS" if max(busy_p95, grid_p95) < TARGET_MS else "FAIL"
    print(f"  target p95 while generating < {TARGET_MS:.0f} ms: {verdict}")
    return 0 if verdict == "PASS" else 1


async def grid_sample(loaded, args: argparse.Namespace) -> tuple[list[float], float, bool, int]:
    """A fresh session, the lens grid shown, a long reply: once it has ``args.grid_tokens`` tokens, presses
    around a token near its end while it goes on (``sample_generating``); also how long the reply got."""
    app = KvtraceApp(TraceSession(loaded, SamplingSettings(max_new_tokens=100_000)))
    async with app.run_test(size=(80, 24)) as pilot:
        watch = FrameWatch(app)
        app.timeline.focus()
        await pilot.press("4")
        app.query_one("#prompt").focus()
        await pilot.press(*GRID_PROMPT, "enter")
        while app.generating and len(app.timeline.records) < args.grid_tokens:
            await asyncio.sleep(0.1)
        if not app.generating:
            return [], 0.0, False, len(app.timeline.records)
        app.timeline.focus()
        await pilot.press("end", *["left"] * 10)
        samples, rate, still_generating = await sample_generating(app, pilot, watch, args.presses)
        return samples, rate, still_generating, len(app.timeline.records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    parser.add_argument("--presses", type=int, default=40, help="key presses per condition (default 40)")
    parser.add_argument("--grid-tokens", type=int, default=500,
                        help="how long the reply is before the grid samples start (default 500)")
    random.seed(0)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
