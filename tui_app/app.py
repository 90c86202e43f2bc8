"""The kvtrace Textual app: chat, token timeline, top-k, attention and lens panes over a session runner.

Threading: the app never touches the session. A ``tracer.runner.SessionRunner``
owns it (its lock, its worker thread, cancellation) and reports every result as
an event; the runner's listener wraps each event in a ``RunnerEvent`` message,
so widgets are updated from the event loop alone. The screen is drawn from
``SessionView`` summaries the runner takes in its worker, and each generation
run has an id: steps of a run that was cancelled or superseded are dropped.
Whatever changes the session (a turn, a load, a prune, a branch) redraws every
pane from the new view, so no pane shows another session's data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import partial

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Container, Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.timer import Timer
from textual.widgets import Footer, Input, Static

from kvstore.pruning import PruneSpec
from tracer import events
from tracer.events import SessionView
from tracer.protocol import Session
from tracer.records import StepRecord
from tracer.autosave import Autosave
from tracer.runner import Opener, SessionRunner
from tui_app import actions
from tui_app.clipboard import copy
from tui_app.details import chat_text, token_details
from tui_app.formatting import byte_count, loading_text
from tui_app.messages import RunnerEvent
from tui_app.screens.compare import CompareScreen
from tui_app.screens.help import HelpScreen
from tui_app.screens.history import HistoryScreen
from tui_app.screens.lens_cell import LensCellScreen
from tui_app.screens.lines import LinesChoice, LinesScreen
from tui_app.screens.load import LoadScreen
from tui_app.screens.prune import PruneScreen
from tui_app.screens.quit import QUIT, SAVE_FIRST, QuitScreen, quit_reasons
from tui_app.screens.save import SaveRequest, SaveScreen
from tui_app.transcript import pruned_note
from tui_app.widgets.attention import AttentionPane
from tui_app.widgets.chat import ChatView
from tui_app.widgets.lens import LensPane
from tui_app.widgets.lens_grid import GridPane, LensGrid
from tui_app.widgets.status import StatusBar
from tui_app.widgets.timeline import TokenTimeline
from tui_app.widgets.topk import TopKPane


def sentence(message: str) -> str:
    """A one-line message of the use-case layer (a lowercase fragment) as a notification sentence."""
    return message[:1].upper() + message[1:] + ("" if message.endswith((".", "!", "?")) else ".")


PANES = {"topk": "1 Top-k", "attention": "2 Attention", "lens": "3 Lens", "grid": "4 Grid"}
ENDINGS = {  # how the chat says why the reply stopped
    "eos": "end of answer",
    "stop": "stopped at a stop string (g continues)",
    "max_tokens": "stopped: max tokens (g continues)",
    "cancelled": "stopped (Esc) · g continues",
    "context_full": "stopped: the context window is full (p prunes the cache to make room)",
}
BACKGROUND_TASKS = ("lens", "compare", "name")  # runner tasks that do not make the app busy
TASKS = {"saving": "a save", "loading": "a load", "pruning": "a prune", "exporting": "an export",
         "switching": "a branch switch", "undoing": "an undo"}


class KvtraceApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "kvtrace"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    # ctrl+p is prune here; the palette is on F2 (and ':'), keys that survive SSH and tmux.
    COMMAND_PALETTE_BINDING = "f2"
    BINDINGS = actions.bindings()

    def __init__(self, session: Session | None = None, *, opener: Opener | None = None, system: str | None = None,
                 prompt: str = "", store: str | None = None, autosave: bool = False) -> None:
        super().__init__()
        if session is None and opener is None:
            raise ValueError("KvtraceApp needs a session or an opener")
        # the snapshot store: the history lists it; with ``autosave`` every finished turn and branch is saved there
        self.store = store
        self.runner = SessionRunner(lambda event: self.post_message(RunnerEvent(event)),
                                    autosave=Autosave(store) if store and autosave else None)
        self._opener: Opener = opener or (lambda progress: session)
        self.view: SessionView | None = None
        self.system = system
        self.load_error: str | None = None
        self.initial_prompt = prompt
        self.run_id = 0
        self.generating = False
        self.busy = False  # a save/load/prune/export/switch task is running
        self.activity = ""  # its activity ("saving", ...)
        self.quit_after_save = False
        self._last_save: SaveRequest | None = None
        self.active_pane = "topk"
        self._run_started = 0.0  # when the run's first token arrived
        self._run_steps = 0
        self._live_reply = ""
        self._token_texts: dict[int, str] = {}
        self._stage = ""  # the model loading stage shown
        self._clock: tuple[float, float] | None = None  # timed loading work: when it started, seconds expected
        self._ticker: Timer | None = None

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield ChatView(id="chat")
            with Vertical(id="right"):
                yield TokenTimeline(self._token_text, id="timeline")
                yield Static(id="pane-bar")
                with Container(id="panes"):
                    yield TopKPane(id="topk", classes="pane -active")
                    yield GridPane(self._token_text, id="grid", classes="pane")  # before the lens: beside it, wide
                    yield LensPane(id="lens", classes="pane")  # before attention: the wide grid's right column
                    yield AttentionPane(self._token_text, id="attention", classes="pane")
        yield Input(self.initial_prompt, placeholder="Message the model; Enter sends · Tab: tokens · F1: help · "
                    "ctrl+q: quit", id="prompt")
        yield Footer(compact=True)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def timeline(self) -> TokenTimeline:
        return self.query_one(TokenTimeline)

    @property
    def chat(self) -> ChatView:
        return self.query_one(ChatView)

    def on_mount(self) -> None:
        self.query_one("#chat").border_title = "Chat"
        self.timeline.border_title = "Tokens"
        self._draw_pane_bar()
        self.status_bar.set(activity="loading", autosave="" if self.store is None
                            else "autosave" if self.runner.autosave else "autosave off")
        self.query_one("#prompt", Input).focus()
        self.chat.show_progress("Loading the model…")
        self.runner.open(self._opener)

    def on_unmount(self) -> None:
        self.runner.close()

    # -- events from the runner -----------------------------------------------------------------
    def on_runner_event(self, message: RunnerEvent) -> None:
        handler = self._HANDLERS.get(type(message.event))
        if handler is not None:
            handler(self, message.event)

    def _progress(self, event: events.Progress) -> None:
        self._stage = event.text
        if event.expected is not None:  # timed work starts: a bar from now on, redrawn as time passes
            self._clock = (time.monotonic(), event.expected)
            self._ticker = self._ticker or self.set_interval(0.5, self._draw_progress)
        self._draw_progress()

    def _draw_progress(self) -> None:
        if self.view is not None or self.load_error is not None:
            if self._ticker is not None:
                self._ticker.stop()
            return
        started, expected = self._clock or (0.0, None)
        elapsed = time.monotonic() - started if self._clock else None
        self.chat.show_progress(loading_text(self._stage, elapsed, expected))

    def _opened(self, event: events.Opened) -> None:
        view = event.view
        self.status_bar.set(model=view.model, device=view.device, dtype=view.dtype,
                            context_limit=view.context_limit, activity="idle")
        self.chat.show_progress(f"{view.model} is ready. Type a message and press Enter; F1 shows every key.")
        for notice in view.notices:
            self.notify(sentence(notice), severity="warning", timeout=8)
        self._sync_view(view)
        self.refresh_bindings()

    def _open_failed(self, event: events.OpenFailed) -> None:
        self.load_error = event.error
        self.status_bar.set(activity="load failed")
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = True  # nothing to send to: q and the other keys reach the app
        self.chat.show_failure(f"The model could not be loaded: {event.error}", "Press q or ctrl+q to quit.")

    def _turn_started(self, event: events.TurnStarted) -> None:
        if event.run_id == self.run_id and self.generating:
            self._sync_view(event.view, streaming=True)

    def _stepped(self, event: events.Stepped) -> None:
        if event.run_id != self.run_id or not self.generating:
            return  # a step of a cancelled or superseded run
        record = event.record
        self._token_texts[record.position] = event.piece or record.text
        self._run_steps += 1
        self._live_reply += record.text
        self.timeline.append(record)
        self.grid_pane.append(record)
        self.chat.update_reply(self._live_reply)
        speed = None
        if self._run_steps == 1:  # the clock starts at the first token, after the prefill
            self._run_started = time.monotonic()
        else:
            speed = (self._run_steps - 1) / max(time.monotonic() - self._run_started, 1e-6)
        self.status_bar.set(context_tokens=event.context_tokens, kv_bytes=event.kv_bytes,
                            **({} if speed is None else {"tokens_per_second": speed}))

    def _run_ended(self, event: events.RunEnded) -> None:
        if event.run_id != self.run_id:
            return
        self.generating = False
        if not self.busy:
            self.status_bar.set(activity="idle")
        self._sync_view(event.view)
        if event.error:
            self.notify(sentence(event.error), severity="error", timeout=8)
        elif event.stop_reason in ("eos", "stop", "context_full") and self._run_steps == 0:
            self.notify(f"The reply is complete ({event.stop_reason}); type a new message to continue.")

    def _lens_ready(self, event: events.LensReady) -> None:
        record = self.timeline.selected_record
        if record is not None and record.index in event.indices:  # no lens now: none can be computed
            self.query_one(LensPane).show(record, record.lens or [])
        self.grid_pane.filled()

    def _compared(self, event: events.Compared) -> None:
        self.push_screen(CompareScreen(event.comparison, self._line_name(event.a), self._line_name(event.b)))

    def _prune_previewed(self, event: events.PrunePreviewed) -> None:
        if isinstance(self.screen, PruneScreen):
            self.screen.show_methods(event)

    def _task_progress(self, event: events.TaskProgress) -> None:
        self.status_bar.set(activity=f"{self.activity} {event.done}/{event.total}")

    def _task_ended(self, event: events.TaskEnded) -> None:
        if event.task not in BACKGROUND_TASKS:
            self.busy = False
            self.activity = ""
            self.status_bar.set(activity="idle")
        if event.view is not None:
            self._sync_view(event.view)
        if event.task == "save" and event.error:
            self._reopen_save(event.message)
            return
        message = sentence(event.message)
        if event.task == "prune" and not event.error:
            message += " Press u to undo it (until the next turn)."
        self.notify(message, severity="error" if event.error else "information", timeout=8)
        if event.task == "save" and self.quit_after_save:
            self.exit()

    def _auto_saved(self, event: events.AutoSaved) -> None:
        self.status_bar.set(autosave="autosave failed" if event.error else "autosaved")
        if event.error:
            self.notify(sentence(event.message), severity="error", timeout=8)
        elif event.view is not None:
            self.view = event.view  # saved now: quitting loses nothing

    _HANDLERS: dict[type, Callable[[KvtraceApp, events.Event], None]] = {
        events.Progress: _progress,
        events.Opened: _opened,
        events.OpenFailed: _open_failed,
        events.TurnStarted: _turn_started,
        events.Stepped: _stepped,
        events.RunEnded: _run_ended,
        events.LensReady: _lens_ready,
        events.Compared: _compared,
        events.PrunePreviewed: _prune_previewed,
        events.TaskProgress: _task_progress,
        events.TaskEnded: _task_ended,
        events.AutoSaved: _auto_saved,
    }

    # -- bindings -------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in actions.MODAL_BLOCKED and isinstance(self.screen, ModalScreen):
            return False
        if action in actions.SESSION_ACTIONS and self.view is None:
            return None
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        for entry in actions.palette_entries():
            yield SystemCommand(entry.command, f"{sentence(entry.help)} ({entry.shown_keys})",
                                partial(self.run_action, entry.action))
        if self.view is not None:
            for i, line in enumerate(self.view.branches):
                yield SystemCommand(f"Switch to line {line.number}: {line.label}",
                                    f"Make line {line.number} current (you are on line {self.view.line})",
                                    partial(self._switch_branch, i))
        yield from super().get_system_commands(screen)

    # -- the session view -----------------------------------------------------------------------
    def _token_text(self, position: int) -> str:
        """Text of the transcript token at ``position``, from the last view and the steps since."""
        return self._token_texts.get(position, "…")

    def _sync_view(self, view: SessionView, *, streaming: bool = False) -> None:
        """Redraw everything from a view the runner took: chat, timeline and every pane."""
        self.view = view
        self._token_texts = dict(enumerate(view.token_texts))
        cached = set(view.positions)
        pruned = frozenset(r.position for r in view.records if r.position < view.next_position) - cached
        self.timeline.set_records(list(view.records), pruned)  # its Selected message redraws the panes
        self.grid_pane.set_records(list(view.records), view.fingerprint.num_layers)
        self._live_reply = view.reply
        notes = [] if streaming else self._notes(view, cached)
        self.chat.show_conversation(*self._conversation(), notes)
        self.status_bar.set(context_tokens=view.context_tokens, kv_bytes=view.kv_bytes)

    def _conversation(self) -> tuple[list[dict[str, str]], str | None]:
        """The chat's messages, and the reply being written unless it is the last message already."""
        messages, reply = list(self.view.messages), self._live_reply
        already_in = bool(messages) and messages[-1]["role"] == "assistant" and messages[-1]["content"] == reply
        show_reply = not already_in and (bool(reply) or (bool(messages) and messages[-1]["role"] == "user"))
        return messages, reply if show_reply else None

    @staticmethod
    def _notes(view: SessionView, cached: set[int]) -> list[str]:
        """Dim lines under the chat: why the reply stopped, and what the cache no longer holds."""
        notes = []
        if view.stop_reason in ENDINGS and view.messages:
            notes.append(ENDINGS[view.stop_reason])
        pruned = pruned_note(view.token_texts, cached)
        if pruned is not None:
            notes.append(pruned + (" (u undoes the prune)" if view.can_undo_prune else ""))
        return notes

    def _draw_pane_bar(self) -> None:
        parts = [f"[reverse b] {title} [/]" if name == self.active_pane else f" {title} " for name, title in PANES.items()]
        self.query_one("#pane-bar", Static).update("".join(parts))

    def _lens_visible(self) -> bool:
        return self.screen.has_class("-wide") or self.active_pane == "lens"

    def _grid_visible(self) -> bool:
        return self.active_pane == "grid"

    @property
    def grid_pane(self) -> GridPane:
        return self.query_one(GridPane)

    def _request_lens(self) -> None:
        """Ask the runner for the lens the screen shows and lacks: the selected token's, then the grid's
        columns in view (the runner computes them in batches, between steps while generating)."""
        records = self.timeline.records
        record = self.timeline.selected_record
        wanted = [record.index] if record is not None and record.lens is None and self._lens_visible() else []
        if self._grid_visible():
            wanted += [i for i in self.grid_pane.grid.visible_indices()
                       if i < len(records) and records[i].lens is None and i not in wanted]
        if wanted:
            self.runner.want_lens(wanted)

    @on(LensGrid.Scrolled)
    def _on_grid_scrolled(self) -> None:
        if self._grid_visible():
            self._request_lens()

    @on(LensGrid.CellClicked)
    def _on_cell_clicked(self, event: LensGrid.CellClicked) -> None:
        self.timeline.select(event.index)
        self.grid_pane.move_layer(0)

    @on(TokenTimeline.Selected)
    def _on_selected(self) -> None:
        # The message only says "the selection moved"; the timeline may have changed since it was
        # posted (a branch or a resync), so show what is selected now.
        self._show_selection(self.timeline.selected_record)

    def _show_selection(self, record: StepRecord | None) -> None:
        self.query_one(TopKPane).show(record)
        self.query_one(AttentionPane).show(record)
        self.grid_pane.select(None if record is None else record.index)
        self._show_lens(record)

    def _show_lens(self, record: StepRecord | None) -> None:
        lens = self.query_one(LensPane)
        if record is None:
            lens.show_pending(None, "Select a generated token to see the per-layer lens.")
        elif record.lens is not None:
            lens.show(record, record.lens)
        elif self._lens_visible():
            lens.show_pending(record, "Computing the lens…" + (" (between steps while the model writes)"
                                                               if self.generating else ""))
        else:
            lens.show_pending(record, "The lens is computed when this pane is shown.")
        self._request_lens()

    # -- generation -----------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def _on_prompt(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if self.view is None:
            self.notify("The model is still loading.", severity="warning")
            return
        if not text:
            return
        if self.generating or self.busy:
            self.notify("Still working: press Escape to stop, then send again.", severity="warning")
            return
        event.input.value = ""
        self.timeline.focus()
        self._begin_run(self.runner.send(text, self.system))

    def _begin_run(self, run_id: int) -> None:
        self.run_id = run_id
        self.generating = True
        self._run_steps = 0
        self.timeline.follow = True
        self.chat.clear_notes()
        self.status_bar.set(activity="generating")

    def _when_idle(self, then: Callable[[], None]) -> None:
        """Run ``then`` now; a running generation is asked to stop first (the runner queues ``then``'s work)."""
        if self.busy:
            self.notify("Still working on the last command; try again in a moment.", severity="warning")
            return
        if self.generating:
            self.runner.stop()
            self.generating = False
            self.status_bar.set(activity="stopping")
        then()

    def _has_turn(self) -> bool:
        if self.view is None or not self.view.token_texts:
            self.notify("Type a message first.", severity="warning")
            return False
        return True

    def action_generate(self) -> None:
        if not self.generating and not self.busy and self._has_turn():
            self._begin_run(self.runner.generate())

    def action_step(self) -> None:
        if not self.generating and not self.busy and self._has_turn():
            self._begin_run(self.runner.generate(1))

    def action_stop(self) -> None:
        if self.generating:
            self.runner.stop()
            self.status_bar.set(activity="stopping")

    # -- selection and panes --------------------------------------------------------------------
    def action_move(self, delta: int) -> None:
        self.timeline.move(delta)

    def action_first(self) -> None:
        self.timeline.select(0)

    def action_last(self) -> None:
        self.timeline.select(len(self.timeline.records) - 1)

    def action_candidate(self, delta: int) -> None:
        """↑ ↓: the layer cursor while the grid is shown, else the candidate to branch with."""
        if self._grid_visible():
            self.grid_pane.move_layer(delta)
        else:
            self.query_one(TopKPane).move_cursor(delta)

    def action_attention_mode(self) -> None:
        self.query_one(AttentionPane).toggle_mode()

    def action_attention_layer(self, delta: int) -> None:
        self.query_one(AttentionPane).shift_layer(delta)

    def action_attention_head(self, delta: int) -> None:
        self.query_one(AttentionPane).shift_head(delta)

    def action_pane(self, name: str) -> None:
        self.active_pane = name
        for pane in self.query(".pane"):
            pane.set_class(pane.id == name, "-active")
        self.screen.set_class(name == "grid", "-grid")
        self._draw_pane_bar()
        if name in ("lens", "grid"):
            self._show_lens(self.timeline.selected_record)

    def action_grid_metric(self) -> None:
        self.action_pane("grid")
        self.grid_pane.cycle_metric()

    def action_open_cell(self) -> None:
        record = self.timeline.selected_record
        if not self._grid_visible() or record is None:
            return
        if record.lens is None:
            self.notify("The lens of this token is still being computed.", severity="warning")
            return
        layer = self.grid_pane.grid.cursor
        self.push_screen(LensCellScreen(record, layer, self._token_text(record.position)))

    def action_picture(self) -> None:
        """The grid shown, then the screen as SVG once it is drawn."""
        if not self._has_turn():
            return
        self.action_pane("grid")
        self.call_after_refresh(self._save_picture)

    def _save_picture(self) -> None:
        name = datetime.now().strftime("kvtrace-grid-%Y%m%d-%H%M%S.svg")
        try:
            path = self.save_screenshot(filename=name, path=".")
        except OSError as error:
            self.notify(f"Could not write {name}: {error.strerror or error}.", severity="error", timeout=8)
            return
        self.notify(f"Wrote the grid picture to {path}.", timeout=8)

    def action_focus_input(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(actions.help_rows()))

    # -- quitting -------------------------------------------------------------------------------
    def action_leave(self) -> None:
        """q: quit from the main screen (in a dialog q is a letter); asks first when something would be lost."""
        self._quit_or_ask()

    async def action_quit(self) -> None:
        """ctrl+q: as q, from anywhere; a second ctrl+q in the question quits."""
        if isinstance(self.screen, QuitScreen):
            self.exit()
        else:
            self._quit_or_ask()

    def _quit_or_ask(self) -> None:
        reasons = quit_reasons(self.view, generating=self.generating, task=TASKS.get(self.activity))
        if not reasons:
            self.exit()
            return
        can_save = bool(self.view and self.view.unsaved) and not self.busy
        self.push_screen(QuitScreen(reasons, can_save=can_save), self._quit_answered)

    def _quit_answered(self, answer: str | None) -> None:
        if answer == QUIT:
            self.exit()
        elif answer == SAVE_FIRST:
            self.quit_after_save = True
            self._when_idle(self._open_save)

    # -- branches -------------------------------------------------------------------------------
    def action_branch(self) -> None:
        self._when_idle(self._branch)

    @on(TopKPane.BranchRequested)
    def _on_branch_requested(self) -> None:
        self.action_branch()

    def _branch(self) -> None:
        index = self.timeline.selected
        candidate = self.query_one(TopKPane).candidate
        if index is None or candidate is None:
            self.notify("Select a generated token first (← →).", severity="warning")
            return
        if candidate.token_id == self.timeline.selected_record.token_id:
            self.notify("That is the token already chosen: pick another candidate with ↑ ↓.", severity="warning")
            return
        number = 1 + max([self.view.line, *(line.number for line in self.view.branches)])
        self.notify(f"Branching at token #{index} with {candidate.text!r}: this is line {number}; B goes back to "
                    f"line {self.view.line}.")
        self._begin_run(self.runner.branch(index, candidate.token_id))

    def _line_name(self, number: int) -> str:
        """``line 3`` or ``line 3 “name”``."""
        names = {self.view.line: self.view.line_name, **{b.number: b.name for b in self.view.branches}}
        return f"line {number}" + (f" “{names[number]}”" if names.get(number) else "")

    def action_lines(self) -> None:
        if self._has_turn():
            self.push_screen(LinesScreen(self.view), self._lines_chosen)

    def _lines_chosen(self, choice: LinesChoice | None) -> None:
        if choice is None:
            return
        if choice.action == "compare":
            self.runner.compare(*choice.numbers)
        elif choice.action == "name":
            self.runner.name_line(choice.numbers[0], choice.name)
        elif choice.numbers[0] != self.view.line:
            self._switch_branch([b.number for b in self.view.branches].index(choice.numbers[0]))

    def action_switch_branch(self) -> None:
        if self.view is not None and not self.view.branches:
            self.notify("There is no other line yet: b makes one.", severity="warning")
            return
        self._switch_branch(len(self.view.branches) - 1)

    def _switch_branch(self, i: int) -> None:
        self._when_idle(lambda: self._start_task("switching", partial(self.runner.switch_branch, i)))

    # -- snapshots, pruning, export, copy --------------------------------------------------------
    def _start_task(self, activity: str, start: Callable[[], None]) -> None:
        self.busy = True
        self.activity = activity
        self.status_bar.set(activity=activity)
        start()

    def _save_summary(self) -> str:
        view = self.view
        return f"{view.context_tokens} tokens, KV cache {byte_count(view.kv_bytes)}, {view.model}"

    def action_save(self) -> None:
        self.quit_after_save = False
        self._when_idle(self._open_save)

    def _open_save(self) -> None:
        if self._has_turn():
            self.push_screen(SaveScreen(self._save_summary()), self._save_chosen)

    def _reopen_save(self, error: str) -> None:
        """The save failed: the dialog again, on the same path, with the reason."""
        request = self._last_save
        assert request is not None
        self.push_screen(SaveScreen(self._save_summary(), path=request.path, codec=request.codec, error=error),
                         self._save_chosen)

    def _save_chosen(self, request: SaveRequest | None) -> None:
        if request is None:
            self.quit_after_save = False
            return
        self._last_save = request
        self._start_task("saving", partial(self.runner.save, request.path, request.codec))

    def action_load(self) -> None:
        self._when_idle(lambda: self.push_screen(LoadScreen(self.view.fingerprint), self._load_chosen))

    def _load_chosen(self, path: str | None) -> None:
        if path is not None:
            self._start_task("loading", partial(self.runner.load, path))

    # -- the store's history (tui_app.screens.history) ---------------------------------------------
    def action_history(self) -> None:
        if self.store is None:
            self.notify("This app was started without a snapshot store.", severity="warning")
            return
        self._when_idle(lambda: self.push_screen(HistoryScreen(self.store, self.view.fingerprint),
                                                 self._history_chosen))

    def _history_chosen(self, name: str | None) -> None:
        if name is not None:
            self._load_chosen(f"{self.store}:{name}")

    def action_prune(self) -> None:
        self._when_idle(self._open_prune)

    def _open_prune(self) -> None:
        if self._has_turn():
            self.push_screen(PruneScreen(self.view, self.runner.preview_prune), self._prune_chosen)

    def _prune_chosen(self, spec: PruneSpec | None) -> None:
        if spec is not None:
            self._start_task("pruning", partial(self.runner.prune, spec))

    def action_undo_prune(self) -> None:
        if self.view is not None and not self.view.can_undo_prune:
            self.notify("There is no prune to undo (a prune can be undone until the next turn).",
                        severity="warning")
            return
        self._when_idle(lambda: self._start_task("undoing", self.runner.undo_prune))

    def action_export(self) -> None:
        if not self._has_turn():
            return
        path = datetime.now().strftime("kvtrace-trace-%Y%m%d-%H%M%S.jsonl")
        self._when_idle(lambda: self._start_task("exporting", partial(self.runner.export, path)))

    def action_export_tensors(self) -> None:
        record = self.timeline.selected_record
        if record is None:
            self.notify("Select a generated token first (← →).", severity="warning")
            return
        path = datetime.now().strftime(f"kvtrace-step-{record.index}-%Y%m%d-%H%M%S.safetensors")
        self._when_idle(lambda: self._start_task("exporting", partial(self.runner.export_tensors, record.index,
                                                                      path)))

    def action_copy(self, what: str) -> None:
        record = self.timeline.selected_record
        if what == "token":
            if record is None:
                self.notify("Select a generated token first (← →).", severity="warning")
                return
            text, name = token_details(record, self._token_text), f"token #{record.index}'s details"
        elif what == "reply":
            if not self._live_reply.strip():
                self.notify("There is no reply yet.", severity="warning")
                return
            text, name = self._live_reply + "\n", "the reply"
        else:
            text, name = chat_text(*self._conversation()), "the chat"
        message, failed = copy(self, text, name)
        self.notify(message, severity="error" if failed else "information", timeout=8)
