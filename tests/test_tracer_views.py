"""The views' numbers on tiny real models (fast): the direct logit attribution against a computation of its
own from a plain transformers forward, the tensors exported against transformers' outputs, lines compared
at their branch point, and the app's grid and head strips against the session's lens and per-head rows."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch
from app_pilot import send, wait_until
from safetensors.torch import load_file
from screen_text import screen_text

from tracer import usecases
from tracer.lens_grid import clip
from tracer.loading import load_model
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession
from tracer.token_text import visible
from tui_app.app import KvtraceApp
from tui_app.widgets.lens_grid import CELL, LABEL

STEPS = 6


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def traced(request) -> TraceSession:
    session = TraceSession(load_model(str(request.getfixturevalue(request.param)), device="cpu"),
                           SamplingSettings(max_new_tokens=STEPS), top_k=5)
    session.start_turn("Tell me a story about a small robot.")
    session.generate()
    return session


def direct_forward(session: TraceSession, position: int) -> dict[str, torch.Tensor]:
    """A fresh forward (no cache) over the transcript before ``position``, read at its last token (the one fed
    to predict ``position``): the hidden states, each attention block's output as the layer adds it, the
    stream entering the final norm, the logits."""
    model = session.loaded.model
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    seen: dict[str, list[torch.Tensor]] = {"attention": [], "final": []}
    hooks = [(block.self_attn if hasattr(block, "self_attn") else block.attn).register_forward_hook(
        lambda _m, _a, out: seen["attention"].append(out[0][0, -1])) for block in blocks]
    hooks.append(norm.register_forward_pre_hook(lambda _m, args: seen["final"].append(args[0][0, -1])))
    try:
        with torch.no_grad():
            output = model(torch.tensor([session.token_ids[:position]]), output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return {"hidden": torch.stack([h[0, -1] for h in output.hidden_states]), "attention": torch.stack(seen["attention"]),
            "final": seen["final"][0], "logits": output.logits[0, -1], "norm": norm}


@torch.no_grad()
def frozen_norm_share(norm: torch.nn.Module, part: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """``part`` through the final norm with the scale the whole ``stream`` gave it, without the norm's bias:
    RMSNorm ``w * x / rms(stream)``, LayerNorm ``w * (x - mean x) / std(stream)``."""
    if isinstance(norm, torch.nn.LayerNorm):
        return norm.weight * (part - part.mean()) / (stream.var(unbiased=False) + norm.eps).sqrt()
    return norm.weight * part / (stream.pow(2).mean() + norm.variance_epsilon).sqrt()


def test_attribution_matches_a_direct_computation_and_sums_to_the_logit(traced):
    session = traced
    head = session.loaded.model.get_output_embeddings().weight.detach()
    for record in session.records:
        attribution = session.attribution(record.index)
        assert attribution is not None
        direct = direct_forward(session, record.position)
        stream, final = direct["hidden"], direct["final"]
        direction = head[record.token_id] - head.mean(0)
        # the layers' residual writes: the last one ends at the final norm's input, not at hidden_states[-1]
        ends = torch.cat([stream[:-1], final[None]])
        writes = ends[1:] - ends[:-1]
        expected = [float(frozen_norm_share(direct["norm"], w, final) @ direction) for w in writes]
        expected_attention = [float(frozen_norm_share(direct["norm"], a, final) @ direction)
                              for a in direct["attention"]]
        assert attribution.layers.tolist() == pytest.approx(expected, abs=1e-3)
        assert attribution.attention.tolist() == pytest.approx(expected_attention, abs=1e-3)
        assert attribution.embedding == pytest.approx(
            float(frozen_norm_share(direct["norm"], ends[0], final) @ direction), abs=1e-3)
        logits = direct["logits"]
        explained = attribution.embedding + sum(attribution.layers.tolist()) + attribution.bias
        # the linear approximation's stated error: the parts rebuild the logit up to float rounding
        assert explained == pytest.approx(float(logits[record.token_id] - logits.mean()), abs=1e-3)
        assert abs(attribution.error) < 1e-3


def test_exported_tensors_are_transformers_outputs_at_the_position(traced, tmp_path):
    session = traced
    record = session.records[3]
    path = tmp_path / "step.safetensors"
    usecases.export_tensors(session, record.index, str(path))
    tensors = load_file(path)
    direct = direct_forward(session, record.position)
    torch.testing.assert_close(tensors["hidden_states"], direct["hidden"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tensors["resid_final"], direct["final"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tensors["logits"], direct["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tensors["attn_out"], direct["attention"], atol=1e-4, rtol=1e-4)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["input_ids"] == session.token_ids[: record.position]
    assert (sidecar["token_id"], sidecar["position"]) == (record.token_id, record.position)
    assert set(sidecar["tensors"]) == set(tensors)


def test_lines_compared_share_one_distribution_at_the_branch_point(tiny_llama_dir):
    session = TraceSession(load_model(str(tiny_llama_dir), device="cpu"), SamplingSettings(max_new_tokens=STEPS),
                           top_k=5)
    session.start_turn("Tell me a story about a small robot.")
    session.generate()
    original = list(session.records)
    other = original[2].top[1]
    session.branch(2, other.token_id)
    session.generate()
    comparison = session.compare_lines(0, -1)  # the line left behind, the new one
    assert comparison.branch == 2
    first = comparison.first_difference
    assert (first.a_token, first.b_token) == (original[2].token_id, other.token_id)
    assert first.a_under_b == pytest.approx(first.a_prob, abs=1e-5)
    assert first.b_under_a == pytest.approx(other.prob, abs=1e-5)
    out = comparison.layers[-1]  # the lens's last layer is the model's output there
    assert (out.a_prob, out.b_prob) == pytest.approx((original[2].prob, other.prob), abs=1e-4)
    later = comparison.steps[1]
    assert later.a_prob == pytest.approx(original[3].prob) and not math.isnan(later.a_under_b)


async def test_app_grid_and_head_strips_are_the_sessions_numbers(tiny_llama_dir):
    session = TraceSession(load_model(str(tiny_llama_dir), device="cpu"), SamplingSettings(max_new_tokens=8),
                           top_k=5)
    app = KvtraceApp(session)
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, "Tell me a story about a small robot.")
        await pilot.press("home", "4")
        await wait_until(pilot, lambda: all(r.lens is not None for r in session.records))
        await pilot.pause()
        grid = app.grid_pane.grid
        for record in session.records:
            lens = session.lens(record.index)
            for layer in range(len(lens)):
                row = grid.render_line(layer + 1).text
                left = LABEL + record.index * CELL
                assert row[left : left + CELL - 1] == clip(visible(lens[layer].top[0].text), CELL - 1).ljust(CELL - 1)
        await pilot.press("2", "a", "a")  # back from the grid: layer 0's heads
        record = app.timeline.selected_record
        heads = record.attention.per_head[0]
        for head, entries in enumerate(heads):  # the cursor walks the heads; the window follows it
            lines = screen_text(app).splitlines()
            header = next(i for i, line in enumerate(lines) if re.search(rf"\bh{head}\b", line))
            for row in range(3):  # the head's strongest entries, in order
                cell = (re.escape(clip(visible(session.token_text(entries[row][0])), 8)) + r"\s+"
                        + re.escape(f"{entries[row][1]:.2f}"))
                assert re.search(cell, lines[header + 1 + row]), (head, row, lines[header + 1 + row])
            await pilot.press("right_curly_bracket")


def test_print_lens_grid_cells_are_the_sessions_lens(traced):
    from rich.console import Console

    from tracer.render import GRID_CELL, lens_grid

    session = traced
    console = Console(width=40, record=True, file=io.StringIO())
    console.print(lens_grid(session, session.records, 40))
    lines = console.export_text().splitlines()
    per_band = (40 - 4) // GRID_CELL
    bands = [i for i, line in enumerate(lines) if line == ""]
    assert len(bands) == math.ceil(len(session.records) / per_band)
    for band, start in enumerate(bands):
        for offset, record in enumerate(session.records[band * per_band : (band + 1) * per_band]):
            left = 4 + offset * GRID_CELL
            lens = session.lens(record.index)
            for layer in range(len(lens)):
                assert lines[start + 2 + layer][left : left + GRID_CELL - 1].rstrip() == \
                    clip(visible(lens[layer].top[0].text), GRID_CELL - 1).rstrip()
