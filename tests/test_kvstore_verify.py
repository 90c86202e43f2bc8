"""verify() finds damage that read_info cannot see: every record's checksum, and with deep=True every payload."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import pytest

from hostile_corpus import assemble, make_state, per_head_state, split
from kvstore import format as fmt
from kvstore import snapshot
from kvstore.errors import SnapshotError
from kvstore.header import decode_header
from kvstore.records import read_header
from kvstore.verify import verify
from kvstore_factory import FINGERPRINT


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "s.kvs"
    snapshot.save(per_head_state(FINGERPRINT), path, codec="int8")
    return path


def test_a_healthy_file_reports_what_was_checked(saved):
    _, _, frames = split(saved.read_bytes())
    shallow = verify(saved)
    assert (shallow.format_version, shallow.records, shallow.deep, shallow.decoded_bytes) == (2, 13, False, 0)
    assert shallow.stored_bytes == sum(len(f) for f in frames)  # 3 layers x (K, V, P, S) + the trace
    deep = verify(saved, deep=True)
    assert deep.decoded_bytes == sum(s.decoded for s in deep_specs(saved))


def deep_specs(path):
    with open(path, "rb") as f:
        version, data, _ = read_header(f, path.stat().st_size, path)
    return decode_header(data, version).records()


@pytest.mark.parametrize("record, name", [(0, "layer 0 keys"), (3, "layer 0 head scores"),
                                          (6, "layer 1 head positions"), (12, "the trace")])
def test_a_flipped_payload_bit_is_named_by_its_record(saved, record, name):
    version, doc, frames = split(saved.read_bytes())
    data = bytearray(assemble(version, doc, frames))
    offset = len(data) - len(fmt.END_MARKER) - sum(len(f) + fmt.RECORD.size for f in frames[record:])
    data[offset + fmt.RECORD.size + len(frames[record]) // 2] ^= 4
    saved.write_bytes(bytes(data))
    snapshot.read_info(saved)  # the header alone looks healthy
    for deep in (False, True):
        with pytest.raises(SnapshotError, match=f"^the snapshot is corrupt: the checksum of {name} does not match$"):
            verify(saved, deep=deep)


def test_only_deep_verification_decodes_the_payloads(saved):
    version, doc, frames = split(saved.read_bytes())
    wrong = frames[:]
    wrong[7] = frames[7][: len(frames[7]) // 2]  # a cut frame, with a valid CRC
    saved.write_bytes(assemble(version, doc, wrong))
    verify(saved)  # every checksum matches
    with pytest.raises(SnapshotError, match="^the snapshot is corrupt: the payload of layer 1 head scores decompresses to 75 bytes, not the 160"):
        verify(saved, deep=True)


@pytest.mark.parametrize("cut, message", [(-3, "truncated before its end marker"), (-100, "truncated or declares"),
                                          (None, "extra bytes after the end marker")])
def test_truncation_and_trailing_bytes(saved, cut, message):
    data = saved.read_bytes()
    saved.write_bytes(data[:cut] if cut else data + b"x")
    with pytest.raises(SnapshotError, match=message):
        verify(saved)


def test_verify_reads_files_larger_than_its_buffers_in_constant_memory(tmp_path):
    path = tmp_path / "big.kvs"
    state = make_state(replace(FINGERPRINT, head_dim=1024), length=2000)  # 6 payloads of 16 MB
    snapshot.save(state, path, codec="raw")
    tracemalloc.start()
    try:
        report = verify(path, deep=True, threads=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.decoded_bytes == state.nbytes and peak < 4 << 20
