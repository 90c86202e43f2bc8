"""The app never touches the session from its event loop: the runner's worker does, under its lock."""

from __future__ import annotations

import threading
import time

from app_pilot import load_by_keys, notifications, save_by_keys, send, wait_idle, wait_until
from fake_session import FakeSession

from tui_app.app import KvtraceApp
from tui_app.screens.prune import PruneScreen


class RecordingLock:
    """A lock that remembers which threads acquired it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.threads: set[int] = set()

    def __enter__(self):
        self.threads.add(threading.get_ident())
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)


class WatchedSession(FakeSession):
    """Records the threads that call any of its methods."""

    def __getattribute__(self, name: str):
        value = object.__getattribute__(self, name)
        if callable(value) and not name.startswith("_"):
            object.__getattribute__(self, "callers").add(threading.get_ident())
        return value

    def __post_init__(self) -> None:
        object.__setattr__(self, "callers", set())
        super().__post_init__()


async def test_no_flow_takes_the_session_lock_or_calls_the_session_on_the_event_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = WatchedSession()
    app = KvtraceApp(session)
    lock = app.runner.lock = RecordingLock()
    event_loop = threading.get_ident()
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three four five six")  # a turn and its reply
        app.timeline.focus()
        await pilot.press("n")  # one more step
        await wait_idle(pilot)
        await pilot.press("p")  # prune
        app.screen.query_one("#budget").value = "6"
        app.screen.query_one("#budget").focus()
        await pilot.press("enter", "enter")  # to the button, then confirm
        await wait_idle(pilot)
        await pilot.press("u")  # undo the prune
        await wait_idle(pilot)
        await pilot.press("p")  # and prune again
        app.screen.query_one("#budget").value = "6"
        await pilot.press("enter", "enter")
        await wait_idle(pilot)
        await pilot.press("c", "y", "Y")  # copy: drawn from the view, never from the session
        await save_by_keys(pilot, tmp_path / "s.kvs")
        await load_by_keys(pilot, tmp_path / "s.kvs", len(session.token_ids))
        await pilot.press("ctrl+e")  # export
        await wait_idle(pilot)
        assert any(n.startswith("Exported") for n in notifications(app))
        assert any(n.startswith("Prune undone") for n in notifications(app))
        assert sum(n.startswith("Wrote") for n in notifications(app)) == 3, "\n".join(notifications(app))
    assert lock.threads and event_loop not in lock.threads
    assert session.callers and event_loop not in session.callers


async def test_the_views_never_call_the_session_on_the_event_loop(tmp_path, monkeypatch):
    """The grid (columns filled while generating and after), heads, a cell, lines named and compared, tensors
    and the picture: all the session work runs in the runner's worker."""
    monkeypatch.chdir(tmp_path)
    session = WatchedSession(step_delay=0.01)
    app = KvtraceApp(session)
    event_loop = threading.get_ident()
    async with app.run_test(size=(100, 30)) as pilot:
        app.timeline.focus()
        await pilot.press("4")  # the grid shown before the reply: its columns fill in between steps
        await send(pilot, "one two three four five six")
        assert any(r.lens is not None for r in session.records)
        await pilot.press("m", "down", "enter", "escape", "2", "a", "a", "right_curly_bracket", "3")
        await pilot.press("1", "home", "down", "b")
        await wait_idle(pilot)
        await pilot.press("l", "n", *"kept", "enter")
        await wait_idle(pilot)
        await pilot.press("l", "enter", "down", "enter")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "CompareScreen")
        await pilot.press("escape", "t")
        await wait_idle(pilot)
        await pilot.press("x")
        await wait_until(pilot, lambda: any(tmp_path.glob("*.svg")))
        assert any(tmp_path.glob("*.safetensors"))
    assert session.callers and event_loop not in session.callers


async def test_the_prune_dialog_opens_at_once_without_copying_the_cache():
    session = FakeSession()
    session.loaded.context_limit = 10_000
    app = KvtraceApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        app.query_one("#prompt").value = " ".join(["w"] * 4000)
        app.query_one("#prompt").focus()
        await pilot.press("enter")
        await wait_idle(pilot)
        exported = []
        session.export_state = lambda: exported.append(time.sleep(1))  # a 4,000-token cache copy is slow
        app.timeline.focus()
        started = time.perf_counter()
        app.action_prune()
        opened = time.perf_counter() - started
        await wait_until(pilot, lambda: isinstance(app.screen, PruneScreen))
        assert opened < 0.05 and not exported
        assert f"Now: {len(session.positions)} cache entries" in str(app.screen.query_one(".muted").render())
