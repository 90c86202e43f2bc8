"""Attention by head: one layer's query heads side by side, each with the earlier tokens it looked at most.

Drawn from the record's ``per_head`` entries (the strongest positions of each
head, strongest first). As many heads as the pane is wide show at once; the
head cursor (``{`` ``}``) walks them and the window follows it.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table
from rich.text import Text

from tracer.lens_grid import clip
from tracer.records import StepRecord
from tracer.token_text import visible

HEAD_WIDTH = 15  # cells per head column: a token, its weight, a gap


def head_count(record: StepRecord | None, layer: int) -> int:
    evidence = None if record is None else record.attention
    if evidence is None or evidence.per_head is None or layer >= len(evidence.per_head):
        return 0
    return len(evidence.per_head[layer])


def window(count: int, cursor: int, fit: int) -> range:
    """The heads shown: ``fit`` of ``count`` around the ``cursor``."""
    fit = max(1, min(fit, count))
    first = min(max(cursor - fit // 2, 0), count - fit)
    return range(first, first + fit)


def heads_table(record: StepRecord, layer: int, cursor: int, width: int, rows: int,
                token_text: Callable[[int], str]) -> tuple[Table, range]:
    """A table of the heads in view (the cursor's header highlighted), and which heads those are."""
    assert record.attention is not None and record.attention.per_head is not None
    heads = record.attention.per_head[layer]
    shown = window(len(heads), cursor, width // HEAD_WIDTH)
    table = Table.grid(padding=(0, 1))
    columns = [heads[head][:rows] for head in shown]
    header = []
    for head in shown:
        table.add_column(no_wrap=True, width=HEAD_WIDTH - 7)
        table.add_column(no_wrap=True, justify="right", width=5)
        header += [Text(f"h{head}", style="reverse bold" if head == cursor else "bold"), Text("")]
    table.add_row(*header)
    for i in range(max((len(c) for c in columns), default=0)):
        cells = []
        for entries in columns:
            if i < len(entries):
                position, weight = entries[i]
                cells += [Text(clip(visible(token_text(position)), HEAD_WIDTH - 7)),
                          Text(f"{weight:.2f}", style="magenta")]
            else:
                cells += [Text(""), Text("")]
        table.add_row(*cells)
    return table, shown
