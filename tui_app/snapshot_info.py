"""What kvtrace says about a snapshot file: ``kvtrace info`` and the app's load dialog both use this.

Everything shown comes from the file, which may have been crafted: every
string is passed through ``printable`` so no control character or escape
sequence reaches the terminal, and ``summary`` only holds JSON-safe values.
"""

from __future__ import annotations

import math
import time
from typing import Any

from kvstore.snapshot import SnapshotInfo
from kvstore.state import ModelFingerprint
from tracer.token_text import printable
from tui_app.formatting import byte_count

PENDING = "⟨{}⟩"  # how the pending token (chosen, not yet fed) is marked in the transcript


def ranges(positions: list[int]) -> str:
    """``0-3, 20-39`` style summary of sorted positions."""
    if not positions:
        return "none"
    spans, start = [], positions[0]
    for a, b in zip(positions, [*positions[1:], None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans)


def created_text(created: float) -> str:
    if not math.isfinite(created) or not 0 <= created < 2**37:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))


def transcript(info: SnapshotInfo) -> str | None:
    """The transcript with uncached stretches marked, so pruning is visible (``None``: no texts stored)."""
    texts = info.metadata.get("token_texts")
    count = len(info.token_ids)
    if not (isinstance(texts, list) and len(texts) == count and all(isinstance(t, str) for t in texts)):
        return None
    cached = set(info.positions)
    out, dropped = [], 0
    for position, text in enumerate(texts):
        if position in cached or position == count - 1:
            if dropped:
                out.append(f"[…{dropped} pruned…]")
                dropped = 0
            out.append(text if position < count - 1 else PENDING.format(text))
        else:
            dropped += 1
    return printable("".join(out), keep_newlines=True)


def messages(info: SnapshotInfo) -> list[dict[str, str]]:
    """The chat messages the file carries, those of the expected shape only."""
    found = info.metadata.get("messages")
    if not isinstance(found, list):
        return []
    return [m for m in found if isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)]


def _plain(value: Any) -> Any:
    """A JSON-safe copy (bytes become hex, odd keys strings)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, bytes) else k.hex(): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def summary(info: SnapshotInfo, resume_model: str | None = None) -> dict[str, Any]:
    """Everything ``kvtrace info --json`` prints."""
    sampling = info.metadata.get("sampling")
    return _plain({
        "file": str(info.path),
        "format_version": info.format_version,
        "codec": info.codec,
        "codec_params": info.codec_params,
        "dtype": info.dtype,
        "model": info.fingerprint.to_dict(),
        "resume_loads": resume_model,
        "tokens": len(info.token_ids),
        "cache_entries": info.cache_length,
        "cached_positions": ranges(info.positions),
        "per_head": info.per_head,
        "entries_per_layer": info.layer_entries,
        "next_position": info.next_position,
        "label": info.label,
        "created": created_text(info.created),
        "raw_bytes": info.raw_bytes,
        "file_bytes": info.file_bytes,
        "ratio": round(info.ratio, 4),
        "attention_scores": info.has_attention_scores,
        "messages": messages(info),
        "sampling": sampling if isinstance(sampling, dict) else None,
        "text": transcript(info),
    })


def lines(info: SnapshotInfo, *, model: ModelFingerprint | None = None, resume_model: str | None = None,
          checked: str | None = None) -> list[str]:
    """The human-readable description, safe to print; with ``model``, whether the snapshot fits it."""
    fp = info.fingerprint
    params = info.codec_params
    shown_params = f" ({', '.join(f'{k} {v}' for k, v in params.items())})" if any(params.values()) else ""
    out = [
        f"file:     {info.path} ({info.container} v{info.format_version}), {info.label or 'no label'}, "
        f"created {created_text(info.created)}",
        f"tokens:   {len(info.token_ids)} in the transcript, {info.cache_length} cached "
        f"(positions {ranges(info.positions)}), next position {info.next_position}",
        *([f"per head: each KV head keeps its own {max(info.layer_entries)} entries (per-head pruning); the "
           "positions above are their union"] if info.per_head else []),
        f"model:    {fp.model_id} ({fp.architecture}, {fp.num_layers} layers, {fp.num_kv_heads} KV heads, "
        f"head dim {fp.head_dim}, {fp.dtype}, vocab {fp.vocab_size})",
        f"codec:    {info.codec}{shown_params}, stored from {info.dtype}",
        f"sizes:    {byte_count(info.file_bytes)} on disk, {byte_count(info.raw_bytes)} of K/V raw, "
        f"ratio {info.ratio:.3f}",
        f"messages: {len(messages(info))}; attention scores: {'yes' if info.has_attention_scores else 'no'}",
    ]
    if checked is not None:
        out.append(f"checked:  {checked}")
    if resume_model is not None:
        out.append(f"resume:   loads {resume_model}")
    if model is not None:
        differences = model.differences(fp)
        if differences:
            out += ["", "This snapshot was made by another model and cannot be loaded into this one:"]
            out += [f"  {d}" for d in differences]
    text = transcript(info)
    if text is not None:
        out += ["text:", text]
    else:  # saved without per-token texts: show the chat instead
        out += [f"{m['role']}: {m['content']}" for m in messages(info)]
    return [printable(line, keep_newlines=True) for line in out]
