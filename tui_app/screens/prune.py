"""The prune dialog (ctrl+p or p): a method and a budget, what they drop shown before anything is dropped.

The dialog builds a ``kvstore.pruning.PruneSpec``, the same object the command
line builds, and previews its ``select`` over the runner's summary of the cache
(positions and the attention each entry received; no copy of the cache): the
positions dropped, and the transcript with those stretches struck through.
Nothing is pruned until the button that names the count is pressed: Enter in
a field only moves to that button. The app keeps the state before the prune
(``u`` undoes it until the next turn).
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static

from kvstore.errors import PruneError
from kvstore.pruning import METHODS, PruneSpec
from tracer.events import SessionView
from tui_app.formatting import byte_count
from tui_app.screens.form import FormScreen
from tui_app.snapshot_info import ranges
from tui_app.transcript import marked, stretches

DROP_SPAN = "drop_span"
CHOICES = [(f"{name}: {text}", name) for name, text in METHODS.items()]
CHOICES.append(("drop a span of positions START END (e.g. one chat turn)", DROP_SPAN))


class PruneScreen(FormScreen[PruneSpec | None]):

    def __init__(self, view: SessionView) -> None:
        super().__init__()
        self.view = view
        self.dropping: list[int] = []  # positions the current settings drop

    def compose(self) -> ComposeResult:
        view = self.view
        n = len(view.positions)
        with Vertical(id="dialog"):
            yield Label("Prune the KV cache", classes="title")
            yield Label(f"Now: {n} cache entries of {view.context_tokens} tokens, {byte_count(view.kv_bytes)}. "
                        "Positions are kept: generation continues at the true next one.", classes="muted")
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
            with VerticalScroll(id="transcript-scroll"):
                yield Static("", id="transcript")
            with Horizontal(classes="buttons"):
                yield Button("Prune", variant="error", id="submit")
                yield Button("Cancel", id="cancel")

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
        view = self.view
        label = self.query_one("#preview", Label)
        button = self.query_one("#submit", Button)
        try:
            spec = self.spec()
            kept = spec.select(view.positions, view.next_position, view.attention_scores)
        except PruneError as error:
            self.dropping = []
            label.update(Text(str(error)[:1].upper() + str(error)[1:] + ".", style="bold red"))
            button.label, button.disabled = "Prune", True
            self._show_transcript()
            return
        kept_set = set(kept)
        self.dropping = [p for i, p in enumerate(view.positions) if i not in kept_set]
        per_entry = view.kv_bytes / len(view.positions) if view.positions else 0
        if self.dropping:
            label.update(f"Drops {len(self.dropping)} entries (positions {ranges(self.dropping)}, struck through "
                         f"below). After: {len(kept)} entries, about {byte_count(round(per_entry * len(kept)))}; "
                         f"the transcript keeps its {view.context_tokens} tokens.")
        else:
            label.update("These settings keep every cache entry: nothing to drop.")
        button.label = f"Drop {len(self.dropping)} entries" if self.dropping else "Prune"
        button.disabled = not self.dropping
        self._show_transcript()

    def _show_transcript(self) -> None:
        runs = stretches(self.view.context_tokens, set(self.view.positions), set(self.dropping))
        self.query_one("#transcript", Static).update(marked(self.view.token_texts, runs))

    def on_input_changed(self) -> None:
        self._preview()

    def on_select_changed(self) -> None:
        self._preview()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in a field goes to the button: pruning is confirmed there, never by Enter in a field."""
        event.stop()
        event.prevent_default()  # not the form's own handler, which submits
        button = self.query_one("#submit", Button)
        if button.disabled:
            self.notify("These settings drop nothing or are incomplete: see the line above the transcript.",
                        severity="warning")
            return
        button.focus()

    def _submit(self) -> None:
        try:
            spec = self.spec()
        except PruneError as error:
            self.notify(f"The prune settings are incomplete: {error}.", severity="warning")
            return
        if self.dropping:
            self.dismiss(spec)
