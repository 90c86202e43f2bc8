"""Every codec round-trips synthetic K/V tensors: lossless bit for bit, lossy within its precision."""

from __future__ import annotations

import pytest
import torch

from kvstore import snapshot
from kvstore.codecs import DEFAULT_INT4_RECENT, DEFAULT_INT4_SINKS
from kvstore.errors import FingerprintMismatch, SnapshotError
from kvstore.format import CODEC_NAMES
from kvstore.state import ModelFingerprint
from kvstore_factory import FINGERPRINT, make_state

CODECS = list(CODEC_NAMES)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lossless_is_bit_exact_for_every_dtype(tmp_path, dtype):
    state = make_state(dtype=dtype)
    state.keys[0][0, 1, 1] = float("nan")
    state.keys[0][0, 1, 2] = float("-inf")
    state.values[1][1, 2, 3] = -0.0
    path = tmp_path / "s.kvs"
    written = snapshot.save(state, path)
    assert written == path.stat().st_size
    loaded = snapshot.load(path, expected=FINGERPRINT)
    for a, b in zip(state.keys + state.values, loaded.keys + loaded.values):
        assert b.dtype == dtype and b.shape == a.shape
        assert bits(a) == bits(b)
    assert loaded.token_ids == state.token_ids
    assert loaded.positions == state.positions
    assert loaded.attention_scores == pytest.approx(state.attention_scores, rel=1e-6)
    assert loaded.metadata == state.metadata
    assert loaded.fingerprint == state.fingerprint


@pytest.mark.parametrize("codec, tolerance", [("fp16", 2e-3), ("bf16", 1e-2), ("int8", 2e-2), ("int4", 0.25)])
def test_lossy_codecs_stay_within_their_precision(tmp_path, codec, tolerance):
    state = make_state(length=64)
    path = tmp_path / f"{codec}.kvs"
    snapshot.save(state, path, codec=codec)
    loaded = snapshot.load(path)
    for a, b in zip(state.keys + state.values, loaded.keys + loaded.values):
        assert b.dtype == a.dtype and b.shape == a.shape
        # error relative to each tensor's spread (scale-free)
        assert ((a - b).abs().mean() / a.std()).item() < tolerance


def test_int4_keeps_sinks_and_recent_entries_exact(tmp_path):
    state = make_state(length=64)
    snapshot.save(state, tmp_path / "s.kvs", codec="int4")
    loaded = snapshot.load(tmp_path / "s.kvs")
    exact = list(range(DEFAULT_INT4_SINKS)) + list(range(64 - DEFAULT_INT4_RECENT, 64))
    for a, b in zip(state.keys + state.values, loaded.keys + loaded.values):
        assert bits(a[:, exact]) == bits(b[:, exact])
        assert not torch.equal(a, b)  # the middle really is quantized


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("length", [0, 1, 5, 21])
def test_short_caches_round_trip(tmp_path, codec, length):
    state = make_state(length=length, dtype=torch.bfloat16)
    snapshot.save(state, tmp_path / "s.kvs", codec=codec)
    loaded = snapshot.load(tmp_path / "s.kvs")
    assert [k.shape for k in loaded.keys] == [k.shape for k in state.keys]
    assert loaded.positions == state.positions and loaded.next_position == state.next_position


def test_smaller_codecs_write_smaller_files(tmp_path):
    state = make_state(length=256)
    sizes = {c: snapshot.save(state, tmp_path / f"{c}.kvs", codec=c) for c in CODECS}
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["lossless"]
    assert sizes["int8"] < 0.35 * state.nbytes


def test_read_info_describes_without_payloads(tmp_path):
    state = make_state(length=32)
    written = snapshot.save(state, tmp_path / "s.kvs", codec="int8")
    info = snapshot.read_info(tmp_path / "s.kvs")
    assert (info.codec, info.dtype, info.num_layers, info.cache_length) == ("int8", "float32", 3, 32)
    assert info.file_bytes == written and info.raw_bytes == state.nbytes
    assert info.ratio == pytest.approx(written / state.nbytes)
    assert info.token_ids == state.token_ids and info.label == "t" and info.created == 1.5
    assert info.fingerprint == FINGERPRINT and info.has_attention_scores


def test_fingerprint_mismatch_says_what_differs(tmp_path):
    snapshot.save(make_state(), tmp_path / "s.kvs")
    other = ModelFingerprint(**{**FINGERPRINT.to_dict(), "head_dim": 16, "tokenizer_hash": "ffff"})
    with pytest.raises(FingerprintMismatch) as error:
        snapshot.load(tmp_path / "s.kvs", expected=other)
    message = str(error.value)
    assert "head_dim: 8 in the snapshot, 16 in the model" in message
    assert "tokenizer_hash" in message and "num_layers" not in message


def test_refused_saves_leave_the_existing_file_untouched(tmp_path):
    path = tmp_path / "s.kvs"
    snapshot.save(make_state(seed=1), path)
    before = path.read_bytes()
    broken = make_state()
    broken.positions = broken.positions[::-1]
    with pytest.raises(SnapshotError, match="inconsistent"):
        snapshot.save(broken, path)
    with pytest.raises(SnapshotError, match="unknown codec"):
        snapshot.save(make_state(), path, codec="zip")
    unserialisable = make_state()
    unserialisable.metadata["callback"] = object()
    with pytest.raises(SnapshotError, match="not serialisable"):
        snapshot.save(unserialisable, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.kvs"]  # no temporary left behind


def test_a_state_with_a_foreign_dtype_is_refused(tmp_path):
    state = make_state()
    state.keys = [k.double() for k in state.keys]
    state.values = [v.double() for v in state.values]
    with pytest.raises(SnapshotError, match="dtype"):
        snapshot.save(state, tmp_path / "s.kvs")
