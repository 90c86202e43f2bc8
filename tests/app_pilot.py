"""Helpers for the app's Pilot tests: wait for the workers, read notifications, save and load by key."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from fake_session import FakeSession
from screen_text import screen_text
from textual.pilot import Pilot

from tui_app.app import KvtraceApp


async def wait_until(pilot: Pilot, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)
    await pilot.pause()


async def wait_idle(pilot: Pilot, timeout: float = 30.0) -> None:
    app = pilot.app
    assert isinstance(app, KvtraceApp)
    await pilot.pause()
    await wait_until(pilot, lambda: app.view is not None and not app.generating and not app.busy, timeout)


async def send(pilot: Pilot, text: str) -> None:
    """Type ``text`` into the prompt box, send it, and wait for the reply to finish."""
    pilot.app.query_one("#prompt").focus()
    await pilot.press(*text, "enter")
    await wait_idle(pilot)


def slow_session() -> FakeSession:
    """A fake session whose reply is long and slow (50 ms a step): time to act while it is being generated."""
    session = FakeSession(step_delay=0.05)
    session.sampling = replace(session.sampling, max_new_tokens=1000)
    return session


async def start_generating(pilot: Pilot, steps: int) -> None:
    """Send "hello" and return once ``steps`` tokens of the reply are on the timeline (it goes on)."""
    app = pilot.app
    app.query_one("#prompt").focus()
    await pilot.press(*"hello", "enter")
    await wait_until(pilot, lambda: len(app.timeline.records) >= steps)


def chat_lines(app: KvtraceApp) -> list[str]:
    """The chat pane's paragraphs as plain text, unwrapped (the screen wraps them to the pane's width)."""
    return [str(child.render()) for child in app.chat.children]


def notifications(app: KvtraceApp) -> list[str]:
    return [n.message for n in app._notifications]


async def save_by_keys(pilot: Pilot, path: Path) -> None:
    """ctrl+s, type the file name, Enter; the app must report the size written."""
    app = pilot.app
    await pilot.press("ctrl+s")
    app.screen.query_one("#path").value = str(path)
    await pilot.press("enter")
    await wait_idle(pilot)
    assert any(f"{path.stat().st_size:,} bytes" in n and n.startswith("Saved") for n in notifications(app))


async def load_by_keys(pilot: Pilot, path: Path, token_count: int) -> None:
    """ctrl+o, pick ``path`` (its header must show ``token_count`` tokens first), Enter."""
    app = pilot.app
    await wait_idle(pilot)
    await pilot.press("ctrl+o")
    app.screen.query_one("#path").value = str(path)
    await wait_until(pilot, lambda: f"tokens:   {token_count} in" in screen_text(app))
    app.screen.query_one("#path").focus()
    await pilot.press("enter")
    await wait_idle(pilot)
