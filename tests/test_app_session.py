"""The app over a real TraceSession on a tiny random-weight Llama (fast): what the panes show is
what the tracer recorded, and a snapshot saved from the app continues exactly in a fresh app."""

from __future__ import annotations

from dataclasses import replace

import pytest
from app_pilot import load_by_keys, save_by_keys, send, wait_idle, wait_until
from screen_text import screen_text

from tracer.loading import load_model
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession
from tui_app.app import KvtraceApp
from tui_app.cli import build_parser
from tui_app.commands.app import session_opener
from tui_app.widgets.attention import strongest
from tui_app.widgets.lens import settling_layer


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
        tokens, traced = session.context_tokens, list(session.records)
        await pilot.press("p")
        app.screen.query_one("#budget").value = "8"
        app.screen.query_one("#budget").focus()
        await pilot.press("enter")
        await wait_idle(pilot)
        assert len(session.positions) == 8 and session.context_tokens == tokens
        assert app.timeline.records == traced  # the trace of the pruned transcript stays on screen
        await pilot.press("n")
        await wait_idle(pilot)
        assert session.records[-1].position == tokens  # the true next position, not the cache length


async def test_export_writes_the_dump_schema(tiny, tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    session = new_session(tiny)
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "Why is the sky blue?")
        await pilot.press("ctrl+e")
        await wait_idle(pilot)
    [path] = tmp_path.glob("kvtrace-trace-*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[-1]["type"] == "end"
    assert [line["token_id"] for line in lines[1:-1]] == [r.token_id for r in session.records]


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
