"""Write an SVG screenshot of the app on a real model: ``python -m tui_app.screenshot docs/screenshot.svg``.

Runs the app headless, sends a prompt, waits for the reply, selects a token
and lets the lens fill in, then saves what the screen shows.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tracer.loading import load_model, quiet_transformers
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession
from tui_app.app import KvtraceApp


async def capture(app: KvtraceApp, prompt: str, size: tuple[int, int], back: int) -> str:
    async with app.run_test(size=size) as pilot:
        app.query_one("#prompt").focus()
        await pilot.press(*prompt, "enter")
        while app.generating or not app.timeline.records:
            await asyncio.sleep(0.1)
        await pilot.press(*["left"] * back)
        record = app.timeline.selected_record
        deadline = time.monotonic() + 120
        while record.lens is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await pilot.pause(0.3)
        return app.export_screenshot(title="kvtrace")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write an SVG screenshot of the kvtrace app.")
    parser.add_argument("output", help="SVG file to write, e.g. docs/screenshot.svg")
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    parser.add_argument("--size", default="132x40", help="terminal size WxH (default 132x40)")
    parser.add_argument("--prompt", default="Why is the sky blue? Answer in two sentences.")
    parser.add_argument("--tokens", type=int, default=40, help="tokens to generate (default 40)")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.lower().split("x"))
    quiet_transformers()
    session = TraceSession(load_model(args.model, device="cpu"), SamplingSettings(max_new_tokens=args.tokens))
    svg = asyncio.run(capture(KvtraceApp(session), args.prompt, (width, height), back=args.tokens // 3))
    with open(args.output, "w", encoding="utf-8") as out:
        out.write(svg)
    print(f"wrote {args.output} ({width}x{height})")


if __name__ == "__main__":
    main()
