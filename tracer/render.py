"""A readable rich rendering of a trace, for the terminal without the app (``kvtrace`` headless demo)."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.records import StepRecord
from tracer.session import TraceSession

BAR_WIDTH = 10


def bar(value: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(value * width)))
    return "█" * filled + "·" * (width - filled)


def _show(text: str) -> str:
    return repr(text)[1:-1] or "∅"


def step_table(session: TraceSession, records: list[StepRecord], lens_layers: list[int]) -> Table:
    """One row per token: the choice, its probability, the runners-up, the strongest attention, the lens."""
    table = Table(title="Step by step", title_justify="left", expand=False, header_style="bold")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token", style="bold cyan")
    table.add_column("p", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("H", justify="right", style="dim")
    table.add_column("also considered", overflow="fold")
    if session.attention_available:
        table.add_column("looked at most (after token 0)", overflow="fold")
    for layer in lens_layers:
        table.add_column(f"lens L{layer}", style="magenta", overflow="fold")
    for record in records:
        others = "  ".join(f"{_show(c.text)} {c.prob:.2f}" for c in record.top[1:4] if c.token_id != record.token_id)
        row = [str(record.index), _show(session.token_text(record.position)), f"{record.prob:.2f}",
               bar(record.prob), f"{record.entropy:.2f}", others]
        if session.attention_available and record.attention is not None:
            positions, weights = record.attention.positions, record.attention.mean
            # the first token soaks up attention in most models (an "attention sink"): show what else mattered
            others = [i for i in range(len(weights)) if positions[i] != 0]
            best = sorted(others, key=weights.__getitem__, reverse=True)[:2]
            row.append("  ".join(f"{session.token_text(positions[i])}@{positions[i]} {weights[i]:.2f}" for i in best))
        elif session.attention_available:
            row.append("")
        if lens_layers:
            layers = session.lens(record.index)
            row.extend(_show(layers[layer].top[0].text) for layer in lens_layers)
        table.add_row(*row)
    return table


def lens_layers_to_show(num_layers: int, count: int = 4) -> list[int]:
    """A few evenly spread layers, always including the last."""
    if num_layers <= count:
        return list(range(num_layers))
    step = (num_layers - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def trace_view(session: TraceSession, prompt: str) -> Group:
    loaded = session.loaded
    layers = lens_layers_to_show(loaded.fingerprint.num_layers) if session.lens_supported else []
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
