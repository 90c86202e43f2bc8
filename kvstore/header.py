"""The msgpack header of a snapshot: built from a ``KVState``, parsed back with strict limits.

Parsing treats the bytes as hostile: msgpack is unpacked with small container
and string limits and no extension types, nesting depth is checked, and every
field's type and range is validated before any size derived from it is used.
"""

from __future__ import annotations

import time
from datetime import datetime
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from kvstore import format as fmt
from kvstore.format import CODEC_NAMES
from kvstore.codecs import DTYPE_NAMES, DTYPES, Codec, make_codec
from kvstore.errors import SnapshotError
from kvstore.state import KVState, ModelFingerprint

KIND = "kvtrace-snapshot"
ROLES = ("key", "value")


@dataclass(frozen=True)
class Header:
    """What the header of a snapshot declares: everything but the tensors."""

    fingerprint: ModelFingerprint
    codec: Codec
    dtype: torch.dtype
    layer_shapes: list[tuple[int, int, int, int]]  # per layer: key heads, key dim, value heads, value dim
    token_ids: list[int]
    positions: list[int]
    attention_scores: list[float] | None
    metadata: dict[str, Any]
    label: str
    created: float

    @property
    def cache_length(self) -> int:
        return len(self.positions)

    def shape(self, layer: int, role: str) -> tuple[int, int, int]:
        kh, kd, vh, vd = self.layer_shapes[layer]
        return (kh, self.cache_length, kd) if role == "key" else (vh, self.cache_length, vd)

    def payload_sizes(self) -> list[tuple[int, str, int]]:
        """(layer, role, decoded bytes) of every payload, in file order."""
        return [
            (layer, role, self.codec.payload_size(self.shape(layer, role), self.dtype, role))
            for layer in range(len(self.layer_shapes))
            for role in ROLES
        ]

    @property
    def raw_bytes(self) -> int:
        """Bytes of the uncompressed K/V tensors in their own dtype (the ratio's reference)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(h * self.cache_length * d * item
                   for kh, kd, vh, vd in self.layer_shapes for h, d in ((kh, kd), (vh, vd)))


def encode_header(state: KVState, codec: Codec) -> tuple[bytes, Header]:
    """The header bytes for ``state`` stored with ``codec``."""
    dtype = state.keys[0].dtype
    if dtype not in DTYPE_NAMES or any(t.dtype != dtype for t in (*state.keys, *state.values)):
        raise SnapshotError(
            f"Cannot save a KV cache of dtype {dtype}: every tensor must be one of "
            f"{', '.join(DTYPES)} and all must share it."
        )
    metadata = dict(state.metadata)
    header = Header(
        fingerprint=state.fingerprint,
        codec=codec,
        dtype=dtype,
        layer_shapes=[(k.shape[0], k.shape[2], v.shape[0], v.shape[2])
                      for k, v in zip(state.keys, state.values)],
        token_ids=list(state.token_ids),
        positions=list(state.positions),
        attention_scores=state.attention_scores,
        metadata=metadata,
        label=str(metadata.get("label") or ""),
        created=_unix_time(metadata.get("created")),
    )
    doc = {
        "kind": KIND,
        "fingerprint": state.fingerprint.to_dict(),
        "codec": codec.name,
        "codec_params": codec.params,
        "dtype": DTYPE_NAMES[dtype],
        "layer_shapes": [list(s) for s in header.layer_shapes],
        "token_ids": _pack_array(header.token_ids, "<u4"),
        "positions": _pack_array(header.positions, "<u4"),
        "attention_scores": None if state.attention_scores is None
        else _pack_array(state.attention_scores, "<f4"),
        "metadata": metadata,
        "label": header.label,
        "created": header.created,
    }
    try:
        data = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise SnapshotError(f"Cannot save the snapshot: its metadata is not serialisable ({error}).") from None
    if len(data) > fmt.MAX_HEADER_BYTES:
        raise SnapshotError("Cannot save the snapshot: its header exceeds the format's size limit.")
    return data, header


def decode_header(data: bytes) -> Header:
    """Validate and parse header bytes; ``SnapshotError`` naming the first defect."""
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
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
        raise _corrupt(f"the header is not valid msgpack ({type(error).__name__})") from None
    _check_plain(doc, 0)
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise _corrupt("the header is not a kvtrace snapshot header")

    fingerprint = _fingerprint(_field(doc, "fingerprint", dict))
    codec_name = _field(doc, "codec", str)
    if codec_name not in CODEC_NAMES:
        raise _corrupt(f"unknown codec {codec_name!r}")
    codec = make_codec(codec_name, _field(doc, "codec_params", dict))
    dtype_name = _field(doc, "dtype", str)
    if dtype_name not in DTYPES:
        raise _corrupt(f"unsupported dtype {dtype_name!r}")

    shapes = _field(doc, "layer_shapes", list)
    if not 1 <= len(shapes) <= fmt.MAX_LAYERS:
        raise _corrupt(f"the layer count {len(shapes)} is outside 1..{fmt.MAX_LAYERS}")
    layer_shapes = [_layer_shape(s) for s in shapes]
    if fingerprint.num_layers != len(layer_shapes):
        raise _corrupt("the fingerprint's layer count differs from the stored layers")

    token_ids = _unpack_array(_field(doc, "token_ids", bytes), "<u4", "token_ids")
    positions = _unpack_array(_field(doc, "positions", bytes), "<u4", "positions")
    if not 1 <= len(token_ids) <= fmt.MAX_TOKENS:
        raise _corrupt(f"the token count {len(token_ids)} is outside 1..{fmt.MAX_TOKENS}")
    if any(b <= a for a, b in zip(positions, positions[1:])) or (
        positions and positions[-1] >= len(token_ids) - 1
    ):
        raise _corrupt("the cached positions are not increasing or lie past the pending token")
    scores = doc.get("attention_scores")
    if scores is not None:
        scores = _unpack_array(_field(doc, "attention_scores", bytes), "<f4", "attention_scores")
        if len(scores) != len(positions):
            raise _corrupt("attention_scores does not have one entry per cached position")

    return Header(
        fingerprint=fingerprint,
        codec=codec,
        dtype=DTYPES[dtype_name],
        layer_shapes=layer_shapes,
        token_ids=token_ids,
        positions=positions,
        attention_scores=scores,
        metadata=_field(doc, "metadata", dict),
        label=_field(doc, "label", str),
        created=float(_field(doc, "created", (int, float))),
    )


def _unix_time(value: Any) -> float:
    """Creation time as Unix seconds from a number or an ISO 8601 string; now when absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    return time.time()


def _corrupt(reason: str) -> SnapshotError:
    return SnapshotError(f"The snapshot is corrupt: {reason}.")


def _refuse_ext(code: int, data: bytes) -> None:
    raise ValueError("extension types are not allowed")


def _check_plain(value: Any, depth: int) -> None:
    """Only plain msgpack types, nested at most MAX_NESTING deep (iterative per level)."""
    if depth > fmt.MAX_NESTING:
        raise _corrupt("the header nests deeper than the format allows")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, depth + 1)
            _check_plain(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_plain(item, depth + 1)
    elif not isinstance(value, (str, bytes, int, float, bool, type(None))):
        raise _corrupt(f"the header holds a value of type {type(value).__name__}")


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in doc:
        raise _corrupt(f"the header lacks {name!r}")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _corrupt(f"the header field {name!r} has the wrong type")
    return value


def _fingerprint(data: dict[str, Any]) -> ModelFingerprint:
    types = {"model_id": str, "architecture": str, "num_layers": int, "num_kv_heads": int,
             "head_dim": int, "dtype": str, "vocab_size": int, "rope": dict, "tokenizer_hash": str}
    for name, kind in types.items():
        _field(data, name, kind)
    return ModelFingerprint.from_dict(data)


def _layer_shape(value: Any) -> tuple[int, int, int, int]:
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _corrupt("a layer shape is not four integers")
    kh, kd, vh, vd = value
    if not (1 <= kh <= fmt.MAX_HEADS and 1 <= vh <= fmt.MAX_HEADS
            and 1 <= kd <= fmt.MAX_HEAD_DIM and 1 <= vd <= fmt.MAX_HEAD_DIM):
        raise _corrupt(f"the layer shape {value} is outside the format's limits")
    return kh, kd, vh, vd


def _pack_array(values: list[int] | list[float], dtype: str) -> bytes:
    try:
        return np.asarray(values, dtype=dtype).tobytes()
    except (OverflowError, ValueError) as error:
        raise SnapshotError(f"Cannot save the snapshot: a value does not fit {dtype} ({error}).") from None


def _unpack_array(data: bytes, dtype: str, name: str) -> list:
    if len(data) % 4:
        raise _corrupt(f"{name} is not a whole number of 4-byte entries")
    if len(data) // 4 > fmt.MAX_TOKENS:
        raise _corrupt(f"{name} has more than {fmt.MAX_TOKENS} entries")
    return np.frombuffer(data, dtype=dtype).tolist()
