"""Read KV caches saved the old way: a tuple of (K, V) per layer written with ``torch.save``.

``torch.save`` files are read with ``weights_only=True``, which only rebuilds
tensors and plain containers and never runs code from the file. Plain pickle
and gzip-pickle files can only be read by really unpickling them, which runs
whatever code they carry; that needs an explicit ``allow_pickle=True``.

Accepted structures: ``((K, V), ...)`` with K, V of shape
``(batch=1, kv_heads, seq, head_dim)`` or ``(kv_heads, seq, head_dim)``, or a
dict with that under ``past_key_values`` and optionally ``input_ids`` /
``token_ids`` (a list or tensor of the token ids the cache was built from).
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.codecs import DTYPE_NAMES
from kvstore.errors import FingerprintMismatch, SnapshotError
from kvstore.state import KVState, ModelFingerprint


@dataclass
class LegacyCache:
    keys: list[torch.Tensor]  # (kv_heads, seq, head_dim) per layer
    values: list[torch.Tensor]
    token_ids: list[int] | None  # None when the file does not carry them


def read_legacy(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> LegacyCache:
    """The K/V tensors (and token ids, if present) of an old-style cache file."""
    if not os.path.isfile(path):
        raise SnapshotError(f"No file at {path}.")
    if zipfile.is_zipfile(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a file it refuses
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SnapshotError(
                f"{path} holds more than tensors and plain containers, so it is not read "
                f"(weights_only=True refused it: {first})."
            ) from None
    elif allow_pickle:
        obj = _unpickle(path)
    else:
        raise SnapshotError(
            f"{path} is not a torch.save file; if it is a pickle or gzip-pickle file you trust, "
            "pass --allow-pickle (unpickling executes code from the file)."
        )
    return _interpret(obj, path)


def _unpickle(path: str | os.PathLike[str]) -> Any:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            return pickle.load(f)  # noqa: S301 - the user passed --allow-pickle
    except Exception as error:
        raise SnapshotError(f"{path} could not be unpickled ({type(error).__name__}: {error}).") from None


def _interpret(obj: Any, path: str | os.PathLike[str]) -> LegacyCache:
    token_ids = None
    if isinstance(obj, dict):
        token_ids = obj.get("token_ids", obj.get("input_ids"))
        obj = obj.get("past_key_values")
    if not isinstance(obj, (tuple, list)) or not obj:
        raise SnapshotError(f"{path} does not hold a tuple of (K, V) pairs, one per layer.")
    keys, values = [], []
    for layer, pair in enumerate(obj):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(t, torch.Tensor) for t in pair)):
            raise SnapshotError(f"{path}: layer {layer} is not a (K, V) pair of tensors.")
        k, v = (_drop_batch(t, path, layer) for t in pair)
        if k.shape[1] != v.shape[1] or (keys and k.shape[1] != keys[0].shape[1]):
            raise SnapshotError(f"{path}: layer {layer} has a different sequence length than the others.")
        keys.append(k)
        values.append(v)
    if token_ids is not None:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        if not (isinstance(token_ids, (list, tuple)) and all(isinstance(t, int) for t in token_ids)):
            raise SnapshotError(f"{path}: the stored token ids are not a list of integers.")
        token_ids = list(token_ids)
    return LegacyCache(keys, values, token_ids)


def _drop_batch(t: torch.Tensor, path: str | os.PathLike[str], layer: int) -> torch.Tensor:
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise SnapshotError(
            f"{path}: layer {layer} has shape {tuple(t.shape)}; expected (1, kv_heads, seq, head_dim)."
        )
    if not t.is_floating_point():
        raise SnapshotError(f"{path}: layer {layer} is not a floating point tensor.")
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
            f"The cache holds {length} entries but {len(token_ids)} token ids were given; "
            f"expected {length} or {length + 1}."
        )
    if length < 0 or not token_ids:
        raise SnapshotError("The legacy cache is empty.")
    found = (len(keys), keys[0].shape[0], keys[0].shape[2])
    wanted = (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim)
    if found != wanted:
        raise FingerprintMismatch(
            f"The legacy cache has {found[0]} layers, {found[1]} KV heads and head dim {found[2]}; "
            f"the model {fingerprint.model_id} has {wanted[0]}, {wanted[1]} and {wanted[2]}."
        )
    if any(t < 0 or t >= fingerprint.vocab_size for t in token_ids):
        raise SnapshotError(f"A token id lies outside the model's vocabulary (0..{fingerprint.vocab_size - 1}).")
    dtype = keys[0].dtype if keys[0].dtype in DTYPE_NAMES else torch.float32
    return KVState(
        keys=[k.to(dtype).contiguous() for k in keys],
        values=[v.to(dtype).contiguous() for v in values],
        token_ids=list(token_ids),
        positions=list(range(length)),
        fingerprint=fingerprint,
    )
