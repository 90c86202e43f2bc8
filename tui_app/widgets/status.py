"""The status bar: model, device, dtype, context use, KV size, speed, and what the app is doing.

The figures (once a model is loaded) and the activity always show; the model
name gives way (with an ellipsis) when the terminal is narrow.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import Static

from tui_app.formatting import byte_count, short_bytes

SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
SHORT_AUTOSAVE = {"autosave": "auto", "autosaved": "saved", "autosave off": "no auto"}  # narrow terminals
ACTIVITY_STYLES = {"generating": "bold green", "stopping": "bold yellow", "loading": "bold yellow",
                   "load failed": "bold red"}


@dataclass
class Status:
    model: str = "…"
    device: str = ""
    dtype: str = ""
    context_tokens: int = 0
    context_limit: int = 0
    kv_bytes: int = 0
    tokens_per_second: float | None = None
    activity: str = "loading"  # loading | idle | generating | stopping | saving | ...
    autosave: str = ""  # "autosave", "autosave off", "autosave failed" ("": the app has no store)


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.status = Status()

    def set(self, **changes) -> None:
        for name, value in changes.items():
            setattr(self.status, name, value)
        self.update(self.render_status(self.size.width or 80))

    def on_resize(self) -> None:
        self.update(self.render_status(self.size.width))

    def render_status(self, width: int) -> Text:
        s = self.status
        speed = "–" if s.tokens_per_second is None else f"{s.tokens_per_second:.1f}"
        wide = width >= 120
        dtype = s.dtype if wide else SHORT_DTYPES.get(s.dtype, s.dtype)
        kv = byte_count(s.kv_bytes) if wide else short_bytes(s.kv_bytes)
        activity = ((" │ ", "dim"), (f"● {s.activity}", ACTIVITY_STYLES.get(s.activity, "bold")))
        if s.autosave:
            activity += ((" │ ", "dim"), (s.autosave if wide else SHORT_AUTOSAVE.get(s.autosave, s.autosave),
                                          "bold red" if s.autosave.endswith("failed") else "dim"))
        if not s.context_limit:  # no model yet: no figures to show
            figures = Text.assemble(*activity)
        else:
            figures = Text.assemble(
                (" │ ctx ", "dim"), f"{s.context_tokens}/{s.context_limit}",
                (" │ KV ", "dim"), kv,
                (" │ ", "dim"), f"{speed} tok/s",
                *activity,
            )
        place = f" {s.device} {dtype}".rstrip()
        room = max(width - 2 - figures.cell_len - cell_len(place), 4)
        model = s.model if cell_len(s.model) <= room else s.model[: room - 1] + "…"
        return Text.assemble((model, "bold"), place, figures, no_wrap=True, overflow="ellipsis")
