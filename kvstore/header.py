"""The msgpack header of a snapshot: built from a ``KVState``, parsed back with strict limits.

Parsing treats the bytes as hostile: msgpack is unpacked with small container
and string limits and no extension types, nesting depth is checked, every
field's type and range is validated, and the fields are checked against each
other (layer shapes against the fingerprint, entry counts against the cached
positions and the sliding window, token ids against the vocabulary) before any
size derived from them is used. Writing runs the same checks on the header it
built, so kvtrace never writes a file it would refuse to read.

Version 1 headers (``layer_shapes``, every layer holding every position) are
read into the same ``Header`` as version 2 ones (``layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from kvstore import format as fmt
from kvstore.codecs import DTYPE_NAMES, DTYPES, ROLES, Codec, make_codec
from kvstore.errors import SnapshotError
from kvstore.format import CODEC_NAMES
from kvstore.metadata import plain, sanitize, sane_time, unix_time
from kvstore.records import RecordSpec, corrupt
from kvstore.state import KVState, ModelFingerprint

KIND = "kvtrace-snapshot"
SLIDING = "sliding_attention"
LAYER_FIELDS = {"key", "value", "entries", "head_positions", "head_scores"}


class HeaderDefect(ValueError):
    """A header field that is missing, mistyped or contradicts another (the caller says whose)."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer as the header declares it."""

    key: tuple[int, int]  # heads, dim
    value: tuple[int, int]
    entries: int
    head_positions: bool  # a P record (per-head positions) follows K and V
    head_scores: bool  # an S record (per-head scores) follows


@dataclass(frozen=True)
class Header:
    """What the header of a snapshot declares: everything but the payloads."""

    version: int
    fingerprint: ModelFingerprint
    codec: Codec
    dtype: torch.dtype
    layers: list[LayerSpec]
    token_ids: list[int]
    positions: list[int]
    attention_scores: list[float] | None
    metadata: dict[str, Any]
    label: str
    created: float  # 0.0: not known
    trace_bytes: int | None  # decoded size of the trace record; None: no trace

    @property
    def cache_length(self) -> int:
        return len(self.positions)

    def shape(self, layer: int, role: str) -> tuple[int, int, int]:
        spec = self.layers[layer]
        heads, dim = spec.key if role == "key" else spec.value
        return heads, spec.entries, dim

    def records(self) -> list[RecordSpec]:
        """Every record in file order, with its exact decoded size."""
        specs = []
        for layer, spec in enumerate(self.layers):
            for role in ROLES:
                size = self.codec.payload_size(self.shape(layer, role), self.dtype, role)
                specs.append(RecordSpec(f"layer {layer} {role}s", size, role, layer))
            table = 4 * spec.key[0] * spec.entries  # u32 or f32 per head and entry
            if spec.head_positions:
                specs.append(RecordSpec(f"layer {layer} head positions", table, "positions", layer))
            if spec.head_scores:
                specs.append(RecordSpec(f"layer {layer} head scores", table, "scores", layer))
        if self.trace_bytes is not None:
            specs.append(RecordSpec("the trace", self.trace_bytes, "trace"))
        return specs

    @property
    def raw_bytes(self) -> int:
        """Bytes of the uncompressed K/V tensors in their own dtype (the ratio's reference)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(item * spec.entries * (spec.key[0] * spec.key[1] + spec.value[0] * spec.value[1])
                   for spec in self.layers)

    @property
    def state_bytes(self) -> int:
        """Bytes the decoded state takes in memory: K/V, per-head tables (int64 positions) and the trace."""
        tables = sum(spec.key[0] * spec.entries * (8 * spec.head_positions + 4 * spec.head_scores)
                     for spec in self.layers)
        return self.raw_bytes + tables + (self.trace_bytes or 0)


def encode_header(state: KVState, codec: Codec) -> bytes:
    """The header bytes for ``state`` stored with ``codec`` (checked as a reader would check them)."""
    dtype = state.keys[0].dtype
    if dtype not in DTYPE_NAMES or any(t.dtype != dtype for t in (*state.keys, *state.values)):
        raise SnapshotError(
            f"cannot save a kv cache of dtype {dtype}: every tensor must be one of "
            f"{', '.join(DTYPES)} and all must share it"
        )
    heads_positions = state.head_positions or [None] * state.num_layers
    doc = {
        "kind": KIND,
        "fingerprint": state.fingerprint.to_dict(),
        "codec": codec.name,
        "codec_params": codec.params,
        "dtype": DTYPE_NAMES[dtype],
        "layers": [
            {"key": [k.shape[0], k.shape[2]], "value": [v.shape[0], v.shape[2]], "entries": k.shape[1],
             "head_positions": heads_positions[layer] is not None, "head_scores": state.head_scores is not None}
            for layer, (k, v) in enumerate(zip(state.keys, state.values))
        ],
        "token_ids": _pack_array(state.token_ids, "<u4"),
        "positions": _pack_array(state.positions, "<u4"),
        "attention_scores": None if state.attention_scores is None
        else _pack_array(state.attention_scores, "<f4"),
        "metadata": state.metadata,
        "label": str(state.metadata.get("label") or ""),
        "created": unix_time(state.metadata.get("created")),
        "trace_bytes": None if state.trace is None else len(state.trace),
    }
    try:
        data = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise SnapshotError(f"cannot save the snapshot: its metadata is not serialisable ({error})") from None
    if len(data) > fmt.MAX_HEADER_BYTES:
        raise SnapshotError("cannot save the snapshot: its header exceeds the format's size limit")
    try:
        _parse(unpack_document(data), fmt.FORMAT_VERSION)
    except HeaderDefect as defect:
        raise SnapshotError(f"cannot save this kv state: {defect}") from None
    return data


def decode_header(data: bytes, version: int) -> Header:
    """Validate and parse header bytes of format ``version``; ``SnapshotError`` naming the first defect."""
    try:
        return _parse(unpack_document(data), version)
    except HeaderDefect as defect:
        raise corrupt(str(defect)) from None


def unpack_document(data: bytes) -> Any:
    """Hostile msgpack bytes as plain Python values: bounded sizes and nesting, no extension types."""
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,  # str or bytes keys only; bytes keys are dropped from metadata below
            use_list=True,
            max_str_len=fmt.MAX_STRING_BYTES,
            max_bin_len=fmt.MAX_HEADER_BYTES,
            max_array_len=fmt.MAX_CONTAINER_LEN,
            max_map_len=fmt.MAX_CONTAINER_LEN,
            max_ext_len=0,
            ext_hook=_refuse_ext,
            timestamp=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError, RecursionError) as error:
        raise HeaderDefect(f"the header is not valid msgpack ({type(error).__name__})") from None
    _check_plain(doc)
    return doc


def _parse(doc: Any, version: int) -> Header:
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise HeaderDefect("the header is not a kvtrace snapshot header")
    fingerprint = _fingerprint(field_of(doc, "fingerprint", dict))
    codec = codec_of(doc)
    dtype_name = field_of(doc, "dtype", str)
    if dtype_name not in DTYPES:
        raise HeaderDefect(f"unsupported dtype {dtype_name!r}")

    token_ids = _unpack_array(field_of(doc, "token_ids", bytes), "<u4", "token_ids")
    positions = _unpack_array(field_of(doc, "positions", bytes), "<u4", "positions")
    if not 1 <= len(token_ids) <= fmt.MAX_TOKENS:
        raise HeaderDefect(f"the token count {len(token_ids)} is outside 1..{fmt.MAX_TOKENS}")
    if int(token_ids.max()) >= fingerprint.vocab_size:
        raise HeaderDefect(f"token id {int(token_ids.max())} lies outside the vocabulary of "
                           f"{fingerprint.vocab_size} tokens")
    if np.any(positions[1:] <= positions[:-1]) or (len(positions) and positions[-1] >= len(token_ids) - 1):
        raise HeaderDefect("the cached positions are not increasing or lie past the pending token")
    scores = doc.get("attention_scores")
    if scores is not None:
        scores = _unpack_array(field_of(doc, "attention_scores", bytes), "<f4", "attention_scores")
        if len(scores) != len(positions):
            raise HeaderDefect("attention_scores does not have one entry per cached position")

    layers = _layers(doc, version, len(positions))
    _check_layers(layers, fingerprint, len(positions))
    trace_bytes = doc.get("trace_bytes") if version >= 2 else None
    if trace_bytes is not None and not (is_int(trace_bytes) and 0 <= trace_bytes <= fmt.MAX_TRACE_BYTES):
        raise HeaderDefect(f"the trace size {trace_bytes!r} is not an integer in 0..{fmt.MAX_TRACE_BYTES}")
    created = sane_time(field_of(doc, "created", (int, float)))
    return Header(
        version=version,
        fingerprint=fingerprint,
        codec=codec,
        dtype=DTYPES[dtype_name],
        layers=layers,
        token_ids=token_ids.tolist(),
        positions=positions.tolist(),
        attention_scores=None if scores is None else scores.tolist(),
        metadata=sanitize(field_of(doc, "metadata", dict), len(token_ids)),
        label=field_of(doc, "label", str),
        created=0.0 if created is None else created,
        trace_bytes=trace_bytes,
    )


def _layers(doc: dict[str, Any], version: int, seq: int) -> list[LayerSpec]:
    if version == 1:
        shapes = field_of(doc, "layer_shapes", list)
        _check_layer_count(len(shapes))
        return [_v1_layer(s, seq) for s in shapes]
    entries = field_of(doc, "layers", list)
    _check_layer_count(len(entries))
    return [_v2_layer(e) for e in entries]


def _check_layer_count(count: int) -> None:
    if not 1 <= count <= fmt.MAX_LAYERS:
        raise HeaderDefect(f"the layer count {count} is outside 1..{fmt.MAX_LAYERS}")


def _v1_layer(value: Any, seq: int) -> LayerSpec:
    if not (isinstance(value, list) and len(value) == 4 and all(is_int(v) for v in value)):
        raise HeaderDefect("a layer shape is not four integers")
    kh, kd, vh, vd = value
    return LayerSpec((kh, kd), (vh, vd), seq, False, False)


def _v2_layer(value: Any) -> LayerSpec:
    if not (isinstance(value, dict) and set(value) == LAYER_FIELDS):
        raise HeaderDefect(f"a layer entry does not have exactly the fields {', '.join(sorted(LAYER_FIELDS))}")
    pairs = [value["key"], value["value"]]
    if not all(isinstance(p, list) and len(p) == 2 and all(is_int(v) for v in p) for p in pairs):
        raise HeaderDefect("a layer's key or value shape is not two integers")
    flags = (value["head_positions"], value["head_scores"])
    if not is_int(value["entries"]) or not all(isinstance(f, bool) for f in flags):
        raise HeaderDefect("a layer's entry count or flags have the wrong type")
    return LayerSpec(tuple(pairs[0]), tuple(pairs[1]), value["entries"], *flags)


def _check_layers(layers: list[LayerSpec], fp: ModelFingerprint, seq: int) -> None:
    """Shapes agree with the fingerprint; entries fit the cached positions and the sliding window."""
    if len(layers) != fp.num_layers:
        raise HeaderDefect(f"the snapshot stores {len(layers)} layers but its fingerprint names {fp.num_layers}")
    if len({spec.head_scores for spec in layers}) > 1:
        raise HeaderDefect("per-head scores are declared for some layers but not all")
    wanted = (fp.num_kv_heads, fp.head_dim)
    for index, spec in enumerate(layers):
        if spec.key != wanted or spec.value != wanted:
            raise HeaderDefect(
                f"layer {index} stores keys of {list(spec.key)} and values of {list(spec.value)} "
                f"(heads, dim), not the fingerprint's {list(wanted)}"
            )
        if not 0 <= spec.entries <= seq:
            raise HeaderDefect(f"layer {index} declares {spec.entries} entries, outside 0..{seq} cached positions")
        sliding = fp.layer_types is not None and fp.layer_types[index] == SLIDING
        if sliding and fp.sliding_window is not None and spec.entries > fp.sliding_window:
            raise HeaderDefect(f"sliding-window layer {index} holds {spec.entries} entries, "
                               f"more than its window of {fp.sliding_window}")


def _fingerprint(data: dict[str, Any]) -> ModelFingerprint:
    types = {"model_id": str, "architecture": str, "num_layers": int, "num_kv_heads": int,
             "head_dim": int, "dtype": str, "vocab_size": int, "rope": dict, "tokenizer_hash": str}
    for name, kind in types.items():
        field_of(data, name, kind)
    for name, limit in (("num_layers", fmt.MAX_LAYERS), ("num_kv_heads", fmt.MAX_HEADS),
                        ("head_dim", fmt.MAX_HEAD_DIM), ("vocab_size", fmt.MAX_VOCAB)):
        if not 1 <= data[name] <= limit:
            raise HeaderDefect(f"the fingerprint's {name} {data[name]} is outside 1..{limit}")
    if not plain(data["rope"]):
        raise HeaderDefect("the fingerprint's rope settings are not a map of plain values")
    types_list = data.get("layer_types")
    if types_list is not None and not (isinstance(types_list, list) and len(types_list) == data["num_layers"]
                                       and all(isinstance(t, str) for t in types_list)):
        raise HeaderDefect("the fingerprint's layer_types is not one string per layer")
    window = data.get("sliding_window")
    if window is not None and not (is_int(window) and 1 <= window <= fmt.MAX_VOCAB):
        raise HeaderDefect(f"the fingerprint's sliding_window {window!r} is not a positive integer")
    return ModelFingerprint.from_dict({k: v for k, v in data.items() if isinstance(k, str)})


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_ext(code: int, data: bytes) -> None:
    raise ValueError("extension types are not allowed")


def _check_plain(doc: Any) -> None:
    """Only plain msgpack types, nested at most MAX_NESTING deep (an explicit stack, no recursion)."""
    stack = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > fmt.MAX_NESTING:
            raise HeaderDefect("the header nests deeper than the format allows")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif not isinstance(value, (str, bytes, int, float, bool, type(None))):
            raise HeaderDefect(f"the header holds a value of type {type(value).__name__}")


def codec_of(doc: dict[str, Any]) -> Codec:
    """The codec a header (of a .kvs file or a store chunk) names, with its parameters checked."""
    codec_name = field_of(doc, "codec", str)
    if codec_name not in CODEC_NAMES:
        raise HeaderDefect(f"unknown codec {codec_name!r}")
    try:
        return make_codec(codec_name, field_of(doc, "codec_params", dict))
    except ValueError as error:
        raise HeaderDefect(str(error)) from None


def field_of(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``doc[name]``, which must exist and be of ``kind`` (a bool is not an int); ``HeaderDefect`` if not."""
    if name not in doc:
        raise HeaderDefect(f"the header lacks {name!r}")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise HeaderDefect(f"the header field {name!r} has the wrong type")
    return value


def _pack_array(values: list[int] | list[float], dtype: str) -> bytes:
    try:
        return np.asarray(values, dtype=dtype).tobytes()
    except (OverflowError, ValueError) as error:
        raise SnapshotError(f"cannot save the snapshot: a value does not fit {dtype} ({error})") from None


def _unpack_array(data: bytes, dtype: str, name: str) -> np.ndarray:
    if len(data) % 4:
        raise HeaderDefect(f"{name} is not a whole number of 4-byte entries")
    if len(data) // 4 > fmt.MAX_TOKENS:
        raise HeaderDefect(f"{name} has more than {fmt.MAX_TOKENS} entries")
    return np.frombuffer(data, dtype=dtype).astype(np.int64 if dtype == "<u4" else np.float64)
