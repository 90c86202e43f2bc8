"""A snapshot carries its trace: loading restores the timeline, its panes and turn marks; crafted traces never crash."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest

from kvstore import snapshot
from tracer import trace_codec
from tracer.loading import load_model
from tracer.records import StepRecord
from tracer.session import TraceSession


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


@pytest.fixture(scope="module")
def traced(tiny):
    """Two turns with replies, the lens computed for a few records."""
    session = TraceSession(tiny, top_k=5)
    session.start_turn("Tell me a story.")
    session.generate(6)
    session.start_turn("Why is the sky blue?")
    session.generate(5)
    session.lens_many([1, 7])
    return session


def as_dicts(records: list[StepRecord]) -> list[dict]:
    return [r.to_dict() for r in records]


def restored(tiny, state) -> TraceSession:
    session = TraceSession(tiny, top_k=5)
    session.import_state(state)
    return session


def test_a_loaded_snapshot_restores_records_panes_and_turns(tiny, traced, tmp_path):
    snapshot.save(traced.export_state(), tmp_path / "s.kvs")
    session = restored(tiny, snapshot.load(tmp_path / "s.kvs", expected=tiny.fingerprint))
    assert as_dicts(session.records) == as_dicts(traced.records)  # top-k, attention, lens where computed
    assert traced.records[1].attention.per_head is not None  # the per-head evidence came along (in the dicts)
    assert session.records[1].lens and session.records[0].lens is None
    assert session.lens(0) == []  # no hidden states were saved: no lens, no crash
    turns = [(t.first_record, t.message_count, t.rendered, t.reply_start) for t in session._turns]
    assert turns == [(t.first_record, t.message_count, t.rendered, t.reply_start) for t in traced._turns]


def test_branching_into_an_earlier_turn_after_a_load_matches_the_original(tiny, traced):
    original = restored(tiny, traced.export_state())  # an untouched copy to branch in place of ``traced``
    loaded = restored(tiny, traced.export_state())
    token = original.records[3].top[1].token_id
    original_copy = TraceSession(tiny, top_k=5)
    original_copy.start_turn("Tell me a story.")
    original_copy.generate(6)
    original_copy.start_turn("Why is the sky blue?")
    original_copy.generate(5)
    original_copy.branch(3, token)
    loaded.branch(3, token)
    assert loaded.messages == original_copy.messages  # the first turn's chat is back
    assert loaded.token_ids == original_copy.token_ids
    assert [r.token_id for r in loaded.generate(4)] == [r.token_id for r in original_copy.generate(4)]


def test_a_snapshot_without_a_trace_still_loads_with_an_empty_timeline(tiny, traced):
    state = dataclasses.replace(traced.export_state(), trace=None)
    session = restored(tiny, state)
    assert session.records == [] and session.token_ids == traced.token_ids
    assert len(session.generate(3)) == 3


def test_numbers_round_trip_exactly():
    record = StepRecord(index=0, position=3, token_id=2, text="x", prob=0.1, logprob=-2.302585092994046,
                        entropy=1e-300, top=[], attention=None, lens=None, extra={"note": [1, 2.5]})
    data = trace_codec.encode([record], [])
    with pytest.raises(trace_codec.TraceError, match="steps but no turn"):
        trace_codec.decode(data, [0, 1, 2, 2], 10, 0)
    packed = trace_codec._floats([0.1, 0.5])
    assert packed[0] == 8  # 0.1 is not a float32: kept as float64
    assert trace_codec._floats([0.5, 0.25])[0] == 4


CRAFTED = {
    "empty": b"",
    "no header": msgpack.packb(["step"]),
    "newer version": msgpack.packb({"kind": "kvtrace-trace", "version": 99}),
    "garbage": b"\xc1\xff\x00" * 10,
    "ext type": msgpack.packb({"kind": "kvtrace-trace", "version": 1}) + msgpack.packb(msgpack.ExtType(1, b"x")),
    "deep nesting": msgpack.packb({"kind": "kvtrace-trace", "version": 1}) + b"\x91" * 100_000,
}


def header() -> bytes:
    return msgpack.packb({"kind": "kvtrace-trace", "version": 1})


@pytest.mark.parametrize("item", [
    ["turn", 0, 99, "", 0],  # more messages than the chat has
    ["turn", 1, 0, "", 0],  # a mark after steps that do not exist
    ["turn", 0, 0, "", 10_000],  # a reply starting past the transcript
    ["turn", 0, 0, b"bytes", 0],  # rendered text that is not text
    ["step", 0, 5, 1, "x", 0.5, -1.0, 1.0, [b"", [4, b""], []], None, None, False, {}],  # before any turn mark
    ["step"] + [None] * 12,
    ["bogus", 1, 2],
    "not a list",
])
def test_crafted_items_are_refused_in_one_line(tiny, traced, item):
    data = header() + msgpack.packb(item, use_bin_type=True)
    with pytest.raises(trace_codec.TraceError) as refused:
        trace_codec.decode(data, traced.token_ids, tiny.fingerprint.vocab_size, len(traced.messages))
    assert "\n" not in str(refused.value)


def test_crafted_and_damaged_traces_never_crash_an_import(tiny, traced):
    state = traced.export_state()
    valid = state.trace
    rng = random.Random(0)
    variants = list(CRAFTED.values())
    for _ in range(120):
        data = bytearray(valid)
        kind = rng.randrange(3)
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            start = rng.randrange(len(data))
            data[start:start + 8] = rng.randbytes(8)
        variants.append(bytes(data))
    for data in variants:
        try:
            trace = trace_codec.decode(data, state.token_ids, tiny.fingerprint.vocab_size,
                                       len(state.metadata["messages"]))
        except trace_codec.TraceError as error:
            assert "\n" not in str(error)
        else:  # what decodes must be usable: every record sits on the transcript
            assert all(state.token_ids[r.position] == r.token_id for r in trace.records)
        session = restored(tiny, dataclasses.replace(state, trace=data))
        assert session.token_ids == state.token_ids
        session.generate(1)  # and the session goes on either way
