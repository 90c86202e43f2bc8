"""Drive the real ``python -m tui_app`` in tmux as a person would, and read the screen with capture-pane.

Shared by the tmux tests: start the app at a terminal size, type with a person's pauses, wait for
what the screen should show (failing with the screen it did show).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def tmux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True)


def screen(name: str) -> str:
    return tmux("capture-pane", "-p", "-t", name).stdout


def flat(text: str) -> str:
    """The screen's words on one line (panes, dialogs and notifications wrap)."""
    return " ".join(text.split())


def wait_for(name: str, predicate: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = screen(name)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"the screen never showed what was expected; it shows:\n{screen(name)}")


def start(name: str, folder: Path, size: tuple[int, int] = (80, 24)) -> None:
    """The app on the embedded model in ``folder``, 8 tokens a reply, without autosave (these runs are
    about what the screen shows and what is asked before unsaved work is lost)."""
    command = f"cd {folder} && {sys.executable} -m tui_app --max-new-tokens 8 --device cpu --no-autosave"
    env = f"PYTHONPATH={REPO_ROOT}"
    width, height = size
    assert tmux("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height),
                f"{env} sh -c '{command}'").returncode == 0
    wait_for(name, lambda s: "is ready" in flat(s), timeout=180)


def keys(name: str, *names: str, literal: str | None = None) -> None:
    """Type ``literal``, then press ``names``, with the pauses of a person (a terminal app reads Escape
    sequences with a short timeout, so keys sent all at once can merge)."""
    if literal is not None:
        tmux("send-keys", "-t", name, "-l", literal)
        time.sleep(0.3)
    for key in names:
        tmux("send-keys", "-t", name, key)
        time.sleep(0.3)
