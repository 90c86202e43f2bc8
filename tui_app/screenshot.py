"""Write an SVG screenshot of the app on a real model: ``python -m tui_app.screenshot docs/screenshot.svg``.

Runs the app headless at the size asked for, sends a prompt (and a follow-up,
so the timeline shows a turn separator), waits for the replies, selects a
token, shows the view asked for (the panes by their keys, all of them from 120
columns; the lens grid; the attention by head; or two lines compared after a
branch at the selected token) and lets the lens fill in where it is shown,
then saves what the screen shows.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tracer.loading import load_model, quiet_transformers
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession
from tui_app.app import KvtraceApp
from tui_app.screens.compare import CompareScreen

VIEW_KEYS = {"topk": ["1"], "attention": ["2"], "lens": ["3"], "grid": ["4"],
             "heads": ["2", "a", "a", *["right_square_bracket"] * 8],  # layer 8's heads: layer 0 looks everywhere
             "compare": []}  # the keys that show each view (compare: see ``_compare``)


async def _send(app: KvtraceApp, pilot, text: str) -> None:
    app.query_one("#prompt").focus()
    await pilot.press(*text, "enter")
    await pilot.pause(0.2)
    while app.generating or app.view is None or not app.timeline.records:
        await asyncio.sleep(0.1)


async def _idle(app: KvtraceApp) -> None:
    while app.generating or app.busy:
        await asyncio.sleep(0.1)


async def _compare(app: KvtraceApp, pilot) -> None:
    """Branch at the selected token with its runner-up, then compare the two lines (l, Enter, ↓, Enter)."""
    await pilot.press("1", "down", "b")
    await pilot.pause(0.2)
    await _idle(app)
    await pilot.press("l", "enter", "down", "enter")
    while not isinstance(app.screen, CompareScreen):
        await asyncio.sleep(0.1)


async def capture(app: KvtraceApp, prompts: list[str], size: tuple[int, int], back: int, view: str) -> str:
    async with app.run_test(size=size) as pilot:
        while app.view is None:
            await asyncio.sleep(0.1)
        for prompt in prompts:
            await _send(app, pilot, prompt)
        app.timeline.focus()
        await pilot.press(*VIEW_KEYS[view], *["left"] * back)
        if view == "compare":
            await _compare(app, pilot)
        records = app.timeline.records
        wanted = [app.timeline.selected_record.index] if app._lens_visible() else []
        if app.active_pane == "grid":
            wanted += app.grid_pane.grid.visible_indices()
        deadline = time.monotonic() + 120
        while any(records[i].lens is None for i in wanted) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await pilot.pause(0.5)
        return app.export_screenshot(title=f"kvtrace {size[0]}×{size[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write an SVG screenshot of the kvtrace app.")
    parser.add_argument("output", help="SVG file to write, e.g. docs/screenshot.svg")
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    parser.add_argument("--size", default="132x40", help="terminal size WxH (default 132x40)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a message to send (repeatable; default: a question and a follow-up)")
    parser.add_argument("--tokens", type=int, default=40, help="tokens to generate per reply (default 40)")
    parser.add_argument("--pane", choices=tuple(VIEW_KEYS), default="topk",
                        help="the view shown: a pane (below 120 columns one at a time), the lens grid, the "
                        "attention by head, or two lines compared (default topk)")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.lower().split("x"))
    prompts = args.prompt or ["Why is the sky blue? Answer in two sentences.", "And at sunset?"]
    quiet_transformers()
    session = TraceSession(load_model(args.model, device="cpu"), SamplingSettings(max_new_tokens=args.tokens))
    svg = asyncio.run(capture(KvtraceApp(session), prompts, (width, height), args.tokens // 3, args.pane))
    with open(args.output, "w", encoding="utf-8") as out:
        out.write(svg)
    print(f"wrote {args.output} ({width}x{height})")


if __name__ == "__main__":
    main()
