"""Read KV caches saved the old way: a tuple of (K, V) per layer written with ``torch.save``.

``torch.save`` files, both the zip format (torch >= 1.6) and the older plain
pickle stream that starts with torch's magic number, are read with
``weights_only=True``, which only rebuilds tensors and plain containers and
never runs code from the file. Plain pickle and gzip-pickle files can only be
read by really unpickling them, which runs whatever code they carry; that
needs an explicit ``allow_pickle=True``.

Accepted structures: ``((K, V), ...)`` with K, V of shape
``(batch=1, kv_heads, seq, head_dim)`` or ``(kv_heads, seq, head_dim)``, or a
dict with that under ``past_key_values`` and optionally ``input_ids`` /
``token_ids`` (a list or tensor of the token ids the cache was built from).
Every layer must have the shape, dtype and length of the first.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from kvstore.codecs import DTYPE_NAMES
from kvstore.errors import FingerprintMismatch, SnapshotError, one_line
from kvstore.safe_io import open_regular
from kvstore.state import KVState, ModelFingerprint

# What torch.save wrote before the zip format: pickle protocol 2, then the long 0x1950a86a20f9469cfc6c.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


@dataclass
class LegacyCache:
    keys: list[torch.Tensor]  # (kv_heads, seq, head_dim) per layer
    values: list[torch.Tensor]
    token_ids: list[int] | None  # None when the file does not carry them


def read_legacy(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> LegacyCache:
    """The K/V tensors (and token ids, if present) of an old-style cache file."""
    with open_regular(path, "file") as f:
        if _is_torch_save(f):
            obj = _torch_load(f, path)
        elif allow_pickle:
            obj = _unpickle(f, path)
        else:
            raise SnapshotError(
                f"{path} is not a torch.save file; if it is a pickle or gzip-pickle file you trust, "
                "pass --allow-pickle (unpickling executes code from the file)"
            )
    return _interpret(obj, path)


def _is_torch_save(f: BinaryIO) -> bool:
    start = f.read(len(LEGACY_TORCH_MAGIC))
    f.seek(0)
    if start == LEGACY_TORCH_MAGIC:
        return True
    found = zipfile.is_zipfile(f)
    f.seek(0)
    return found


def _torch_load(f: BinaryIO, path: str | os.PathLike[str]) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file it refuses
        raise SnapshotError(
            f"{path} holds more than tensors and plain containers, so it is not read "
            f"(weights_only=True refused it: {one_line(error)})"
        ) from None


def _unpickle(f: BinaryIO, path: str | os.PathLike[str]) -> Any:
    gzipped = f.read(2) == b"\x1f\x8b"
    f.seek(0)
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") if gzipped else f as source:
            return pickle.load(source)  # noqa: S301 - the user passed --allow-pickle
    except Exception as error:
        raise SnapshotError(f"{path} could not be unpickled ({type(error).__name__}: {one_line(error)})") from None


def _interpret(obj: Any, path: str | os.PathLike[str]) -> LegacyCache:
    token_ids = None
    if isinstance(obj, dict):
        token_ids = obj.get("token_ids", obj.get("input_ids"))
        obj = obj.get("past_key_values")
    if not isinstance(obj, (tuple, list)) or not obj:
        raise SnapshotError(f"{path} does not hold a tuple of (K, V) pairs, one per layer")
    keys, values = [], []
    for layer, pair in enumerate(obj):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(t, torch.Tensor) for t in pair)):
            raise SnapshotError(f"{path}: layer {layer} is not a (K, V) pair of tensors")
        k, v = (_drop_batch(t, path, layer) for t in pair)
        first = keys[0] if keys else k
        for name, t in (("keys", k), ("values", v)):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise SnapshotError(
                    f"{path}: layer {layer} {name} are {tuple(t.shape)} {t.dtype}, unlike layer 0 keys "
                    f"({tuple(first.shape)} {first.dtype})"
                )
        keys.append(k)
        values.append(v)
    if token_ids is not None:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        if not (isinstance(token_ids, (list, tuple))
                and all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids)):
            raise SnapshotError(f"{path}: the stored token ids are not a list of integers")
        token_ids = list(token_ids)
    return LegacyCache(keys, values, token_ids)


def _drop_batch(t: torch.Tensor, path: str | os.PathLike[str], layer: int) -> torch.Tensor:
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise SnapshotError(
            f"{path}: layer {layer} has shape {tuple(t.shape)}; expected (1, kv_heads, seq, head_dim)"
        )
    if not t.is_floating_point():
        raise SnapshotError(f"{path}: layer {layer} is not a floating point tensor")
    return t.contiguous()


def to_state(legacy: LegacyCache, token_ids: list[int], fingerprint: ModelFingerprint) -> KVState:
    """A ``KVState`` for the model ``fingerprint`` describes, from an old cache and its token ids.

    With one id more than cache entries, the last id is the pending token. With
    exactly as many, the last cache entry is dropped and its token becomes the
    pending one: feeding it again recomputes the same K/V, so nothing is lost.
    """
    length = legacy.keys[0].shape[1]
    keys, values = legacy.keys, legacy.values
    if len(token_ids) == length:
        keys = [k[:, :-1] for k in keys]
        values = [v[:, :-1] for v in values]
        length -= 1
    elif len(token_ids) != length + 1:
        raise SnapshotError(
            f"the cache holds {length} entries but {len(token_ids)} token ids were given; "
            f"expected {length} or {length + 1}"
        )
    if length < 0 or not token_ids:
        raise SnapshotError("the legacy cache is empty")
    wanted = (fingerprint.num_kv_heads, fingerprint.head_dim)
    for layer, (k, v) in enumerate(zip(keys, values)):
        for found in (k, v):
            if (found.shape[0], found.shape[2]) != wanted:
                raise FingerprintMismatch(
                    f"layer {layer} of the legacy cache has {found.shape[0]} kv heads and head dim "
                    f"{found.shape[2]}; the model {fingerprint.model_id} has {wanted[0]} and {wanted[1]}"
                )
    if len(keys) != fingerprint.num_layers:
        raise FingerprintMismatch(
            f"the legacy cache has {len(keys)} layers; the model {fingerprint.model_id} has {fingerprint.num_layers}"
        )
    if any(t < 0 or t >= fingerprint.vocab_size for t in token_ids):
        raise SnapshotError(f"a token id lies outside the model's vocabulary (0..{fingerprint.vocab_size - 1})")
    dtype = keys[0].dtype if keys[0].dtype in DTYPE_NAMES else torch.float32
    return KVState(
        keys=[k.to(dtype).contiguous() for k in keys],
        values=[v.to(dtype).contiguous() for v in values],
        token_ids=list(token_ids),
        positions=list(range(length)),
        fingerprint=fingerprint,
    )
