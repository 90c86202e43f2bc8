"""The snapshot store: exact round trips of every layout, only new chunks written, damage contained, two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hostile_corpus import per_head_state
from kvstore import pruning, snapshot
from kvstore.errors import FingerprintMismatch, SnapshotError
from kvstore.state import KVState
from kvstore.store import Store
from kvstore_factory import FINGERPRINT, make_state

REPO = Path(__file__).resolve().parents[1]
WIDE = replace(FINGERPRINT, num_layers=4, head_dim=64)  # 2 KiB of float32 K/V per token
SLIDING = replace(FINGERPRINT, layer_types=("sliding_attention", "full_attention", "full_attention"),
                  sliding_window=16)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def assert_same(a: KVState, b: KVState) -> None:
    """Bit for bit: tensors, per-head tables, transcript, metadata, trace."""
    assert [bits(t) for t in a.keys + a.values] == [bits(t) for t in b.keys + b.values]
    assert (a.token_ids, a.positions, a.attention_scores, a.metadata, a.trace) == \
        (b.token_ids, b.positions, b.attention_scores, b.metadata, b.trace)
    assert [None if t is None else t.tolist() for t in a.head_positions or []] == \
        [None if t is None else t.tolist() for t in b.head_positions or []]
    assert [bits(t) for t in a.head_scores or []] == [bits(t) for t in b.head_scores or []]


def conversation(turns: int, per_turn: int, fp=WIDE, seed: int = 0) -> list[KVState]:
    """States of one conversation after each turn: each one the previous plus ``per_turn`` entries."""
    g = torch.Generator().manual_seed(seed)
    total = turns * per_turn
    shape = (fp.num_kv_heads, total, fp.head_dim)
    keys = [torch.randn(shape, generator=g) for _ in range(fp.num_layers)]
    values = [torch.randn(shape, generator=g) for _ in range(fp.num_layers)]
    tokens = torch.randint(0, fp.vocab_size, (total + 1,), generator=g).tolist()
    states = []
    for turn in range(1, turns + 1):
        n = turn * per_turn
        states.append(KVState([k[:, :n].clone() for k in keys], [v[:, :n].clone() for v in values],
                              tokens[:n + 1], list(range(n)), fp, metadata={"turn": turn},
                              trace=bytes(range(256)) * (40 * turn)))
    return states


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("codec", ["lossless", "raw"])
def test_every_layout_round_trips_bit_for_bit(tmp_path, codec):
    store = Store.open(tmp_path / "s", create=True)
    full = make_state(600)
    per_head = per_head_state(SLIDING)  # a sliding layer, per-head positions and scores, a trace
    pruned = pruning.sinks_recent(full, 4, 100)
    heads = full.select_per_head([torch.stack([torch.arange(h, 600, 3) for h in range(2)]) for _ in range(3)])
    nothing = full.select([])  # every entry pruned: ranges without chunks
    for name, state in (("full", full), ("per-head", per_head), ("pruned", pruned), ("heads", heads),
                        ("nothing", nothing)):
        store.save(state, name, codec=codec)
        assert_same(state, store.load(name, expected=state.fingerprint))
        store.verify(name, deep=True)


def test_a_lossy_codec_decodes_close_to_the_state(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    state = make_state(300)
    store.save(state, "q", codec="int8")
    loaded = store.load("q")
    for a, b in zip(state.keys + state.values, loaded.keys + loaded.values):
        assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert store.info("q").codec == "int8"


def test_saving_turn_after_turn_writes_only_the_new_tokens(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    states = conversation(10, 130)
    single = snapshot.save(states[-1], tmp_path / "final.kvs")
    per_token = single / states[-1].cache_length
    parent = None
    for turn, state in enumerate(states):
        saved = store.save(state, f"t{turn}", parent=parent)
        if parent is not None:
            assert saved.written <= 1.1 * 130 * per_token + 16_000  # new chunks, a trace block, the entry
            assert saved.reused_chunks >= turn  # every earlier chunk, the short ones included
        parent = f"t{turn}"
    assert store_bytes(tmp_path / "s") <= 1.15 * single + 40_000
    for turn in (0, 4, 9):
        assert_same(states[turn], store.load(f"t{turn}"))


def test_two_branches_of_one_prompt_share_the_common_chunks_without_a_hint(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    a = make_state(700, seed=1)
    b = make_state(700, seed=2)
    b.token_ids[:601] = a.token_ids[:601]
    b.keys = [torch.cat([ka[:, :600], kb[:, 600:]], 1) for ka, kb in zip(a.keys, b.keys)]
    b.values = [torch.cat([va[:, :600], vb[:, 600:]], 1) for va, vb in zip(a.values, b.values)]
    b.attention_scores = a.attention_scores
    store.save(a, "a")
    saved = store.save(b, "b")
    assert saved.reused_chunks == 2  # positions 0-511 on the grid; 512-599 lie in the chunk where they part
    assert_same(b, store.load("b"))
    assert_same(a, store.load("a"))


def test_a_sliding_window_rewrites_only_its_own_chunk(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    fp = replace(WIDE, layer_types=("sliding_attention", "full_attention", "full_attention", "full_attention"),
                 sliding_window=64)
    states = conversation(3, 300, fp)
    for state in states:
        state.keys[0] = state.keys[0][:, -64:].clone()
        state.values[0] = state.values[0][:, -64:].clone()
    store.save(states[0], "t0")
    store.save(states[1], "t1", parent="t0")
    saved = store.save(states[2], "t2", parent="t1")
    # the full layers' chunks of 0-255, 256-299, 300-511 and 512-599 are reused (the window has left them);
    # new: 600-767 (full layers), 768-899 (full layers, and the sliding layer's window 836-899)
    assert (saved.reused_chunks, saved.new_chunks) == (4, 3)
    for i, state in enumerate(states):
        assert_same(state, store.load(f"t{i}"))


def test_same_tokens_with_other_cache_contents_never_share_a_chunk(tmp_path):
    """A state pruned then continued holds other values than the unpruned run at the same positions."""
    store = Store.open(tmp_path / "s", create=True)
    state = make_state(300)
    changed = replace(state, keys=[k.clone() for k in state.keys], values=list(state.values))
    changed.keys[1][:, 280] += 1e-3
    store.save(state, "a")
    saved = store.save(changed, "b")
    assert saved.reused_chunks == 1  # 0-255 is shared, 256-299 differs in one entry of one layer
    assert_same(changed, store.load("b"))
    assert_same(state, store.load("a"))


def test_a_damaged_chunk_is_named_and_refused_and_nothing_else_is_affected(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    a, b = make_state(300, seed=1), make_state(300, seed=2)
    store.save(a, "a")
    store.save(b, "b")
    [chunk] = [p for p in (tmp_path / "s" / "chunks").rglob("*.kvc")
               if p.name[:64] == store.read("a").ranges[1].chunks[0].key.hex()]
    data = bytearray(chunk.read_bytes())
    data[-100] ^= 0x04
    chunk.write_bytes(bytes(data))
    for check in (lambda: store.verify("a"), lambda: store.load("a"), lambda: store.verify("a", deep=True)):
        with pytest.raises(SnapshotError, match=r"s:a is damaged: chunk [0-9a-f]{12} \(positions 256-299\)"):
            check()
    assert_same(b, store.load("b"))
    assert store.info("a").cache_length == 300  # the header is fine


def test_a_missing_chunk_is_a_clear_refusal(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    store.save(make_state(300), "a")
    next((tmp_path / "s" / "chunks").rglob("*.kvc")).unlink()
    with pytest.raises(SnapshotError, match="names chunk .* which is missing from the store"):
        store.load("a")
    with pytest.raises(SnapshotError, match="missing"):
        store.verify("a")


def test_another_models_entry_is_refused_before_any_chunk_is_read(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    store.save(make_state(50), "a")
    for chunk in (tmp_path / "s" / "chunks").rglob("*.kvc"):
        chunk.unlink()
    with pytest.raises(FingerprintMismatch):
        store.load("a", expected=replace(FINGERPRINT, head_dim=16))
    with pytest.raises(SnapshotError, match="51 tokens long, more than the 10"):
        store.load("a", max_tokens=10)


def test_memory_budget_refuses_before_allocating(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    store.save(make_state(300), "a")
    with pytest.raises(SnapshotError, match="memory"):
        store.load("a", max_bytes=10_000)


def test_gc_removes_only_what_no_entry_uses(tmp_path):
    root = tmp_path / "s"
    store = Store.open(root, create=True)
    states = conversation(2, 300)
    store.save(states[0], "t0")
    store.save(states[1], "t1", parent="t0")
    store.save(make_state(100, seed=3), "other")
    (root / "tmp" / "left-by-a-killed-save.tmp").write_bytes(b"x")
    first = store.gc()
    assert (first.removed, first.temporaries) == (0, 1)
    store.remove("t1")
    collected = store.gc()
    assert collected.removed >= 2 and collected.freed > 0
    assert_same(states[0], store.load("t0"))
    store.remove("t0")
    store.gc()
    assert {p.parent.name for p in root.rglob("*.kvc")} and [e.name for e in store.entries()] == ["other"]
    store.load("other")
    (root / "entries" / "broken.kve").write_bytes(b"not an entry")
    with pytest.raises(SnapshotError, match="cannot collect garbage while an entry is unreadable"):
        store.gc()


def test_listing_counts_shared_and_own_bytes(tmp_path):
    store = Store.open(tmp_path / "s", create=True)
    states = conversation(2, 300)
    store.save(states[0], "t0")
    store.save(states[1], "t1", parent="t0")
    infos = {i.name: i for i in store.entries()}
    assert infos["t1"].parent == "t0" and infos["t1"].tokens == 601
    assert infos["t0"].own_bytes < 1000  # every chunk it uses, t1 uses too: only its short trace block is its own
    assert infos["t1"].own_bytes > 0 and infos["t1"].shared_bytes == infos["t0"].shared_bytes


def test_opening_folders_that_are_not_stores(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SnapshotError, match="not a kvtrace snapshot store"):
        Store.open(tmp_path / "full")
    with pytest.raises(SnapshotError, match="other files"):
        Store.open(tmp_path / "full", create=True)
    with pytest.raises(SnapshotError, match="not a folder"):
        Store.open(tmp_path / "file", create=True)
    with pytest.raises(SnapshotError, match="no snapshot store"):
        Store.open(tmp_path / "nothing")
    store = Store.open(tmp_path / "new" / "deeper", create=True)
    (store.path / "kvtrace-store").write_text('{"kind": "kvtrace-store", "version": 9}')
    with pytest.raises(SnapshotError, match="version 9"):
        Store.open(store.path)
    for name in ("../x", "a/b", ".hidden", "x.kvs", "", "a" * 200):
        with pytest.raises(SnapshotError, match="not a store entry name"):
            Store.open(tmp_path / "ok", create=True).save(make_state(5), name)


SAVER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from kvstore.store import Store
    from test_store import conversation
    store = Store.open({store!r}, create=True)
    states = conversation(6, 120, seed={seed})
    for round in range({rounds}):
        parent = None
        for turn, state in enumerate(states):
            store.save(state, f"{prefix}{{turn}}", parent=parent)
            parent = f"{prefix}{{turn}}"
""")

COLLECTOR = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    from kvstore.store import Store
    store = Store.open({store!r}, create=True)
    end = time.time() + 60
    while time.time() < end and not __import__("os").path.exists({stop!r}):
        store.gc()
""")


def test_two_processes_save_into_one_store_at_once_while_gc_runs(tmp_path):
    root = str(tmp_path / "s")
    Store.open(root, create=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = {"repo": str(REPO), "tests": str(REPO / "tests"), "store": root}
    collector = subprocess.Popen([sys.executable, "-c", COLLECTOR.format(**common, stop=str(tmp_path / "stop"))],
                                 env=env)
    savers = [subprocess.Popen([sys.executable, "-c", SAVER.format(**common, seed=0, prefix=prefix, rounds=2)],
                               env=env, stderr=subprocess.PIPE, text=True) for prefix in ("a", "b")]
    try:
        errors = [saver.communicate(timeout=300)[1] for saver in savers]
    finally:
        (tmp_path / "stop").touch()
        collector.wait(timeout=120)
    assert [saver.returncode for saver in savers] == [0, 0], errors
    store = Store.open(root)
    states = conversation(6, 120, seed=0)
    for prefix in ("a", "b"):  # the same conversation from two processes: one set of chunks
        for turn, state in enumerate(states):
            assert_same(state, store.load(f"{prefix}{turn}"))
    assert store.gc().removed == 0 and not os.listdir(Path(root) / "tmp")
