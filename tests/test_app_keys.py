"""Every key flow of the app, driven with Pilot against a deterministic fake session (fast)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from app_pilot import (chat_lines, notifications, save_by_keys, send, slow_session, start_generating, wait_idle,
                       wait_until)
from fake_session import FakeSession
from screen_text import screen_text
from textual.command import CommandPalette

from tracer.errors import ModelLoadError
from tui_app.app import KvtraceApp
from tracer.events import Stepped
from tui_app.messages import RunnerEvent
from tui_app.screens.help import HelpScreen
from tui_app.screens.prune import PruneScreen
from tui_app.widgets.attention import AttentionPane
from tui_app.widgets.lens import LensPane
from tui_app.widgets.topk import TopKPane


async def test_prompt_streams_reply_into_chat_and_timeline():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        assert len(session.records) == session.sampling.max_new_tokens
        assert app.timeline.records == session.records
        text = screen_text(app)
        assert "user: hello there" in text
        assert f"assistant: {session.reply_text()}" in chat_lines(app)
        assert f"ctx {session.context_tokens}/256" in text
        assert f"KV {session.kv_bytes:,} B" in text
        assert "idle" in text


async def test_letters_type_into_the_input_box_instead_of_acting():
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(*"q pgnb")
        assert app.query_one("#prompt").value == "q pgnb"
        assert app.is_running and not app.view.records


async def test_selection_keys_drive_topk_and_attention():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        last = len(session.records) - 1
        assert app.timeline.selected == last
        await pilot.press("left", "left")
        assert app.timeline.selected == last - 2
        record = session.records[last - 2]
        assert app.query_one(TopKPane).record is record
        text = screen_text(app)
        assert f"Top-k · token #{record.index}" in text
        assert f"{record.top[0].prob:.3f}" in text
        await pilot.press("home")
        assert app.timeline.selected == 0
        await pilot.press("end")
        assert app.timeline.selected == last
        await pilot.press("2")
        text = screen_text(app)
        evidence = session.records[last].attention
        best = max(range(len(evidence.mean)), key=lambda i: evidence.mean[i])
        assert f"@{evidence.positions[best]}" in text and f"{evidence.mean[best]:.3f}" in text


async def test_attention_switches_between_mean_and_each_layer():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("2")
        assert "mean over layers" in screen_text(app)
        await pilot.press("a")
        assert "layer 0/3" in screen_text(app)
        await pilot.press("right_square_bracket", "right_square_bracket")
        pane = app.query_one(AttentionPane)
        assert pane.shown_layer == 2
        position, weight = session.records[-1].attention.per_layer[2][0]
        text = screen_text(app)
        assert "layer 2/3" in text and f"@{position}" in text and f"{weight:.3f}" in text
        await pilot.press("a")  # that layer's heads (tests/test_app_views.py), then the mean again
        assert pane.by_head and "layer 2/3 · head 0/" in screen_text(app)
        await pilot.press("a")
        assert pane.shown_layer is None and "mean over layers" in screen_text(app)


async def test_lens_is_computed_lazily_when_shown_and_cached():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        assert session.lens_calls == 0  # the lens pane is not shown at 80 columns
        await pilot.press("3")
        await wait_until(pilot, lambda: session.records[-1].lens is not None)
        await pilot.pause()
        assert session.lens_calls == 1
        text = screen_text(app)
        assert "settles at layer 2" in text and "◆2" in text
        await pilot.press("left", "right")
        await wait_until(pilot, lambda: session.records[-2].lens is not None)
        assert session.lens_calls == 2  # the last token's lens came from the cache
        assert app.query_one(LensPane).record is session.records[-1]


async def test_n_steps_once_and_g_generates_more():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        before = len(session.records)
        app.timeline.focus()
        await pilot.press("n")
        await wait_idle(pilot)
        assert len(session.records) == before + 1 == len(app.timeline.records)
        await pilot.press("g")
        await wait_idle(pilot)
        assert len(session.records) == before + 1 + session.sampling.max_new_tokens
        assert app.timeline.records == session.records


async def test_escape_stops_within_one_step_and_no_stale_step_reaches_the_screen():
    session = slow_session()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await start_generating(pilot, 3)
        await pilot.press("escape")
        shown = len(app.timeline.records)
        await wait_until(pilot, lambda: not app.generating, timeout=1.0)
        assert session.stop_reason == "cancelled"
        assert len(session.records) <= shown + 1  # at most the step in flight
        assert app.timeline.records == session.records
        # A step message of the finished run arriving late is dropped.
        app.post_message(RunnerEvent(Stepped(app.run_id, session.records[0], 1, 1)))
        await pilot.pause()
        assert app.timeline.records == session.records
        # So is one from an older run while a new run streams.
        old_run = app.run_id
        await pilot.press("g")
        app.post_message(RunnerEvent(Stepped(old_run, session.records[0], 1, 1)))
        await wait_until(pilot, lambda: len(app.timeline.records) >= len(session.records) > shown + 2)
        await pilot.press("escape")
        await wait_idle(pilot)
        assert [r.index for r in app.timeline.records] == list(range(len(session.records)))


async def test_branch_with_selected_candidate_and_switch_back():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        original = [r.token_id for r in session.records]
        await pilot.press("home", "right", "right")
        record = session.records[2]
        await pilot.press("down")
        candidate = app.query_one(TopKPane).candidate
        assert candidate.token_id != record.token_id
        await pilot.press("b")
        await wait_idle(pilot)
        assert session.records[2].forced and session.records[2].token_id == candidate.token_id
        assert [r.token_id for r in session.records[:2]] == original[:2]
        assert app.timeline.records == session.records
        assert len(session.branches) == 1
        await pilot.press("B")
        await wait_idle(pilot)
        assert [r.token_id for r in app.timeline.records] == original
        await pilot.press("B")
        await wait_idle(pilot)
        assert app.timeline.records[2].token_id == candidate.token_id


async def test_branch_refuses_the_already_chosen_token():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        top = app.query_one(TopKPane)
        while top.candidate.token_id != top.record.token_id:
            await pilot.press("up")
        await pilot.press("b")
        await pilot.pause()
        assert not session.branches
        assert any("already chosen" in n for n in notifications(app))


async def test_save_dialog_writes_the_file_and_shows_its_size(tmp_path):
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("ctrl+s")
        path_box = app.screen.query_one("#path")
        path_box.value = str(tmp_path / "a.kvs")
        await pilot.press("enter")
        await wait_idle(pilot)
        size = (tmp_path / "a.kvs").stat().st_size
        assert any(f"{size:,} bytes" in n and n.startswith("Saved") for n in notifications(app))


async def test_save_while_generating_stops_first_then_opens_the_dialog(tmp_path):
    session = slow_session()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await start_generating(pilot, 2)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not app.generating, timeout=1.0)
        assert app.screen.query("#codec")
        await pilot.press("escape")
        assert not app.screen.query("#codec")


async def test_load_dialog_shows_the_header_then_loads_and_continues(tmp_path):
    from kvstore.snapshot import save

    source = FakeSession()
    source.start_turn("hello there")
    source.generate(5)
    path = tmp_path / "s.kvs"
    save(source.export_state(), path)

    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+o")
        app.screen.query_one("#path").value = str(path)
        await wait_until(pilot, lambda: "codec:" in screen_text(app))
        text = screen_text(app)
        assert f"tokens:   {len(source.token_ids)} in the transcript" in text and "codec:    lossless" in text
        app.screen.query_one("#path").focus()
        await pilot.press("enter")
        await wait_idle(pilot)
        assert session.token_ids == source.token_ids
        assert any("Loaded" in n for n in notifications(app))
        app.timeline.focus()
        await pilot.press("n")
        await wait_idle(pilot)
        source.step()
        assert session.token_ids == source.token_ids


@pytest.mark.parametrize("kind", ["mismatch", "corrupt"])
async def test_load_failure_is_a_notification_and_the_session_stays(tmp_path, kind):
    from dataclasses import replace

    from kvstore.snapshot import save

    path = tmp_path / "bad.kvs"
    other = FakeSession()
    other.start_turn("some other words")
    if kind == "mismatch":
        other.loaded.fingerprint = replace(other.loaded.fingerprint, architecture="OtherForCausalLM")
        save(other.export_state(), path)
    else:
        save(other.export_state(), path)
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))

    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "hello there")
        before = (list(session.token_ids), list(session.records))
        await pilot.press("ctrl+o")
        app.screen.query_one("#path").value = str(path)
        await pilot.pause()
        if kind == "mismatch":
            assert "made by another model" in screen_text(app)
        app.screen.query_one("#path").focus()
        await pilot.press("enter")
        await wait_idle(pilot)
        assert (session.token_ids, session.records) == before
        assert app.timeline.records == session.records
        assert app._notifications and list(app._notifications)[-1].severity == "error"


async def test_prune_dialog_shows_before_and_after():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "one two three four five six")
        entries, nbytes = len(session.positions), session.kv_bytes
        app.timeline.focus()
        await pilot.press("p")
        text = screen_text(app)
        assert f"Now: {entries} cache entries" in text
        before = list(session.positions)
        budget = app.screen.query_one("#budget")
        budget.value = "6"
        await pilot.pause()
        dropped = before[4:-2]
        preview = str(app.screen.query_one("#preview").render())
        assert f"Drops {len(dropped)} entries (positions {dropped[0]}-{dropped[-1]}" in preview
        assert "After: 6 entries" in preview and f"Drop {len(dropped)} entries" in screen_text(app)
        budget.focus()
        await pilot.press("enter")  # Enter in a field only goes to the button
        await pilot.pause()
        assert isinstance(app.screen, PruneScreen) and session.positions == before
        assert app.screen.focused.id == "submit"
        await pilot.press("enter")
        await wait_idle(pilot)
        assert session.positions == before[:4] + before[-2:]
        message = notifications(app)[-1]
        assert f"{nbytes:,} -> {session.kv_bytes:,} bytes" in message and f"{entries} -> 6" in message
        assert "u to undo" in message


async def test_ctrl_p_is_prune_and_the_palette_is_on_f2_with_every_action():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("ctrl+p")
        assert app.screen.query("#budget")
        await pilot.press("escape")
        await pilot.press("f2")
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"Save snapshot")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen.query("#codec")


async def test_help_lists_the_keys_and_the_palette():
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        app.timeline.focus()
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause()
        text = screen_text(app)
        assert "ctrl+s" in text and "F2" in text
        await pilot.press("q")  # closes the help, does not quit
        assert not isinstance(app.screen, HelpScreen) and app.is_running
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("q")
    assert app.return_code == 0


async def test_model_loads_inside_the_app_with_progress():
    release = threading.Event()

    def loader(progress):
        progress("Dequantizing weights (first load only)")
        release.wait(5)
        return FakeSession()

    app = KvtraceApp(opener=loader)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "Dequantizing" in screen_text(app))
        assert "loading" in screen_text(app)
        await pilot.press(*"hi")  # typing works while loading
        release.set()
        await wait_until(pilot, lambda: app.view is not None)
        await pilot.press("enter")
        await wait_idle(pilot)
        assert app.timeline.records


async def test_a_load_error_is_shown_and_reported():
    def loader(progress):
        raise ModelLoadError("No model at ./nowhere: give a folder, a .gguf file or a cached hub id.")

    app = KvtraceApp(opener=loader)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.load_error is not None)
        assert "No model at ./nowhere" in screen_text(app) and "ctrl+q" in screen_text(app)
        await pilot.press("ctrl+q")
    assert app.load_error.startswith("No model")


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_layout_fits_small_and_uses_large_terminals(size):
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=size) as pilot:
        await send(pilot, "hello there")
        text = screen_text(app)
        lines = text.splitlines()
        assert len(lines) == size[1]
        assert "ctx" in lines[0] and "Save" in lines[-1] and "Help" in lines[-1]
        assert "Tokens" in text and "Top-k" in text and "Chat" in text
        wide = size[0] >= 120
        assert ("Attention ·" in text) == wide and ("Lens ·" in text) == wide


async def test_q_in_a_dialog_does_not_quit_but_ctrl_q_does(tmp_path):
    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await save_by_keys(pilot, tmp_path / "saved.kvs")  # nothing unsaved: ctrl+q does not ask
        await pilot.press("ctrl+s")
        app.screen.query_one("#cancel").focus()
        await pilot.press("q")
        assert app.is_running and app.screen.query("#codec")
        await pilot.press("ctrl+q")
    assert not app.is_running


async def test_ansi_theme_keeps_the_timeline_tints_in_the_terminals_own_colours():
    from rich.color import ColorType

    app = KvtraceApp(FakeSession())
    async with app.run_test(size=(80, 24)) as pilot:
        app.theme = "ansi-dark"
        await send(pilot, "hello there")
        strip = app.timeline.render_line(0)
        tints = [seg.style.bgcolor for seg in strip if seg.text.strip() and seg.style and seg.style.bgcolor]
        assert tints and all(color.type == ColorType.STANDARD for color in tints)
        assert "assistant:" in screen_text(app)


async def test_while_a_branch_streams_the_screen_shows_the_new_line_only():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        kept = "".join(r.text for r in session.records[:2])
        session.step_delay = 0.1
        await pilot.press("home", "right", "right", "down", "b")
        await wait_until(pilot, lambda: len(app.timeline.records) >= 4)
        assert app.generating
        shown = app.timeline.records
        assert shown[2].forced and shown == session.records[: len(shown)]
        assert app._live_reply.startswith(kept + shown[2].text)
        await pilot.press("escape")
        await wait_idle(pilot)


async def test_switching_branch_while_the_branch_generates():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        original = [r.token_id for r in session.records]
        session.step_delay = 0.05
        await pilot.press("home", "right", "down", "b")
        await wait_until(pilot, lambda: len(app.timeline.records) >= 3)
        await pilot.press("B", "left", "right", "end")
        await wait_idle(pilot)
        assert [r.token_id for r in session.records] == original
        assert app.timeline.records == session.records
