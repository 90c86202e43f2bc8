"""Two lines side by side from where they part: the first differing token, the lens of both at the branch
point, and each token's probability under its own line and under the other's, step by step."""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from tracer.compare import LineComparison
from tracer.lens_grid import clip
from tracer.token_text import visible
from tui_app.screens.reading import ReadingScreen

TOKEN = 10  # cells of a token in the tables


def probability(value: float) -> Text:
    return Text("–", style="dim") if math.isnan(value) else Text(f"{value:.3f}")


def summary(c: LineComparison, a: str, b: str) -> Text:
    """Where the lines part and with which tokens."""
    first = c.first_difference
    text = Text()
    if first is None:
        longer = a if c.a_steps > c.b_steps else b
        text.append(f"The lines agree on all {min(c.a_steps, c.b_steps)} shared tokens; {longer} goes on.")
        return text
    text.append(f"They part at generated token #{c.branch} (position {first.position}), after “")
    text.append(visible(c.prefix_text[-40:]), style="dim")
    text.append("”:\n  ")
    text.append(f"{a}: {visible(first.a_text)}", style="bold cyan")
    text.append(f"  p={first.a_prob:.3f}    ")
    text.append(f"{b}: {visible(first.b_text)}", style="bold magenta")
    text.append(f"  p={first.b_prob:.3f}")
    return text


def layers_table(c: LineComparison, a: str, b: str) -> Table:
    """Per layer at the branch point: each token's lens probability, the lens's top-1, and one step later
    each line's top-1."""
    table = Table(title="The lens at the branch point", title_justify="left", box=None, padding=(0, 1),
                  header_style="bold")
    table.add_column("L", justify="right", style="dim")
    table.add_column(f"p {a}", justify="right", style="cyan")
    table.add_column(f"p {b}", justify="right", style="magenta")
    table.add_column("top-1", no_wrap=True, max_width=TOKEN)
    if c.a_after:
        table.add_column(f"{a} next", no_wrap=True, max_width=TOKEN)
        table.add_column(f"{b} next", no_wrap=True, max_width=TOKEN)
    for row in c.layers:
        cells = [str(row.layer), f"{row.a_prob:.3f}", f"{row.b_prob:.3f}", clip(visible(row.top_text), TOKEN)]
        if c.a_after:
            cells += [clip(visible(c.a_after[row.layer]), TOKEN), clip(visible(c.b_after[row.layer]), TOKEN)]
        table.add_row(*cells)
    return table


def steps_table(c: LineComparison, a: str, b: str) -> Table:
    """Step by step: each line's token, its probability on its own line and on the other."""
    table = Table(title="Step by step (p: on its own line · p other: under the other line's distribution)",
                  title_justify="left", box=None, padding=(0, 1), header_style="bold")
    table.add_column("#", justify="right", style="dim")
    table.add_column(a, no_wrap=True, max_width=TOKEN, style="cyan")
    table.add_column("p", justify="right")
    table.add_column("p other", justify="right")
    table.add_column(b, no_wrap=True, max_width=TOKEN, style="magenta")
    table.add_column("p", justify="right")
    table.add_column("p other", justify="right")
    for step in c.steps:
        table.add_row(str(step.index), clip(visible(step.a_text), TOKEN), f"{step.a_prob:.3f}",
                      probability(step.a_under_b), clip(visible(step.b_text), TOKEN), f"{step.b_prob:.3f}",
                      probability(step.b_under_a))
    return table


class CompareScreen(ReadingScreen):
    def __init__(self, comparison: LineComparison, a: str, b: str) -> None:
        parts = [summary(comparison, a, b)]
        if comparison.layers:
            parts += [Text(""), layers_table(comparison, a, b)]
        if comparison.steps:
            parts += [Text(""), steps_table(comparison, a, b)]
        super().__init__(f"{a} ({comparison.a_steps} tokens) and {b} ({comparison.b_steps} tokens)", Group(*parts),
                         "↑ ↓ PageUp PageDown scroll · Escape closes", wide=True)
        self.comparison = comparison
