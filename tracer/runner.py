"""The runner: the one owner of a trace session, its lock, its worker thread and cancellation.

Everything that touches the session (opening it, turns, steps, the lens,
snapshots, pruning, export) runs as a job on one worker thread, holding the
session lock, in the order it was asked for. Results leave only as events
(``tracer.events``) handed to a listener, from the worker thread: the app
turns them into Textual messages, a headless caller into lines of output.
Callers never touch the session; they read ``view``, a summary the worker
refreshes after every job.

Each generation run has an id and its own cancel event: ``stop()`` ends the
current run within one step, and a caller can drop events of runs it no
longer shows.

Beside the session the runner keeps what only it can know: whether the
session changed since it was last saved or loaded (a screen asks before
quitting), the state before the last prune (one level of undo, dropped at the
next turn), and stable numbers for the lines of generation (``tracer.lines``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from kvstore.errors import PruneError
from kvstore.pruning import PruneSpec
from kvstore.state import KVState
from tracer import usecases
from tracer.autosave import Autosave
from tracer.errors import TracerError, UserError
from tracer.events import (
    AutoSaved,
    Compared,
    Event,
    LensReady,
    Opened,
    OpenFailed,
    Progress,
    PrunePreviewed,
    RunEnded,
    SessionView,
    Stepped,
    TaskEnded,
    TaskProgress,
    TurnStarted,
)
from tracer.lines import LineNumbers
from tracer.protocol import Session
from tracer.records import StepRecord

Listener = Callable[[Event], None]
LENS_BATCH = 8  # records per lens job: columns fill in a batch at a time, and other jobs run between batches
RUN_LENS_BATCH = 2  # records per lens batch between two steps of a generation: Escape still stops quickly
RUN_LENS_SHARE = 0.5  # while generating, the lens may take up to this share of the run's time
Opener = Callable[[Callable[[str], None]], Session]  # progress callback -> session
T = TypeVar("T")


class OpenProgress:
    """The progress callback an opener gets: stages as ``Progress`` events, and with ``expect`` how long
    the work starting at the current stage should take (``tracer.loading`` says so for a first GGUF load)."""

    def __init__(self, emit: Callable[[Event], None]) -> None:
        self._emit = emit
        self._stage = ""

    def __call__(self, text: str) -> None:
        self._stage = text
        self._emit(Progress(text))

    def expect(self, seconds: float) -> None:
        self._emit(Progress(self._stage, expected=seconds))


class SessionRunner:
    """Runs jobs on a session in one worker thread and reports what happened as events."""

    def __init__(self, listener: Listener, *, lock: Any = None, autosave: Autosave | None = None) -> None:
        self._listener = listener
        self.autosave = autosave  # saves every finished turn and branch to a store (in the worker)
        self.lock = lock if lock is not None else threading.Lock()
        self.view: SessionView | None = None
        self._session: Session | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._run_id = 0
        self._cancel = threading.Event()
        self._lens_wanted: tuple[int, ...] = ()  # replaced whole by the caller, thinned by the worker
        self._lens_request = threading.Lock()  # guards _lens_wanted between the two
        self._lens_queued = False
        self._preview_wanted: tuple | None = None  # the latest prune preview asked for (older ones are skipped)
        self._open_error: BaseException | None = None
        self._lines = LineNumbers()
        self._version = 0  # bumped by every change to the session
        self._saved_version = 0  # the version last saved or loaded
        self._saved_to: str | None = None
        self._before_prune: tuple[KVState, int] | None = None  # the state and version a prune replaced
        self._next_version = 1  # never reused: an undone version can never equal a later one
        self._thread = threading.Thread(target=self._work, name="kvtrace-runner", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ plumbing
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self.lock:
                job()

    @staticmethod
    def _explain(error: Exception) -> str:
        """One line for an error: a user's mistake as it is, a bug named as one (the worker goes on)."""
        if isinstance(error, UserError):
            return str(error)
        return f"unexpected error (a bug in kvtrace, please report it): {type(error).__name__}: {error}"

    def _emit(self, event: Event) -> None:
        self._listener(event)

    def _refresh(self) -> SessionView:
        assert self._session is not None
        unsaved = self._version != self._saved_version and bool(self._session.token_ids)
        self.view = SessionView.of(self._session, self._lines, unsaved=unsaved, saved_to=self._saved_to,
                                   can_undo_prune=self._before_prune is not None,
                                   autosaved=self.autosave.last if self.autosave else None)
        return self.view

    def _autosave(self, session: Session, kind: str) -> None:
        """Save the session to the autosave store after a run of ``kind``; AutoSaved either way (never raises)."""
        try:
            message = self.autosave.save(session, kind)
        except Exception as error:
            self._emit(AutoSaved(None, f"autosave failed: {self._explain(error)}", error=True))
            return
        self._saved(self.autosave.last)  # nothing is lost by quitting now
        self._emit(AutoSaved(self.autosave.last, message, view=self._refresh()))

    def _changed(self) -> None:
        """The session changed: it differs from any saved copy."""
        self._version = self._next_version
        self._next_version += 1

    def _saved(self, path: str) -> None:
        self._saved_version = self._version
        self._saved_to = path

    def _new_turn(self) -> None:
        """Generation, a branch switch or a load moves on: the state before the last prune is let go."""
        self._before_prune = None

    def call(self, job: Callable[[Session], T]) -> Future[T]:
        """Run ``job(session)`` in the worker (after what is queued); its result or error in the future.

        For headless callers that want a use case's result directly; the view is refreshed afterwards.
        """
        future: Future[T] = Future()

        def run() -> None:
            try:
                if self._session is None:
                    raise self._open_error or RuntimeError("the runner has no session")
                future.set_result(job(self._session))
            except BaseException as error:  # handed to the caller, who decides what it means
                future.set_exception(error)
            finally:
                if self._session is not None:
                    self._refresh()

        self._jobs.put(run)
        return future

    def close(self) -> None:
        """Stop the current run and end the worker once the queued jobs are done."""
        self.stop()
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---------------------------------------------------------------- opening
    def open(self, opener: Opener) -> None:
        """Open the session in the worker (loading a model can take a while): Progress..., Opened or OpenFailed."""

        def run() -> None:
            try:
                self._session = opener(OpenProgress(self._emit))
            except Exception as error:
                self._open_error = error
                self._emit(OpenFailed(self._explain(error)))
                return
            self._emit(Opened(self._refresh()))

        self._jobs.put(run)

    @classmethod
    def headless(cls, opener: Opener, progress: Callable[[str], None]) -> SessionRunner:
        """A runner for scripts: opens the session and waits for it (an open failure is raised here).

        Loading stages go to ``progress``; use ``call`` for the work itself, and the runner as a context
        manager, so its worker has ended before the interpreter does (whatever the job raised).
        """
        def stages(event: Event) -> None:
            if isinstance(event, Progress) and event.expected is None:  # each stage once
                progress(event.text)

        runner = cls(stages)
        runner.open(opener)
        try:
            runner.call(lambda session: None).result()
        except BaseException:
            runner.__exit__(None, None, None)
            raise
        return runner

    def __enter__(self) -> SessionRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop what runs and wait for the worker to end."""
        self.close()
        self.join()

    def attach(self, session: Session) -> None:
        """Use an already open session."""
        self.open(lambda progress: session)

    # ------------------------------------------------------------- generation
    def _start_run(self, prepare: Callable[[Session], Any] | None, steps: int | None, kind: str) -> int:
        self._run_id += 1
        run_id = self._run_id
        cancel = self._cancel = threading.Event()

        def run() -> None:
            session = self._session
            assert session is not None
            error = None
            stepped = False
            started, lens_seconds = time.monotonic(), 0.0
            version = self._version

            def on_step(record: StepRecord) -> None:
                nonlocal stepped, lens_seconds
                stepped = True
                if not cancel.is_set():
                    self._emit(Stepped(run_id, record, session.context_tokens, session.kv_bytes,
                                       session.token_text(record.position)))
                if not cancel.is_set() and lens_seconds <= RUN_LENS_SHARE * (time.monotonic() - started):
                    begun = time.monotonic()
                    self._lens_batch(session, RUN_LENS_BATCH)
                    lens_seconds += time.monotonic() - begun

            try:
                if prepare is not None:
                    prepare(session)
                    self._new_turn()
                    self._changed()
                    self._emit(TurnStarted(run_id, self._refresh()))
                session.generate(steps, cancel=cancel, on_step=on_step)
            except Exception as exc:
                error = self._explain(exc)
            if stepped:
                self._new_turn()
                self._changed()
            self._emit(RunEnded(run_id, session.stop_reason, error, self._refresh()))
            if self.autosave is not None and self._version != version:
                self._autosave(session, kind)

        self._jobs.put(run)
        return run_id

    def send(self, text: str, system: str | None = None) -> int:
        """A new user turn, then the reply up to the sampling settings' max new tokens; returns the run id."""
        return self._start_run(lambda session: session.start_turn(text, system=system), None, "turn")

    def generate(self, steps: int | None = None) -> int:
        """More of the current reply (``steps`` tokens, default the settings' max new tokens)."""
        return self._start_run(None, steps, "more")

    def branch(self, index: int, token_id: int) -> int:
        """From generated token ``index``, continue with ``token_id`` instead (the old line is kept)."""

        def prepare(session: Session) -> None:
            session.branch(index, token_id)
            self._lines.branched()

        return self._start_run(prepare, None, "branch")

    def stop(self) -> None:
        """End the running generation within one step."""
        self._cancel.set()

    # -------------------------------------------------------------------- lens
    def want_lens(self, indices: Sequence[int]) -> None:
        """Compute the lens and the attribution of these records, the first first, in batches (a LensReady
        each); a newer request replaces what is left of this one. While a reply is generated, small batches run
        between its steps, taking at most ``RUN_LENS_SHARE`` of the time."""
        with self._lens_request:
            self._lens_wanted = tuple(indices)
        if not self._lens_queued:
            self._lens_queued = True
            self._jobs.put(self._lens_job)

    def _lens_job(self) -> None:
        self._lens_queued = False  # before reading the request: a newer one queues another job
        if self._session is not None and self._lens_batch(self._session, LENS_BATCH):
            self._lens_queued = True
            self._jobs.put(self._lens_job)  # the rest after whatever was asked for meanwhile

    def _lens_batch(self, session: Session, size: int) -> bool:
        """Compute the lens of up to ``size`` wanted records that lack it; whether any did."""
        records = session.records
        batch = [i for i in self._lens_wanted if 0 <= i < len(records) and records[i].lens is None][:size]
        if not batch:
            return False
        if not session.lens_supported:  # nothing to compute: say so once
            self._lens_wanted = ()
            self._emit(LensReady(tuple(batch)))
            return False
        try:
            session.lens_many(batch)
            for index in batch:
                session.attribution(index)
        except Exception as error:
            self._lens_wanted = ()
            self._emit(TaskEnded("lens", f"the lens could not be computed: {self._explain(error)}", error=True))
            return False
        with self._lens_request:  # asked for once: a record restored without hidden states stays without a lens
            self._lens_wanted = tuple(i for i in self._lens_wanted if i not in batch)
        self._emit(LensReady(tuple(batch)))
        return True

    # ---------------------------------------------------------------- lines
    def compare(self, a: int, b: int) -> None:
        """Lines number ``a`` and ``b`` side by side from where they part (Compared)."""

        def run() -> None:
            session = self._session
            assert session is not None
            try:
                comparison = session.compare_lines(self._lines.index_of(a), self._lines.index_of(b))
            except KeyError as missing:
                self._emit(TaskEnded("compare", f"there is no line {missing}", error=True))
                return
            except Exception as error:
                self._emit(TaskEnded("compare", self._explain(error), error=True))
                return
            self._emit(Compared(a, b, comparison))

        self._jobs.put(run)

    def name_line(self, number: int, name: str) -> None:
        """Call line ``number`` ``name`` (an empty name takes the name away)."""

        def rename(session: Session) -> str:
            if number != self._lines.current and number not in self._lines.others:
                raise TracerError(f"there is no line {number}")
            if name.strip():
                self._lines.names[number] = name.strip()
                return f"line {number} is now called {name.strip()!r}"
            self._lines.names.pop(number, None)
            return f"line {number} has no name now"

        self._task("name", rename, changes_session=True)

    def export_tensors(self, index: int, path: str) -> None:
        """Record ``index``'s tensors to ``path`` (.safetensors) and its JSON sidecar."""
        self._task("tensors", lambda session: usecases.export_tensors(session, index, path).describe(),
                   changes_session=False)

    def preview_prune(self, budget: int, sinks: int, span: tuple[int, int] | None) -> None:
        """Preview every pruning method at ``budget`` (PrunePreviewed), unless a newer request supersedes it
        first; the session is not changed (the preview prunes copies)."""
        wanted = (budget, sinks, span)
        self._preview_wanted = wanted

        def run() -> None:
            if self._preview_wanted != wanted or self._session is None:
                return
            try:
                result = usecases.preview_prune(self._session, budget, sinks, span)
            except Exception as error:
                self._emit(PrunePreviewed(budget, sinks, span, None, self._explain(error)))
                return
            self._emit(PrunePreviewed(budget, sinks, span, result))

        self._jobs.put(run)

    # ------------------------------------------------------------------- tasks
    def _task(self, name: str, job: Callable[[Session], str], *, changes_session: bool) -> None:
        def run() -> None:
            assert self._session is not None
            try:
                message = job(self._session)
            except Exception as error:
                self._emit(TaskEnded(name, self._explain(error), error=True, view=self._refresh()))
                return
            self._emit(TaskEnded(name, message, view=self._refresh() if changes_session else None))

        self._jobs.put(run)

    def save(self, path: str, codec: str) -> None:
        def save(session: Session) -> str:
            saved = usecases.save(session, path, codec)
            self._saved(path)
            return saved.describe()

        self._task("save", save, changes_session=True)

    def load(self, path: str) -> None:
        """Continue from the snapshot ``path`` names (a ``.kvs`` file or ``DIR:NAME``)."""

        def load(session: Session) -> str:
            loaded = usecases.load_into(session, path)
            if not session.branches:  # another transcript: its lines start afresh
                self._lines.restart()
            self._new_turn()
            self._changed()
            self._saved(path)
            if self.autosave is not None:
                self.autosave.loaded(path)
            return loaded.describe()

        self._task("load", load, changes_session=True)

    def prune(self, spec: PruneSpec) -> None:
        def prune(session: Session) -> str:
            version = self._version
            pruned = usecases.prune(session, spec)
            self._before_prune = (pruned.before, version)
            self._changed()
            if self.autosave is not None:
                self.autosave.changed()
            return pruned.describe()

        self._task("prune", prune, changes_session=True)

    def undo_prune(self) -> None:
        """Put back the cache as it was before the last prune (kept until the next turn)."""

        def undo(session: Session) -> str:
            if self._before_prune is None:
                raise PruneError("there is no prune to undo (a prune can be undone until the next turn)")
            state, version = self._before_prune
            undone = usecases.undo_prune(session, state)
            self._before_prune = None
            self._version = version  # exactly the state it was: saved if it was saved
            if self.autosave is not None:
                self.autosave.changed()
            return undone.describe()

        self._task("undo", undo, changes_session=True)

    def export(self, path: str) -> None:
        def export(session: Session) -> str:
            return usecases.export_trace(
                session, path, with_lens=session.lens_supported,
                progress=lambda done, total: self._emit(TaskProgress("export", done, total))).describe()

        self._task("export", export, changes_session=False)

    def switch_branch(self, index: int) -> None:
        """Make line ``index`` of the view's ``branches`` current; the line left takes its place."""

        def switch(session: Session) -> str:
            left = self._lines.current
            session.switch_branch(index)
            self._lines.switched(index)
            self._new_turn()
            self._changed()
            if self.autosave is not None:
                self.autosave.switched(index)
            return f"now on line {self._lines.current}; line {left}, which you left, is kept"

        self._task("branch", switch, changes_session=True)
