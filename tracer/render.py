"""A readable rich rendering of a trace, for terminals and logs where the app can't run (``kvtrace --print``).

Laid out for the width it is given (80 columns when piped): one line per
token, cells cut with an ellipsis rather than wrapped, and the columns that
need room (the probability bar, lens layers) only where there is room.
"""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.lens import settling_layer
from tracer.lens_grid import agrees, cell_text, clip
from tracer.records import StepRecord
from tracer.session import TraceSession
from tracer.token_text import visible

BAR_WIDTH = 10
WIDE = 110  # from here: a probability bar and four lens layers; below, the settling layer alone
GRID_CELL = 7  # cells per token column of the lens grid, the gap included
GRID_LAYERS = 12  # layers the lens grid shows at most (spread over the depth, the output always)


def bar(value: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(value * width)))
    return "█" * filled + "·" * (width - filled)


def strongest_attended(session: TraceSession, record: StepRecord, count: int) -> str:
    """The positions ``record`` attended to most, leaving out token 0 (the "attention sink" most models have)."""
    if record.attention is None:
        return ""
    positions, weights = record.attention.positions, record.attention.mean
    others = [i for i in range(len(weights)) if positions[i] != 0]
    best = sorted(others, key=weights.__getitem__, reverse=True)[:count]
    return "  ".join(f"{visible(session.token_text(positions[i]))}@{positions[i]} {weights[i]:.2f}" for i in best)


def step_table(session: TraceSession, records: list[StepRecord], lens_layers: list[int], *,
               width: int = 120) -> Table:
    """One line per token: the choice, its probability, the runners-up, the strongest attention, the lens.

    Headers are one short word each (the caption explains them); the runners-up and the attention share
    what the other columns leave of ``width``, and end in an ellipsis when longer.
    """
    lens = session.lens_supported
    wide = width >= WIDE
    tokens = [visible(session.token_text(r.position)) for r in records]
    token_width = min(max((len(t) for t in tokens), default=5), 12)
    fixed = len(str(len(records))) + max(token_width, 5) + 4 + 5 + (7 if lens else 0) + (6 if wide else 0) + 9 * len(lens_layers)
    columns = 5 + int(lens) + int(wide) + int(session.attention_available) + len(lens_layers)
    room = max(width - fixed - 2 * columns, 16)
    also = room if not session.attention_available else room * 11 // 20
    caption = ("H: entropy (nats) · attended: strongest after token 0"
               + (" · settles: the first layer from which the lens keeps the token on top" if lens else "")
               + (" · L<n>: the lens's top-1 at layer n" if lens_layers else ""))
    table = Table(title="Step by step", title_justify="left", caption=caption, caption_justify="left",
                  expand=False, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("token", style="bold cyan", no_wrap=True, overflow="ellipsis", min_width=5, max_width=12)
    table.add_column("p", justify="right", no_wrap=True)
    if wide:
        table.add_column("", no_wrap=True)
    table.add_column("H", justify="right", style="dim", no_wrap=True)
    if lens:
        table.add_column("settles", justify="right", no_wrap=True)
    table.add_column("also", no_wrap=True, overflow="ellipsis", max_width=also)
    if session.attention_available:
        table.add_column("attended", no_wrap=True, overflow="ellipsis", max_width=room - also)
    for layer in lens_layers:
        table.add_column(f"L{layer}", style="magenta", no_wrap=True, overflow="ellipsis", max_width=9)
    for record, token in zip(records, tokens):
        alternatives = [c for c in record.top if c.token_id != record.token_id][: 3 if wide else 2]
        others = "  ".join(f"{visible(c.text)} {c.prob:.2f}" for c in alternatives)
        row = [str(record.index), token, f"{record.prob:.2f}"]
        if wide:
            row.append(bar(record.prob, 6))
        row.append(f"{record.entropy:.2f}")
        layers = session.lens(record.index) if lens else []
        if lens:
            settle = settling_layer(layers, record.token_id)
            row.append("–" if settle is None else str(settle))
        row.append(others)
        if session.attention_available:
            row.append(strongest_attended(session, record, 2 if wide else 1))
        row.extend(visible(layers[layer].top[0].text) for layer in lens_layers)
        table.add_row(*row)
    return table


def lens_layers_to_show(num_layers: int, count: int = 4) -> list[int]:
    """A few evenly spread layers, always including the last."""
    if num_layers <= count or count <= 1:
        return list(range(num_layers))[-count:] if count > 0 else []
    step = (num_layers - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def lens_grid(session: TraceSession, records: list[StepRecord], width: int = 120) -> Group:
    """The classic logit-lens picture in text: tokens across, layers down (the output last), each cell the
    layer's top-1, bold where it is already the token chosen; as many tokens a band as ``width`` holds, bands
    one under the other for the whole reply."""
    session.lens_many([r.index for r in records])
    depth = len(records[0].lens) if records and records[0].lens else 0
    layers = lens_layers_to_show(depth, GRID_LAYERS)
    per_band = max((width - 4) // GRID_CELL, 1)
    bands: list[Text] = [Text("Lens grid: the top-1 of each layer (bold: already the token chosen)", style="bold")]
    for start in range(0, len(records), per_band):
        band = records[start : start + per_band]
        lines = [Text("    ") + Text("".join(clip(visible(session.token_text(r.position)), GRID_CELL - 1)
                                               .ljust(GRID_CELL) for r in band).rstrip(), style="cyan")]
        for layer in layers:
            line = Text(f"{'out' if layer == depth - 1 else layer:>3} ", style="dim")
            for record in band:
                line.append(cell_text(record, layer, GRID_CELL - 1).ljust(GRID_CELL),
                            style="bold" if agrees(record, layer) else "dim")
            line.rstrip()
            lines.append(line)
        bands.append(Text("\n").join([Text(""), *lines]))
    return Group(*bands)


def trace_view(session: TraceSession, prompt: str, width: int = 120) -> Group:
    """The whole trace for a terminal ``width`` columns wide (no bar and no lens columns when it is narrow)."""
    loaded = session.loaded
    wide = width >= WIDE
    layers = lens_layers_to_show(loaded.fingerprint.num_layers, 4) if session.lens_supported and wide else []
    summary = Text(" · ", style="dim").join([
        Text.assemble(("model ", "dim"), (loaded.name, "bold")),
        Text.assemble(("layers ", "dim"), str(loaded.fingerprint.num_layers)),
        Text.assemble(("context ", "dim"), f"{session.context_tokens}/{loaded.context_limit}"),
        Text.assemble(("KV cache ", "dim"), f"{session.kv_bytes / 1024:.0f} KiB"),
        Text.assemble(("stopped: ", "dim"), str(session.stop_reason)),
    ])
    parts = [
        Panel(Text(prompt), title="prompt", title_align="left"),
        Panel(Text(session.reply_text()), title="reply", title_align="left", border_style="green"),
        summary,
        step_table(session, session.records, layers, width=width),
    ]
    if session.lens_supported and session.records:
        parts.append(lens_grid(session, session.records, width))
    parts.extend(Text(f"note: {notice}", style="yellow") for notice in session.notices)
    return Group(*parts)
