"""Format version 2: per-layer lengths, per-head positions and scores, the trace; version 1 files still load."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import zstandard

from hostile_corpus import huge_layer, per_head_state, saved_int4, split, v1_bytes
from kvstore import format as fmt
from kvstore import pipeline, snapshot
from kvstore.errors import FingerprintMismatch, SnapshotError
from kvstore.format import CODEC_NAMES
from kvstore_factory import FINGERPRINT, make_state

REPO = Path(__file__).resolve().parents[1]


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def assert_same_state(a, b) -> None:
    assert [bits(t) for t in a.keys + a.values] == [bits(t) for t in b.keys + b.values]
    assert (a.token_ids, a.positions, a.metadata, a.fingerprint) == (b.token_ids, b.positions, b.metadata,
                                                                     b.fingerprint)
    assert a.trace == b.trace


@pytest.mark.parametrize("codec", ["lossless", "raw"])
def test_per_head_sliding_state_with_a_trace_round_trips(tmp_path, codec):
    fp = replace(FINGERPRINT, layer_types=("sliding_attention", "full_attention", "full_attention"),
                 sliding_window=16)
    state = per_head_state(fp)
    assert state.per_head and state.layer_length(0) == 8 and state.layer_length(1) == 20
    snapshot.save(state, tmp_path / "s.kvs", codec=codec)
    loaded = snapshot.load(tmp_path / "s.kvs", expected=fp)
    assert_same_state(state, loaded)
    for layer in range(fp.num_layers):
        assert torch.equal(loaded.head_positions[layer], state.head_positions[layer])
        assert loaded.head_positions[layer].dtype == torch.int64
        assert torch.equal(loaded.head_scores[layer], state.head_scores[layer])
    assert loaded.attention_scores == pytest.approx(state.attention_scores, rel=1e-6)
    info = snapshot.read_info(tmp_path / "s.kvs")
    assert (info.format_version, info.layer_entries, info.per_head, info.has_head_scores) == (2, [8, 20, 20],
                                                                                              True, True)
    assert info.trace_bytes == len(state.trace) and info.fingerprint.sliding_window == 16


def test_a_model_that_records_no_layer_types_still_compares_the_rest(tmp_path):
    fp = replace(FINGERPRINT, layer_types=("full_attention",) * 3, sliding_window=None)
    snapshot.save(make_state(), tmp_path / "old-style.kvs")  # the snapshot does not record layer types
    snapshot.load(tmp_path / "old-style.kvs", expected=fp)
    snapshot.save(replace(make_state(), fingerprint=fp), tmp_path / "new.kvs")
    other = replace(fp, layer_types=("sliding_attention",) * 3, sliding_window=64)
    with pytest.raises(FingerprintMismatch, match="layer_types"):
        snapshot.load(tmp_path / "new.kvs", expected=other)


@pytest.mark.parametrize("codec", ["lossless", "int4"])
def test_version_1_files_still_load(tmp_path, codec):
    state = make_state(length=64)
    (tmp_path / "v1.kvs").write_bytes(v1_bytes(state, codec))
    info = snapshot.read_info(tmp_path / "v1.kvs")
    assert info.format_version == 1 and info.layer_entries == [64] * 3 and info.trace_bytes is None
    loaded = snapshot.load(tmp_path / "v1.kvs", expected=FINGERPRINT)
    snapshot.save(state, tmp_path / "v2.kvs", codec=codec)
    assert_same_state(snapshot.load(tmp_path / "v2.kvs"), loaded)  # the same codec decodes the same way
    assert loaded.head_positions is None and loaded.head_scores is None and loaded.trace is None


def test_files_are_written_as_version_2(tmp_path):
    snapshot.save(make_state(), tmp_path / "s.kvs")
    version, doc, frames = split((tmp_path / "s.kvs").read_bytes())
    assert version == fmt.FORMAT_VERSION == 2
    assert doc["layers"][0] == {"key": [2, 8], "value": [2, 8], "entries": 40, "head_positions": False,
                                "head_scores": False}
    assert len(frames) == 6 and doc["trace_bytes"] is None


def test_raw_is_bit_exact_and_skips_the_shuffle(tmp_path):
    state = make_state(length=64, dtype=torch.bfloat16)
    state.keys[1][0, 3, 2] = float("nan")
    snapshot.save(state, tmp_path / "raw.kvs", codec="raw")
    assert_same_state(state, snapshot.load(tmp_path / "raw.kvs"))
    _, _, frames = split((tmp_path / "raw.kvs").read_bytes())
    assert zstandard.ZstdDecompressor().decompress(frames[0]) == bits(state.keys[0])  # the tensor as it is
    assert "raw" in CODEC_NAMES


@pytest.mark.parametrize("codec", list(CODEC_NAMES))
def test_threads_do_not_change_the_bytes_or_the_state(tmp_path, codec):
    state = make_state(length=300)
    one = snapshot.save(state, tmp_path / "one.kvs", codec=codec, threads=1)
    snapshot.save(state, tmp_path / "two.kvs", codec=codec, threads=3)
    assert (tmp_path / "one.kvs").read_bytes() == (tmp_path / "two.kvs").read_bytes() and one > 0
    assert_same_state(snapshot.load(tmp_path / "one.kvs", threads=1), snapshot.load(tmp_path / "one.kvs", threads=4))


def test_the_first_damaged_record_in_file_order_is_named(tmp_path):
    path = tmp_path / "s.kvs"
    snapshot.save(make_state(length=300), path)
    data = bytearray(path.read_bytes())
    data[-40] ^= 1  # inside the last record (layer 2 values)
    header_len = fmt.PREAMBLE.unpack_from(data)[3]
    first = fmt.PREAMBLE.size + header_len + fmt.CHECKSUM.size + fmt.RECORD.size
    data[first + 500] ^= 1  # inside layer 0 keys
    path.write_bytes(bytes(data))
    for threads in (1, 4):
        with pytest.raises(SnapshotError, match="^the snapshot is corrupt: the checksum of layer 0 keys does not"):
            snapshot.load(path, threads=threads)


def test_load_onto_a_device(tmp_path):
    snapshot.save(make_state(), tmp_path / "s.kvs")
    state = snapshot.load(tmp_path / "s.kvs", device="cpu")
    assert state.keys[0].device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SnapshotError, match="cannot load onto cuda"):
            snapshot.load(tmp_path / "s.kvs", device="cuda")
    else:  # pinned, asynchronous copies
        on_gpu = snapshot.load(tmp_path / "s.kvs", device="cuda")
        assert on_gpu.keys[0].is_cuda and torch.equal(on_gpu.keys[2].cpu(), state.keys[2])
    with pytest.raises(SnapshotError, match="cannot load onto"):
        snapshot.load(tmp_path / "s.kvs", device="nonsense")


def test_memory_budget_refuses_before_allocating_and_limits_threads(tmp_path, monkeypatch):
    path = tmp_path / "huge.kvs"
    path.write_bytes(huge_layer(FINGERPRINT, 16, 4096, 15000, [b"\0"] * 2))  # 2 x 3.9 GB declared
    with pytest.raises(SnapshotError, match=r"^loading the snapshot needs 10\.99 GiB of memory, more than the "
                                            r"limit of 8\.00 GiB$"):
        snapshot.load(path, max_bytes=8 << 30)
    small = tmp_path / "s.kvs"
    state = make_state(length=1000)
    snapshot.save(state, small)
    with pytest.raises(SnapshotError, match="needs"):
        snapshot.load(small, max_bytes=state.nbytes)  # the state fits, its decode buffer does not
    used = []
    real = pipeline.in_order
    monkeypatch.setattr(pipeline, "in_order", lambda tasks, threads: used.append(threads) or real(tasks, threads))
    per_payload = state.nbytes // 6
    snapshot.load(small, max_bytes=state.nbytes + 2 * per_payload, threads=8)
    assert used == [2]


def test_transcripts_longer_than_the_context_are_refused(tmp_path):
    snapshot.save(make_state(length=40), tmp_path / "s.kvs")
    assert len(snapshot.load(tmp_path / "s.kvs", max_tokens=41).token_ids) == 41
    with pytest.raises(SnapshotError, match="^the snapshot's transcript is 41 tokens long, more than the 40 tokens"):
        snapshot.load(tmp_path / "s.kvs", max_tokens=40)


def test_the_fingerprint_is_compared_before_any_payload_is_read(tmp_path):
    path = tmp_path / "s.kvs"
    snapshot.save(make_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # payloads truncated: a reader that decoded first would say "corrupt"
    with pytest.raises(FingerprintMismatch):
        snapshot.load(path, expected=replace(FINGERPRINT, head_dim=16))


def test_the_writer_refuses_what_the_reader_would(tmp_path):
    state = make_state()
    state.token_ids[-1] = FINGERPRINT.vocab_size  # a pending id past the vocabulary
    with pytest.raises(SnapshotError, match="^cannot save this kv state: token id 1000 lies outside"):
        snapshot.save(state, tmp_path / "s.kvs")
    wide = make_state()
    wide.keys = [torch.zeros(3, 40, 8) for _ in range(3)]
    wide.values = [torch.zeros(3, 40, 8) for _ in range(3)]
    with pytest.raises(SnapshotError, match="not the fingerprint's"):
        snapshot.save(wide, tmp_path / "s.kvs")
    assert not (tmp_path / "s.kvs").exists()


def test_metadata_of_the_wrong_shape_is_dropped_and_the_rest_kept(tmp_path):
    state = make_state()
    state.metadata.update(messages=[{"role": "user", "content": 5}], reply_start="abc", created=float("nan"),
                          sampling={"stop": [b"\n"]}, token_texts=["a"] * 41, custom={"kept": True})
    snapshot.save(state, tmp_path / "s.kvs")
    loaded = snapshot.load(tmp_path / "s.kvs")
    assert set(loaded.metadata) == {"label", "token_texts", "custom"}
    info = snapshot.read_info(tmp_path / "s.kvs")
    assert info.created > 1.7e9  # an absurd creation time is replaced by the time of the save


def test_an_int4_key_group_far_past_the_sequence_is_one_group_and_costs_nothing(tmp_path):
    fp = replace(FINGERPRINT, head_dim=1024)  # a per-token expansion of 4 Mi groups would need 32 GiB
    for group in (0, 1 << 22):
        (tmp_path / f"{group}.kvs").write_bytes(saved_int4(fp, tmp_path, key_group=group))
    one, huge = (snapshot.load(tmp_path / f"{group}.kvs", expected=fp) for group in (0, 1 << 22))
    assert all(torch.equal(a, b) for a, b in zip(one.keys + one.values, huge.keys + huge.values))


def test_kvstore_never_imports_model_or_screen_libraries():
    code = ("import sys, kvstore.snapshot, kvstore.verify, kvstore.legacy, kvstore.pruning; "
            "print(sorted(m for m in ('transformers', 'textual', 'tracer', 'tui_app') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
