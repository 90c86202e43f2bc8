"""The app keeps every finished turn and branch in the snapshot store, and its history goes back to any of them."""

from __future__ import annotations

import threading

from app_pilot import notifications, send, wait_idle, wait_until
from fake_session import FakeSession
from test_app_runner import RecordingLock, WatchedSession
from textual.widgets import Tree

from kvstore.store import Store
from tui_app.app import KvtraceApp
from tui_app.screens.history import HistoryScreen


def entries(store) -> dict:
    return {e.name: e for e in Store.open(store).entries()}


async def open_history(pilot) -> Tree:
    app = pilot.app
    app.timeline.focus()
    await pilot.press("h")
    await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen))
    tree = app.screen.query_one("#history", Tree)
    await wait_until(pilot, lambda: tree.root.children)
    return tree


def nodes(tree: Tree) -> list:
    found, stack = [], list(reversed(tree.root.children))
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(reversed(node.children))
    return found


async def test_turns_and_branches_are_saved_as_a_tree(tmp_path):
    store = tmp_path / "store"
    session = FakeSession()
    app = KvtraceApp(session, store=str(store), autosave=True)
    async with app.run_test(size=(100, 30)) as pilot:
        assert "autosave" in app.status_bar.render_status(120).plain
        await send(pilot, "one two three")
        await wait_until(pilot, lambda: app.view.autosaved is not None)
        [first] = entries(store)
        first_tokens = list(session.token_ids)
        app.timeline.focus()
        await pilot.press("g")  # more of the same turn: the same entry, replaced
        await wait_idle(pilot)
        await wait_until(pilot, lambda: Store.open(store).load(first).token_ids == session.token_ids)
        assert list(entries(store)) == [first] and len(session.token_ids) > len(first_tokens)
        await send(pilot, "four five")  # a new turn: a child
        await wait_until(pilot, lambda: len(entries(store)) == 2)
        second = next(n for n in entries(store) if n != first)
        assert entries(store)[second].parent == first
        await pilot.press("home", "right", "down", "b")  # a branch: another child of the current entry
        await wait_idle(pilot)
        await wait_until(pilot, lambda: len(entries(store)) == 3)
        saved = entries(store)
        branch = next(n for n in saved if n not in (first, second))
        assert saved[branch].parent == second and saved[branch].label.startswith("branch, turn 2")
        assert Store.open(store).load(branch).token_ids == session.token_ids
        assert app.view.autosaved == f"{store}:{branch}"  # what a quit confirmation can show
        assert "autosaved" in app.status_bar.render_status(120).plain
        assert app.status_bar.render_status(80).plain.endswith("│ saved")  # narrow: short words


async def test_the_history_resumes_an_earlier_turn_also_after_a_restart(tmp_path):
    store = tmp_path / "store"
    app = KvtraceApp(FakeSession(), store=str(store), autosave=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three")
        await wait_until(pilot, lambda: len(entries(store)) == 1)
        await send(pilot, "four five six")
        await wait_until(pilot, lambda: len(entries(store)) == 2)
    saved = entries(store)
    first = next(n for n, e in saved.items() if e.parent is None)
    first_tokens = Store.open(store).load(first).token_ids

    restarted = FakeSession()  # tomorrow: a new app, a new session, the same store
    app = KvtraceApp(restarted, store=str(store), autosave=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.view is not None)
        tree = await open_history(pilot)
        listed = nodes(tree)
        assert [n.data.name for n in listed] == [first, next(n for n in saved if n != first)]  # a chain
        tree.move_cursor(listed[0])
        await wait_until(pilot, lambda: "user: one two three" in str(app.screen.query_one("#entry").render()))
        await pilot.press("enter")
        await wait_idle(pilot)
        assert restarted.token_ids == first_tokens
        assert any(n.startswith("Loaded") for n in notifications(app))
        await send(pilot, "seven")  # goes on from there: a new child of that entry, nothing replaced
        await wait_until(pilot, lambda: len(entries(store)) == 3)
        new = next(e for n, e in entries(store).items() if n not in saved)
        assert new.parent == first
        assert Store.open(store).load(first).token_ids == first_tokens


async def test_autosave_off_writes_nothing_and_the_history_still_opens(tmp_path):
    store = tmp_path / "store"
    app = KvtraceApp(FakeSession(), store=str(store), autosave=False)
    async with app.run_test(size=(100, 30)) as pilot:
        assert "autosave off" in app.status_bar.render_status(120).plain
        await send(pilot, "one two three")
        app.timeline.focus()
        await pilot.press("h")
        await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen))
        await wait_until(pilot, lambda: "Nothing is saved" in str(app.screen.query_one("#entry").render()))
        await pilot.press("escape")
        assert app.view.autosaved is None and not store.exists()


async def test_a_failing_autosave_is_reported_and_the_app_goes_on(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    app = KvtraceApp(FakeSession(), store=str(tmp_path / "file"), autosave=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three")
        await wait_until(pilot, lambda: any(n.startswith("Autosave failed") for n in notifications(app)))
        assert "autosave failed" in app.status_bar.render_status(120).plain
        await send(pilot, "four")
        assert len(app.view.records) > 0


async def test_autosave_runs_in_the_runners_worker(tmp_path):
    session = WatchedSession()
    app = KvtraceApp(session, store=str(tmp_path / "store"), autosave=True)
    lock = app.runner.lock = RecordingLock()
    event_loop = threading.get_ident()
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three")
        await wait_until(pilot, lambda: app.view.autosaved is not None)
        await open_history(pilot)
    assert lock.threads and event_loop not in lock.threads
    assert session.callers and event_loop not in session.callers
