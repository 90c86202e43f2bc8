"""A session's trace as bytes, so a snapshot restores the timeline and its panes, not only the chat.

What is kept: every step record (chosen token, probabilities, top-k, the
attention evidence with any per-head part, the lens when it was computed) and
every turn mark (where a turn began, so branching into an earlier turn
restores that turn's chat). The hidden states behind the lens are not kept
(tens of kilobytes a token): a restored record shows its lens if it was
computed before the save, and none otherwise.

Format: a msgpack stream, a header map then one array per item, in the order
they happened (``["turn", ...]`` and ``["step", ...]``), numbers packed as
little-endian arrays (float32 when that is exact, else float64). Nothing in it
counts the items, so the trace of a longer conversation starts with the bytes
of the shorter one: the snapshot store keeps the trace in blocks and writes
only the new tail each turn.

Reading treats the bytes as hostile: bounded msgpack, every field's type,
size and range checked, records checked against the state's transcript. A
defect raises ``TraceError`` (one line); the session then ignores the trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NamedTuple

import msgpack
import numpy as np

from kvstore.metadata import plain
from tracer import records as record_types
from tracer.errors import TracerError
from tracer.records import AttentionEvidence, Candidate, LensLayer, StepRecord

KIND = "kvtrace-trace"
VERSION = 1
MAX_TOP = 1000  # candidates per list (usecases.MAX_TOP_K)
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_STRING = 1 << 20
MAX_ITEMS = 1 << 24
HAS_PER_HEAD = "per_head" in {f.name for f in fields(AttentionEvidence)}


class TraceError(TracerError):
    """A trace that cannot be restored (damaged, crafted, or of another transcript)."""


class Turn(NamedTuple):
    """A turn mark as the session keeps it (``tracer.session.TurnMark``'s fields)."""

    first_record: int
    message_count: int
    rendered: str
    reply_start: int


class Trace(NamedTuple):
    records: list[StepRecord]
    turns: list[Turn]


# ------------------------------------------------------------------------------------ writing
def encode(records: Sequence[StepRecord], turns: Sequence[Any]) -> bytes:
    """The trace of ``records`` and ``turns`` (objects with ``Turn``'s fields), in the order they happened."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack({"kind": KIND, "version": VERSION})]
    ordered = sorted(turns, key=lambda t: t.first_record)
    turn = 0
    for index in range(len(records) + 1):
        while turn < len(ordered) and ordered[turn].first_record == index:
            mark = ordered[turn]
            parts.append(packer.pack(["turn", mark.first_record, mark.message_count, mark.rendered,
                                      mark.reply_start]))
            turn += 1
        if index < len(records):
            parts.append(packer.pack(_record(records[index])))
    return b"".join(parts)


def _record(r: StepRecord) -> list[Any]:
    lens = None if r.lens is None else [[layer.layer, _top(layer.top)] for layer in r.lens]
    return ["step", r.index, r.position, r.token_id, r.text, r.prob, r.logprob, r.entropy, _top(r.top),
            _attention(r.attention), lens, r.forced, r.extra if plain(r.extra) else {}]


def _top(candidates: Sequence[Candidate]) -> list[Any]:
    return [np.asarray([c.token_id for c in candidates], dtype="<u4").tobytes(),
            _floats([c.prob for c in candidates]), [c.text for c in candidates]]


def _attention(evidence: AttentionEvidence | None) -> list[Any] | None:
    if evidence is None:
        return None
    per_head = getattr(evidence, "per_head", None)
    return [np.asarray(list(evidence.positions), dtype="<i4").tobytes(), _floats(list(evidence.mean)),
            _table([list(row) for row in evidence.per_layer]),
            None if per_head is None else _head_table(per_head)]


def _floats(values: Sequence[float]) -> list[Any]:
    """``[4 or 8, little-endian bytes]``: float32 when every value survives it exactly."""
    wide = np.asarray(values, dtype="<f8")
    narrow = wide.astype("<f4")
    exact = np.array_equal(narrow.astype("<f8"), wide, equal_nan=True)
    return [4, narrow.tobytes()] if exact else [8, wide.tobytes()]


def _table(rows: Sequence[Sequence[tuple[int, float]]]) -> list[Any]:
    """Rows of ``(position, weight)`` as ``[rows, width, positions (-1 pads), weights]``."""
    width = max((len(row) for row in rows), default=0)
    positions = np.full((len(rows), width), -1, dtype="<i4")
    weights = np.zeros((len(rows), width), dtype="<f8")
    for i, row in enumerate(rows):
        for j, (position, weight) in enumerate(row):
            positions[i, j], weights[i, j] = position, weight
    return [len(rows), width, positions.tobytes(), _floats(weights.reshape(-1).tolist())]


def _head_table(entries: Any) -> list[Any]:
    """Per layer and head ``(position, weight)`` entries, kept as ``(layers, heads, k)`` arrays."""
    positions = np.asarray(entries.positions, dtype="<i4")
    weights = np.asarray(entries.weights, dtype="<f8")
    return [*positions.shape, positions.tobytes(), _floats(weights.reshape(-1).tolist())]


# ------------------------------------------------------------------------------------ reading
def decode(data: bytes, token_ids: Sequence[int], vocab_size: int, message_count: int) -> Trace:
    """The records and turn marks in ``data``, checked against the state they came with; ``TraceError`` if not."""
    unpacker = msgpack.Unpacker(raw=False, use_list=True, strict_map_key=True, max_buffer_size=max(len(data), 1),
                                max_str_len=MAX_STRING, max_bin_len=len(data), max_array_len=len(data),
                                max_map_len=len(data), max_ext_len=0)
    unpacker.feed(data)
    reader = _Reader(token_ids, vocab_size, message_count)
    try:
        header = next(unpacker, None)
        if not (isinstance(header, dict) and header.get("kind") == KIND):
            raise TraceError("the trace has no kvtrace trace header")
        if header.get("version") != VERSION:
            raise TraceError(f"the trace has version {header.get('version')!r}; this kvtrace reads {VERSION}")
        for count, item in enumerate(unpacker):
            if count >= MAX_ITEMS:
                raise TraceError("the trace holds too many items")
            reader.item(item)
    except (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError, RecursionError) as error:
        raise TraceError(f"the trace is not valid msgpack ({type(error).__name__})") from None
    return reader.finish()


def _defect(reason: str) -> TraceError:
    return TraceError(f"the trace is damaged: {reason}")


class _Reader:
    """Checks and builds items one at a time."""

    def __init__(self, token_ids: Sequence[int], vocab_size: int, message_count: int) -> None:
        self.token_ids = token_ids
        self.vocab = vocab_size
        self.messages = message_count
        self.records: list[StepRecord] = []
        self.turns: list[Turn] = []

    def item(self, item: Any) -> None:
        if not (isinstance(item, list) and item and isinstance(item[0], str)):
            raise _defect("an item is not a tagged array")
        if item[0] == "turn" and len(item) == 5:
            self._turn(*item[1:])
        elif item[0] == "step" and len(item) == 13:
            self._step(*item[1:])
        else:
            raise _defect(f"an item of kind {item[0][:20]!r} has the wrong length")

    def _turn(self, first: Any, messages: Any, rendered: Any, reply_start: Any) -> None:
        if first != len(self.records) or (self.turns and self.turns[-1].first_record > first):
            raise _defect("a turn mark is out of place")
        if not _count(messages, self.messages) or not _count(reply_start, len(self.token_ids)):
            raise _defect("a turn mark's counts lie outside the transcript")
        if not isinstance(rendered, str):
            raise _defect("a turn mark's rendered text is not a string")
        self.turns.append(Turn(first, messages, rendered, reply_start))

    def _step(self, index: Any, position: Any, token_id: Any, text: Any, prob: Any, logprob: Any, entropy: Any,
              top: Any, attention: Any, lens: Any, forced: Any, extra: Any) -> None:
        if index != len(self.records):
            raise _defect(f"step {len(self.records)} is numbered {index!r}")
        last = self.records[-1].position if self.records else 0
        if not (_count(position, len(self.token_ids) - 1) and position > last):
            raise _defect(f"step {index} sits at a position outside the transcript or out of order")
        if token_id != self.token_ids[position]:
            raise _defect(f"step {index}'s token is not the transcript's token at position {position}")
        if not isinstance(text, str) or not all(_number(v) for v in (prob, logprob, entropy)):
            raise _defect(f"step {index}'s text or probabilities have the wrong type")
        if not isinstance(forced, bool) or not (isinstance(extra, dict) and plain(extra)):
            raise _defect(f"step {index}'s flags have the wrong type")
        self.records.append(StepRecord(
            index=index, position=position, token_id=token_id, text=text, prob=float(prob), logprob=float(logprob),
            entropy=float(entropy), top=self._top(top), attention=self._attention(attention, position),
            lens=self._lens(lens), forced=forced, extra=extra,
        ))

    def _top(self, top: Any) -> list[Candidate]:
        if not (isinstance(top, list) and len(top) == 3 and isinstance(top[2], list)):
            raise _defect("a top-k list is malformed")
        ids = _array(top[0], "<u4", MAX_TOP, "a top-k list")
        probs = _floats_of(top[1], len(ids), "a top-k list")
        texts = top[2]
        if len(texts) != len(ids) or not all(isinstance(t, str) for t in texts) or (len(ids) and ids.max() >= self.vocab):
            raise _defect("a top-k list's ids, probabilities and texts disagree")
        return [Candidate(int(i), t, p) for i, t, p in zip(ids.tolist(), texts, probs.tolist())]

    def _attention(self, attention: Any, position: int) -> AttentionEvidence | None:
        if attention is None:
            return None
        if not (isinstance(attention, list) and len(attention) == 4):
            raise _defect("an attention record is malformed")
        positions = _array(attention[0], "<i4", position + 1, "attention positions")
        if len(positions) and (positions.min() < 0 or positions.max() > position):
            raise _defect("attention positions lie outside the transcript")
        mean = _floats_of(attention[1], len(positions), "the mean attention row")
        per_layer = self._table(attention[2], position)
        extra = {}
        if attention[3] is not None and HAS_PER_HEAD:
            extra["per_head"] = self._head_table(attention[3], position)
        return AttentionEvidence(positions=positions.tolist(), mean=mean.tolist(), per_layer=per_layer, **extra)

    def _table(self, table: Any, position: int) -> list[list[tuple[int, float]]]:
        if not (isinstance(table, list) and len(table) == 4 and _count(table[0], MAX_LAYERS)
                and _count(table[1], MAX_TOP)):
            raise _defect("a per-layer attention table is malformed")
        rows, width = table[0], table[1]
        positions = _array(table[2], "<i4", rows * width, "a per-layer attention table")
        weights = _floats_of(table[3], rows * width, "a per-layer attention table")
        if len(positions) != rows * width or (len(positions) and positions.max() > position):
            raise _defect("a per-layer attention table does not match its shape")
        positions, weights = positions.reshape(rows, width), weights.reshape(rows, width)
        return [[(p, w) for p, w in zip(ps.tolist(), ws.tolist()) if p >= 0] for ps, ws in zip(positions, weights)]

    def _head_table(self, table: Any, position: int) -> Any:
        if not (isinstance(table, list) and len(table) == 5 and _count(table[0], MAX_LAYERS)
                and _count(table[1], MAX_HEADS) and _count(table[2], MAX_TOP)):
            raise _defect("a per-head attention table is malformed")
        shape = tuple(table[:3])
        size = shape[0] * shape[1] * shape[2]
        positions = _array(table[3], "<i4", size, "a per-head attention table")
        weights = _floats_of(table[4], size, "a per-head attention table")
        if len(positions) != size or (size and positions.max() > position):
            raise _defect("a per-head attention table does not match its shape")
        return record_types.TopEntries(positions.reshape(shape), weights.astype(np.float32).reshape(shape))

    def _lens(self, lens: Any) -> list[LensLayer] | None:
        if lens is None:
            return None
        if not (isinstance(lens, list) and len(lens) <= MAX_LAYERS + 1):
            raise _defect("a lens is malformed")
        layers = []
        for item in lens:
            if not (isinstance(item, list) and len(item) == 2 and _count(item[0], MAX_LAYERS)):
                raise _defect("a lens layer is malformed")
            layers.append(LensLayer(item[0], self._top(item[1])))
        return layers

    def finish(self) -> Trace:
        if self.records and not self.turns:
            raise _defect("it has steps but no turn")
        return Trace(self.records, self.turns)


def _count(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _array(data: Any, dtype: str, limit: int, what: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if not isinstance(data, bytes) or len(data) % size or len(data) // size > limit:
        raise _defect(f"{what} is not a packed array of at most {limit} numbers")
    return np.frombuffer(data, dtype=dtype)


def _floats_of(value: Any, count: int, what: str) -> np.ndarray:
    if not (isinstance(value, list) and len(value) == 2 and value[0] in (4, 8)):
        raise _defect(f"{what} has malformed numbers")
    values = _array(value[1], "<f4" if value[0] == 4 else "<f8", count, what)
    if len(values) != count:
        raise _defect(f"{what} has {len(values)} numbers, not {count}")
    return values.astype(np.float64)
