"""The real ``python -m tui_app`` in tmux at 80×24 [slow]: type a prompt, save with ctrl+s, quit; and the
flows that ask before losing work (quit, overwrite, prune and its undo); then check the snapshot files and
what the screen showed (capture-pane)."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from tmux_driver import flat, keys, screen, start, tmux, wait_for

from kvstore.snapshot import load

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]


def test_type_save_overwrite_prune_undo_quit_in_tmux(tmp_path):
    name = f"kvtrace-test-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "tmux.kvs"
    start(name, tmp_path)
    try:
        keys(name, "Enter", literal="Why is the sky blue?")
        reply = wait_for(name, lambda s: "assistant:" in s and "● idle" in s, timeout=180)
        lines = reply.splitlines()
        assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
        assert "SmolLM2" in lines[0] and "ctx" in lines[0] and "KV" in lines[0]
        assert "user: Why is the sky blue?" in reply and "Top-k" in reply and "Save" in lines[-1]
        keys(name, "q")  # an unsaved turn: asks
        wait_for(name, lambda s: "Quit kvtrace?" in s and "not saved" in flat(s), timeout=30)
        keys(name, "Escape")
        wait_for(name, lambda s: "Quit kvtrace?" not in s, timeout=30)

        keys(name, "C-s")
        wait_for(name, lambda s: "Save a snapshot" in s, timeout=30)
        keys(name, "C-u")
        keys(name, "Enter", literal=str(path))
        saved = wait_for(name, lambda s: "Saved" in s and "● idle" in s, timeout=60)
        assert f"{path.stat().st_size:,} bytes" in flat(saved)
        first = path.stat().st_mtime_ns
        keys(name, "C-s")
        wait_for(name, lambda s: "Save a snapshot" in s, timeout=30)
        keys(name, "C-u")
        keys(name, "Enter", literal=str(path))
        wait_for(name, lambda s: "Replace tmux.kvs?" in s, timeout=30)
        keys(name, "y")
        wait_for(name, lambda s: "Replace tmux.kvs?" not in s and path.stat().st_mtime_ns != first and "● idle" in s,
                 timeout=60)  # idle: the save's task has ended, so the next key is not refused as "still working"

        keys(name, "p")  # prune: Enter in the budget field only goes to the button
        dialog = wait_for(name, lambda s: "Prune the KV cache" in s and "Drop " in s, timeout=30)
        assert "Drops " in flat(dialog)
        keys(name, "Enter")
        time.sleep(1)
        assert "Prune the KV cache" in screen(name)
        keys(name, "Enter")
        pruned = wait_for(name, lambda s: "Pruned" in s and "● idle" in s, timeout=60)
        assert "u to undo" in flat(pruned)
        keys(name, "u")
        wait_for(name, lambda s: "Prune undone" in flat(s) and "● idle" in s, timeout=60)
        keys(name, "p")
        wait_for(name, lambda s: "Prune the KV cache" in s, timeout=30)
        keys(name, "Enter", "Enter")
        wait_for(name, lambda s: "Prune the KV cache" not in s and "pruned: positions" in flat(s), timeout=60)
        keys(name, "q")  # pruned since the save: asks, and q in the question quits
        wait_for(name, lambda s: "Quit kvtrace?" in s and "since it was saved to" in flat(s), timeout=30)
        keys(name, "q")
        deadline = time.monotonic() + 30
        while tmux("has-session", "-t", name).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tmux("has-session", "-t", name).returncode != 0, "q in the question did not quit"
    finally:
        tmux("kill-session", "-t", name)
    state = load(path)
    assert state.metadata["messages"][0]["content"] == "Why is the sky blue?"
    assert len(state.token_ids) == state.positions[-1] + 2  # prompt + 8 tokens, the last pending, nothing pruned
    assert state.positions == list(range(len(state.token_ids) - 1))
