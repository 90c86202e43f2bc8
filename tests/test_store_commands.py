"""Snapshot references (``FILE.kvs`` or ``DIR:NAME``) through the use cases and the commands, on tiny real models.

Every restore from the store continues exactly like the uninterrupted run
(greedy and seeded sampling, full and pruned states); damage is named in one
line and confined to the entries that use the damaged chunk.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvstore import pruning, snapshot
from kvstore.errors import SnapshotError
from kvstore.store import Store
from test_snapshot_commands import assert_one_line_error, kvtrace_here
from test_store import assert_same
from tracer import references, usecases
from tracer.loading import load_model
from tracer.sampling import SamplingSettings
from tracer.session import TraceSession


@pytest.fixture(params=["tiny_llama_dir", "tiny_gpt2_dir"])
def tiny(request):
    return load_model(str(request.getfixturevalue(request.param)), device="cpu")


def test_the_reference_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    parse = references.parse
    assert parse("story.kvs").file == Path("story.kvs")
    assert parse("/tmp/a:b.kvs").file == Path("/tmp/a:b.kvs")  # a .kvs name may hold colons
    assert parse("plain").file == Path("plain")
    ref = parse("mem:t1")
    assert (ref.store, ref.name) == (Path("mem"), "t1")
    ref = parse("/x/odd:folder:t2")  # split at the last colon
    assert (ref.store, ref.name) == (Path("/x/odd:folder"), "t2")
    assert parse(":t3").store == tmp_path / "data" / "kvtrace" / "store"
    for bad in ("mem:", "mem:a/b", "mem:.x"):
        with pytest.raises(SnapshotError):
            parse(bad)


def test_a_store_restore_continues_like_the_uninterrupted_run(tiny, tmp_path):
    """Greedy and seeded sampling, through ``usecases.save``/``load_into`` with DIR:NAME references."""
    for settings in (SamplingSettings(), SamplingSettings(temperature=1.0, top_p=0.9, seed=3)):
        reference = TraceSession(tiny, settings)
        reference.start_turn("Tell me a story.")
        reference.generate(20)
        paused = TraceSession(tiny, settings)
        paused.start_turn("Tell me a story.")
        paused.generate(6)
        ref = f"{tmp_path / 'mem'}:s{settings.seed}"
        usecases.save(paused, ref)
        resumed = TraceSession(tiny, settings)
        usecases.load_into(resumed, ref)
        resumed.generate(14)
        assert resumed.token_ids == reference.token_ids
        assert [r.to_dict() for r in resumed.records] == [r.to_dict() for r in reference.records][:6] + \
            [r.to_dict() for r in resumed.records[6:]]  # the first six came back from the trace


def test_a_pruned_store_restore_continues_like_the_pruned_state_in_memory(tiny, tmp_path):
    """Shared-position prunes; per-head prunes continue exactly through the store in test_pruning_per_head.py."""
    session = TraceSession(tiny)
    session.start_turn("Why is the sky blue? Because of Rayleigh scattering of sunlight.")
    session.generate(6)
    for name, pruned in (("recent", pruning.sinks_recent(session.export_state(), 2, 8)),
                         ("span", pruning.drop_span(session.export_state(), 3, 9))):
        expected = TraceSession(tiny)
        expected.import_state(pruned)
        reference = [r.token_id for r in expected.generate(10)]
        ref = f"{tmp_path / 'mem'}:{name}"
        usecases.save_state(pruned, ref)
        snapshot.save(pruned, tmp_path / f"{name}.kvs")  # (attention scores are float32 in both)
        assert_same(snapshot.load(tmp_path / f"{name}.kvs"), usecases.read_state(ref))
        resumed = TraceSession(tiny)
        usecases.load_into(resumed, ref)
        assert [r.token_id for r in resumed.generate(10)] == reference


def test_a_conversation_kept_turn_by_turn_from_the_shell(tiny_llama_dir, tmp_path, capsys):
    mem = tmp_path / "mem"
    model = ["--model", tiny_llama_dir]
    assert kvtrace_here(capsys, "save", "--prompt", "Tell me a story.", "--steps", 6, "-o", f"{mem}:t1",
                        *model).returncode == 0
    assert kvtrace_here(capsys, "resume", f"{mem}:t1", "--continue", "Why is the sky blue?", "--steps", 6,
                        "-o", f"{mem}:t2").returncode == 0
    reference = TraceSession(load_model(str(tiny_llama_dir)))
    reference.start_turn("Tell me a story.")
    reference.generate(6)
    reference.start_turn("Why is the sky blue?")
    reference.generate(6)
    store = Store.open(mem)
    t2 = store.load("t2")
    assert t2.token_ids == reference.token_ids
    assert len(store.read("t2").ranges) > len(store.read("t1").ranges)  # t2 follows t1's cut, then adds
    listing = [re.split(r"\s{2,}", line.strip()) for line in kvtrace_here(capsys, "ls", mem).stdout.splitlines()]
    assert listing[0][:5] == ["NAME", "TOKENS", "OWN", "SHARED", "PARENT"]
    assert (listing[1][0], listing[1][4], listing[2][4]) == ("t2", "t1", "-")  # newest first, with its parent

    info = kvtrace_here(capsys, "info", f"{mem}:t2")
    assert info.returncode == 0 and "kvtrace store entry" in info.stdout and "checked:  every checksum" in info.stdout
    assert kvtrace_here(capsys, "export", f"{mem}:t2", "-o", tmp_path / "t2.kvs").returncode == 0
    assert_same(t2, snapshot.load(tmp_path / "t2.kvs"))

    assert kvtrace_here(capsys, "prune", f"{mem}:t2", "-o", f"{mem}:small", "--keep-last", 12).returncode == 0
    assert store.read("small").parent == "t2" and store.load("small").cache_length == 12
    assert kvtrace_here(capsys, "resume", f"{mem}:small", "--steps", 2).returncode == 0
    assert kvtrace_here(capsys, "rm", f"{mem}:small").returncode == 0
    assert "removed 1 " in kvtrace_here(capsys, "gc", mem).stdout  # the pruned chunk; the trace block is t2's


def test_damage_is_named_in_one_line_and_stays_in_the_entries_that_use_it(tiny_llama_dir, tmp_path, capsys):
    mem = tmp_path / "mem"
    model = ["--model", tiny_llama_dir]
    for name, prompt in (("a", "Tell me a story."), ("b", "Why is the sky blue?")):
        assert kvtrace_here(capsys, "save", "--prompt", prompt, "-o", f"{mem}:{name}", *model).returncode == 0
    key = Store.open(mem).read("a").ranges[0].chunks[0].key.hex()
    chunk = next(p for p in (mem / "chunks").rglob("*.kvc") if p.name.startswith(key))
    data = bytearray(chunk.read_bytes())
    data[-40] ^= 0x01  # a bit in the last record's payload
    chunk.write_bytes(bytes(data))
    for args in (("info", f"{mem}:a"), ("info", f"{mem}:a", "--deep"), ("resume", f"{mem}:a", "--steps", 1),
                 ("export", f"{mem}:a", "-o", tmp_path / "a.kvs"), ("prune", f"{mem}:a", "-o", f"{mem}:p",
                                                                     "--keep-last", 2)):
        assert_one_line_error(kvtrace_here(capsys, *args), f"{mem}:a is damaged: chunk {key[:12]}")
    assert kvtrace_here(capsys, "info", f"{mem}:a", "--header").returncode == 0
    assert kvtrace_here(capsys, "info", f"{mem}:b").returncode == 0
    assert kvtrace_here(capsys, "resume", f"{mem}:b", "--steps", 1).returncode == 0
    chunk.unlink()
    assert_one_line_error(kvtrace_here(capsys, "info", f"{mem}:a"), "which is missing from the store")
    assert_one_line_error(kvtrace_here(capsys, "resume", f"{mem}:a"), "which is missing from the store")
    assert not (tmp_path / "a.kvs").exists() and not (mem / "entries" / "p.kve").exists()


def test_store_arguments_are_checked_before_a_model_loads(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    assert_one_line_error(kvtrace_here(capsys, "save", "--prompt", "x", "-o", f"{tmp_path / 'notes'}:t1"),
                          "not a kvtrace snapshot store")
    assert_one_line_error(kvtrace_here(capsys, "save", "--prompt", "x", "-o", f"{tmp_path}:bad/name"),
                          "not a store entry name")
    assert_one_line_error(kvtrace_here(capsys, "resume", f"{tmp_path / 'none'}:t1"), "no snapshot store")
    assert_one_line_error(kvtrace_here(capsys, "ls", tmp_path / "notes"), "not a kvtrace snapshot store")
    Store.open(tmp_path / "mem", create=True)
    assert_one_line_error(kvtrace_here(capsys, "info", f"{tmp_path / 'mem'}:nope"), "has no entry 'nope'")
    assert_one_line_error(kvtrace_here(capsys, "rm", tmp_path / "x.kvs"), "is a file, not a store entry")
