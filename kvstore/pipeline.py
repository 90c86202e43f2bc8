"""Parallel codec work: payloads encoded for a save and decoded for a load by a thread pool.

zstandard, ``zlib.crc32``, ``os.pread`` and torch's copy kernels release the
GIL, so with N threads about N payloads are compressed or decompressed at
once. Results come back in file order with at most a few payloads in flight,
so memory stays bounded; the failure reported is the first in file order.

Decoding writes into tensors allocated before any payload is read (the reader
knows every size from the header): ``raw`` payloads are decompressed straight
into them, the other codecs go through one reusable buffer per thread. When
the caller wants CUDA tensors, the outputs are pinned and each one is copied
to the device asynchronously as soon as it is decoded, overlapping the copies
with the decoding of later layers.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from kvstore.codecs import ROLES, Codec
from kvstore.compression import compress
from kvstore.header import Header
from kvstore.records import Record, read_payload
from kvstore.state import KVState

T = TypeVar("T")


def default_threads() -> int:
    """One thread per core, at most 8 (beyond that, reading the file is the limit)."""
    return max(1, min(8, os.cpu_count() or 1))


def in_order(tasks: Iterable[Callable[[], T]], threads: int) -> Iterator[T]:
    """Run ``tasks`` on ``threads`` threads; yield their results in order, 2 x threads in flight at most.

    The first task (in order) that raises ends the run: its exception is
    raised and the tasks not yet started are dropped.
    """
    if threads <= 1:
        for task in tasks:
            yield task()
        return
    pending: deque[Future[T]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="kvstore") as pool:
        try:
            for task in tasks:
                pending.append(pool.submit(task))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class Scratch:
    """One growing byte buffer per thread, reused for every payload that thread decodes."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._local.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes]


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (any dtype, bfloat16 included)."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def encoded_frames(state: KVState, codec: Codec, threads: int) -> Iterator[bytes]:
    """The compressed payload of every record of ``state``, in file order (see Header.records)."""
    def frame(chunks: Callable[[], list[torch.Tensor]], level: int) -> Callable[[], bytes]:
        return lambda: compress(chunks(), level)

    def table(tensor: torch.Tensor, dtype: str) -> Callable[[], list[torch.Tensor]]:
        return lambda: [torch.from_numpy(tensor.detach().cpu().numpy().astype(dtype).view(np.uint8).reshape(-1))]

    tasks = []
    for layer, (key, value) in enumerate(zip(state.keys, state.values)):
        for role, tensor in (("key", key), ("value", value)):
            tasks.append(frame(lambda t=tensor, r=role: codec.encode(t.detach().cpu(), r), codec.level))
        if state.head_positions is not None and state.head_positions[layer] is not None:
            tasks.append(frame(table(state.head_positions[layer], "<u4"), codec.level))
        if state.head_scores is not None:
            tasks.append(frame(table(state.head_scores[layer], "<f4"), codec.level))
    if state.trace is not None:
        trace = state.trace
        tasks.append(frame(lambda: [torch.frombuffer(bytearray(trace), dtype=torch.uint8)], codec.level))
    return in_order(tasks, threads)


@dataclass
class Decoded:
    """The tensors and blobs of a snapshot's records, as ``decode_records`` fills them."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    head_positions: list[torch.Tensor | None] | None
    head_scores: list[torch.Tensor] | None
    trace: bytes | None


def decode_records(fd: int, header: Header, records: list[Record], threads: int,
                   device: torch.device) -> Decoded:
    """Every record of the file decoded into tensors allocated up front (K and V on ``device``)."""
    pin = device.type == "cuda"
    codec = header.codec

    def empty(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool = False) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)

    count = len(header.layers)
    outputs = {role: [empty(header.shape(layer, role), header.dtype, pin) for layer in range(count)]
               for role in ROLES}
    tables = {"positions": [None] * count, "scores": [None] * count}
    for layer, spec in enumerate(header.layers):
        if spec.head_positions:
            tables["positions"][layer] = empty((spec.key[0], spec.entries), torch.int64)
        if spec.head_scores:
            tables["scores"][layer] = empty((spec.key[0], spec.entries), torch.float32)
    trace = bytearray(header.trace_bytes) if header.trace_bytes is not None else None
    scratch = Scratch()

    def decode(record: Record) -> None:
        spec = record.spec
        if spec.kind == "trace":
            read_payload(fd, record, memoryview(trace))
        elif spec.kind == "scores":
            read_payload(fd, record, byte_view(tables["scores"][spec.layer]))  # f32, little-endian host
        elif spec.kind == "positions":
            buffer = scratch.get(spec.decoded)
            read_payload(fd, record, byte_view(buffer))
            table = tables["positions"][spec.layer]
            table.view(-1).copy_(torch.from_numpy(buffer.numpy().view("<u4").astype(np.int64)))
        elif codec.direct:
            read_payload(fd, record, byte_view(outputs[spec.kind][spec.layer]))
        else:
            buffer = scratch.get(spec.decoded)
            read_payload(fd, record, byte_view(buffer))
            codec.decode_into(buffer, outputs[spec.kind][spec.layer], spec.kind)

    tasks = [lambda r=record: decode(r) for record in records]
    moved = {role: list(tensors) for role, tensors in outputs.items()}
    for record, _ in zip(records, in_order(tasks, threads), strict=True):
        if device.type != "cpu" and record.spec.kind in moved:
            layer = record.spec.layer
            moved[record.spec.kind][layer] = outputs[record.spec.kind][layer].to(device, non_blocking=pin)
    if pin:
        torch.cuda.synchronize(device)  # the pinned buffers must outlive their copies
    has_positions = any(t is not None for t in tables["positions"])
    has_scores = any(spec.head_scores for spec in header.layers)
    return Decoded(
        keys=moved["key"],
        values=moved["value"],
        head_positions=tables["positions"] if has_positions else None,
        head_scores=tables["scores"] if has_scores else None,
        trace=None if trace is None else bytes(trace),
    )
