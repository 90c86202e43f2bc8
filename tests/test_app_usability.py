"""The app as people use it (issue 12), driven with Pilot against the fake session: nothing is lost without
a question, the keys act on the selection whatever the scroll state, and every pane tells the truth."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from app_pilot import (chat_lines, notifications, save_by_keys, send, slow_session, start_generating, wait_idle,
                       wait_until)
from fake_session import FakeSession
from screen_text import screen_text
from textual.command import CommandPalette

from kvstore.errors import SnapshotError
from kvstore.snapshot import save
from tracer import usecases
from tracer.errors import ModelLoadError
from tracer.records import StepRecord
from tui_app.app import KvtraceApp
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.prune import PruneScreen
from tui_app.screens.quit import QuitScreen
from tui_app.screens.save import SaveScreen
from tui_app.widgets.attention import AttentionPane
from tui_app.widgets.timeline import shown_text
from tui_app.widgets.topk import TopKPane


def long_session(tokens: int = 60) -> FakeSession:
    """A fake whose replies run to its end of answer (40 tokens) within ``tokens``."""
    session = FakeSession()
    session.sampling = replace(session.sampling, max_new_tokens=tokens)
    return session


# -- work lost without a word -------------------------------------------------------------------------
async def test_saving_onto_an_existing_file_asks_first(tmp_path):
    path = tmp_path / "a.kvs"
    path.write_bytes(b"precious")
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("ctrl+s")
        app.screen.query_one("#path").value = str(path)
        await pilot.pause()
        assert "A file with this name exists" in str(app.screen.query_one("#exists").render())
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen) and "Replace a.kvs?" in screen_text(app)
        await pilot.press("enter")  # the focus starts on Cancel
        await pilot.pause()
        assert isinstance(app.screen, SaveScreen) and path.read_bytes() == b"precious"
        await pilot.press("enter", "y")
        await wait_idle(pilot)
        assert path.read_bytes() != b"precious" and notifications(app)[-1].startswith("Saved")


async def test_a_bad_save_path_keeps_the_dialog_open_with_the_clis_words(tmp_path):
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("ctrl+s")
        app.screen.query_one("#path").value = str(tmp_path)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SaveScreen)
        assert f"{tmp_path} is a folder; give a file name to write" in str(app.screen.query_one("#error").render())
        app.screen.query_one("#path").value = str(tmp_path / "fixed.kvs")
        await pilot.press("enter")
        await wait_idle(pilot)
        assert (tmp_path / "fixed.kvs").is_file()


async def test_a_save_that_fails_in_the_worker_reopens_the_dialog_on_the_same_path(tmp_path, monkeypatch):
    def full_disk(session, path, codec, label=None):
        raise SnapshotError(f"cannot write {path}: no space left on the device")

    monkeypatch.setattr(usecases, "save", full_disk)
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("ctrl+s")
        app.screen.query_one("#path").value = str(tmp_path / "x.kvs")
        await pilot.press("enter")
        await wait_idle(pilot)
        await wait_until(pilot, lambda: isinstance(app.screen, SaveScreen))
        assert app.screen.query_one("#path").value == str(tmp_path / "x.kvs")
        assert "no space left" in str(app.screen.query_one("#error").render())


async def test_quit_asks_while_there_are_unsaved_changes():
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        assert app.view.unsaved
        app.timeline.focus()
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        assert "changes that are not saved" in str(app.screen.query_one("#question").render())
        await pilot.press("escape")
        assert app.is_running and not isinstance(app.screen, QuitScreen)
        await pilot.press("ctrl+q")  # ctrl+q asks too, and a second one quits
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("ctrl+q")
    assert not app.is_running


async def test_quit_answered_with_save_first_saves_then_quits(tmp_path):
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        app.timeline.focus()
        await pilot.press("q", "s")
        assert isinstance(app.screen, SaveScreen)
        app.screen.query_one("#path").value = str(tmp_path / "last.kvs")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.is_running)
    assert (tmp_path / "last.kvs").is_file()


async def test_quit_does_not_ask_once_saved_and_asks_again_after_a_change(tmp_path):
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await save_by_keys(pilot, tmp_path / "s.kvs")
        assert not app.view.unsaved and app.view.saved_to == str(tmp_path / "s.kvs")
        app.timeline.focus()
        await pilot.press("n")
        await wait_idle(pilot)
        assert app.view.unsaved
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        assert "since it was saved to s.kvs" in str(app.screen.query_one("#question").render())
        await pilot.press("escape")
        await save_by_keys(pilot, tmp_path / "t.kvs")
        app.timeline.focus()
        await pilot.press("p", "enter", "enter")
        await wait_idle(pilot)
        assert app.view.unsaved
        await pilot.press("u")  # the undo puts back exactly the saved state
        await wait_idle(pilot)
        assert not app.view.unsaved
        await pilot.press("q")
    assert not app.is_running


async def test_quit_asks_while_generating():
    session = slow_session()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await start_generating(pilot, 2)
        await pilot.press("q")  # (waited for: under load the question may take a few frames to draw)
        await wait_until(pilot, lambda: isinstance(app.screen, QuitScreen) and "being generated" in screen_text(app))
        await pilot.press("q")
    assert not app.is_running


async def test_prune_needs_an_explicit_confirm_and_undo_restores_the_cache():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three four five six")
        before = list(session.positions)
        app.timeline.focus()
        await pilot.press("p", "enter")  # the old accident: p, Enter
        assert isinstance(app.screen, PruneScreen) and session.positions == before
        await pilot.press("enter")  # Enter on "Drop N entries": confirmed
        await wait_idle(pilot)
        assert len(session.positions) < len(before)
        assert app.view.can_undo_prune and any("pruned: positions" in line for line in chat_lines(app))
        await pilot.press("u")
        await wait_idle(pilot)
        assert session.positions == before and not app.view.can_undo_prune
        assert notifications(app)[-1].startswith("Prune undone")
        assert not any("pruned: positions" in line for line in chat_lines(app))


async def test_a_prune_can_be_undone_only_until_the_next_turn():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three four five six")
        app.timeline.focus()
        await pilot.press("p", "enter", "enter")
        await wait_idle(pilot)
        pruned = list(session.positions)
        await pilot.press("n")
        await wait_idle(pilot)
        await pilot.press("u")
        await pilot.pause()
        assert "There is no prune to undo" in notifications(app)[-1]
        assert session.positions[: len(pruned)] == pruned


async def test_the_prune_dialog_says_why_a_budget_below_the_sinks_is_refused():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three four five six")
        before = list(session.positions)
        app.timeline.focus()
        await pilot.press("p")
        app.screen.query_one("#budget").value = "2"
        await pilot.pause()
        preview = str(app.screen.query_one("#preview").render())
        assert "The budget 2 is smaller than the sinks (4)" in preview
        assert app.screen.query_one("#submit").disabled
        await pilot.press("enter", "enter")
        await pilot.pause()
        assert session.positions == before and isinstance(app.screen, PruneScreen)


# -- keys and focus ------------------------------------------------------------------------------------
async def test_arrows_move_the_candidate_and_the_selection_with_an_overflowing_timeline():
    session = long_session()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await send(pilot, "and again")
        timeline = app.timeline
        timeline.focus()
        assert timeline.virtual_size.height > timeline.scrollable_content_region.height  # it overflows
        top = app.query_one(TopKPane)
        cursor, scroll, rows = top.cursor, timeline.scroll_y, len(top.record.top)
        await pilot.press("down")
        assert top.cursor == (cursor + 1) % rows and timeline.scroll_y == scroll
        await pilot.press("up", "up")
        assert top.cursor == (cursor - 1) % rows
        await pilot.press("home")
        assert timeline.selected == 0 and timeline.scroll_y == 0
        await pilot.press("end")
        assert timeline.selected == len(session.records) - 1 and timeline.scroll_y > 0
        await pilot.press("home", "right", "down")
        candidate = top.candidate
        await pilot.press("b")
        await wait_idle(pilot)
        assert session.records[1].forced and session.records[1].token_id == candidate.token_id


async def test_the_selection_stays_in_view_after_a_resize():
    session = long_session()
    app = KvtraceApp(session)
    async with app.run_test(size=(160, 48)) as pilot:
        await send(pilot, "hello there")
        await send(pilot, "and again")
        await pilot.press("home")
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        timeline = app.timeline
        line = timeline._line_of[timeline.selected]
        assert timeline.scroll_y <= line < timeline.scroll_y + timeline.scrollable_content_region.height
        await pilot.press("end")
        await pilot.resize_terminal(100, 30)
        await pilot.pause(0.2)
        line = timeline._line_of[timeline.selected]
        assert timeline.scroll_y <= line < timeline.scroll_y + timeline.scrollable_content_region.height


async def test_clicks_select_tokens_and_candidates_and_a_double_click_branches():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        timeline = app.timeline
        cell = timeline._lines[0][2]
        await pilot.click(timeline, offset=(cell.x + 1 + timeline.gutter.left, 1))  # the border is row 0
        assert timeline.selected == cell.index
        top = app.query_one(TopKPane)
        await pilot.click(top, offset=(4, 1 + 2))  # border, then row 2
        assert top.cursor == 2
        chosen = top.candidate
        await pilot.click(top, offset=(4, 1 + 2), times=2)
        await wait_idle(pilot)
        assert session.records[cell.index].forced and session.records[cell.index].token_id == chosen.token_id


async def test_the_input_says_what_works_there_and_the_footer_says_f1():
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.view is not None)
        text = screen_text(app)
        assert "F1: help" in text and "ctrl+q: quit" in text and "F1 Help" in text.splitlines()[-1]


async def test_after_a_load_failure_q_quits():
    def loader(progress):
        raise ModelLoadError("no such model file or folder: ./nowhere")

    app = KvtraceApp(opener=loader)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.load_error is not None)
        text = screen_text(app)
        assert "[b" not in text and "Press q or ctrl+q to quit" in text
        await pilot.press("q")
    assert not app.is_running


async def test_the_load_dialog_starts_in_the_path_box_and_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = FakeSession()
    source.start_turn("hello there")
    save(source.export_state(), tmp_path / "one.kvs")
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "hi")
        await pilot.press("ctrl+o")
        assert app.screen.focused.id == "path"
        tree = app.screen.query_one("#tree")
        assert str(tree.root.label) == f"{tmp_path}/"
        await pilot.press("tab")  # the tree, its cursor on the named root
        assert app.screen.focused is tree and tree.cursor_line == 0 and tree.cursor_node is tree.root


async def test_copy_goes_to_the_terminal_clipboard_and_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("c")
        details = (tmp_path / "kvtrace-copy.txt").read_text()
        record = session.records[-1]
        assert f"token #{record.index} at position {record.position}" in details
        assert f"{record.top[0].prob:.4f}" in details
        assert notifications(app)[-1].startswith("Wrote token #") and "no terminal here" in notifications(app)[-1]
        monkeypatch.setattr(KvtraceApp, "is_headless", property(lambda self: False))
        await pilot.press("y")
        assert app.clipboard == session.reply_text() + "\n"
        assert notifications(app)[-1].startswith("Copied the reply to the clipboard (OSC 52)")
        await pilot.press("Y")
        assert app.clipboard.startswith("user: hello there\n\nassistant: ")


# -- panes that tell the truth -------------------------------------------------------------------------
async def test_every_pane_is_cleared_when_a_snapshot_of_another_transcript_loads(tmp_path):
    other = FakeSession()
    other.start_turn("a b")
    path = tmp_path / "other.kvs"
    save(other.export_state(), path)
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(160, 48)) as pilot:
        await send(pilot, "one two three four five six seven eight")
        assert "Attention · #" in screen_text(app)
        await pilot.press("ctrl+o")
        app.screen.query_one("#path").value = str(path)
        app.screen.query_one("#path").focus()
        await pilot.press("enter")
        await wait_idle(pilot)
        text = screen_text(app)
        assert "Attention · #" not in text and "Top-k · token" not in text and "Lens · #" not in text
        assert app.query_one(AttentionPane).record is None
        assert str(app.query_one(AttentionPane).render()) == "Select a generated token to see what it attended to."


async def test_the_chat_says_why_each_reply_stopped():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        assert chat_lines(app)[-1] == "― stopped: max tokens (g continues)"
        session.sampling = replace(session.sampling, max_new_tokens=1000)
        session.step_delay = 0.1
        app.timeline.focus()
        await pilot.press("g")
        await wait_until(pilot, lambda: len(app.timeline.records) > 10)
        assert not any(line.startswith("― stopped") for line in chat_lines(app))  # going on: no ending yet
        await pilot.press("escape")
        await wait_idle(pilot)
        assert chat_lines(app)[-1] == "― stopped (Esc) · g continues"
        session.step_delay = 0
        await pilot.press("g")
        await wait_idle(pilot)
        assert session.stop_reason == "eos" and chat_lines(app)[-1] == "― end of answer"


async def test_the_timeline_separates_turns():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await send(pilot, "and again")
        assert "turn 2 ▸" in screen_text(app)
        turn_two = next(i for i, line in enumerate(app.timeline._lines) if line[0].text == "turn 2 ▸")
        assert app.timeline._lines[turn_two][1].index == session.sampling.max_new_tokens


async def test_lines_have_numbers_that_stay_and_messages_that_are_true():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("home", "right", "right", "down", "b")
        await wait_idle(pilot)
        assert any("this is line 2; B goes back to line 1" in n for n in notifications(app))
        assert app.view.line == 2 and [line.number for line in app.view.branches] == [1]
        await pilot.press("B")
        await wait_idle(pilot)
        assert notifications(app)[-1] == "Now on line 1; line 2, which you left, is kept."
        assert app.view.line == 1 and [line.number for line in app.view.branches] == [2]
        label = app.view.branches[0].label
        assert label.startswith("from #2: “") and label.endswith("”")
        await pilot.press("f2", *"Switch to line")
        await pilot.pause(0.3)
        assert isinstance(app.screen, CommandPalette) and "Switch to line 2: from #2" in screen_text(app)


async def test_every_top_k_row_shows_at_80x24():
    session = FakeSession(top_k=10)
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        text = screen_text(app)
        assert all(f"{c.prob:.3f}" in text for c in session.records[-1].top)


def test_byte_fragments_show_as_byte_escapes():
    record = StepRecord(index=0, position=5, token_id=1, text="", prob=0.5, logprob=-0.7, entropy=1.0, top=[])
    assert shown_text(record, "<0xE2>") == "<0xE2>"
    assert shown_text(replace(record, text="\ufffd"), "<0xE2>") == "<0xE2>"
    assert shown_text(replace(record, text=" cat"), " cat") == " cat"


async def test_loading_shows_a_progress_bar_and_the_time_left():
    release = threading.Event()

    def loader(progress):
        progress("Dequantizing model.gguf (first load only, about 20 s)")
        progress.expect(20.0)
        progress("Converting the tokenizer (first load only)")  # the clock goes on across the stages
        release.wait(5)
        return FakeSession()

    app = KvtraceApp(opener=loader)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "Converting the tokenizer" in chat_lines(app)[0])
        await pilot.pause(1.2)
        progress = chat_lines(app)[0]
        assert "█" in progress and any(f"about {n} s left" in progress for n in (18, 19))
        text = screen_text(app)
        assert "ctx 0/0" not in text and "● loading" in text
        release.set()
        await wait_until(pilot, lambda: app.view is not None)
        assert "is ready" in chat_lines(app)[0]


def test_a_first_load_is_announced_with_this_machines_pace(tmp_path, monkeypatch):
    from tracer import gguf_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 2_000_000)
    assert gguf_cache.expected_first_load(model) == pytest.approx(2 * gguf_cache.SECONDS_PER_MB)
    gguf_cache.record_first_load(model, 3.0)
    assert gguf_cache.expected_first_load(model) == pytest.approx(3.0)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_the_lens_fits_and_shows_where_it_settles(size):
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=size) as pilot:
        await send(pilot, "hello there")
        await pilot.press("3")
        await wait_until(pilot, lambda: session.records[-1].lens is not None)
        await pilot.pause()
        text = screen_text(app)
        assert "settles at layer 2" in text and all(f"{layer.top[0].prob:.3f}" in text
                                                    for layer in session.records[-1].lens)


def test_the_lens_keeps_the_settling_layer_when_it_cannot_show_them_all():
    from tui_app.widgets.lens import rows_to_show

    assert rows_to_show(30, 40, 17) == list(range(30))
    shown = rows_to_show(30, 12, 17)
    assert len(shown) == 12 and {0, 16, 17, 29} <= set(shown) and shown == sorted(shown)
    assert rows_to_show(30, 12, None)[-1] == 29 and len(rows_to_show(30, 1, 17)) == 1
