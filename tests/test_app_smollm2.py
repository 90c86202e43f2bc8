"""End to end with the real SmolLM2 [slow]: the app streams a reply, its panes show the tracer's
numbers (checked against a plain transformers forward), and a snapshot saved from the app resumes
exactly in a fresh app."""

from __future__ import annotations

import pytest
import torch
from app_pilot import load_by_keys, save_by_keys, wait_idle, wait_until
from screen_text import screen_text

from tracer.sampling import SamplingSettings
from tracer.session import TraceSession
from tui_app.app import KvtraceApp
from tui_app.widgets.attention import strongest

pytestmark = pytest.mark.slow
PROMPT = "Why is the sky blue?"


def flat(text: str) -> str:
    return " ".join(text.split())


async def test_smollm2_reply_panes_save_and_resume(smollm2, tmp_path):
    path = tmp_path / "sky.kvs"
    session = TraceSession(smollm2, SamplingSettings(max_new_tokens=12))
    app = KvtraceApp(session)
    async with app.run_test(size=(160, 48)) as pilot:
        app.query_one("#prompt").focus()
        await pilot.press(*PROMPT, "enter")
        await wait_until(pilot, lambda: len(app.timeline.records) >= 1, timeout=120)
        await wait_idle(pilot, timeout=120)
        assert app.timeline.records == session.records and len(session.records) == 12
        assert flat(f"assistant: {session.reply_text()}") in flat(screen_text(app))

        await pilot.press("home", "right", "right")
        record = session.records[2]
        await wait_until(pilot, lambda: record.lens is not None, timeout=60)
        await pilot.pause()
        text = screen_text(app)
        for candidate in record.top[:8]:
            assert f"{candidate.prob:.3f}" in text
        for position, weight in strongest(record, None, 5):
            assert f"@{position}" in text and f"{weight:.3f}" in text
        for layer in record.lens[:10]:
            assert f"{layer.top[0].prob:.3f}" in text

        # The top-k numbers on screen equal a plain forward over the transcript so far.
        with torch.no_grad():
            logits = smollm2.model(torch.tensor([session.token_ids[: record.position]])).logits[0, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        for candidate in record.top[:5]:
            assert probs[candidate.token_id].item() == pytest.approx(candidate.prob, abs=2e-3)

        await save_by_keys(pilot, path)

    fresh = TraceSession(smollm2, SamplingSettings(max_new_tokens=8))
    app = KvtraceApp(fresh)
    async with app.run_test(size=(80, 24)) as pilot:
        await load_by_keys(pilot, path, len(session.token_ids))
        assert fresh.token_ids == session.token_ids
        assert [r.to_dict() for r in app.timeline.records] == [r.to_dict() for r in session.records]  # its trace
        app.timeline.focus()
        await pilot.press("g")
        await wait_idle(pilot, timeout=120)
    expected = session.generate(8)
    assert [r.token_id for r in fresh.records[12:]] == [r.token_id for r in expected]
