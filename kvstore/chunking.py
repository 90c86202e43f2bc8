"""How the snapshot store cuts a KV state into chunks, names them, and puts them back together.

Pure tensor and hash logic, no files (``kvstore.store`` does the I/O).

* **Ranges.** The position space ``[0, next_position)`` is cut into ranges
  ``[start, end)``. A save first follows the ranges of a hint entry (the turn
  before, the line a branch left) for as long as its transcript matches, then
  cuts the rest at multiples of ``CHUNK_TOKENS``. So a conversation saved after
  every turn reuses every earlier range, its short last one included, and two
  saves of one prompt without a hint share every range of the common prefix
  but the one where they part.
* **Links.** Each range has a link, a hash of the previous range's link and of
  this range's bounds and token ids (the first chains from a hash of the model
  fingerprint, codec and dtype): the prefix identity of serving engines'
  prefix caches.
* **Groups.** Within a range, the layers that hold the same positions in every
  head (their *layout*: one bitmap row per KV head, or one shared row) share
  one chunk. Full-attention layers of an unpruned state form one group; a
  sliding-window layer whose window cuts the range forms another, so as the
  window slides only that small chunk is new, and the full layers' chunk is
  reused. Per-head pruned layers get the layout of what they keep, exactly.
* **Keys.** A chunk's key hashes its link, the context, its layers and layout,
  and the SHA-256 of its raw K/V (and per-head scores) bytes. The content
  digest makes reuse exact: two states with the same tokens but different
  cache contents (pruned at another time, computed elsewhere) never share a
  chunk, so every restore is bit for bit what was saved.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.state import KVState

CHUNK_TOKENS = 256  # positions per range on the grid (the last range of a save may be shorter)
ROOT = b"kvtrace-store/1 root"
LAYOUT_HEAD = struct.Struct("<HIB")  # heads, width, shared


@dataclass(frozen=True)
class Layout:
    """Which positions of a range ``[start, start + width)`` each KV head holds, as bitmap rows.

    ``bits`` holds ``rows`` rows of ``ceil(width / 8)`` bytes (numpy's packbits,
    most significant bit first, zero padding); ``rows`` is 1 when every head
    holds the same positions (``shared``), else ``heads``.
    """

    heads: int
    width: int
    shared: bool
    bits: bytes

    @property
    def rows(self) -> int:
        return 1 if self.shared else self.heads

    @property
    def row_bytes(self) -> int:
        return (self.width + 7) // 8

    def encoded(self) -> bytes:
        """The canonical bytes hashed into a chunk's key."""
        return LAYOUT_HEAD.pack(self.heads, self.width, self.shared) + self.bits

    def offsets(self) -> list[np.ndarray]:
        """Per head, the held positions as offsets from the range's start (int64, increasing)."""
        table = np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8).reshape(self.rows, self.row_bytes),
                              axis=1, count=self.width)
        rows = [np.flatnonzero(row).astype(np.int64) for row in table]
        return rows * self.heads if self.shared else rows

    def counts(self) -> list[int]:
        """Entries per head."""
        return [len(row) for row in self.offsets()]

    @classmethod
    def of(cls, rows: Sequence[np.ndarray], width: int) -> Layout:
        """The layout of per-head offset arrays (each increasing, within ``0..width-1``)."""
        table = np.zeros((len(rows), width), dtype=np.uint8)
        for head, row in enumerate(rows):
            table[head, row] = 1
        shared = bool((table == table[:1]).all())
        packed = np.packbits(table[:1] if shared else table, axis=1)
        return cls(len(rows), width, shared, packed.tobytes())


@dataclass(frozen=True)
class Piece:
    """Where one head's entries of one layer in a range sit in that layer's tensors: ``[first, first + count)``."""

    first: int
    count: int


@dataclass(frozen=True)
class Group:
    """Layers that hold the same positions of one range: one chunk."""

    layers: tuple[int, ...]
    layout: Layout
    pieces: dict[int, list[Piece]]  # per layer: one Piece per head


@dataclass(frozen=True)
class RangePlan:
    start: int
    end: int
    link: bytes
    groups: list[Group]


def context_digest(fingerprint: dict, codec: str, params: dict, dtype: str) -> bytes:
    """What a chunk's bytes mean: the model (its id aside: the same weights may load from anywhere), codec, dtype."""
    described = {k: v for k, v in fingerprint.items() if k != "model_id"}
    text = json.dumps([described, codec, params, dtype], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def root_link(context: bytes) -> bytes:
    return hashlib.sha256(ROOT + context).digest()


def next_link(previous: bytes, start: int, end: int, tokens: np.ndarray) -> bytes:
    """The link of range ``[start, end)`` whose token ids are ``tokens`` (uint32), after ``previous``."""
    return hashlib.sha256(previous + struct.pack("<II", start, end) + tokens.astype("<u4").tobytes()).digest()


def chunk_key(context: bytes, link: bytes, start: int, end: int, layers: Sequence[int], layout: Layout,
              head_scores: bool, content: bytes) -> bytes:
    parts = [b"kvtrace-store/1 chunk", context, link, struct.pack("<IIB", start, end, head_scores),
             np.asarray(layers, dtype="<u2").tobytes(), layout.encoded(), content]
    return hashlib.sha256(b"".join(struct.pack("<I", len(p)) + p for p in parts)).digest()


def plan_ranges(state: KVState, context: bytes, hint: Sequence[tuple[int, int, bytes]],
                chunk_tokens: int = CHUNK_TOKENS) -> list[RangePlan]:
    """The ranges and groups of ``state``; ``hint`` is another entry's ``(start, end, link)`` list to follow."""
    tokens = np.asarray(state.token_ids, dtype=np.int64)
    stop = state.next_position
    followed = {}
    previous = root_link(context)
    for start, end, link in hint:
        followed[(start, previous)] = (end, link)
        previous = link
    held = [state.layer_positions(layer).numpy() for layer in range(state.num_layers)]
    shared = [state.head_positions is None or state.head_positions[layer] is None
              for layer in range(state.num_layers)]
    plans, start, link = [], 0, root_link(context)
    while start < stop:
        end, candidate = followed.get((start, link), (None, None))
        if end is not None and end <= stop:
            following = next_link(link, start, end, tokens[start:end])
            if following != candidate:
                end = None
        if end is None or end <= start or end > stop:
            end = min((start // chunk_tokens + 1) * chunk_tokens, stop)
        link = next_link(link, start, end, tokens[start:end])
        plans.append(RangePlan(start, end, link, _groups(held, shared, start, end)))
        start = end
    return plans


def _groups(held: list[np.ndarray], shared: list[bool], start: int, end: int) -> list[Group]:
    """The layers of range ``[start, end)`` grouped by layout (layers holding nothing there left out)."""
    by_layout: dict[bytes, tuple[Layout, list[int], dict[int, list[Piece]]]] = {}
    for layer, table in enumerate(held):
        rows = table[:1] if shared[layer] else table
        firsts = [int(np.searchsorted(row, start)) for row in rows]
        lasts = [int(np.searchsorted(row, end)) for row in rows]
        if all(a == b for a, b in zip(firsts, lasts)):
            continue
        offsets = [row[a:b] - start for row, a, b in zip(rows, firsts, lasts)]
        heads = table.shape[0]
        if shared[layer]:
            offsets, firsts, lasts = offsets * heads, firsts * heads, lasts * heads
        layout = Layout.of(offsets, end - start)
        _, layers, pieces = by_layout.setdefault(layout.encoded(), (layout, [], {}))
        layers.append(layer)
        pieces[layer] = [Piece(a, b - a) for a, b in zip(firsts, lasts)]
    return [Group(tuple(layers), layout, pieces) for layout, layers, pieces in by_layout.values()]


def group_tensors(state: KVState, group: Group) -> list[tuple[int, str, list[torch.Tensor]]]:
    """``(layer, role, units)`` in record order: per layer its keys, values and (if any) scores.

    A record holds one unit per head, ``(1, count, head_dim)`` (scores:
    ``(1, count)``), when the heads hold different positions; when they hold
    the same (a shared layout: every unpruned or sliding layer) it holds one
    ``(heads, count, head_dim)`` unit, encoded as a ``.kvs`` file encodes a layer.
    """
    out = []
    for layer in group.layers:
        roles = [("key", state.keys[layer]), ("value", state.values[layer])]
        if state.head_scores is not None:
            roles.append(("scores", state.head_scores[layer].to(torch.float32)))
        pieces = group.pieces[layer]
        for role, tensor in roles:
            tensor = tensor.detach().cpu().contiguous()
            units = [tensor[h:h + 1, p.first:p.first + p.count] for h, p in enumerate(pieces)]
            if group.layout.shared:
                same = all(p.first == pieces[0].first for p in pieces)
                units = [tensor[:, pieces[0].first:pieces[0].first + pieces[0].count] if same
                         else torch.cat(units)]
            out.append((layer, role, units))
    return out


def content_digest(pieces: Sequence[tuple[int, str, list[torch.Tensor]]]) -> bytes:
    """SHA-256 of the raw bytes of every piece, in record order (sizes follow from the layout)."""
    digest = hashlib.sha256()
    for _, _, units in pieces:
        for unit in units:
            if unit.numel():
                digest.update(unit.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


@dataclass(frozen=True)
class Placement:
    """Where each head's entries of a chunk go in the state being rebuilt."""

    layer: int
    first: list[int]  # per head: index of the chunk's first entry in the layer's tensors
    count: list[int]  # per head


def place(chunks: Sequence[tuple[int, int, Sequence[int], Layout]], entries: Sequence[int],
          check: Callable[[str], Exception]) -> tuple[list[list[Placement]], list[list[np.ndarray]]]:
    """Placements of every chunk's layers, and every layer's per-head positions, from the chunks' headers.

    ``chunks`` are ``(start, end, layers, layout)`` in range order; ``entries``
    the entry count per layer. Raises ``check(reason)`` when they do not add
    up: a layer twice in one range, a head holding more or fewer entries than
    its layer declares.
    """
    filled: list[list[int] | None] = [None] * len(entries)  # per layer: entries so far per head
    positions: list[list[list[np.ndarray]]] = [[] for _ in entries]
    placements, last_range = [], [-1] * len(entries)
    for start, _, layers, layout in chunks:
        offsets = layout.offsets()
        counts = [len(row) for row in offsets]
        placed = []
        for layer in layers:
            if last_range[layer] == start:
                raise check(f"layer {layer} is stored twice for positions from {start}")
            last_range[layer] = start
            so_far = filled[layer]
            if so_far is None:
                so_far = filled[layer] = [0] * layout.heads
                positions[layer] = [[] for _ in range(layout.heads)]
            if layout.heads != len(so_far):
                raise check(f"the chunks of layer {layer} disagree on its number of heads")
            placed.append(Placement(layer, list(so_far), counts))
            for head, row in enumerate(offsets):
                so_far[head] += counts[head]
                if so_far[head] > entries[layer]:
                    raise check(f"layer {layer} holds more entries than the {entries[layer]} its header declares")
                positions[layer][head].append(row + start)
        placements.append(placed)
    for layer, total in enumerate(entries):
        held = filled[layer] or [0]
        if any(count != total for count in held):
            wrong = next(count for count in held if count != total)
            raise check(f"the chunks of layer {layer} hold {wrong} entries in some head, not the {total} its header "
                        "declares")
    tables = [[np.concatenate(rows) for rows in layer] for layer in positions]
    return placements, tables
