"""A readable rich rendering of a trace, for terminals and logs where the app can't run (``kvtrace --print``)."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.records import StepRecord
from tracer.session import TraceSession
from tracer.token_text import visible

BAR_WIDTH = 10


def bar(value: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(value * width)))
    return "█" * filled + "·" * (width - filled)


def step_table(session: TraceSession, records: list[StepRecord], lens_layers: list[int]) -> Table:
    """One row per token: the choice, its probability, the runners-up, the strongest attention, the lens.

    Headers are one short word each (the caption explains them), so the table keeps its shape at 80 columns.
    """
    caption = "H: entropy (nats) · attended: strongest after token 0 · L<n>: the lens's top-1 at layer n"
    table = Table(title="Step by step", title_justify="left", caption=caption, caption_justify="left",
                  expand=False, header_style="bold")
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("token", style="bold cyan", min_width=5)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("H", justify="right", style="dim", no_wrap=True)
    table.add_column("also", overflow="fold", min_width=8)
    if session.attention_available:
        table.add_column("attended", overflow="fold", min_width=8)
    for layer in lens_layers:
        table.add_column(f"L{layer}", style="magenta", overflow="fold", min_width=4)
    for record in records:
        others = "  ".join(f"{visible(c.text)} {c.prob:.2f}" for c in record.top[1:4] if c.token_id != record.token_id)
        row = [str(record.index), visible(session.token_text(record.position)), f"{record.prob:.2f}",
               bar(record.prob, 6), f"{record.entropy:.2f}", others]
        if session.attention_available and record.attention is not None:
            positions, weights = record.attention.positions, record.attention.mean
            # the first token soaks up attention in most models (an "attention sink"): show what else mattered
            others = [i for i in range(len(weights)) if positions[i] != 0]
            best = sorted(others, key=weights.__getitem__, reverse=True)[:2]
            row.append("  ".join(f"{visible(session.token_text(positions[i]))}@{positions[i]} {weights[i]:.2f}" for i in best))
        elif session.attention_available:
            row.append("")
        if lens_layers:
            layers = session.lens(record.index)
            row.extend(visible(layers[layer].top[0].text) for layer in lens_layers)
        table.add_row(*row)
    return table


def lens_layers_to_show(num_layers: int, count: int = 4) -> list[int]:
    """A few evenly spread layers, always including the last."""
    if num_layers <= count or count <= 1:
        return list(range(num_layers))[-count:] if count > 0 else []
    step = (num_layers - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def trace_view(session: TraceSession, prompt: str, width: int = 120) -> Group:
    """The whole trace for a terminal ``width`` columns wide (fewer lens columns when it is narrow)."""
    loaded = session.loaded
    lens_columns = 4 if width >= 110 else 2 if width >= 70 else 0
    layers = lens_layers_to_show(loaded.fingerprint.num_layers, lens_columns) if session.lens_supported else []
    summary = Text.assemble(
        ("model ", "dim"), (loaded.name, "bold"), ("  layers ", "dim"), str(loaded.fingerprint.num_layers),
        ("  context ", "dim"), f"{session.context_tokens}/{loaded.context_limit}",
        ("  KV cache ", "dim"), f"{session.kv_bytes / 1024:.0f} KiB",
        ("  stopped: ", "dim"), str(session.stop_reason),
    )
    parts = [
        Panel(Text(prompt), title="prompt", title_align="left"),
        Panel(Text(session.reply_text()), title="reply", title_align="left", border_style="green"),
        summary,
        step_table(session, session.records, layers),
    ]
    parts.extend(Text(f"note: {notice}", style="yellow") for notice in session.notices)
    return Group(*parts)
