"""The views of issue 13 over the fake session (fast): the lens grid, attention by head, what each layer
added, lines compared and named, a step's tensors, the grid's picture."""

from __future__ import annotations

import json
import math

from app_pilot import notifications, send, wait_idle, wait_until
from fake_session import LAYERS, FakeSession
from safetensors.torch import load_file
from screen_text import screen_text

from tracer.lens_grid import METRICS, clip
from tracer.sampling import SamplingSettings
from tracer.token_text import visible
from tui_app.actions import help_rows, palette_entries
from tui_app.app import KvtraceApp
from tui_app.formatting import signed_bar
from tui_app.screens.compare import CompareScreen
from tui_app.screens.lens_cell import LensCellScreen
from tui_app.screens.lines import LinesScreen
from tui_app.widgets.attention import AttentionPane
from tui_app.widgets.lens import BAR_HALF
from tui_app.widgets.lens_grid import CELL, LABEL, LensGrid


def grid_cell(grid: LensGrid, index: int, layer: int) -> str:
    """What the grid draws in token ``index``'s column at ``layer`` (the row under the token row)."""
    row = grid.render_line(layer - int(grid.scroll_offset.y) + 1).text
    left = LABEL + index * CELL - int(grid.scroll_offset.x)
    return row[left : left + CELL - 1]


def expected_cell(session: FakeSession, index: int, layer: int) -> str:
    return clip(visible(session.lens(index)[layer].top[0].text), CELL - 1).ljust(CELL - 1)


async def test_grid_cells_are_the_sessions_lens_and_the_column_follows_the_cursor():
    session = FakeSession(sampling=SamplingSettings(max_new_tokens=40))
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("home", "4")
        await pilot.pause()
        grid = app.grid_pane.grid
        shown = grid.visible_indices()
        assert 0 in shown and len(shown) < len(session.records)
        await wait_until(pilot, lambda: all(session.records[i].lens is not None for i in shown))
        assert session.records[-1].lens is None, "only the columns in view are computed"
        for index in shown:
            if LABEL + (index + 1) * CELL <= grid.scrollable_content_region.width:
                for layer in range(LAYERS):
                    assert grid_cell(grid, index, layer) == expected_cell(session, index, layer)
        await pilot.press("end")  # the column follows the timeline; its lens is asked for
        assert grid.selected == len(session.records) - 1
        await wait_until(pilot, lambda: session.records[-1].lens is not None)
        for layer in range(LAYERS):
            assert grid_cell(grid, grid.selected, layer) == expected_cell(session, grid.selected, layer)


async def test_metric_key_layer_cursor_and_enter_open_the_cell():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("home", "right", "4")
        record = session.records[1]
        await wait_until(pilot, lambda: record.lens is not None)
        assert f"Lens grid · {METRICS[0].name} (m)" in screen_text(app)
        await pilot.press("m")
        assert f"Lens grid · {METRICS[1].name} (m)" in screen_text(app)
        await pilot.press("down", "down")
        assert app.grid_pane.grid.cursor == 2
        text = screen_text(app)
        assert f"#1 · layer 2: " in text and f"{METRICS[1].name} {record.lens_stats.chosen_prob[2]:.2f}" in text
        await pilot.press("enter")
        assert isinstance(app.screen, LensCellScreen)
        text = screen_text(app)
        for candidate in record.lens[2].top:
            assert f"{candidate.prob:.3f}" in text
        await pilot.press("escape")
        assert not isinstance(app.screen, LensCellScreen)


async def test_heads_show_each_heads_strongest_entries():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("2", "a", "right_square_bracket", "a")  # one layer, layer 1, its heads
        pane = app.query_one(AttentionPane)
        assert pane.by_head and pane.shown_layer == 1
        await pilot.press("right_curly_bracket")
        record = app.timeline.selected_record
        heads = record.attention.per_head[1]
        text = screen_text(app)
        assert f"layer 1/{LAYERS - 1} · head 1/{len(heads) - 1}" in text
        lines = text.splitlines()
        for head, entries in enumerate(heads):
            header = next(i for i, line in enumerate(lines) if f"h{head}" in line)
            for row, (position, weight) in enumerate(entries[:3], start=1):
                token = clip(visible(session.token_text(position)), 8)
                assert token in lines[header + row] and f"{weight:.2f}" in lines[header + row]


async def test_lens_pane_shows_what_each_layer_added():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("3")
        record = app.timeline.selected_record
        await wait_until(pilot, lambda: record.attribution is not None)
        await pilot.pause()
        attribution = record.attribution
        scale = max(abs(v) for v in [*attribution.attention.tolist(),
                                     *(t - a for t, a in zip(attribution.layers, attribution.attention))])
        text = screen_text(app)
        assert "attn" in text and "mlp" in text and f"added to logit−mean {attribution.total:+.2f}" in text
        for layer in range(LAYERS):
            assert signed_bar(attribution.attention[layer] / scale, BAR_HALF) in text


async def test_lines_are_named_and_compared_from_where_they_part():
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, "hello there")
        original = list(session.records)
        await pilot.press("home", "right", "right", "down", "b")
        await wait_idle(pilot)
        await pilot.press("l")
        assert isinstance(app.screen, LinesScreen)
        await pilot.press("n", *"detour", "enter")  # the highlighted line: the first, the one left behind
        await wait_until(pilot, lambda: any(b.name == "detour" for b in app.view.branches))
        await pilot.press("l", "enter", "down", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen))
        comparison = app.screen.comparison
        assert comparison.branch == 2 and comparison.first_difference.a_token == original[2].token_id
        text = screen_text(app)
        assert "line 1 “detour”" in text and "They part at generated token #2" in text
        first = comparison.first_difference
        assert math.isclose(first.a_prob, original[2].prob) and math.isclose(first.b_prob, session.records[2].prob)
        assert math.isclose(first.a_under_b, first.a_prob), "at the branch point both lines share one distribution"


async def test_tensor_export_writes_safetensors_and_a_sidecar(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("home", "right", "t")
        await wait_idle(pilot)
        record = session.records[1]
        [path] = tmp_path.glob("kvtrace-step-1-*.safetensors")
        tensors = load_file(path)
        assert set(tensors) == set(session.step_tensors(1))
        assert (tensors["hidden_states"] == record.position).all()
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert (sidecar["token_id"], sidecar["position"], sidecar["index"]) == (record.token_id, record.position, 1)
        assert sidecar["input_ids"] == session.token_ids[: record.position]
        assert any(n.startswith("Wrote 2 tensors") for n in notifications(app))


async def test_picture_key_writes_the_grid_as_svg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = FakeSession()
    app = KvtraceApp(session)
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, "hello there")
        await pilot.press("x")
        await wait_until(pilot, lambda: any(tmp_path.glob("kvtrace-grid-*.svg")))
        [picture] = tmp_path.glob("kvtrace-grid-*.svg")
        assert "<svg" in picture.read_text() and "Lens" in picture.read_text()
        assert app.active_pane == "grid"


def test_help_and_palette_list_the_view_keys():
    rows = dict(help_rows())
    for key, words in (("4", "lens grid"), ("m", "metric"), ("Enter", "the layer under the cursor"), ("x", "SVG"), ("l", "compare"),
                       ("t", "safetensors"), ("{", "head"), ("}", "head"), ("3", "attribution")):
        assert words in rows[key], key
    palette = {a.command for a in palette_entries()}
    assert {"Save grid picture", "Compare lines", "Export step tensors", "Show grid", "Grid metric"} <= palette
