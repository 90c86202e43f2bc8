"""The snapshot store: named KV states kept as shared chunks, so saving every turn costs only the new tokens.

A store is a folder (``kvstore.store_dir``: layout, lock, atomic writes) of
chunk files (``kvstore.chunk_file``), trace blocks (``kvstore.blocks``) and
entries (``kvstore.entry_file``): an entry is a state's header plus the chain
of chunks that hold its K/V (``kvstore.chunking``: how a state is cut, named
and put back together). Saving writes the chunks and blocks that are not
there yet, then the entry; loading reads the entry, checks every chunk it
names (present, its header hashing to its name and to the entry's digest, its
layout adding up to the entry's layers) before anything is allocated, then
decodes the chunks in parallel straight into the state's tensors, checking
every record's CRC-32 and SHA-256 on the way.

    store = Store.open("~/kv", create=True)
    store.save(state, "chat-t2", parent="chat-t1")   # writes only what chat-t1 lacks
    state = store.load("chat-t2", expected=fingerprint)
    store.entries(); store.gc()
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore import format as fmt
from kvstore.atomic import fsync_folder
from kvstore.blocks import BLOCK, encode_block, split
from kvstore.blocks import parse_header as parse_block_header
from kvstore.chunk_file import CHUNK, ChunkHeader, assemble, encode_frames, parse_header
from kvstore.chunking import Placement, chunk_key, content_digest, context_digest, group_tensors, place, plan_ranges
from kvstore.codecs import DTYPE_NAMES, make_codec
from kvstore.entry_file import ENTRY, BlockRef, ChunkRef, Entry, RangeRef, check_name, encode_entry, parse_entry
from kvstore.errors import CorruptError, SnapshotError
from kvstore.header import HeaderDefect, encode_header
from kvstore.metadata import plain
from kvstore.pipeline import Scratch, byte_view, default_threads, in_order
from kvstore.records import Record, RecordSpec, check_checksum, locate_records, read_header, read_payload
from kvstore.safe_io import open_regular, reason
from kvstore.snapshot import SnapshotInfo, check_fingerprint, check_savable
from kvstore.state import KVState
from kvstore.store_dir import VERSION, StoreDir, default_store_path
from kvstore.verify import VerifyReport

__all__ = ["Store", "SavedEntry", "EntryInfo", "Collected", "default_store_path"]


@dataclass(frozen=True)
class SavedEntry:
    name: str
    written: int  # bytes of the files this save added
    shared: int  # bytes of existing chunks and blocks it reuses
    new_chunks: int
    reused_chunks: int


@dataclass(frozen=True)
class EntryInfo:
    """One line of ``kvtrace ls`` and one node of the app's history."""

    name: str
    parent: str | None
    saved: float  # when the entry was written, Unix seconds (0: unknown)
    label: str
    tokens: int
    cached: int
    model: str
    fingerprint: Any  # ModelFingerprint
    own_bytes: int  # bytes of chunks and blocks no other entry uses
    shared_bytes: int  # bytes of chunks and blocks other entries use too
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)
    error: str | None = None  # the entry cannot be read (the other fields are empty)


@dataclass(frozen=True)
class Collected:
    """What ``gc`` did."""

    removed: int  # chunk and block files
    freed: int  # their bytes
    kept: int
    temporaries: int


@dataclass
class _Opened:
    """A chunk file opened for reading, its header checked against the entry."""

    file: Any
    header: ChunkHeader
    records: list[Record]


class Store:
    """A snapshot store folder (see the module docstring)."""

    def __init__(self, folder: StoreDir) -> None:
        self._dir = folder

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> Store:
        """The store at ``path`` (``create``: make it when the folder does not exist or is empty)."""
        return cls(StoreDir.open(path, create=create))

    @property
    def path(self) -> Path:
        return self._dir.root

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}"

    # ------------------------------------------------------------------------------- saving
    def save(self, state: KVState, name: str, *, codec: str = fmt.DEFAULT_CODEC, parent: str | None = None,
             threads: int | None = None) -> SavedEntry:
        """Save ``state`` as entry ``name`` (replacing one of that name), writing only chunks not yet stored.

        ``parent`` (an entry of this store, recorded for ``ls`` and the app's
        history) is also where the cut into ranges starts from, so a save after
        one more turn shares every chunk of the turn before.
        """
        check_name(name)
        if parent is not None:
            check_name(parent)
        check_savable(state)
        chosen = make_codec(codec)
        header_bytes = encode_header(state, chosen)
        dtype = state.keys[0].dtype
        context = context_digest(state.fingerprint.to_dict(), chosen.name, chosen.params, DTYPE_NAMES[dtype])
        state = _on_cpu(state)
        threads = threads or default_threads()
        scores = state.head_scores is not None
        tally = {"written": 0, "shared": 0, "new": 0, "reused": 0}
        try:
            with self._dir.locked():
                plans = plan_ranges(state, context, self._hint(parent, name))
                jobs = [(plan, group, group_tensors(state, group)) for plan in plans for group in plan.groups]
                contents = list(in_order([lambda p=p: content_digest(p) for _, _, p in jobs], threads))
                refs: dict[int, list[ChunkRef]] = {}
                for (plan, group, pieces), content in zip(jobs, contents):
                    key = chunk_key(context, plan.link, plan.start, plan.end, group.layers, group.layout, scores,
                                    content)

                    def build(plan=plan, group=group, pieces=pieces, content=content) -> tuple[bytes, bytes]:
                        frames = list(in_order(encode_frames(pieces, chosen), threads))
                        return assemble(context, plan.link, plan.start, plan.end, group, state.keys[0].shape[2],
                                        dtype, chosen, scores, content, frames)

                    refs.setdefault(plan.start, []).append(self._store_content("chunks", key, build, tally))
                ranges = [RangeRef(p.start, p.end, p.link, tuple(refs.get(p.start, []))) for p in plans]
                blocks = []
                for data in split(state.trace or b""):
                    digest, encoded = encode_block(data)
                    ref = self._store_content("blocks", digest, lambda e=encoded, d=digest: (e, d), tally)
                    blocks.append(BlockRef(digest, len(data), ref.size))
                entry = encode_entry(parent, time.time(), header_bytes, ranges, blocks)
                self._sync_content()
                self._dir.replace(entry, self._dir.entry_path(name))
                tally["written"] += len(entry)
        except OSError as error:
            raise SnapshotError(f"cannot save to the snapshot store {self.path}: {reason(error)}") from None
        return SavedEntry(name, tally["written"], tally["shared"], tally["new"], tally["reused"])

    def _hint(self, parent: str | None, name: str) -> list[tuple[int, int, bytes]]:
        """The ranges of the parent entry (else of the entry being replaced) to cut the new state the same way."""
        for candidate in (parent, name):
            if candidate is None or not self._dir.entry_path(candidate).exists():
                continue
            try:
                return [(r.start, r.end, r.link) for r in self.read(candidate).ranges]
            except SnapshotError:
                continue
        return []

    def _store_content(self, kind: str, digest: bytes, build: Callable[[], tuple[bytes, bytes]],
                       tally: dict[str, int]) -> ChunkRef:
        """A reference to the chunk or block ``digest``: the stored one when intact, else ``build()``'s
        ``(file bytes, header digest)`` written now (a block's "header digest" is its own digest)."""
        path = self._dir.content_path(kind, digest)
        existing = self._intact(kind, digest, path)
        if existing is None:
            data, header_digest = build()
            if not self._dir.publish(data, path):  # another save wrote it meanwhile, or a damaged copy is there
                existing = self._intact(kind, digest, path)
                if existing is None:
                    self._dir.replace(data, path)
            if existing is None:
                tally["written"] += len(data)
                tally["new"] += kind == "chunks"
                return ChunkRef(digest, header_digest, len(data))
        tally["shared"] += existing.size
        tally["reused"] += kind == "chunks"
        return existing

    def _intact(self, kind: str, digest: bytes, path: Path) -> ChunkRef | None:
        """The stored file's reference when its header and record layout are intact (payloads are not read)."""
        try:
            with open_regular(path, "store file") as f:
                size = os.fstat(f.fileno()).st_size
                if kind == "blocks":
                    _, data, start = read_header(f, size, path, BLOCK)
                    found, length = parse_block_header(data)
                    locate_records(f.fileno(), start, size, [RecordSpec("the block", length, "trace")], BLOCK.end)
                    return ChunkRef(digest, digest, size) if found == digest else None
                _, data, start = read_header(f, size, path, CHUNK)
                header = parse_header(data)
                locate_records(f.fileno(), start, size, header.specs, CHUNK.end)
        except (SnapshotError, HeaderDefect):
            return None
        if header.key != digest or header.computed_key() != digest:
            return None
        return ChunkRef(digest, hashlib.sha256(data).digest(), size)

    def _sync_content(self) -> None:
        """Make the links of new chunks and blocks durable before an entry names them."""
        for kind in ("chunks", "blocks"):
            for sub in (self.path / kind).iterdir():
                fsync_folder(sub)

    # ------------------------------------------------------------------------------- reading
    def read(self, name: str) -> Entry:
        """Entry ``name``'s parsed document (its header and chunk references; no chunk is opened)."""
        check_name(name)
        path = self._dir.entry_path(name)
        if not path.exists():
            raise SnapshotError(f"the snapshot store {self.path} has no entry {name!r}")
        try:
            with open_regular(path, "store entry") as f:
                size = os.fstat(f.fileno()).st_size
                _, data, start = read_header(f, size, path, ENTRY)
                locate_records(f.fileno(), start, size, [], ENTRY.end)
            return parse_entry(data)
        except CorruptError as error:
            raise SnapshotError(f"the store entry {self._where(name)} is damaged: {error.reason}") from None

    def info(self, name: str) -> SnapshotInfo:
        """Entry ``name`` described like a ``.kvs`` file's header (``kvtrace info``, the app's history)."""
        entry = self.read(name)
        h = entry.header
        size = self._dir.entry_path(name).stat().st_size
        return SnapshotInfo(
            path=Path(self._where(name)), format_version=VERSION, codec=h.codec.name,
            codec_params=dict(h.codec.params), dtype=DTYPE_NAMES[h.dtype], fingerprint=h.fingerprint,
            token_ids=h.token_ids, positions=h.positions, metadata=h.metadata, label=h.label, created=h.created,
            num_layers=len(h.layers), has_attention_scores=h.attention_scores is not None, raw_bytes=h.raw_bytes,
            file_bytes=size + sum(c.size for c in entry.chunk_refs) + sum(b.size for b in entry.blocks),
            layer_entries=[spec.entries for spec in h.layers], per_head=any(s.head_positions for s in h.layers),
            has_head_scores=any(s.head_scores for s in h.layers), trace_bytes=h.trace_bytes,
            state_bytes=h.state_bytes, container="kvtrace store entry",
        )

    def load(self, name: str, *, expected: Any = None, max_bytes: int | None = None, max_tokens: int | None = None,
             device: str | torch.device | None = None, threads: int | None = None) -> KVState:
        """Entry ``name`` as a state; refused (``SnapshotError``) before any payload is decoded when it cannot fit.

        The arguments mean what they mean for ``kvstore.snapshot.load``.
        """
        entry = self.read(name)
        header = entry.header
        if expected is not None:
            check_fingerprint(header.fingerprint, expected)
        if max_tokens is not None and len(header.token_ids) > max_tokens:
            raise SnapshotError(f"the snapshot's transcript is {len(header.token_ids)} tokens long, more than "
                                f"the {max_tokens} tokens the model takes")
        target = torch.device(device or "cpu")
        with self._dir.locked():
            opened = self._open_chunks(name, entry)
            try:
                placements, tables = self._place(name, entry, opened)
                threads = self._threads_within(entry, opened, fmt.default_max_bytes() if max_bytes is None
                                               else max_bytes, threads or default_threads())
                state = self._decode(name, entry, opened, placements, tables, threads)
                state.trace = self._trace(name, entry)
            finally:
                for chunk in opened:
                    chunk.file.close()
        try:
            state.validate()
        except ValueError as error:
            raise SnapshotError(f"the store entry {self._where(name)} is damaged: {error}") from None
        if target.type != "cpu":
            state.keys = [k.to(target) for k in state.keys]
            state.values = [v.to(target) for v in state.values]
        return state

    def verify(self, name: str, *, deep: bool = False, threads: int | None = None) -> VerifyReport:
        """Check every chunk and trace block entry ``name`` uses; ``SnapshotError`` naming the first damage.

        Every record's CRC-32 and SHA-256 (``deep``: also that it decompresses to
        its exact size), every chunk header against its name and the entry, and
        that the chunks add up to the entry's layers. Memory stays constant.
        """
        entry = self.read(name)
        with self._dir.locked():
            opened = self._open_chunks(name, entry)
            try:
                self._place(name, entry, opened)
                tasks = [lambda c=c, i=i, r=r: self._check_record(name, c, i, r, None if not deep else False)
                         for c in opened for i, r in enumerate(c.records)]
                for _ in in_order(tasks, threads or default_threads()):
                    pass
            finally:
                for chunk in opened:
                    chunk.file.close()
            self._trace(name, entry)
        records = [r for c in opened for r in c.records]
        return VerifyReport(
            format_version=VERSION,
            records=len(records) + len(entry.blocks),
            stored_bytes=sum(r.length for r in records) + sum(b.size for b in entry.blocks),
            decoded_bytes=sum(r.spec.decoded for r in records) + sum(b.length for b in entry.blocks) if deep else 0,
            deep=deep,
        )

    def _damaged(self, name: str, what: str, problem: str) -> SnapshotError:
        return SnapshotError(f"the store entry {self._where(name)} is damaged: {what}: {problem}")

    def _open_chunks(self, name: str, entry: Entry) -> list[_Opened]:
        """Every chunk the entry names, opened, its header and record layout checked against the entry."""
        opened: list[_Opened] = []
        try:
            for r in entry.ranges:
                for ref in r.chunks:
                    what = _chunk_name(ref.key, r.start, r.end)
                    path = self._dir.content_path("chunks", ref.key)
                    if not path.exists():
                        raise SnapshotError(f"the store entry {self._where(name)} names {what}, which is missing "
                                            "from the store")
                    f = open_regular(path, "store chunk")
                    try:
                        size = os.fstat(f.fileno()).st_size
                        _, data, start = read_header(f, size, path, CHUNK)
                        header = parse_header(data)
                        problem = _mismatch(header, hashlib.sha256(data).digest(), ref, r, entry)
                        if problem:
                            raise self._damaged(name, what, problem)
                        records = locate_records(f.fileno(), start, size, header.specs, CHUNK.end)
                    except (CorruptError, HeaderDefect) as error:
                        f.close()
                        raise self._damaged(name, what, getattr(error, "reason", str(error))) from None
                    except BaseException:
                        f.close()
                        raise
                    opened.append(_Opened(f, header, records))
        except BaseException:
            for chunk in opened:
                chunk.file.close()
            raise
        return opened

    def _place(self, name: str, entry: Entry, opened: Sequence[_Opened]
               ) -> tuple[list[list[Placement]], list[torch.Tensor | None]]:
        """Where every chunk's entries go, and the per-head position tables; checked against the header."""
        h = entry.header
        chunks = [(c.header.start, c.header.end, c.header.layers, c.header.layout) for c in opened]
        placements, rows = place(chunks, [s.entries for s in h.layers],
                                 lambda problem: SnapshotError(f"the store entry {self._where(name)} is damaged: "
                                                               f"{problem}"))
        positions = np.asarray(h.positions, dtype=np.int64)
        tables: list[torch.Tensor | None] = []
        for layer, spec in enumerate(h.layers):
            table = np.stack(rows[layer]) if spec.entries else np.zeros((spec.key[0], 0), dtype=np.int64)
            if spec.head_positions:
                tables.append(torch.from_numpy(table))
                continue
            tail = positions[len(positions) - spec.entries:]
            if table.shape != (spec.key[0], spec.entries) or not (table == tail).all():
                raise SnapshotError(f"the store entry {self._where(name)} is damaged: layer {layer}'s chunks do not "
                                    "hold its last cached positions")
            tables.append(None)
        return placements, tables

    def _threads_within(self, entry: Entry, opened: Sequence[_Opened], budget: int, threads: int) -> int:
        """As many decoding threads as the memory budget allows after the state itself; refused if none fits."""
        h = entry.header
        specs = [(c.header, spec) for c in opened for spec in c.header.specs]
        biggest = max((spec.decoded for _, spec in specs), default=0)
        if biggest > fmt.MAX_PAYLOAD_BYTES:
            raise SnapshotError(f"the store entry declares a record of {biggest} bytes, more than the format's "
                                f"{fmt.MAX_PAYLOAD_BYTES}")
        work = biggest + max((header.codec.work_bytes((heads, count, header.head_dim), header.dtype, spec.kind)
                              for header, spec in specs for heads, count in header.units), default=0)
        need = h.state_bytes
        if need + work > budget:
            raise SnapshotError(f"loading the snapshot needs {(need + work) / 2**20:.1f} MiB of memory, more than "
                                f"the limit of {budget / 2**20:.1f} MiB")
        threads = max(1, min(threads, len(specs) or 1))
        while threads > 1 and need + threads * work > budget:
            threads -= 1
        return threads

    def _decode(self, name: str, entry: Entry, opened: Sequence[_Opened], placements: list[list[Placement]],
                tables: list[torch.Tensor | None], threads: int) -> KVState:
        h = entry.header
        keys = [torch.empty(h.shape(layer, "key"), dtype=h.dtype) for layer in range(len(h.layers))]
        values = [torch.empty(h.shape(layer, "value"), dtype=h.dtype) for layer in range(len(h.layers))]
        has_scores = any(spec.head_scores for spec in h.layers)
        scores = [torch.empty((s.key[0], s.entries), dtype=torch.float32) for s in h.layers] if has_scores else None
        outputs = {"key": keys, "value": values, "scores": scores}
        scratch = Scratch()

        def decode(chunk: _Opened, index: int, record: Record, where: Placement) -> None:
            buffer = scratch.get(record.spec.decoded)
            self._check_record(name, chunk, index, record, byte_view(buffer))
            out, kind = outputs[record.spec.kind][where.layer], record.spec.kind
            header, offset, head = chunk.header, 0, 0
            for unit, (heads, count) in enumerate(header.units):
                firsts = where.first[head:head + heads]
                if all(first == firsts[0] for first in firsts):  # the unit's place is one slice of the layer
                    into, first = out[head:head + heads, firsts[0]:firsts[0] + count], None
                else:  # a shared layout whose heads sit at different offsets (after per-head pruning)
                    into = torch.empty((heads, count, *out.shape[2:]), dtype=out.dtype)
                    first = firsts
                size = header.unit_bytes[kind][unit]
                if kind == "scores":
                    into.copy_(buffer[offset:offset + size].view(torch.float32).view(heads, count))
                else:
                    header.codec.decode_into(buffer[offset:offset + size], into, kind)
                if first is not None:
                    for i, start in enumerate(first):
                        out[head + i, start:start + count] = into[i]
                offset += size
                head += heads

        def decode_chunk(chunk: _Opened, placed: list[Placement]) -> None:
            per_layer = {p.layer: p for p in placed}
            for index, record in enumerate(chunk.records):
                decode(chunk, index, record, per_layer[record.spec.layer])

        for _ in in_order([lambda c=c, p=p: decode_chunk(c, p) for c, p in zip(opened, placements)], threads):
            pass
        return KVState(
            keys=keys, values=values, token_ids=h.token_ids, positions=h.positions, fingerprint=h.fingerprint,
            attention_scores=h.attention_scores, metadata=h.metadata,
            head_positions=tables if any(t is not None for t in tables) else None, head_scores=scores,
        )

    def _check_record(self, name: str, chunk: _Opened, index: int, record: Record,
                      out: memoryview | None | bool) -> None:
        """Read one record and check its CRC-32 and SHA-256: ``None``: only that; ``False``: also that it decodes
        (to nowhere); a buffer: decode it there."""
        digest = hashlib.sha256()
        fd = chunk.file.fileno()
        try:
            if out is None:
                check_checksum(fd, record, digest)
            else:
                read_payload(fd, record, None if out is False else out, digest)
        except CorruptError as error:
            raise self._damaged(name, _chunk_name(chunk.header.key, chunk.header.start, chunk.header.end),
                                error.reason) from None
        if digest.digest() != chunk.header.records[index]:
            raise self._damaged(name, _chunk_name(chunk.header.key, chunk.header.start, chunk.header.end),
                                f"the content hash of {record.spec.name} does not match")

    def _trace(self, name: str, entry: Entry) -> bytes | None:
        """The entry's trace from its blocks, every block checked against its digest."""
        if entry.header.trace_bytes is None:
            return None
        trace = bytearray(entry.header.trace_bytes)
        offset = 0
        for ref in entry.blocks:
            what = f"trace block {ref.digest.hex()[:12]}"
            path = self._dir.content_path("blocks", ref.digest)
            if not path.exists():
                raise SnapshotError(f"the store entry {self._where(name)} names {what}, which is missing from the "
                                    "store")
            try:
                with open_regular(path, "store block") as f:
                    size = os.fstat(f.fileno()).st_size
                    _, data, start = read_header(f, size, path, BLOCK)
                    digest, length = parse_block_header(data)
                    if digest != ref.digest or length != ref.length:
                        raise self._damaged(name, what, "its header does not match the entry")
                    spec = RecordSpec("the trace block", length, "trace")
                    [record] = locate_records(f.fileno(), start, size, [spec], BLOCK.end)
                    view = memoryview(trace)[offset:offset + length]
                    read_payload(f.fileno(), record, view)
            except (CorruptError, HeaderDefect) as error:
                raise self._damaged(name, what, getattr(error, "reason", str(error))) from None
            if hashlib.sha256(view).digest() != ref.digest:
                raise self._damaged(name, what, "its content hash does not match")
            offset += length
        return bytes(trace)

    # ------------------------------------------------------------------------------- listing
    def entries(self) -> list[EntryInfo]:
        """Every entry, newest first, with the bytes it shares with others and the bytes only it uses."""
        read: list[tuple[str, Entry | None, str | None]] = []
        for name in self._dir.entry_names():
            try:
                read.append((name, self.read(name), None))
            except SnapshotError as error:
                read.append((name, None, str(error)))
        users: dict[bytes, int] = {}
        for _, entry, _ in read:
            for digest in {ref.key for ref in entry.chunk_refs} | {b.digest for b in entry.blocks} if entry else ():
                users[digest] = users.get(digest, 0) + 1
        infos = []
        for name, entry, error in read:
            if entry is None:
                infos.append(EntryInfo(name, None, 0.0, "", 0, 0, "", None, 0, 0, error=error))
                continue
            sizes = {ref.key: ref.size for ref in entry.chunk_refs} | {b.digest: b.size for b in entry.blocks}
            own = sum(size for digest, size in sizes.items() if users[digest] == 1)
            h = entry.header
            metadata = {k: v for k, v in h.metadata.items() if k in ("messages", "reply", "label") and plain(v)}
            infos.append(EntryInfo(name, entry.parent, entry.saved, h.label, len(h.token_ids), h.cache_length,
                                   h.fingerprint.model_id, h.fingerprint, own,
                                   sum(sizes.values()) - own, metadata))
        return sorted(infos, key=lambda i: (-i.saved, i.name))

    def remove(self, name: str) -> None:
        """Delete entry ``name`` (its chunks stay until ``gc``)."""
        check_name(name)
        with self._dir.locked():
            try:
                os.unlink(self._dir.entry_path(name))
            except FileNotFoundError:
                raise SnapshotError(f"the snapshot store {self.path} has no entry {name!r}") from None
            except OSError as error:
                raise SnapshotError(f"cannot remove {self._where(name)}: {reason(error)}") from None

    def gc(self) -> Collected:
        """Delete the chunks and blocks no entry uses, and temporaries of killed saves.

        Runs under the store's exclusive lock (it waits for running saves and
        loads, and they for it). Refused while an entry is unreadable: what it
        uses cannot be known, so nothing is deleted.
        """
        with self._dir.locked(exclusive=True):
            used: set[bytes] = set()
            for name in self._dir.entry_names():
                try:
                    entry = self.read(name)
                except SnapshotError as error:
                    raise SnapshotError(f"cannot collect garbage while an entry is unreadable ({error}); remove it "
                                        f"with kvtrace rm {self._where(name)}") from None
                used |= {ref.key for ref in entry.chunk_refs} | {b.digest for b in entry.blocks}
            removed = freed = kept = 0
            for kind in ("chunks", "blocks"):
                for digest, path in list(self._dir.content_files(kind)):
                    if digest in used:
                        kept += 1
                        continue
                    freed += path.stat().st_size
                    path.unlink()
                    removed += 1
            temporaries = self._dir.temporaries()
            for path in temporaries:
                path.unlink()
        return Collected(removed, freed, kept, len(temporaries))


def _on_cpu(state: KVState) -> KVState:
    """``state`` with its tensors in host memory (chunks are cut from them many times)."""
    if all(t.device.type == "cpu" for t in (*state.keys, *state.values)):
        return state
    return replace(state, keys=[k.detach().cpu() for k in state.keys], values=[v.detach().cpu() for v in state.values],
                   head_positions=None if state.head_positions is None
                   else [None if t is None else t.cpu() for t in state.head_positions],
                   head_scores=None if state.head_scores is None else [t.cpu() for t in state.head_scores])


def _chunk_name(key: bytes, start: int, end: int) -> str:
    return f"chunk {key.hex()[:12]} (positions {start}-{end - 1})"


def _mismatch(header: ChunkHeader, digest: bytes, ref: ChunkRef, r: RangeRef, entry: Entry) -> str | None:
    """Why a chunk's header does not belong where the entry puts it (None: it does)."""
    h = entry.header
    if digest != ref.digest:
        return "its header does not match the digest the entry records"
    if header.key != ref.key or header.computed_key() != ref.key:
        return "its header does not hash to its name"
    if (header.start, header.end, header.link, header.context) != (r.start, r.end, r.link, entry.context):
        return "it belongs to another range or conversation"
    if header.codec != h.codec or header.dtype != h.dtype or header.head_scores != any(s.head_scores for s in h.layers):
        return "its codec, dtype or scores differ from the entry's"
    if header.layers[-1] >= len(h.layers) or any(
            (header.layout.heads, header.head_dim) != h.layers[layer].key for layer in header.layers):
        return "its layers or shapes differ from the entry's"
    return None
