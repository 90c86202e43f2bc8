"""The status bar: model, device, dtype, context use, KV size, speed, and what the app is doing."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

from tui_app.formatting import byte_count


@dataclass
class Status:
    model: str = "…"
    device: str = ""
    dtype: str = ""
    context_tokens: int = 0
    context_limit: int = 0
    kv_bytes: int = 0
    tokens_per_second: float | None = None
    activity: str = "loading"  # loading | idle | generating | stopping | busy


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
        self.update(self.render_status())

    def render_status(self) -> Text:
        s = self.status
        activity_style = {"generating": "bold green", "stopping": "bold yellow", "loading": "bold yellow",
                          "busy": "bold yellow"}.get(s.activity, "bold")
        speed = "–" if s.tokens_per_second is None else f"{s.tokens_per_second:.1f}"
        parts = [
            (s.model, "bold"),
            (f" {s.device} {s.dtype}".rstrip(), ""),
            (" │ ctx ", "dim"), (f"{s.context_tokens}/{s.context_limit}", ""),
            (" │ KV ", "dim"), (byte_count(s.kv_bytes), ""),
            (" │ ", "dim"), (f"{speed} tok/s", ""),
            (" │ ", "dim"), (f"● {s.activity}", activity_style),
        ]
        return Text.assemble(*parts, no_wrap=True, overflow="ellipsis")
