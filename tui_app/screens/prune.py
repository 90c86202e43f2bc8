"""The prune dialog (ctrl+p or p): a method and a budget, what they drop shown before anything is dropped.

The dialog builds a ``kvstore.pruning.PruneSpec``, the same object the command
line builds, and previews its ``select`` over the runner's summary of the cache
(positions and the attention each entry received; no copy of the cache): the
positions dropped, and the transcript with those stretches struck through.
Beside it, live, what every method at the budget would do to the next token
(KL to the full cache, top-1, top 5): the runner computes it on its worker
(``SessionRunner.preview_prune``, a pruned copy, never the session) and the
app hands the result to ``show_methods``; a per-head method's struck-through
positions (those no head keeps) come from there too.
Nothing is pruned until the button that names the count is pressed: Enter in
a field only moves to that button. The app keeps the state before the prune
(``u`` undoes it until the next turn).
"""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static

from kvstore.errors import PruneError
from kvstore.pruning import METHODS, PruneSpec
from tracer.events import PrunePreviewed, SessionView
from tui_app.formatting import byte_count
from tui_app.prune_table import preview_lines
from tui_app.screens.form import FormScreen
from tui_app.snapshot_info import ranges
from tui_app.transcript import marked, stretches

DROP_SPAN = "drop_span"
CHOICES = [(f"{name}: {method.keeps}", name) for name, method in METHODS.items()]
CHOICES.append(("drop a span of positions START END (e.g. one chat turn)", DROP_SPAN))
PREVIEW_DELAY = 0.4  # seconds of quiet typing before the next-token preview is asked for
PreviewRequest = Callable[[int, int, "tuple[int, int] | None"], None]


class PruneScreen(FormScreen[PruneSpec | None]):

    def __init__(self, view: SessionView, request_preview: PreviewRequest | None = None) -> None:
        super().__init__()
        self.view = view
        self.request_preview = request_preview  # asks the runner for a PrunePreviewed (None: no live preview)
        self.dropping: list[int] = []  # positions the current settings drop
        self.previewed: PrunePreviewed | None = None  # the latest preview of the current settings
        self._timer = None

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
            with VerticalScroll(id="prune-details"):  # scrolls, so the buttons stay on a 24-row screen
                yield Label("", id="preview")
                yield Static("", id="methods")
                yield Static("", id="transcript")
            with Horizontal(classes="buttons"):
                yield Button("Prune", variant="error", id="submit")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#budget", Input).focus()
        self._changed()

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

    def _preview_key(self) -> tuple[int, int, None] | None:
        """The (budget, sinks, span) the next-token preview is for; None when the fields name no method."""
        try:
            spec = self.spec()
        except PruneError:
            return None
        return None if spec.method is None else (spec.budget, spec.sinks, None)

    def _ask_preview(self) -> None:
        key = self._preview_key()
        if key is None or self.request_preview is None:
            return
        if self.previewed is None or (self.previewed.budget, self.previewed.sinks, self.previewed.span) != key:
            self.query_one("#methods", Static).update("Computing what each method does to the next token…")
            self.request_preview(*key)

    def show_methods(self, event: PrunePreviewed) -> None:
        """The runner's preview arrived: show it if it is still for the fields' settings."""
        if self._preview_key() != (event.budget, event.sinks, event.span):
            return
        self.previewed = event
        methods = self.query_one("#methods", Static)
        if event.preview is None:
            methods.update(Text(f"No preview: {event.error}", style="red"))
        else:
            methods.update("\n".join(preview_lines(event.preview, len(self.view.positions), wide=False)))
        self._preview()

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
        if spec.per_head and spec.budget < len(kept):
            self._per_head_preview(spec, len(kept), per_entry)
            self._show_transcript()
            return
        if self.dropping:
            label.update(f"Drops {len(self.dropping)} entries (positions {ranges(self.dropping)}, struck through "
                         f"below). After: {len(kept)} entries, about {byte_count(round(per_entry * len(kept)))}; "
                         f"the transcript keeps its {view.context_tokens} tokens.")
        else:
            label.update("These settings keep every cache entry: nothing to drop.")
        button.label = f"Drop {len(self.dropping)} entries" if self.dropping else "Prune"
        button.disabled = not self.dropping
        self._show_transcript()

    def _per_head_preview(self, spec: PruneSpec, entries: int, per_entry: float) -> None:
        """A per-head method keeps ``budget`` of each head's ``entries``; which positions no head keeps is
        known once the runner's preview (which prunes a copy) has come back."""
        row = None if self.previewed is None or self.previewed.preview is None else next(
            (r for r in self.previewed.preview.methods if r.method == spec.method and r.error is None), None)
        self.dropping = list(row.dropped) if row is not None else []
        struck = (f"; no head keeps {len(self.dropping)} positions (struck through below)" if row is not None
                  else "; the positions no head keeps are struck through once the preview is in")
        self.query_one("#preview", Label).update(
            f"Keeps {spec.budget} of the {entries} entries in each layer's KV heads, each head its own"
            f"{struck}. After: about {byte_count(round(per_entry * spec.budget))}; the transcript keeps its "
            f"{self.view.context_tokens} tokens.")
        button = self.query_one("#submit", Button)
        button.label, button.disabled = f"Keep {spec.budget} per head", False

    def _show_transcript(self) -> None:
        runs = stretches(self.view.context_tokens, set(self.view.positions), set(self.dropping))
        self.query_one("#transcript", Static).update(marked(self.view.token_texts, runs))

    def _changed(self) -> None:
        self._preview()
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(PREVIEW_DELAY, self._ask_preview)

    def on_input_changed(self) -> None:
        self._changed()

    def on_select_changed(self) -> None:
        self._changed()

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
        if not self.query_one("#submit", Button).disabled:
            self.dismiss(spec)
