"""What the load dialog shows about a snapshot before loading it (the same facts as ``kvtrace info``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from kvstore.errors import SnapshotError
from kvstore.snapshot import read_info
from kvstore.state import ModelFingerprint
from tui_app.formatting import byte_count


def describe_snapshot(path: str, model: ModelFingerprint, decode: Callable[[list[int]], str] | None = None) -> str:
    """The header of the snapshot at ``path``, and whether it fits ``model``; never raises."""
    try:
        info = read_info(path)
    except (SnapshotError, OSError) as error:
        return f"Cannot read this snapshot: {error}"
    fp = info.fingerprint
    lines = [
        f"file       {info.path}  (format v{info.format_version})",
        f"model      {fp.model_id} · {fp.architecture} · {fp.num_layers} layers · {fp.num_kv_heads} KV heads "
        f"· head_dim {fp.head_dim} · {info.dtype}",
        f"codec      {info.codec}" + (f" {info.codec_params}" if info.codec_params else ""),
        f"tokens     {len(info.token_ids)} (next position {info.next_position}); cached entries "
        f"{info.cache_length}" + (" (pruned)" if info.cache_length < info.next_position else ""),
        f"size       file {byte_count(info.file_bytes)}, K/V raw {byte_count(info.raw_bytes)} "
        f"(ratio {info.ratio:.2f})",
        f"created    {datetime.fromtimestamp(info.created):%Y-%m-%d %H:%M:%S}" if info.created else "created    –",
    ]
    if info.label:
        lines.append(f"label      {info.label}")
    differences = model.differences(fp)
    if differences:
        lines.append("")
        lines.append("This snapshot was made by another model and cannot be loaded into this one:")
        lines.extend(f"  {d}" for d in differences)
    elif decode is not None:
        text = decode(info.token_ids)
        lines += ["", "text:", text if len(text) <= 600 else "…" + text[-600:]]
    return "\n".join(lines)
