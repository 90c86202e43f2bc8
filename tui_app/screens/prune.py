"""The prune dialog (ctrl+p or p): a method and a budget, with the effect previewed.

The preview counts the cache entries each method keeps from the cached
positions alone; the app then prunes for real and reports bytes and tokens
before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, Select

from tui_app.formatting import byte_count
from tui_app.screens.form import FormScreen

METHODS = [
    ("sinks + recent: the first S and the last entries", "sinks_recent"),
    ("attention: heavy hitters + sinks + recent", "heavy_hitters"),
    ("keep last N entries", "keep_last"),
    ("drop a span of positions START END", "drop_span"),
]


@dataclass(frozen=True)
class PruneRequest:
    method: str
    budget: int = 0  # entries to keep (all methods but drop_span)
    sinks: int = 4
    start: int = 0  # drop_span: original positions start..end-1
    end: int = 0

    def kept(self, positions: list[int]) -> int:
        """How many of the cache entries at ``positions`` this request keeps."""
        n = len(positions)
        if self.method == "drop_span":
            return sum(1 for p in positions if not self.start <= p < self.end)
        return min(self.budget, n)


class PruneScreen(FormScreen[PruneRequest | None]):

    def __init__(self, positions: list[int], nbytes: int, tokens: int) -> None:
        super().__init__()
        self.positions = positions
        self.nbytes = nbytes
        self.tokens = tokens

    def compose(self) -> ComposeResult:
        n = len(self.positions)
        with Vertical(id="dialog"):
            yield Label("Prune the KV cache", classes="title")
            yield Label(f"Now: {n} cache entries of {self.tokens} tokens, {byte_count(self.nbytes)}. Positions "
                        "are kept: generation continues at the true next one.", classes="muted")
            yield Label("Method")
            yield Select(METHODS, value="sinks_recent", allow_blank=False, id="method")
            with Horizontal(classes="fields"):
                with Vertical():
                    yield Label("Budget (entries kept)")
                    yield Input(str(max(n // 2, 1)), id="budget", type="integer")
                with Vertical():
                    yield Label("Sinks")
                    yield Input("4", id="sinks", type="integer")
                with Vertical():
                    yield Label("Span START END")
                    yield Input(placeholder="e.g. 10 40", id="span")
            yield Label("", id="preview")
            yield self.buttons("Prune")

    def on_mount(self) -> None:
        self.query_one("#budget", Input).focus()
        self._preview()

    def request(self) -> PruneRequest | None:
        method = str(self.query_one("#method", Select).value)
        try:
            budget = int(self.query_one("#budget", Input).value or 0)
            sinks = int(self.query_one("#sinks", Input).value or 0)
            start = end = 0
            if method == "drop_span":
                start, end = (int(x) for x in self.query_one("#span", Input).value.split())
        except ValueError:
            return None
        if budget < 1 and method != "drop_span" or sinks < 0 or (method == "drop_span" and end <= start):
            return None
        if method == "sinks_recent" and sinks > budget:
            return None
        return PruneRequest(method, budget, sinks, start, end)

    def _preview(self) -> None:
        request = self.request()
        label = self.query_one("#preview", Label)
        if request is None:
            label.update("Give a budget of at least 1 (at least the sinks), or a span START END with END > START.")
            return
        kept = request.kept(self.positions)
        per_entry = self.nbytes / len(self.positions) if self.positions else 0
        label.update(f"After: {kept} cache entries, about {byte_count(round(per_entry * kept))}; "
                     f"tokens stay {self.tokens} (dropped entries are no longer attended to)")

    def on_input_changed(self) -> None:
        self._preview()

    def on_select_changed(self) -> None:
        self._preview()

    def _submit(self) -> None:
        request = self.request()
        if request is None:
            self.notify("The prune settings are incomplete; see the line above the buttons.", severity="warning")
            return
        self.dismiss(request)
