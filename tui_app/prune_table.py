"""The pruning preview as lines of text: one row per method, for ``kvtrace prune --preview`` and the app's
prune dialog (no textual here)."""

from __future__ import annotations

from collections.abc import Callable

from tracer.prune_preview import PrunePreview
from tracer.token_text import visible

TokenText = Callable[[int], str]


def top_text(top: tuple[tuple[int, float], ...], text_of: TokenText, before: set[int] | None = None) -> str:
    """``'tok' 42%`` for each candidate; with ``before``, a ``+`` marks those the full cache's top 5 lacked."""
    return " ".join(f"{'+' if before is not None and token not in before else ''}{visible(text_of(token))!r} "
                    f"{probability:.0%}" for token, probability in top)


def preview_lines(result: PrunePreview, text_of: TokenText, entries: int) -> list[str]:
    """The table: KL(full || pruned) of the next-token distribution, whether the top-1 stays, the new top 5."""
    full_ids = {token for token, _ in result.full_top}
    width = max(len(row.method) for row in result.methods)
    lines = [f"budget {result.budget} entries of {entries}; next token with the full cache: "
             f"{top_text(result.full_top, text_of)}",
             f"{'method':<{width}}  kept/head  KL(full||pruned)  top-1  top-5 after (+ new)"]
    for row in result.methods:
        if row.error is not None:
            lines.append(f"{row.method:<{width}}  cannot run: {row.error}")
            continue
        kept = len(full_ids & {token for token, _ in row.top})
        lines.append(f"{row.method:<{width}}  {row.entries:>9}  {row.kl:>16.5f}  {'same' if row.top1_kept else 'CHANGED':<5}"
                     f"  {kept}/5 kept: {top_text(row.top, text_of, full_ids)}")
    return lines
