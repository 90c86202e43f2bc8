"""The views of the real app in tmux at 80×24 and 160×48 [slow]: after one reply, the lens grid (its metric
key and a cell), the attention of one layer's heads, two lines compared, and the help listing their keys;
each screen fits the terminal and is read back with capture-pane."""

from __future__ import annotations

import re
import shutil
import uuid

import pytest
from tmux_driver import flat, keys, start, tmux, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]
GRID_TITLE = re.compile(r"Lens grid · ([^(]+?) \(m\)")


def fits(text: str, size: tuple[int, int]) -> bool:
    lines = text.splitlines()
    return len(lines) == size[1] and all(len(line) <= size[0] for line in lines)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_grid_heads_lines_compared_and_help_in_tmux(tmp_path, size):
    name = f"kvtrace-views-{uuid.uuid4().hex[:8]}"
    start(name, tmp_path, size)
    try:
        keys(name, "Enter", literal="Why is the sky blue?")
        wait_for(name, lambda s: "assistant:" in s and "● idle" in s, timeout=180)

        keys(name, "4")
        grid = wait_for(name, lambda s: GRID_TITLE.search(s) is not None, timeout=30)
        assert fits(grid, size)
        metric = GRID_TITLE.search(grid).group(1)
        keys(name, "m")
        wait_for(name, lambda s: (m := GRID_TITLE.search(s)) is not None and m.group(1) != metric, timeout=30)
        keys(name, "Enter")  # the selected token's top-k at the layer under the cursor
        cell = wait_for(name, lambda s: re.search(r"Token #\d+ .* · (layer \d+|the model's output)", s), timeout=30)
        assert fits(cell, size) and "Escape closes" in flat(cell)
        keys(name, "Escape")
        wait_for(name, lambda s: "Escape closes" not in flat(s), timeout=30)

        keys(name, "2", "a", "a")  # attention: mean → one layer → that layer's heads
        heads = wait_for(name, lambda s: re.search(r"Attention · #\d+ · layer \d+/\d+ · head \d+/\d+", s), timeout=30)
        assert fits(heads, size)

        keys(name, "1", "down", "b")  # branch at the selected token with its runner-up
        wait_for(name, lambda s: "● idle" in s and "branch" in flat(s).lower(), timeout=120)
        keys(name, "l")
        wait_for(name, lambda s: "Lines of generation" in s, timeout=30)
        keys(name, "Enter", "down", "Enter")
        compared = wait_for(name, lambda s: "The lens at the branch point" in s, timeout=60)
        assert fits(compared, size) and "tokens) and" in flat(compared)
        keys(name, "Escape")
        wait_for(name, lambda s: "The lens at the branch point" not in s, timeout=30)

        keys(name, "F1")
        seen = flat(wait_for(name, lambda s: "kvtrace — keys" in s, timeout=30))
        for _ in range(8):  # page down through the help until the views' keys have been on screen
            if "show the lens grid" in seen and "lens grid: shade by the next metric" in seen:
                break
            keys(name, "pagedown")
            seen += flat(wait_for(name, lambda s: "kvtrace — keys" in s, timeout=30))
        assert "show the lens grid" in seen and "lens grid: shade by the next metric" in seen
    finally:
        tmux("kill-session", "-t", name)
