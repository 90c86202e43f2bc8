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
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from kvstore.pruning import PruneSpec
from tracer import usecases
from tracer.autosave import Autosave
from tracer.errors import UserError
from tracer.events import (
    AutoSaved,
    Event,
    LensReady,
    Opened,
    OpenFailed,
    Progress,
    RunEnded,
    SessionView,
    Stepped,
    TaskEnded,
    TurnStarted,
)
from tracer.protocol import Session
from tracer.records import StepRecord

Listener = Callable[[Event], None]
Opener = Callable[[Callable[[str], None]], Session]  # progress callback -> session
T = TypeVar("T")


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
        self._lens_wanted: int | None = None
        self._open_error: BaseException | None = None
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
        self.view = SessionView.of(self._session, self.autosave.last if self.autosave else None)
        return self.view

    def _autosave(self, session: Session, kind: str) -> None:
        """Save the session to the autosave store after a run of ``kind``; AutoSaved either way (never raises)."""
        try:
            message = self.autosave.save(session, kind)
        except Exception as error:
            self._emit(AutoSaved(None, f"autosave failed: {self._explain(error)}", error=True))
            return
        self._emit(AutoSaved(self.autosave.last, message))

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
                self._session = opener(lambda text: self._emit(Progress(text)))
            except Exception as error:
                self._open_error = error
                self._emit(OpenFailed(self._explain(error)))
                return
            self._emit(Opened(self._refresh()))

        self._jobs.put(run)

    @classmethod
    def headless(cls, opener: Opener, progress: Callable[[str], None]) -> SessionRunner:
        """A runner for scripts: opens the session and waits for it (an open failure is raised here).

        Loading stages go to ``progress``; use ``call`` for the work itself.
        """
        runner = cls(lambda event: progress(event.text) if isinstance(event, Progress) else None)
        runner.open(opener)
        runner.call(lambda session: None).result()
        return runner

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
            before = (len(session.token_ids), len(session.records))

            def on_step(record: StepRecord) -> None:
                if not cancel.is_set():
                    self._emit(Stepped(run_id, record, session.context_tokens, session.kv_bytes))

            try:
                if prepare is not None:
                    prepare(session)
                    self._emit(TurnStarted(run_id, self._refresh()))
                session.generate(steps, cancel=cancel, on_step=on_step)
            except Exception as exc:
                error = self._explain(exc)
            self._emit(RunEnded(run_id, session.stop_reason, error, self._refresh()))
            if self.autosave is not None and (len(session.token_ids), len(session.records)) != before:
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
        return self._start_run(lambda session: session.branch(index, token_id), None, "branch")

    def stop(self) -> None:
        """End the running generation within one step."""
        self._cancel.set()

    # -------------------------------------------------------------------- lens
    def lens(self, index: int) -> None:
        """Compute the lens of record ``index`` (LensReady), unless a newer request supersedes it first."""
        self._lens_wanted = index

        def run() -> None:
            if self._lens_wanted != index or self._session is None:
                return
            try:
                layers = self._session.lens(index)
            except Exception as error:
                self._emit(TaskEnded("lens", f"the lens could not be computed: {self._explain(error)}", error=True))
                return
            self._emit(LensReady(index, layers))

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
        self._task("save", lambda s: usecases.save(s, path, codec).describe(), changes_session=False)

    def load(self, path: str) -> None:
        """Continue from the snapshot ``path`` names (a ``.kvs`` file or ``DIR:NAME``)."""
        def load(session: Session) -> str:
            message = usecases.load_into(session, path).describe()
            if self.autosave is not None:
                self.autosave.loaded(path)
            return message

        self._task("load", load, changes_session=True)

    def prune(self, spec: PruneSpec) -> None:
        def prune(session: Session) -> str:
            message = usecases.prune(session, spec).describe()
            if self.autosave is not None:
                self.autosave.changed()
            return message

        self._task("prune", prune, changes_session=True)

    def export(self, path: str) -> None:
        self._task("export", lambda s: usecases.export_trace(s, path).describe(), changes_session=False)

    def switch_branch(self, index: int) -> None:
        def switch(session: Session) -> str:
            label = self.view.branch_labels[index] if self.view and index < len(self.view.branch_labels) else ""
            session.switch_branch(index)
            if self.autosave is not None:
                self.autosave.switched(index)
            return f"switched to branch {index} ({label}); the line you left takes its place in the list"

        self._task("branch", switch, changes_session=True)
