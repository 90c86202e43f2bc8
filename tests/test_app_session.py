"""The app over a real TraceSession on a tiny random-weight Llama (fast): what the panes show is
what the tracer recorded, and a snapshot saved from the app continues exactly in a fresh app."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from app_pilot import load_by_keys, notifications, save_by_keys, send, wait_idle, wait_until
from screen_text import screen_text

from tracer import trace_schema
from tracer.dump import write_trace
from tracer.loading import load_model
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession
from tui_app.app import KvtraceApp
from tui_app.cli import build_parser
from tui_app.commands.app import session_opener
from tui_app.widgets.attention import strongest
from tracer.lens import settling_layer


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


def new_session(loaded) -> TraceSession:
    return TraceSession(loaded, SamplingSettings(max_new_tokens=12), top_k=5)


async def test_panes_show_the_tracers_numbers(tiny):
    session = new_session(tiny)
    app = KvtraceApp(session)
    async with app.run_test(size=(160, 48)) as pilot:
        await send(pilot, "Tell me a story about a small robot.")
        assert len(session.records) == 12 and app.timeline.records == session.records
        assert f"assistant: {session.reply_text()}" in screen_text(app)
        await pilot.press("home", "right", "right", "right")
        record = session.records[3]
        await wait_until(pilot, lambda: record.lens is not None)
        await pilot.pause()
        text = screen_text(app)
        for candidate in record.top:
            assert f"{candidate.prob:.3f}" in text
        for position, weight in strongest(record, None, 3):
            assert f"@{position}" in text and f"{weight:.3f}" in text
        for layer in record.lens:
            assert f"{layer.top[0].prob:.3f}" in text
        settle = settling_layer(record.lens, record.token_id)
        assert settle is None or f"settles at layer {settle}" in text


async def test_saved_snapshot_continues_exactly_in_a_fresh_app(tiny, tmp_path):
    path = tmp_path / "robot.kvs"
    reference = new_session(tiny)
    reference.start_turn("Hello world, hello kvtrace!")
    reference.generate(6)

    session = new_session(tiny)
    session.sampling = replace(session.sampling, max_new_tokens=6)
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "Hello world, hello kvtrace!")
        assert session.token_ids == reference.token_ids
        await save_by_keys(pilot, path)

    fresh = new_session(tiny)
    app = KvtraceApp(fresh)
    async with app.run_test(size=(80, 24)) as pilot:
        await load_by_keys(pilot, path, len(reference.token_ids))
        assert fresh.token_ids == reference.token_ids
        app.timeline.focus()
        await pilot.press("g")
        await wait_idle(pilot)
    assert [r.token_id for r in fresh.records[:6]] == [r.token_id for r in reference.records]  # the saved trace
    expected = reference.generate(len(fresh.records) - 6)
    assert [r.token_id for r in fresh.records[6:]] == [r.token_id for r in expected]


async def test_prune_then_continue_in_the_app(tiny):
    session = new_session(tiny)
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "The quick brown fox jumps over the lazy dog.")
        tokens, traced, before = session.context_tokens, list(session.records), session.export_state()
        await pilot.press("p")
        app.screen.query_one("#budget").value = "8"
        app.screen.query_one("#budget").focus()
        await pilot.press("enter", "enter")  # to the button, then confirm
        await wait_idle(pilot)
        assert len(session.positions) == 8 and session.context_tokens == tokens
        assert app.timeline.records == traced  # the trace of the pruned transcript stays on screen
        assert session.stop_reason == before.metadata["stop_reason"]  # a prune is no new step
        await pilot.press("u")
        await wait_idle(pilot)
        restored = session.export_state()
        assert restored.positions == before.positions
        assert restored.attention_scores == pytest.approx(before.attention_scores, rel=1e-6)  # float32 in the state
        assert all(torch.equal(a, b) for a, b in zip(restored.keys + restored.values, before.keys + before.values))
        await pilot.press("p")
        app.screen.query_one("#budget").value = "8"
        await pilot.press("enter", "enter")
        await wait_idle(pilot)
        await pilot.press("n")
        await wait_idle(pilot)
        assert session.records[-1].position == tokens  # the true next position, not the cache length
        assert not app.view.can_undo_prune  # a new step lets the old state go
        await pilot.press("u")
        assert "There is no prune to undo" in notifications(app)[-1]


async def test_export_of_a_multi_turn_branched_session_is_valid_and_complete(tiny, tmp_path, monkeypatch):
    """Two turns, a branch in the second and a switch back (B): the export holds every transcript token
    once, a lens for every step (one of them viewed in the app first), and a stop reason."""
    monkeypatch.chdir(tmp_path)
    session = new_session(tiny)
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "Why is the sky blue?")
        await send(pilot, "Tell me a story about a small robot.")
        await pilot.press("3", "home", "right", "down", "b")  # the lens pane shows token 1's lens, then branch
        await wait_idle(pilot)
        await pilot.press("B")  # back to line 1: the restored line keeps how it ended
        await wait_idle(pilot)
        assert app.view.branches and session.stop_reason == "max_tokens"
        await pilot.press("ctrl+e")
        await wait_idle(pilot)
    [path] = tmp_path.glob("kvtrace-trace-*.jsonl")
    lines = trace_schema.read(path.read_text().splitlines())
    assert trace_schema.problems(lines) == []
    header, end = lines[0], lines[-1]
    assert [line["type"] for line in lines].count("prompt") == 1  # the second turn's prompt
    assert header["settings"]["lens"] and all(line["lens"] for line in lines if line["type"] == "step")
    assert end["stop_reason"] == "max_tokens" and end["transcript_tokens"] == len(session.token_ids)
    assert [line["token_id"] for line in lines if line["type"] == "step"] == [r.token_id for r in session.records]
    ids = {t["position"]: t["id"] for line in lines[:-1] for t in line.get("tokens", line.get("prompt_tokens", []))}
    ids.update({line["position"]: line["token_id"] for line in lines if line["type"] == "step"})
    assert [ids[p] for p in range(len(ids))] == session.token_ids


def test_the_schema_check_finds_what_a_broken_trace_lacks(tiny, tmp_path):
    session = new_session(tiny)
    session.start_turn("Hello world")
    session.generate(3)
    session.start_turn("Hello again")
    session.generate(2)
    out = io.StringIO()
    write_trace(session, out, with_lens=False)
    lines = trace_schema.read(out.getvalue().splitlines())
    assert trace_schema.problems(lines) == []
    assert [line["type"] for line in lines] == ["header", *["step"] * 3, "prompt", *["step"] * 2, "end"]
    without_prompt = [line for line in lines if line["type"] != "prompt"]
    assert any("positions" in p for p in trace_schema.problems(without_prompt))
    no_reason = [*lines[:-1], {**lines[-1], "stop_reason": None}]
    assert any("stop_reason" in p for p in trace_schema.problems(no_reason))
    half_lens = [*lines[:2], {**lines[2], "lens": []}, *lines[3:]]
    assert any("settings.lens" in p for p in trace_schema.problems(half_lens))


async def test_the_command_loader_opens_the_model_inside_the_app(tiny_llama_dir):
    args = build_parser().parse_args(["--model", str(tiny_llama_dir), "--max-new-tokens", "5", "--device", "cpu"])
    app = KvtraceApp(opener=session_opener(args))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.view is not None)
        assert "tiny" in screen_text(app) or app.view.model in screen_text(app)
        await send(pilot, "Hello")
        assert len(app.view.records) == 5


async def test_branch_and_back_on_a_real_session(tiny):
    session = new_session(tiny)
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "Tell me a story about a small robot.")
        original = [r.token_id for r in session.records]
        await pilot.press("home", "right", "right")
        candidate = app.query_one("TopKPane").candidate
        await pilot.press("b")
        await wait_idle(pilot)
        assert session.records[2].forced and session.records[2].token_id == candidate.token_id
        assert [r.token_id for r in session.records[:2]] == original[:2]
        assert app.timeline.records == session.records
        await pilot.press("B")
        await wait_idle(pilot)
        assert [r.token_id for r in app.timeline.records] == original


async def test_the_prune_dialog_previews_every_method_live_and_prunes_per_head(tiny):
    from kvstore.pruning import METHODS

    session = new_session(tiny)
    app = KvtraceApp(session)
    async with app.run_test(size=(160, 48)) as pilot:
        await send(pilot, "The quick brown fox jumps over the lazy dog.")
        before = session.export_state()
        await pilot.press("p")
        app.screen.query_one("#method").value = "head_heavy_hitters"
        app.screen.query_one("#budget").value = "8"
        await pilot.pause()
        button = app.screen.query_one("#submit")
        assert str(button.label) == "Keep 8 per head" and not button.disabled  # before the preview is in too
        await wait_until(pilot, lambda: app.screen.previewed is not None and app.screen.previewed.budget == 8)
        table = str(app.screen.query_one("#methods").render())
        assert table.startswith("Next token with the full cache: ") and all(f"\n{name} " in table for name in METHODS)
        assert table.count(" KL ") == len(METHODS) and table.count(" of the top 5 stay") == len(METHODS), table
        assert app.screen.dropping  # positions no head keeps, struck through on the transcript
        assert session.export_state().positions == before.positions  # the preview pruned a copy
        app.screen.query_one("#budget").focus()
        await pilot.press("enter", "enter")
        await wait_idle(pilot)
        state = session.export_state()
        assert state.per_head and all(k.shape[1] == 8 for k in state.keys)
        assert state.next_position == before.next_position


async def test_the_prune_buttons_stay_on_an_80x24_screen_with_the_preview_in(tiny):
    session = new_session(tiny)
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "The quick brown fox jumps over the lazy dog. " * 3)
        app.timeline.focus()
        await pilot.press("p")
        await wait_until(pilot, lambda: app.screen.previewed is not None)
        await pilot.pause()
        screen = app.screen.region
        for button in app.screen.query("Button"):
            assert screen.contains_region(button.region), f"{button.label} is off the screen"
        assert "Drop " in screen_text(app)  # the button that prunes, readable
