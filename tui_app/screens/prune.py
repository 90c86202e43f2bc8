"""The prune dialog (ctrl+p or p): a method and a budget, with the effect previewed.

The dialog builds a ``kvstore.pruning.PruneSpec``, the same object the command
line builds; the preview counts what that spec keeps of the cached positions
(the runner's summary, not a copy of the cache), with the same rule that
prunes.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, Select

from kvstore.errors import PruneError
from kvstore.pruning import METHODS, PruneSpec
from tui_app.formatting import byte_count
from tui_app.screens.form import FormScreen

DROP_SPAN = "drop_span"
CHOICES = [(f"{name}: {text}", name) for name, text in METHODS.items()]
CHOICES.append(("drop a span of positions START END (e.g. one chat turn)", DROP_SPAN))


class PruneScreen(FormScreen[PruneSpec | None]):

    def __init__(self, positions: tuple[int, ...], nbytes: int, tokens: int) -> None:
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
            yield Select(CHOICES, value="sinks_recent", allow_blank=False, id="method")
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

    def spec(self) -> PruneSpec:
        """The spec the fields describe; ``PruneError`` (one line) when they do not make one."""
        method = str(self.query_one("#method", Select).value)
        try:
            budget = int(self.query_one("#budget", Input).value or 0)
            sinks = int(self.query_one("#sinks", Input).value or 0)
            span = None
            if method == DROP_SPAN:
                start, end = (int(x) for x in self.query_one("#span", Input).value.split())
                span = (start, end)
        except ValueError:
            raise PruneError("give whole numbers: a budget, sinks, and for a span START END") from None
        if method == DROP_SPAN:
            return PruneSpec(None, span=span)
        if budget < 1:
            raise PruneError("give a budget of at least 1 entry")
        return PruneSpec(method, budget=budget, sinks=sinks)

    def _preview(self) -> None:
        label = self.query_one("#preview", Label)
        try:
            spec = self.spec()
            kept = len(spec.select(self.positions, self.tokens - 1, scores=[0.0] * len(self.positions)))
        except PruneError as error:
            label.update(str(error)[:1].upper() + str(error)[1:] + ".")
            return
        per_entry = self.nbytes / len(self.positions) if self.positions else 0
        label.update(f"After: {kept} cache entries, about {byte_count(round(per_entry * kept))}; "
                     f"tokens stay {self.tokens} (dropped entries are no longer attended to)")

    def on_input_changed(self) -> None:
        self._preview()

    def on_select_changed(self) -> None:
        self._preview()

    def _submit(self) -> None:
        try:
            spec = self.spec()
        except PruneError as error:
            self.notify(f"The prune settings are incomplete: {error}.", severity="warning")
            return
        self.dismiss(spec)
