"""Damaged, hostile or foreign files give SnapshotError: never a crash, a hang or runaway memory."""

from __future__ import annotations

import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import format as fmt
from kvstore import snapshot
from kvstore.errors import SnapshotError
from kvstore_factory import make_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "good.kvs"
    snapshot.save(make_state(length=24), path, codec="int4")
    return path.read_bytes()


def load_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / "x.kvs"
    path.write_bytes(data)
    return snapshot.load(path)


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    """(preamble, header document, everything after the header checksum)."""
    header_len = fmt.PREAMBLE.unpack(data[: fmt.PREAMBLE.size])[3]
    start = fmt.PREAMBLE.size
    doc = msgpack.unpackb(data[start:start + header_len])
    return data[:start], doc, data[start + header_len + fmt.CHECKSUM.size:]


def rebuild(doc_bytes: bytes, rest: bytes) -> bytes:
    """A file with this header, a correct preamble and a correct header checksum."""
    preamble = fmt.PREAMBLE.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, len(doc_bytes))
    return preamble + doc_bytes + fmt.CHECKSUM.pack(zlib.crc32(doc_bytes, zlib.crc32(preamble))) + rest


def test_truncation_at_many_offsets(tmp_path, good):
    # every offset through the preamble, header and first record, then every third one
    cuts = sorted(set(range(600)) | set(range(600, len(good), 3)) | set(range(len(good) - 40, len(good))))
    for cut in cuts:
        with pytest.raises(SnapshotError):
            load_bytes(tmp_path, good[:cut])


def test_random_bit_flips(tmp_path, good):
    rng = random.Random(3)
    for _ in range(300):
        data = bytearray(good)
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SnapshotError):
            load_bytes(tmp_path, bytes(data))


def test_wrong_magic_and_version(tmp_path, good):
    with pytest.raises(SnapshotError, match="not a kvtrace snapshot"):
        load_bytes(tmp_path, b"\x89PNG\r\n\x1a\n" + good[8:])
    newer = fmt.PREAMBLE.pack(fmt.MAGIC, fmt.FORMAT_VERSION + 1, 0, 0) + good[fmt.PREAMBLE.size:]
    with pytest.raises(SnapshotError, match=f"format version {fmt.FORMAT_VERSION + 1}"):
        load_bytes(tmp_path, newer)


def test_trailing_bytes_are_refused(tmp_path, good):
    with pytest.raises(SnapshotError, match="extra bytes"):
        load_bytes(tmp_path, good + b"\0")


def test_huge_declared_lengths(tmp_path, good):
    huge_header = fmt.PREAMBLE.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, 0xFFFFFFFF) + good[fmt.PREAMBLE.size:]
    with pytest.raises(SnapshotError, match="header length"):
        load_bytes(tmp_path, huge_header)
    _, doc, rest = split(good)
    huge_record = fmt.RECORD.pack(1 << 60, 0) + rest[fmt.RECORD.size:]
    with pytest.raises(SnapshotError, match="too long a length"):
        load_bytes(tmp_path, rebuild(msgpack.packb(doc), huge_record))
    for field, value in [
        ("layers", [{**doc["layers"][0], "key": [1024, 16384], "value": [1024, 16384]}] * 3),  # 64 GiB a layer
        ("layers", [{**doc["layers"][0], "key": [2**40, 8]}] * 3),
        ("layers", [{**doc["layers"][0], "entries": 2**40}] * 3),
        ("token_ids", b"\0" * 4 * (fmt.MAX_TOKENS + 1)),
        ("positions", b"\0\0\0"),
    ]:
        with pytest.raises(SnapshotError):
            load_bytes(tmp_path, rebuild(msgpack.packb({**doc, field: value}), rest))


def test_deeply_nested_msgpack(tmp_path, good):
    _, doc, rest = split(good)
    nested: object = "leaf"
    for _ in range(200):
        nested = [nested]
    with pytest.raises(SnapshotError, match="nests deeper"):
        load_bytes(tmp_path, rebuild(msgpack.packb({**doc, "metadata": {"x": nested}}), rest))
    bomb = b"\x81\xa8metadata" + b"\x91" * 500_000 + b"\xc0"  # too deep for msgpack itself
    with pytest.raises(SnapshotError, match="not valid msgpack"):
        load_bytes(tmp_path, rebuild(bomb, rest))


def test_header_with_foreign_types_or_fields(tmp_path, good):
    _, doc, rest = split(good)
    ext = msgpack.packb({**doc, "metadata": {"t": msgpack.ExtType(5, b"code")}})
    with pytest.raises(SnapshotError):
        load_bytes(tmp_path, rebuild(ext, rest))
    for change in ({"kind": "other"}, {"codec": "zip"}, {"dtype": "float64"}, {"label": 3},
                   {"codec_params": {"sinks": -1, "recent": 0}}):
        with pytest.raises(SnapshotError):
            load_bytes(tmp_path, rebuild(msgpack.packb({**doc, **change}), rest))
    missing = {k: v for k, v in doc.items() if k != "positions"}
    with pytest.raises(SnapshotError, match="lacks 'positions'"):
        load_bytes(tmp_path, rebuild(msgpack.packb(missing), rest))


@pytest.mark.parametrize("with_size", [True, False])
def test_zstd_bomb_expanding_past_the_declared_size(tmp_path, good, with_size):
    _, doc, rest = split(good)
    (length, _) = fmt.RECORD.unpack(rest[: fmt.RECORD.size])
    later = rest[fmt.RECORD.size + length:]
    zeros = b"\0" * (256 << 20)
    if with_size:
        frame = zstandard.ZstdCompressor(level=1).compress(zeros)
    else:
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
        frame = compressor.compress(zeros) + compressor.flush()
    del zeros
    data = rebuild(msgpack.packb(doc), fmt.RECORD.pack(len(frame), zlib.crc32(frame)) + frame + later)
    tracemalloc.start()
    try:
        with pytest.raises(SnapshotError, match="decompresses to more"):
            load_bytes(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the 256 MiB expansion is never materialised


def test_pickle_and_torch_files_renamed_kvs(tmp_path):
    layers = tuple((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)) for _ in range(2))
    (tmp_path / "p.kvs").write_bytes(pickle.dumps(layers))
    torch.save(layers, tmp_path / "t.kvs")
    for name in ("p.kvs", "t.kvs"):
        with pytest.raises(SnapshotError, match="not a kvtrace snapshot"):
            snapshot.load(tmp_path / name)


def test_missing_empty_and_folder_paths(tmp_path):
    with pytest.raises(SnapshotError, match="no snapshot"):
        snapshot.load(tmp_path / "absent.kvs")
    with pytest.raises(SnapshotError, match="folder"):
        snapshot.read_info(tmp_path)
    (tmp_path / "empty.kvs").write_bytes(b"")
    with pytest.raises(SnapshotError):
        snapshot.load(tmp_path / "empty.kvs")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations_never_escape_as_other_errors(tmp_path, good, data):
    mutated = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        offset = data.draw(st.integers(0, len(mutated) - 1))
        mutated[offset] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    mutated += data.draw(st.binary(max_size=16))
    try:
        state = load_bytes(tmp_path, bytes(mutated))
    except SnapshotError:
        return
    state.validate()  # only harmless changes (e.g. none at all) may load


def test_a_save_killed_halfway_leaves_the_earlier_snapshot(tmp_path):
    path = tmp_path / "s.kvs"
    earlier = make_state(length=8, seed=7)
    snapshot.save(earlier, path)
    before = path.read_bytes()
    child = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO / "tests")!r})
        from kvstore import snapshot
        from kvstore_factory import make_state
        from kvstore import pipeline
        real = pipeline.compress
        calls = []
        def slow_compress(chunks, level):
            calls.append(1)
            if len(calls) == 3:  # layer 1 of 3: halfway through the payloads
                print("halfway", flush=True)
                time.sleep(60)
            return real(chunks, level)
        pipeline.compress = slow_compress
        snapshot.save(make_state(length=4000, seed=8), {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "halfway"
        deadline = time.monotonic() + 10
        while not (temps := [p for p in tmp_path.iterdir() if p.name != "s.kvs" and p.stat().st_size]):
            assert time.monotonic() < deadline, "the save never streamed into a temporary"
            time.sleep(0.05)  # other threads are still writing the earlier records
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert path.read_bytes() == before
    assert temps[0].exists()  # what a killed save leaves behind ...
    snapshot.save(earlier, path)
    assert not temps[0].exists()  # ... the next save to the same target removes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.kvs"]
    loaded = snapshot.load(path)
    assert loaded.token_ids == earlier.token_ids
    assert torch.equal(loaded.keys[2], earlier.keys[2])


def test_a_saved_snapshot_gets_ordinary_file_permissions(tmp_path):
    """Not the owner-only mode of the temporary it was written to: what ``open`` would give, or the old file's."""
    old_mask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.kvs"
        snapshot.save(make_state(length=4), fresh)
        assert fresh.stat().st_mode & 0o777 == 0o644
        fresh.chmod(0o600)
        snapshot.save(make_state(length=4, seed=1), fresh)
        assert fresh.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_mask)
