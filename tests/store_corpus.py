"""A corpus of crafted snapshot stores: damaged or hostile entry, chunk and trace block files, checksums and all.

Each case is a copy of one small valid store (written by kvtrace) with one
file changed by hand: documents are re-packed with msgpack, frames made with
zstandard or by hand, and every CRC, digest and key the damage is not about
is recomputed (with hashlib and ``kvstore.chunking.chunk_key``), so each case
tests the one defect it names.

``build_store_corpus(folder)`` returns ``(name, store folder, expectation)``:

* ``BROKEN_ENTRY``: the entry itself is refused (``info``, ``verify``, ``load``).
* ``BROKEN_CHUNKS``: the entry reads (``info``), but ``verify`` and ``load``
  refuse: a chunk or block is missing, damaged or does not belong there.

Every case's entry is called ``t``; the store also holds an intact entry
``other`` that shares nothing with it, which must keep loading.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from hostile_corpus import rle_frame
from kvstore import format as fmt
from kvstore.blocks import BLOCK
from kvstore.chunk_file import CHUNK
from kvstore.chunking import Layout, chunk_key
from kvstore.entry_file import ENTRY
from kvstore.store import Store
from kvstore_factory import make_state

BROKEN_ENTRY, BROKEN_CHUNKS = "broken entry", "broken chunks"
TRACE = bytes(range(256)) * 1200  # two trace blocks


def read_file(path: Path) -> tuple[int, dict[str, Any], list[bytes]]:
    """(version, document, record frames) of a store file."""
    data = path.read_bytes()
    _, version, _, length = fmt.PREAMBLE.unpack_from(data)
    doc = msgpack.unpackb(data[fmt.PREAMBLE.size:fmt.PREAMBLE.size + length], raw=False)
    offset, frames = fmt.PREAMBLE.size + length + fmt.CHECKSUM.size, []
    while offset < len(data) - 8:
        size, _ = fmt.RECORD.unpack_from(data, offset)
        frames.append(data[offset + fmt.RECORD.size:offset + fmt.RECORD.size + size])
        offset += fmt.RECORD.size + size
    return version, doc, frames


def write_file(path: Path, framing: fmt.Framing, doc: Any, frames: list[bytes], version: int = 1,
               header: bytes | None = None) -> bytes:
    """Write a store file, every CRC computed; returns the header bytes."""
    header = msgpack.packb(doc, use_bin_type=True) if header is None else header
    preamble = fmt.PREAMBLE.pack(framing.magic, version, 0, len(header))
    parts = [preamble, header, fmt.CHECKSUM.pack(zlib.crc32(header, zlib.crc32(preamble)))]
    for frame in frames:
        parts += [fmt.RECORD.pack(len(frame), zlib.crc32(frame)), frame]
    parts.append(framing.end)
    path.write_bytes(b"".join(parts))
    return header


class Case:
    """A copy of the base store, with helpers to change its entry ``t`` and the files it names."""

    def __init__(self, base: Path, folder: Path) -> None:
        shutil.copytree(base, folder)
        self.root = folder
        self.entry_path = folder / "entries" / "t.kve"
        _, self.entry, _ = read_file(self.entry_path)

    def chunk_path(self, r: int = 0, i: int = 0) -> Path:
        key = self.entry["ranges"][r][3][i][0].hex()
        return self.root / "chunks" / key[:2] / f"{key}.kvc"

    def block_path(self, i: int = 0) -> Path:
        digest = self.entry["trace"][i][0].hex()
        return self.root / "blocks" / digest[:2] / f"{digest}.kvb"

    def write_entry(self, **changes: Any) -> None:
        self.entry.update(changes)
        write_file(self.entry_path, ENTRY, self.entry, [])

    def change_chunk(self, change: Callable[[dict[str, Any], list[bytes]], None], *, rekey: bool = True,
                     redigest: bool = True, r: int = 0) -> None:
        """Apply ``change`` to chunk ``r``'s document and frames; recompute its key (renaming the file) and the
        entry's reference unless told not to."""
        path = self.chunk_path(r)
        _, doc, frames = read_file(path)
        change(doc, frames)
        if rekey:
            layout = Layout(doc["heads"], doc["end"] - doc["start"], doc["layout"]["shared"], doc["layout"]["bits"])
            doc["key"] = chunk_key(doc["context"], doc["link"], doc["start"], doc["end"], doc["layers"], layout,
                                   doc["head_scores"], doc["content"])
        path.unlink()
        target = self.root / "chunks" / doc["key"].hex()[:2] / f"{doc['key'].hex()}.kvc"
        target.parent.mkdir(exist_ok=True)
        header = write_file(target, CHUNK, doc, frames)
        ref = self.entry["ranges"][r][3][0]
        ref[0] = doc["key"] if rekey else ref[0]
        if redigest:
            ref[1] = hashlib.sha256(header).digest()
        ref[2] = target.stat().st_size
        if not rekey:
            target.rename(path)
        self.write_entry()


def build_store_corpus(folder: str | Path) -> list[tuple[str, Path, str]]:
    folder = Path(folder)
    base = folder / "_base"
    store = Store.open(base, create=True)
    state = make_state(300)
    state.trace = TRACE
    store.save(state, "t")
    store.save(make_state(40, seed=9), "other")
    cases: list[tuple[str, Path, str]] = []

    def case(name: str, expectation: str, build: Callable[[Case], None]) -> None:
        c = Case(base, folder / name)
        build(c)
        cases.append((name, c.root, expectation))

    # --------------------------------------------------------------- the entry file
    case("entry-garbage", BROKEN_ENTRY, lambda c: c.entry_path.write_bytes(os.urandom(200)))
    case("entry-is-a-kvs-file", BROKEN_ENTRY, lambda c: c.entry_path.write_bytes(
        fmt.MAGIC + c.entry_path.read_bytes()[8:]))
    case("entry-header-crc", BROKEN_ENTRY, lambda c: c.entry_path.write_bytes(
        _flip(c.entry_path.read_bytes(), fmt.PREAMBLE.size + 5)))
    case("entry-truncated", BROKEN_ENTRY, lambda c: c.entry_path.write_bytes(c.entry_path.read_bytes()[:-20]))
    case("entry-extra-bytes", BROKEN_ENTRY, lambda c: c.entry_path.write_bytes(c.entry_path.read_bytes() + b"x"))
    case("entry-newer-version", BROKEN_ENTRY, lambda c: write_file(c.entry_path, ENTRY, c.entry, [], version=2))
    case("entry-not-a-map", BROKEN_ENTRY, lambda c: write_file(c.entry_path, ENTRY, [1, 2, 3], []))
    case("entry-wrong-kind", BROKEN_ENTRY, lambda c: c.write_entry(kind="kvtrace-snapshot"))
    case("entry-nested-deep", BROKEN_ENTRY, lambda c: write_file(
        c.entry_path, ENTRY, None, [], header=b"\x91" * 100_000 + b"\xc0"))
    case("entry-ext-type", BROKEN_ENTRY, lambda c: c.write_entry(parent=msgpack.ExtType(3, b"x")))
    case("entry-parent-path", BROKEN_ENTRY, lambda c: c.write_entry(parent="../../etc/passwd"))
    case("entry-header-not-a-snapshot-header", BROKEN_ENTRY, lambda c: c.write_entry(header=b"\x80"))
    case("entry-header-wrong-type", BROKEN_ENTRY, lambda c: c.write_entry(header="text"))
    case("entry-saved-not-a-number", BROKEN_ENTRY, lambda c: c.write_entry(saved="yesterday"))
    case("ranges-gap", BROKEN_ENTRY, lambda c: c.write_entry(ranges=c.entry["ranges"][1:]))
    case("ranges-not-a-list", BROKEN_ENTRY, lambda c: c.write_entry(ranges={"a": 1}))
    case("ranges-overlap", BROKEN_ENTRY, lambda c: c.write_entry(
        ranges=[c.entry["ranges"][0], [200, 300, c.entry["ranges"][1][2], c.entry["ranges"][1][3]]]))
    case("ranges-millions", BROKEN_ENTRY, lambda c: c.write_entry(ranges=[[0, 1, b"x" * 32, []]] * 100_000))
    case("range-link-wrong", BROKEN_ENTRY, lambda c: c.write_entry(
        ranges=[[*c.entry["ranges"][0][:2], bytes(32), c.entry["ranges"][0][3]], c.entry["ranges"][1]]))
    case("range-too-many-chunks", BROKEN_ENTRY, lambda c: c.write_entry(
        ranges=[[*c.entry["ranges"][0][:3], c.entry["ranges"][0][3] * 4], c.entry["ranges"][1]]))
    case("chunk-ref-short-digest", BROKEN_ENTRY, lambda c: c.write_entry(
        ranges=[[*c.entry["ranges"][0][:3], [[b"x" * 31, b"y" * 32, 10]]], c.entry["ranges"][1]]))
    case("chunk-ref-negative-size", BROKEN_ENTRY, lambda c: c.write_entry(
        ranges=[[*c.entry["ranges"][0][:3], [[*c.entry["ranges"][0][3][0][:2], -1]]], c.entry["ranges"][1]]))
    case("trace-blocks-short", BROKEN_ENTRY, lambda c: c.write_entry(trace=c.entry["trace"][:1]))
    case("trace-block-length-huge", BROKEN_ENTRY, lambda c: c.write_entry(
        trace=[[c.entry["trace"][0][0], 1 << 40, 10]]))
    case("entry-is-a-fifo", BROKEN_ENTRY, lambda c: (c.entry_path.unlink(), os.mkfifo(c.entry_path)))
    case("entry-is-a-symlink-loop", BROKEN_ENTRY, lambda c: (c.entry_path.unlink(),
                                                              os.symlink(c.entry_path.name, c.entry_path)))
    case("entry-is-a-folder", BROKEN_ENTRY, lambda c: (c.entry_path.unlink(), c.entry_path.mkdir()))

    # --------------------------------------------------------------- the chunks and blocks it names
    case("chunk-missing", BROKEN_CHUNKS, lambda c: c.chunk_path(1).unlink())
    case("chunk-of-another-entry", BROKEN_CHUNKS, lambda c: shutil.copy(
        next(p for p in (c.root / "chunks").rglob("*.kvc") if p != c.chunk_path(0) and p != c.chunk_path(1)),
        c.chunk_path(1)))
    case("chunk-flipped-payload-bit", BROKEN_CHUNKS, lambda c: c.chunk_path(1).write_bytes(
        _flip(c.chunk_path(1).read_bytes(), -30)))
    case("chunk-truncated", BROKEN_CHUNKS, lambda c: c.chunk_path(0).write_bytes(c.chunk_path(0).read_bytes()[:-99]))
    case("chunk-empty-file", BROKEN_CHUNKS, lambda c: c.chunk_path(0).write_bytes(b""))
    case("chunk-header-not-the-entrys", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc.update(note="x"), redigest=False))
    case("chunk-key-not-its-hash", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc.update(content=bytes(32)), rekey=False))
    case("chunk-other-range", BROKEN_CHUNKS, lambda c: c.change_chunk(lambda doc, frames: doc.update(end=299)))
    case("chunk-layer-out-of-range", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc.update(layers=[0, 1, 99])))
    case("chunk-layers-unsorted", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc.update(layers=[2, 1, 0])))
    case("chunk-layout-short", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc["layout"].update(bits=doc["layout"]["bits"][:-1])))
    case("chunk-layout-padding-bits", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc["layout"].update(bits=doc["layout"]["bits"][:-1] + b"\xff"), r=1))
    case("chunk-layout-fewer-entries", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc["layout"].update(bits=b"\x7f" + doc["layout"]["bits"][1:])))
    case("chunk-layout-per-head-rows-wrong", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc["layout"].update(shared=False)))
    case("chunk-heads-huge", BROKEN_CHUNKS, lambda c: c.change_chunk(lambda doc, frames: doc.update(heads=1000)))
    case("chunk-codec-unknown", BROKEN_CHUNKS, lambda c: c.change_chunk(lambda doc, frames: doc.update(codec="lz")))
    case("chunk-codec-other", BROKEN_CHUNKS, lambda c: c.change_chunk(lambda doc, frames: doc.update(codec="raw")))
    case("chunk-record-digests-short", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc.update(records=doc["records"][:-1])))
    case("chunk-record-swapped", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: frames.reverse()))  # CRCs recomputed; the record digests no longer match
    case("chunk-zstd-bomb", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: _bomb(doc, frames, 1 << 31)))
    case("chunk-declares-huge-record", BROKEN_CHUNKS, lambda c: c.change_chunk(
        lambda doc, frames: doc.update(head_dim=16384)))
    case("chunk-layer-twice-in-a-range", BROKEN_CHUNKS, lambda c: c.write_entry(
        ranges=[[*c.entry["ranges"][0][:3], c.entry["ranges"][0][3] * 2], c.entry["ranges"][1]]))
    case("chunk-is-a-fifo", BROKEN_CHUNKS, lambda c: (c.chunk_path(0).unlink(), os.mkfifo(c.chunk_path(0))))
    case("block-missing", BROKEN_CHUNKS, lambda c: c.block_path(1).unlink())
    case("block-content-changed", BROKEN_CHUNKS, lambda c: _change_block(c, lambda data: data[::-1]))
    case("block-length-changed", BROKEN_CHUNKS, lambda c: _change_block(c, lambda data: data + b"x"))
    return cases


def _flip(data: bytes, offset: int) -> bytes:
    data = bytearray(data)
    data[offset] ^= 0x10
    return bytes(data)


def _bomb(doc: dict[str, Any], frames: list[bytes], total: int) -> None:
    frames[0] = rle_frame(total)
    doc["records"][0] = hashlib.sha256(frames[0]).digest()


def _change_block(c: Case, change: Callable[[bytes], bytes]) -> None:
    path = c.block_path(0)
    _, doc, frames = read_file(path)
    data = change(zstandard.ZstdDecompressor().decompress(frames[0]))
    write_file(path, BLOCK, {**doc, "length": len(data)}, [zstandard.ZstdCompressor().compress(data)])
