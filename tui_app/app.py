"""The kvtrace Textual app: chat, token timeline, top-k, attention and lens panes over a TraceSession.

Threading: everything that touches the model (loading, prefill, steps, the
lens, snapshots) runs in thread workers holding ``session_lock``; results come
back only as messages (``tui_app.messages``), so widgets are touched from the
event loop alone. Each generation run gets an id; steps from a run that was
cancelled or superseded are dropped, and when a run ends the screen is redrawn
from the session, which is the single source of truth.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import partial
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Static
from textual.worker import get_current_worker

from tracer.errors import UserError
from tracer.records import StepRecord
from tui_app.formatting import byte_count
from tui_app.messages import LensReady, LoadProgress, ModelFailed, ModelReady, RunFinished, StepTaken, TaskDone, TurnStarted
from tui_app.screens.help import HelpScreen
from tui_app.screens.load import LoadScreen
from tui_app.screens.prune import PruneRequest, PruneScreen
from tui_app.screens.save import SaveRequest, SaveScreen
from tui_app.widgets.attention import AttentionPane
from tui_app.widgets.chat import ChatView
from tui_app.widgets.lens import LensPane
from tui_app.widgets.status import StatusBar
from tui_app.widgets.timeline import TokenTimeline
from tui_app.widgets.topk import TopKPane

SessionLoader = Callable[[Callable[[str], None]], Any]  # progress callback -> TraceSession

PANES = {"topk": "1 Top-k", "attention": "2 Attention", "lens": "3 Lens"}

# Actions that need a loaded session and no dialog on top.
SESSION_ACTIONS = {"save", "load", "prune", "generate", "step", "branch", "switch_branch", "export", "stop",
                   "move", "first", "last", "candidate", "attention_mode", "attention_layer", "pane",
                   "focus_input", "leave"}
# What the command palette lists besides Textual's own commands.
COMMANDS: list[tuple[str, str, str]] = [  # (action, palette title, help)
    ("generate", "Generate", "Generate up to max-new-tokens more tokens (g)"),
    ("step", "One step", "Generate exactly one token (n)"),
    ("stop", "Stop", "Stop the running generation (escape)"),
    ("branch", "Branch", "Continue from the selected token with the selected top-k candidate (b)"),
    ("switch_branch", "Other branch", "Swap to the previous branch and back (B)"),
    ("save", "Save snapshot", "Save the KV cache to a .kvs file (ctrl+s)"),
    ("load", "Load snapshot", "Load a .kvs file and continue from it (ctrl+o)"),
    ("prune", "Prune cache", "Shrink the KV cache (ctrl+p or p)"),
    ("export", "Export trace", "Write the trace as JSON Lines (ctrl+e)"),
    ("attention_mode", "Attention mean/layer", "Switch the attention pane between the mean and one layer (a)"),
    ("pane('topk')", "Show top-k", "Show the top-k pane (1)"),
    ("pane('attention')", "Show attention", "Show the attention pane (2)"),
    ("pane('lens')", "Show lens", "Show the lens pane (3)"),
    ("focus_input", "Type a message", "Focus the input box (i)"),
    ("help", "Help", "Show every key (f1 or ?)"),
]


class KvtraceApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "kvtrace"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    # ctrl+p is prune here; the palette is on F2 (and ':'), keys that survive SSH and tmux.
    COMMAND_PALETTE_BINDING = "f2"
    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+o", "load", "Load"),
        Binding("ctrl+p,p", "prune", "Prune", key_display="p"),
        Binding("g", "generate", "Gen"),
        Binding("n", "step", "Step"),
        Binding("escape", "stop", "Stop"),
        Binding("b", "branch", "Branch"),
        Binding("B", "switch_branch", "Other branch", show=False),
        Binding("ctrl+e", "export", "Export", show=False, priority=True),
        Binding("f1,question_mark", "help", "Help", key_display="?"),
        Binding("q", "leave", "Quit"),
        Binding("f2", "command_palette", "Palette", show=False, priority=True),
        Binding("colon", "command_palette", "Palette", show=False),
        Binding("left", "move(-1)", "Previous token", show=False),
        Binding("right", "move(1)", "Next token", show=False),
        Binding("home", "first", "First token", show=False),
        Binding("end", "last", "Last token", show=False),
        Binding("up", "candidate(-1)", "Previous candidate", show=False),
        Binding("down", "candidate(1)", "Next candidate", show=False),
        Binding("a", "attention_mode", "Mean/layer", show=False),
        Binding("left_square_bracket", "attention_layer(-1)", "Previous layer", show=False),
        Binding("right_square_bracket", "attention_layer(1)", "Next layer", show=False),
        Binding("1", "pane('topk')", "Top-k", show=False),
        Binding("2", "pane('attention')", "Attention", show=False),
        Binding("3", "pane('lens')", "Lens", show=False),
        Binding("i", "focus_input", "Type", show=False),
    ]

    def __init__(self, session: Any = None, *, loader: SessionLoader | None = None, system: str | None = None,
                 prompt: str = "") -> None:
        super().__init__()
        if session is None and loader is None:
            raise ValueError("KvtraceApp needs a session or a loader")
        self.session = session
        self.loader = loader
        self.system = system
        self.load_error: str | None = None
        self.initial_prompt = prompt
        self.session_lock = threading.Lock()
        self.run_id = 0
        self.cancel = threading.Event()
        self.generating = False
        self.busy = False  # a save/load/prune/export task is running
        self.active_pane = "topk"
        self._after_run: list[Callable[[], None]] = []
        self._run_started = 0.0  # when the run's first token arrived
        self._run_steps = 0
        self._live_reply = ""
        self._token_texts: dict[int, str] = {}

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield ChatView(id="chat")
                yield Input(self.initial_prompt, placeholder="Message the model, Enter to send (Tab: tokens, ? help)",
                            id="prompt")
            with Vertical(id="right"):
                yield TokenTimeline(id="timeline")
                yield Static(id="pane-bar")
                with Container(id="panes"):
                    yield TopKPane(id="topk", classes="pane -active")
                    yield AttentionPane(self._token_text, id="attention", classes="pane")
                    yield LensPane(id="lens", classes="pane")
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
        self.status_bar.set(activity="loading")
        self.query_one("#prompt", Input).focus()
        if self.session is not None:
            self._session_ready(self.session)
        else:
            self.chat.show_progress("Loading the model…")
            self._load_worker()

    # -- loading --------------------------------------------------------------------------------
    @work(thread=True, group="load")
    def _load_worker(self) -> None:
        assert self.loader is not None
        try:
            session = self.loader(lambda text: self.post_message(LoadProgress(text)))
        except UserError as error:
            self.post_message(ModelFailed(str(error)))
        else:
            self.post_message(ModelReady(session))

    def on_load_progress(self, message: LoadProgress) -> None:
        self.chat.show_progress(f"Loading: {message.text}")

    def on_model_ready(self, message: ModelReady) -> None:
        self._session_ready(message.session)

    def on_model_failed(self, message: ModelFailed) -> None:
        self.load_error = message.error
        self.status_bar.set(activity="load failed")
        self.chat.show_progress(f"[b red]The model could not be loaded:[/] {message.error}\nPress q to quit.")

    def _session_ready(self, session: Any) -> None:
        self.session = session
        loaded = session.loaded
        self.status_bar.set(model=loaded.name, device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."),
                            context_limit=loaded.context_limit, activity="idle")
        self.chat.show_progress(f"{loaded.name} is ready. Type a message and press Enter; ? shows every key.")
        for notice in session.notices:
            self.notify(notice, severity="warning", timeout=8)
        self._sync_view()
        self.refresh_bindings()

    # -- bindings -------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in SESSION_ACTIONS or action == "help":
            if isinstance(self.screen, ModalScreen):
                return False
            if action not in ("help", "leave") and self.session is None:
                return None
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        for action, title, help_text in COMMANDS:
            yield SystemCommand(title, help_text, partial(self.run_action, action))
        if self.session is not None:
            for i, branch in enumerate(self.session.branches):
                label = getattr(branch, "label", "") or f"branch {i}"
                yield SystemCommand(f"Switch to branch {i}: {label}", "Swap the current line with this branch",
                                    partial(self._switch_branch, i))
        yield from super().get_system_commands(screen)

    def keys_for_help(self) -> list[tuple[str, str]]:
        return [
            ("Enter", "send the message in the input box and generate the reply"),
            ("F2 or :", "command palette: every action is there too (ctrl+p is prune here)"),
            ("g / n", "generate more tokens / exactly one token"),
            ("Escape", "stop generating (within one step)"),
            ("ctrl+s", "save a snapshot of the KV cache (file name, codec)"),
            ("ctrl+o", "load a snapshot (shows its header first)"),
            ("ctrl+p or p", "prune the KV cache (method, budget)"),
            ("ctrl+e", "export the trace as JSON Lines"),
            ("← → Home End", "move the token selection in the timeline"),
            ("↑ ↓", "choose a top-k candidate (▶) for branching"),
            ("b", "branch: continue from the selected token with the ▶ candidate"),
            ("B", "swap to the previous branch (and back); all branches are in the palette"),
            ("1 2 3", "show the top-k, attention or lens pane (narrow terminals)"),
            ("a", "attention pane: switch between the mean over layers and one layer"),
            ("[ ]", "attention pane: previous / next layer"),
            ("Tab / i", "move the focus / go to the input box"),
            ("f1 or ?", "this help"),
            ("q / ctrl+q", "quit"),
        ]

    # -- the session view -----------------------------------------------------------------------
    def _token_text(self, position: int) -> str:
        """Text of the transcript token at ``position``, read from the session when it was idle."""
        return self._token_texts.get(position, "…")

    def _sync_view(self) -> None:
        """Redraw everything from the session; only while no worker is using it."""
        session = self.session
        self._token_texts = {p: session.token_text(p) for p in range(session.context_tokens)}
        self.timeline.set_records(session.records)
        messages = list(session.messages)
        reply = session.reply_text()
        self._live_reply = reply
        already_in = bool(messages) and messages[-1]["role"] == "assistant" and messages[-1]["content"] == reply
        show_reply = not already_in and (bool(reply) or (bool(messages) and messages[-1]["role"] == "user"))
        self.chat.show_conversation(messages, reply if show_reply else None)
        self.status_bar.set(context_tokens=session.context_tokens, kv_bytes=session.kv_bytes)
        if not session.records:
            self._show_selection(None)

    def _draw_pane_bar(self) -> None:
        parts = [f"[reverse b] {title} [/]" if name == self.active_pane else f" {title} " for name, title in PANES.items()]
        self.query_one("#pane-bar", Static).update("".join(parts))

    def _lens_visible(self) -> bool:
        return self.screen.has_class("-wide") or self.active_pane == "lens"

    @on(TokenTimeline.Selected)
    def _on_selected(self) -> None:
        # The message only says "the selection moved"; the timeline may have changed since it was
        # posted (a branch or a resync), so show what is selected now.
        self._show_selection(self.timeline.selected_record)

    def _show_selection(self, record: StepRecord | None) -> None:
        self.query_one(TopKPane).show(record)
        self.query_one(AttentionPane).show(record)
        self._show_lens(record)

    def _show_lens(self, record: StepRecord | None) -> None:
        lens = self.query_one(LensPane)
        if record is None:
            lens.show_pending(None, "Select a generated token to see the per-layer lens.")
        elif record.lens is not None:
            lens.show(record, record.lens)
        elif self.generating:
            lens.show_pending(record, "The lens is computed when generation stops (Escape stops it).")
        elif self._lens_visible():
            lens.show_pending(record, "Computing the lens…")
            self._lens_worker(record.index)
        else:
            lens.show_pending(record, "The lens is computed when this pane is shown.")

    @work(thread=True, group="lens", exclusive=True)
    def _lens_worker(self, index: int) -> None:
        worker = get_current_worker()
        with self.session_lock:
            if worker.is_cancelled:
                return
            try:
                layers = self.session.lens(index)
            except UserError as error:
                self.post_message(TaskDone(f"The lens could not be computed: {error}", error=True))
                return
        self.post_message(LensReady(index, layers))

    def on_lens_ready(self, message: LensReady) -> None:
        record = self.timeline.selected_record
        if record is not None and record.index == message.index:
            self.query_one(LensPane).show(record, message.layers)

    # -- generation -----------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def _on_prompt(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if self.session is None:
            self.notify("The model is still loading.", severity="warning")
            return
        if not text:
            return
        if self.generating or self.busy:
            self.notify("Still working: press Escape to stop, then send again.", severity="warning")
            return
        event.input.value = ""
        self.timeline.focus()
        self._start_run(partial(_start_turn, text=text, system=self.system), steps=None)

    def _start_run(self, prepare: Callable[[Any], Any] | None, steps: int | None) -> None:
        self.run_id += 1
        self.cancel = threading.Event()
        self.generating = True
        self._run_steps = 0
        self.timeline.follow = True
        self.status_bar.set(activity="generating")
        self._generate_worker(self.run_id, prepare, steps, self.cancel)

    @work(thread=True, group="generate")
    def _generate_worker(self, run_id: int, prepare: Callable[[Any], Any] | None, steps: int | None,
                         cancel: threading.Event) -> None:
        session, error = self.session, None

        def on_step(record: StepRecord) -> None:
            if not cancel.is_set():
                self.post_message(StepTaken(run_id, record, session.context_tokens, session.kv_bytes))

        with self.session_lock:
            try:
                if prepare is not None:
                    prepare(session)
                    texts = [session.token_text(p) for p in range(session.context_tokens)]
                    self.post_message(TurnStarted(run_id, list(session.records), list(session.messages),
                                                  session.reply_text(), texts))
                session.generate(steps, cancel=cancel, on_step=on_step)
            except UserError as exc:
                error = str(exc)
            stop_reason = session.stop_reason
        self.post_message(RunFinished(run_id, stop_reason, error))

    def on_turn_started(self, message: TurnStarted) -> None:
        if message.run_id == self.run_id and not self.cancel.is_set():
            self._token_texts = dict(enumerate(message.token_texts))
            self.timeline.set_records(message.records)
            self.chat.show_conversation(message.messages, message.reply)
            self._live_reply = message.reply

    def on_step_taken(self, message: StepTaken) -> None:
        if message.run_id != self.run_id or self.cancel.is_set():
            return  # a step of a cancelled or superseded run
        record = message.record
        self._token_texts[record.position] = record.text
        self._run_steps += 1
        self._live_reply += record.text
        self.timeline.append(record)
        self.chat.update_reply(self._live_reply)
        speed = None
        if self._run_steps == 1:  # the clock starts at the first token, after the prefill
            self._run_started = time.monotonic()
        else:
            speed = (self._run_steps - 1) / max(time.monotonic() - self._run_started, 1e-6)
        self.status_bar.set(context_tokens=message.context_tokens, kv_bytes=message.kv_bytes,
                            **({} if speed is None else {"tokens_per_second": speed}))

    def on_run_finished(self, message: RunFinished) -> None:
        if message.run_id != self.run_id:
            return
        self.generating = False
        self.status_bar.set(activity="idle")
        self._sync_view()
        if message.error:
            self.notify(message.error, severity="error", timeout=8)
        elif message.stop_reason in ("eos", "stop", "context_full") and self._run_steps == 0:
            self.notify(f"The reply is complete ({message.stop_reason}); type a new message to continue.")
        pending, self._after_run = self._after_run, []
        for then in pending:
            then()

    def _when_idle(self, then: Callable[[], None]) -> None:
        """Run ``then`` now, or once the running generation has stopped (it is asked to stop)."""
        if self.busy:
            self.notify("Still working on the last command; try again in a moment.", severity="warning")
        elif self.generating:
            self._after_run.append(then)
            self.cancel.set()
            self.status_bar.set(activity="stopping")
        else:
            then()

    def _has_turn(self) -> bool:
        if not self.session.token_ids:
            self.notify("Type a message first.", severity="warning")
            return False
        return True

    def action_generate(self) -> None:
        if self.generating:
            return
        if self._has_turn():
            self._start_run(None, steps=None)

    def action_step(self) -> None:
        if self.generating:
            return
        if self._has_turn():
            self._start_run(None, steps=1)

    def action_stop(self) -> None:
        if self.generating and not self.cancel.is_set():
            self.cancel.set()
            self.status_bar.set(activity="stopping")

    # -- selection and panes --------------------------------------------------------------------
    def action_move(self, delta: int) -> None:
        self.timeline.move(delta)

    def action_first(self) -> None:
        self.timeline.select(0)

    def action_last(self) -> None:
        self.timeline.select(len(self.timeline.records) - 1)

    def action_candidate(self, delta: int) -> None:
        self.query_one(TopKPane).move_cursor(delta)

    def action_attention_mode(self) -> None:
        self.query_one(AttentionPane).toggle_mode()

    def action_attention_layer(self, delta: int) -> None:
        self.query_one(AttentionPane).shift_layer(delta)

    def action_pane(self, name: str) -> None:
        self.active_pane = name
        for pane in self.query(".pane"):
            pane.set_class(pane.id == name, "-active")
        self._draw_pane_bar()
        if name == "lens":
            self._show_lens(self.timeline.selected_record)

    def action_focus_input(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_leave(self) -> None:
        """q: quit, but only from the main screen (in a dialog q is a letter; ctrl+q always quits)."""
        self.exit()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.keys_for_help()))

    # -- branches -------------------------------------------------------------------------------
    def action_branch(self) -> None:
        self._when_idle(self._branch)

    def _branch(self) -> None:
        index = self.timeline.selected
        candidate = self.query_one(TopKPane).candidate
        if index is None or candidate is None:
            self.notify("Select a generated token first (← →).", severity="warning")
            return
        if candidate.token_id == self.timeline.selected_record.token_id:
            self.notify("That is the token already chosen: pick another candidate with ↑ ↓.", severity="warning")
            return
        self.notify(f"Branching at token #{index} with {candidate.text!r}; B goes back to the previous branch.")
        self._start_run(partial(_branch, index=index, token_id=candidate.token_id), steps=None)

    def action_switch_branch(self) -> None:
        if self.session is not None and not self.session.branches:
            self.notify("There is no other branch yet: b makes one.", severity="warning")
            return
        self._switch_branch(len(self.session.branches) - 1)

    def _switch_branch(self, i: int) -> None:
        self._when_idle(lambda: self._run_task("Switching…", partial(_switch_branch, index=i)))

    # -- snapshots, pruning, export --------------------------------------------------------------
    def action_save(self) -> None:
        self._when_idle(self._open_save)

    def _open_save(self) -> None:
        session = self.session
        summary = f"{session.context_tokens} tokens, KV cache {byte_count(session.kv_bytes)}, {session.loaded.name}"
        self.push_screen(SaveScreen(summary), self._save_chosen)

    def _save_chosen(self, request: SaveRequest | None) -> None:
        if request is not None:
            self._run_task("Saving…", partial(_save, request=request))

    def action_load(self) -> None:
        self._when_idle(lambda: self.push_screen(LoadScreen(self._describe_snapshot), self._load_chosen))

    def _describe_snapshot(self, path: str) -> str:
        from tui_app.snapshot_info import describe_snapshot

        tokenizer = getattr(self.session.loaded, "tokenizer", None)
        decode = None if tokenizer is None else tokenizer.decode
        return describe_snapshot(path, self.session.loaded.fingerprint, decode)

    def _load_chosen(self, path: str | None) -> None:
        if path is not None:
            self._run_task("Loading the snapshot…", partial(_load, path=path))

    def action_prune(self) -> None:
        self._when_idle(self._open_prune)

    def _open_prune(self) -> None:
        if not self._has_turn():
            return
        with self.session_lock:
            state = self.session.export_state()
        screen = PruneScreen(list(state.positions), state.nbytes, len(state.token_ids))
        self.push_screen(screen, partial(self._prune_chosen, state))

    def _prune_chosen(self, state: Any, request: PruneRequest | None) -> None:
        if request is not None:
            self._run_task("Pruning…", partial(_prune, state=state, request=request))

    def action_export(self) -> None:
        self._when_idle(lambda: self._run_task("Exporting…", _export))

    def _run_task(self, activity: str, job: Callable[[Any], tuple[str, bool]]) -> None:
        self.busy = True
        self.status_bar.set(activity=activity.rstrip("…").lower())
        self._task_worker(job)

    @work(thread=True, group="task")
    def _task_worker(self, job: Callable[[Any], tuple[str, bool]]) -> None:
        with self.session_lock:
            try:
                text, changed = job(self.session)
            except UserError as error:
                self.post_message(TaskDone(str(error), error=True))
                return
        self.post_message(TaskDone(text, changed_session=changed))

    def on_task_done(self, message: TaskDone) -> None:
        self.busy = False
        self.status_bar.set(activity="idle")
        if message.changed_session:
            self._sync_view()
        self.notify(message.text, severity="error" if message.error else "information", timeout=8)


# -- jobs run in worker threads with the session lock held ---------------------------------------
def _start_turn(session: Any, *, text: str, system: str | None) -> None:
    session.start_turn(text, system=system)


def _branch(session: Any, *, index: int, token_id: int) -> None:
    session.branch(index, token_id)


def _switch_branch(session: Any, *, index: int) -> tuple[str, bool]:
    session.switch_branch(index)
    return f"Switched to branch {index}; the line you left is now branch {index} (B swaps back).", True


def _save(session: Any, *, request: SaveRequest) -> tuple[str, bool]:
    from kvstore import snapshot

    size = snapshot.save(session.export_state(), request.path, codec=request.codec)
    return f"Saved {byte_count(size)} to {request.path} ({request.codec}).", False


def _load(session: Any, *, path: str) -> tuple[str, bool]:
    from kvstore import snapshot

    state = snapshot.load(path, expected=session.loaded.fingerprint)
    session.import_state(state)
    return f"Loaded {path}: {len(state.token_ids)} tokens, KV {byte_count(state.nbytes)}.", True


def _prune(session: Any, *, state: Any, request: PruneRequest) -> tuple[str, bool]:
    from kvstore import pruning

    if request.method == "keep_last":
        pruned = pruning.keep_last(state, request.budget)
    elif request.method == "sinks_recent":
        pruned = pruning.sinks_recent(state, request.sinks, request.budget - request.sinks)
    elif request.method == "heavy_hitters":
        pruned = pruning.heavy_hitters(state, request.budget, sinks=request.sinks)
    else:
        pruned = pruning.drop_span(state, request.start, request.end)
    session.import_state(pruned)
    return (f"Pruned: KV {byte_count(state.nbytes)} → {byte_count(pruned.nbytes)}, cached tokens "
            f"{state.cache_length} → {pruned.cache_length} (transcript {len(pruned.token_ids)} tokens)."), True


def _export(session: Any) -> tuple[str, bool]:
    from tracer.dump import write_trace

    path = datetime.now().strftime("kvtrace-trace-%Y%m%d-%H%M%S.jsonl")
    with open(path, "w", encoding="utf-8") as out:
        write_trace(session, out, with_lens=False)
    return f"Exported {len(session.records)} steps to {path}.", False
