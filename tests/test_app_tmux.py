"""The real ``python -m tui_app`` in tmux at 80×24 [slow]: type a prompt, save with ctrl+s, quit;
then check the snapshot file and what the screen showed (capture-pane)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvstore.snapshot import load

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]
REPO_ROOT = Path(__file__).resolve().parents[1]


def tmux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True)


def screen(name: str) -> str:
    return tmux("capture-pane", "-p", "-t", name).stdout


def wait_for(name: str, predicate, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = screen(name)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"the screen never showed what was expected; it shows:\n{screen(name)}")


def test_type_save_quit_in_tmux(tmp_path):
    name = f"kvtrace-test-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "tmux.kvs"
    command = f"cd {REPO_ROOT} && {sys.executable} -m tui_app --max-new-tokens 8 --device cpu --store {tmp_path}/store"
    assert tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24", command).returncode == 0
    try:
        wait_for(name, lambda s: "is ready" in s, timeout=180)
        tmux("send-keys", "-t", name, "-l", "Why is the sky blue?")
        tmux("send-keys", "-t", name, "Enter")
        reply = wait_for(name, lambda s: "assistant:" in s and "● idle" in s, timeout=180)
        lines = reply.splitlines()
        assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
        assert "SmolLM2" in lines[0] and "ctx" in lines[0] and "KV" in lines[0]
        assert "user: Why is the sky blue?" in reply and "Top-k" in reply and "Save" in lines[-1]
        tmux("send-keys", "-t", name, "C-s")
        wait_for(name, lambda s: "Save a snapshot" in s, timeout=30)
        tmux("send-keys", "-t", name, "C-u")
        tmux("send-keys", "-t", name, "-l", str(path))
        tmux("send-keys", "-t", name, "Enter")
        saved = wait_for(name, lambda s: "Saved" in s, timeout=60)
        assert f"{path.stat().st_size:,} bytes" in " ".join(saved.split())
        tmux("send-keys", "-t", name, "q")
        deadline = time.monotonic() + 30
        while tmux("has-session", "-t", name).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tmux("has-session", "-t", name).returncode != 0, "q did not quit the app"
    finally:
        tmux("kill-session", "-t", name)
    state = load(path)
    assert state.metadata["messages"][0]["content"] == "Why is the sky blue?"
    assert len(state.token_ids) == state.positions[-1] + 2  # prompt + 8 tokens, the last pending
