"""Write an SVG screenshot of the app on a real model: ``python -m tui_app.screenshot docs/screenshot.svg``.

Runs the app headless at the size asked for, sends a prompt (and a follow-up,
so the timeline shows a turn separator), waits for the replies, selects a
token, shows the pane asked for (all of them from 120 columns) and lets the
lens fill in where it is shown, then saves what the screen shows.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tracer.loading import load_model, quiet_transformers
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession
from tui_app.app import KvtraceApp


async def _send(app: KvtraceApp, pilot, text: str) -> None:
    app.query_one("#prompt").focus()
    await pilot.press(*text, "enter")
    await pilot.pause(0.2)
    while app.generating or app.view is None or not app.timeline.records:
        await asyncio.sleep(0.1)


async def capture(app: KvtraceApp, prompts: list[str], size: tuple[int, int], back: int, pane: str) -> str:
    async with app.run_test(size=size) as pilot:
        while app.view is None:
            await asyncio.sleep(0.1)
        for prompt in prompts:
            await _send(app, pilot, prompt)
        await pilot.press(str(list(("topk", "attention", "lens")).index(pane) + 1), *["left"] * back)
        record = app.timeline.selected_record
        deadline = time.monotonic() + 120
        while app._lens_visible() and record.lens is None and time.monotonic() < deadline:
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
    parser.add_argument("--pane", choices=("topk", "attention", "lens"), default="topk",
                        help="the pane shown below 120 columns (default topk)")
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
