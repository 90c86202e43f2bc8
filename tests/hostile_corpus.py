"""A corpus of crafted ``.kvs`` files: what an attacker could hand kvtrace, checksums and all.

The CRCs of a snapshot protect against accidents, not against a crafted file:
anyone can recompute them, and every file here has valid checksums unless
the damage itself is the point. Files are written with msgpack and zstandard
directly (and by hand for run-length zstd bombs), so the corpus does not
depend on the writer it is meant to test.

``build_corpus(folder)`` writes the files and returns ``(name, path,
expectation)`` triples. An expectation says what each entry point must do
(every refusal a ``SnapshotError`` of one line, never another exception):

* ``LOADS``: ``read_info``, ``verify(deep=True)`` and ``load`` succeed and
  the state is valid (valid edge cases, and metadata of the wrong shape,
  which is dropped).
* ``REFUSED``: all three refuse (the preamble or the header is defective).
* ``DAMAGED``: ``read_info`` succeeds (it reads the header only); ``verify``
  and ``load`` refuse (a payload or the layout after the header is wrong).
* ``UNLOADABLE``: the file is intact, but ``load(expected=fingerprint,
  max_tokens=MAX_CONTEXT)`` refuses it (another model, too long a transcript,
  per-head positions that contradict the state).

Pass ``fingerprint`` (a model's) to build the same classes for that model,
e.g. to run the corpus through ``kvtrace info/resume/prune``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from kvstore import format as fmt
from kvstore import snapshot
from kvstore.codecs import DTYPE_NAMES, make_codec
from kvstore.compression import compress
from kvstore.state import KVState, ModelFingerprint
from kvstore_factory import FINGERPRINT

LOADS, REFUSED, DAMAGED, UNLOADABLE = "loads", "refused", "damaged", "unloadable"
EXPECTATIONS = (LOADS, REFUSED, DAMAGED, UNLOADABLE)
MAX_CONTEXT = 8192  # the max_tokens the corpus is loaded with
ZSTD_BLOCK = 128 << 10


def make_state(fp: ModelFingerprint, length: int = 24, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> KVState:
    """A valid state for ``fp`` with ``length`` cached entries and one pending token."""
    g = torch.Generator().manual_seed(seed)
    shape = (fp.num_kv_heads, length, fp.head_dim)
    return KVState(
        keys=[torch.randn(shape, generator=g).to(dtype) for _ in range(fp.num_layers)],
        values=[torch.randn(shape, generator=g).to(dtype) for _ in range(fp.num_layers)],
        token_ids=torch.randint(0, fp.vocab_size, (length + 1,), generator=g).tolist(),
        positions=list(range(length)),
        fingerprint=fp,
        attention_scores=torch.rand(length, generator=g).tolist(),
        metadata={"messages": [{"role": "user", "content": "hi"}], "sampling": {"temperature": 0.7},
                  "reply_start": 2, "created": 1.7e9, "label": "corpus"},
    )


def per_head_state(fp: ModelFingerprint) -> KVState:
    """Per-layer lengths (layer 0 and the model's sliding layers hold 16 entries), every head keeping its own
    half of its layer, per-head scores, and a trace."""
    state = make_state(fp, length=40, seed=5)
    for layer in range(fp.num_layers):
        sliding = fp.layer_types is not None and fp.layer_types[layer] == "sliding_attention"
        if layer == 0 or sliding:
            keep = min(16, fp.sliding_window or 16)
            state.keys[layer] = state.keys[layer][:, -keep:].clone()
            state.values[layer] = state.values[layer][:, -keep:].clone()
    g = torch.Generator().manual_seed(6)
    state.head_scores = [torch.rand(k.shape[0], k.shape[1], generator=g) for k in state.keys]
    keep = [torch.stack([torch.arange(h % 2, k.shape[1] - k.shape[1] % 2, 2) for h in range(k.shape[0])])
            for k in state.keys]
    state = state.select_per_head(keep)
    state.trace = msgpack.packb([{"step": i, "token": i * 7} for i in range(50)])
    return state


# ---------------------------------------------------------------- raw file assembly
def assemble(version: int, doc: dict[str, Any] | None, frames: list[bytes], *, header: bytes | None = None,
             end: bytes = fmt.END_MARKER, flags: int = 0, magic: bytes = fmt.MAGIC) -> bytes:
    """A snapshot file from a header document (or raw header bytes) and payload frames, CRCs computed."""
    header = msgpack.packb(doc, use_bin_type=True) if header is None else header
    preamble = fmt.PREAMBLE.pack(magic, version, flags, len(header))
    parts = [preamble, header, fmt.CHECKSUM.pack(zlib.crc32(header, zlib.crc32(preamble)))]
    for frame in frames:
        parts += [fmt.RECORD.pack(len(frame), zlib.crc32(frame)), frame]
    parts.append(end)
    return b"".join(parts)


def split(data: bytes) -> tuple[int, dict[str, Any], list[bytes]]:
    """(version, header document, payload frames) of a well-formed file."""
    _, version, _, length = fmt.PREAMBLE.unpack_from(data)
    doc = msgpack.unpackb(data[fmt.PREAMBLE.size:fmt.PREAMBLE.size + length], raw=False)
    offset, frames = fmt.PREAMBLE.size + length + fmt.CHECKSUM.size, []
    while data[offset:offset + len(fmt.END_MARKER)] != fmt.END_MARKER:
        size, _ = fmt.RECORD.unpack_from(data, offset)
        frames.append(data[offset + fmt.RECORD.size:offset + fmt.RECORD.size + size])
        offset += fmt.RECORD.size + size
    return version, doc, frames


def v1_bytes(state: KVState, codec: str = "lossless") -> bytes:
    """``state`` in the version 1 layout (``layer_shapes``, K and V records only), as kvtrace 0.1 wrote it."""
    chosen = make_codec(codec)
    fingerprint = {k: v for k, v in state.fingerprint.to_dict().items() if k not in ("layer_types", "sliding_window")}
    doc = {
        "kind": "kvtrace-snapshot", "fingerprint": fingerprint, "codec": codec, "codec_params": chosen.params,
        "dtype": DTYPE_NAMES[state.keys[0].dtype],
        "layer_shapes": [[k.shape[0], k.shape[2], v.shape[0], v.shape[2]] for k, v in zip(state.keys, state.values)],
        "token_ids": np.asarray(state.token_ids, "<u4").tobytes(),
        "positions": np.asarray(state.positions, "<u4").tobytes(),
        "attention_scores": None if state.attention_scores is None
        else np.asarray(state.attention_scores, "<f4").tobytes(),
        "metadata": state.metadata, "label": str(state.metadata.get("label", "")), "created": 1.5,
    }
    frames = [compress(chosen.encode(t, role)) for k, v in zip(state.keys, state.values)
              for role, t in (("key", k), ("value", v))]
    return assemble(1, doc, frames)


def rle_frame(total: int, content_size: bool = True) -> bytes:
    """A zstd frame of ``total`` zero bytes made of run-length blocks: 4 bytes per 128 KiB of output."""
    descriptor = 0xC0 if content_size else 0x00  # 8-byte content size (or none), window descriptor present
    parts = [b"\x28\xb5\x2f\xfd", bytes([descriptor, 7 << 3])]  # magic; window 2^(10+7) = 128 KiB
    if content_size:
        parts.append(total.to_bytes(8, "little"))
    left = total
    while True:
        size = min(left, ZSTD_BLOCK)
        left -= size
        header = (size << 3) | (1 << 1) | (1 if left == 0 else 0)  # block size, type RLE, last block
        parts.append(header.to_bytes(3, "little") + b"\0")
        if left == 0:
            return b"".join(parts)


def saved(state: KVState, folder: Path, codec: str = "lossless") -> bytes:
    path = folder / "_base.kvs"
    snapshot.save(state, path, codec=codec)
    data = path.read_bytes()
    path.unlink()
    return data


def with_header(data: bytes, **changes: Any) -> bytes:
    version, doc, frames = split(data)
    return assemble(version, {**doc, **changes}, frames)


def with_fingerprint(data: bytes, **changes: Any) -> bytes:
    version, doc, frames = split(data)
    return assemble(version, {**doc, "fingerprint": {**doc["fingerprint"], **changes}}, frames)


def with_metadata(data: bytes, **changes: Any) -> bytes:
    version, doc, frames = split(data)
    return assemble(version, {**doc, "metadata": {**doc["metadata"], **changes}}, frames)


def with_frames(data: bytes, change: Callable[[list[bytes]], list[bytes]]) -> bytes:
    version, doc, frames = split(data)
    return assemble(version, doc, change(list(frames)))


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:]


def huge_layer(fp: ModelFingerprint, heads: int, dim: int, entries: int, frames: list[bytes],
               model_id: str | None = None) -> bytes:
    """One layer of ``heads x entries x dim`` float32 declared, tiny or run-length payloads stored."""
    big = {**fp.to_dict(), "num_layers": 1, "num_kv_heads": heads, "head_dim": dim,
           "layer_types": None, "sliding_window": None, "model_id": model_id or fp.model_id}
    doc = {
        "kind": "kvtrace-snapshot", "fingerprint": big, "codec": "lossless", "codec_params": {},
        "dtype": "float32",
        "layers": [{"key": [heads, dim], "value": [heads, dim], "entries": entries,
                    "head_positions": False, "head_scores": False}],
        "token_ids": np.zeros(entries + 1, "<u4").tobytes(), "positions": np.arange(entries, dtype="<u4").tobytes(),
        "attention_scores": None, "metadata": {}, "label": "", "created": 0.0, "trace_bytes": None,
    }
    return assemble(2, doc, frames)


# ---------------------------------------------------------------- the corpus
def build_corpus(folder: str | Path, fingerprint: ModelFingerprint = FINGERPRINT) -> list[tuple[str, Path, str]]:
    """Write every crafted file into ``folder``; ``(name, path, expectation)`` for each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fp = fingerprint
    base_state = make_state(fp)
    base = saved(base_state, folder)
    int4 = saved(make_state(fp, length=64), folder, "int4")
    per_head = saved(per_head_state(fp), folder)
    v1 = v1_bytes(base_state)
    _, doc, frames = split(base)
    header_len = fmt.PREAMBLE.unpack_from(base)[3]
    first_record = fmt.PREAMBLE.size + header_len + fmt.CHECKSUM.size
    layer = doc["layers"][0]
    seq, heads, dim = layer["entries"], fp.num_kv_heads, fp.head_dim
    key_bytes = heads * seq * dim * 4
    nested: Any = "leaf"
    for _ in range(200):
        nested = [nested]
    other_model = replace(fp, model_id="other", architecture="OtherForCausalLM")
    long_ids = np.zeros(fmt.MAX_TOKENS, "<u4").tobytes()

    entries: dict[str, tuple[bytes, str]] = {
        # valid edge cases
        "valid-lossless": (base, LOADS),
        "valid-raw": (saved(base_state, folder, "raw"), LOADS),
        "valid-empty-cache": (saved(make_state(fp, length=0), folder), LOADS),
        "valid-float16": (saved(make_state(fp, dtype=torch.float16), folder), LOADS),
        "valid-bfloat16-int8": (saved(make_state(fp, dtype=torch.bfloat16), folder, "int8"), LOADS),
        "valid-int4": (int4, LOADS),
        "valid-int4-key-group-0": (saved_int4(fp, folder, key_group=0), LOADS),
        "valid-per-head-sliding-trace": (per_head, LOADS),
        "valid-v1-lossless": (v1, LOADS),
        "valid-v1-int4": (v1_bytes(make_state(fp, length=64), "int4"), LOADS),
        "valid-long-strings": (with_metadata(base, messages=[{"role": "user", "content": "x" * (4 << 20)}],
                                             note="é" * (1 << 20)), LOADS),
        "valid-two-frames-in-a-record": (with_frames(base, lambda f: [compress([]) + f[0]] + f[1:]), LOADS),
        # metadata the code reads, of the wrong shape: dropped, the snapshot still loads
        "metadata-messages-int": (with_metadata(base, messages=5), LOADS),
        "metadata-messages-list-of-ints": (with_metadata(base, messages=[1, 2]), LOADS),
        "metadata-message-bytes-content": (with_metadata(base, messages=[{"role": "user", "content": b"x"}]), LOADS),
        "metadata-reply-start-str": (with_metadata(base, reply_start="abc"), LOADS),
        "metadata-reply-start-huge": (with_metadata(base, reply_start=10**18), LOADS),
        "metadata-created-inf": (with_metadata(base, created=float("inf")), LOADS),
        "metadata-token-texts-wrong-length": (with_metadata(base, token_texts=["a"]), LOADS),
        "metadata-sampling-bytes-keys": (with_metadata(base, sampling={b"temperature": 1.0}), LOADS),
        "metadata-sampling-bytes-values": (with_metadata(base, sampling={"stop": [b"\xff"]}), LOADS),
        "metadata-sampling-list": (with_metadata(base, sampling=[1]), LOADS),
        "metadata-bytes-key": (with_header(base, metadata={**doc["metadata"], b"raw": 1}), LOADS),
        "header-created-inf": (with_header(base, created=float("inf")), LOADS),
        "header-created-nan": (with_header(base, created=float("nan")), LOADS),
        "header-created-1e300": (with_header(base, created=1e300), LOADS),
        "header-created-negative": (with_header(base, created=-5.0), LOADS),
        "int4-key-group-4Mi": (saved_int4(fp, folder, key_group=1 << 22), LOADS),
        # preamble and header defects
        "empty-file": (b"", REFUSED),
        "wrong-magic": (b"\x89PNG\r\n\x1a\n" + base[8:], REFUSED),
        "version-3": (assemble(3, doc, frames), REFUSED),
        "flags-set": (assemble(2, doc, frames, flags=1), REFUSED),
        "header-length-huge": (fmt.PREAMBLE.pack(fmt.MAGIC, 2, 0, 0xFFFFFFFF) + base[fmt.PREAMBLE.size:], REFUSED),
        "header-length-past-end": (fmt.PREAMBLE.pack(fmt.MAGIC, 2, 0, len(base)) + base[fmt.PREAMBLE.size:],
                                   REFUSED),
        "header-not-msgpack": (assemble(2, None, frames, header=b"\xc1" * 64), REFUSED),
        "header-nested-200": (with_metadata(base, x=nested), REFUSED),
        "header-msgpack-depth-bomb": (assemble(2, None, frames, header=b"\x81\xa8metadata" + b"\x91" * 500_000
                                               + b"\xc0"), REFUSED),
        "header-ext-type": (assemble(2, None, frames, header=msgpack.packb(
            {**doc, "metadata": {"t": msgpack.ExtType(5, b"code")}}, use_bin_type=True)), REFUSED),
        "header-missing-positions": (assemble(2, {k: v for k, v in doc.items() if k != "positions"}, frames),
                                     REFUSED),
        "header-label-int": (with_header(base, label=3), REFUSED),
        "header-unknown-codec": (with_header(base, codec="zz"), REFUSED),
        "header-dtype-float64": (with_header(base, dtype="float64"), REFUSED),
        "header-codec-params-negative": (with_header(int4, codec_params={"sinks": -1, "recent": 0, "key_group": 0}),
                                         REFUSED),
        "header-key-group-past-limit": (with_header(int4, codec_params={"sinks": 4, "recent": 32,
                                                                        "key_group": (1 << 22) + 1}), REFUSED),
        "shapes-heads-contradict-fingerprint": (with_header(base, layers=[
            {**layer, "key": [heads + 3, dim]}] * fp.num_layers), REFUSED),
        "shapes-value-dim-contradicts": (with_header(base, layers=[
            {**layer, "value": [heads, dim * 2]}] * fp.num_layers), REFUSED),
        "shapes-layer-count-contradicts": (with_header(base, layers=[layer] * (fp.num_layers + 1)), REFUSED),
        "shapes-entries-past-positions": (with_header(base, layers=[{**layer, "entries": seq + 1}] * fp.num_layers),
                                          REFUSED),
        "shapes-entries-2-pow-40": (with_header(base, layers=[{**layer, "entries": 1 << 40}] * fp.num_layers),
                                    REFUSED),
        "shapes-extra-layer-field": (with_header(base, layers=[{**layer, "x": 1}] * fp.num_layers), REFUSED),
        "shapes-mixed-score-flags": (with_header(per_head, layers=[
            {**entry, "head_scores": i == 0} for i, entry in enumerate(split(per_head)[1]["layers"])]), REFUSED),
        "sliding-layer-past-its-window": (with_fingerprint(per_head, sliding_window=4, layer_types=[
            "sliding_attention"] * fp.num_layers), REFUSED),
        "layer-types-wrong-length": (with_fingerprint(base, layer_types=["full_attention"]), REFUSED),
        "fingerprint-vocab-0": (with_fingerprint(base, vocab_size=0), REFUSED),
        "fingerprint-heads-huge": (with_fingerprint(base, num_kv_heads=1 << 40), REFUSED),
        "fingerprint-rope-bytes-value": (with_fingerprint(base, rope={"rope_type": b"default"}), REFUSED),
        "fingerprint-rope-bytes-key": (with_fingerprint(base, rope={b"rope_theta": 1.0}), REFUSED),
        "token-id-out-of-vocab": (with_header(base, token_ids=np.asarray(
            [fp.vocab_size] + base_state.token_ids[1:], "<u4").tobytes()), REFUSED),
        "pending-id-1e9": (with_header(base, token_ids=np.asarray(
            base_state.token_ids[:-1] + [10**9], "<u4").tobytes()), REFUSED),
        "token-ids-past-the-limit": (with_header(base, token_ids=long_ids + b"\0\0\0\0"), REFUSED),
        "token-ids-odd-length": (with_header(base, token_ids=b"\0\0\0"), REFUSED),
        "positions-past-pending": (with_header(base, positions=np.arange(1, seq + 1, dtype="<u4").tobytes()),
                                   REFUSED),
        "trace-bytes-past-limit": (with_header(per_head, trace_bytes=fmt.MAX_TRACE_BYTES + 1), REFUSED),
        "v1-shapes-contradict-fingerprint": (with_header(v1, layer_shapes=[[heads + 1, dim, heads, dim]]
                                                         * fp.num_layers), REFUSED),
        "v1-pending-id-1e9": (with_header(v1, token_ids=np.asarray(
            base_state.token_ids[:-1] + [10**9], "<u4").tobytes()), REFUSED),
        "truncated-in-magic": (base[:5], REFUSED),
        "truncated-in-preamble": (base[:12], REFUSED),
        "truncated-in-header": (base[:fmt.PREAMBLE.size + header_len // 2], REFUSED),
        "truncated-in-header-crc": (base[:first_record - 2], REFUSED),
        "flipped-header-byte": (flip(base, fmt.PREAMBLE.size + 40), REFUSED),
        "flipped-header-crc": (flip(base, first_record - 1), REFUSED),
        # damage after the header: read_info is fine, verify and load refuse
        "truncated-in-first-record-header": (base[:first_record + 5], DAMAGED),
        "truncated-in-a-payload": (base[:first_record + 40], DAMAGED),
        "truncated-before-end-marker": (base[:-len(fmt.END_MARKER)], DAMAGED),
        "truncated-in-end-marker": (base[:-3], DAMAGED),
        "v1-truncated-in-a-payload": (v1[:len(v1) // 2], DAMAGED),
        "flipped-payload-byte": (flip(base, first_record + fmt.RECORD.size + 20), DAMAGED),
        "flipped-end-marker": (flip(base, len(base) - 2), DAMAGED),
        "trailing-byte": (base + b"\0", DAMAGED),
        "record-length-2-pow-60": (base[:first_record] + fmt.RECORD.pack(1 << 60, 0) + base[first_record
                                                                                          + fmt.RECORD.size:],
                                   DAMAGED),
        "record-longer-than-its-data-can-need": (with_frames(base, lambda f: [f[0] + b"\0" * (200 << 10)] + f[1:]),
                                                 DAMAGED),
        "junk-after-the-frame-in-a-record": (with_frames(base, lambda f: [f[0] + b"junk"] + f[1:]), DAMAGED),
        "frame-not-zstd": (with_frames(base, lambda f: [b"\0" * len(f[0])] + f[1:]), DAMAGED),
        "frame-short-of-declared": (with_frames(base, lambda f: [compress([torch.zeros(key_bytes - 1,
                                                                                       dtype=torch.uint8)])]
                                                + f[1:]), DAMAGED),
        "zstd-bomb-above-declared-256MiB": (with_frames(base, lambda f: [rle_frame(256 << 20)] + f[1:]), DAMAGED),
        "zstd-bomb-above-declared-no-size": (with_frames(base, lambda f: [rle_frame(256 << 20, False)] + f[1:]),
                                             DAMAGED),
        "zstd-bomb-below-declared": (huge_layer(fp, 16, 4096, 2048, [rle_frame(1 << 20)] * 2), DAMAGED),
        "rle-bomb-exactly-declared-2GiB": (huge_layer(fp, 16, 4096, 8192, [rle_frame(2 << 30)] * 2), DAMAGED),
        "rle-bomb-2GiB-other-model": (huge_layer(fp, 16, 4096, 8192, [rle_frame(2 << 30)] * 2, "other"), DAMAGED),
        "declared-3.9GiB-payload": (huge_layer(fp, 16, 4096, 15000, [compress([torch.zeros(64, dtype=torch.uint8)])]
                                               * 2), DAMAGED),
        "declared-past-payload-limit": (huge_layer(fp, 64, 16384, 1100, [b"\0"] * 2), DAMAGED),
        "v1-zstd-bomb-above-declared": (with_frames(v1, lambda f: [rle_frame(64 << 20)] + f[1:]), DAMAGED),
        # intact files that a model must not load
        "another-model": (saved(make_state(other_model), folder), UNLOADABLE),
        "transcript-4Mi-tokens": (with_header(base, token_ids=long_ids), UNLOADABLE),
        "head-positions-not-increasing": (with_frames(per_head, lambda f: [*f[:2], compress([torch.from_numpy(
            np.zeros(heads * split(per_head)[1]["layers"][0]["entries"], "<u4").view(np.uint8))]), *f[3:]]),
            UNLOADABLE),
    }
    corpus = []
    for name, (data, expectation) in entries.items():
        path = folder / f"{name}.kvs"
        path.write_bytes(data)
        corpus.append((name, path, expectation))
    return corpus


def saved_int4(fp: ModelFingerprint, folder: Path, key_group: int) -> bytes:
    """An int4 snapshot with 4 sinks, 8 recent entries and ``key_group`` (0: one group; or far past the sequence)."""
    state = make_state(fp, length=64)
    codec = make_codec("int4", {"sinks": 4, "recent": 8, "key_group": key_group})
    frames = [compress(codec.encode(t, role)) for k, v in zip(state.keys, state.values)
              for role, t in (("key", k), ("value", v))]
    _, doc, _ = split(saved(state, folder, "int4"))
    return assemble(2, {**doc, "codec_params": codec.params}, frames)
