"""The pruning preview as lines of text: one row per method, for ``kvtrace prune --preview`` and the app's
prune dialog (no textual here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracer.records import Candidate
from tracer.token_text import visible

if TYPE_CHECKING:  # the preview's module imports torch; the dialog formats its result without it
    from tracer.prune_preview import PrunePreview


def top_text(top: tuple[Candidate, ...], before: set[int] | None = None) -> str:
    """``'tok' 42%`` for each candidate; with ``before``, a ``+`` marks those the full cache's top 5 lacked."""
    return " ".join(f"{'+' if before is not None and c.token_id not in before else ''}{visible(c.text)!r} "
                    f"{c.prob:.0%}" for c in top)


def preview_lines(result: PrunePreview, entries: int, *, wide: bool = True) -> list[str]:
    """The table: KL(full || pruned) of the next-token distribution, whether the top-1 stays, the new top 5.

    Not ``wide`` (the app's dialog): the new top-1 instead of the whole top 5, so a row fits 80 columns.
    """
    full_ids = {c.token_id for c in result.full_top}
    if not wide:
        return _narrow_lines(result, full_ids)
    width = max(len(row.method) for row in result.methods)
    lines = [f"budget {result.budget} entries of {entries}; next token with the full cache: "
             f"{top_text(result.full_top)}",
             f"{'method':<{width}}  kept/head  KL(full||pruned)  top-1  top-5 after (+ new)"]
    for row in result.methods:
        if row.error is not None:
            lines.append(f"{row.method:<{width}}  cannot run: {row.error}")
            continue
        kept = len(full_ids & {c.token_id for c in row.top})
        lines.append(f"{row.method:<{width}}  {row.entries:>9}  {row.kl:>16.5f}  {'same' if row.top1_kept else 'CHANGED':<5}"
                     f"  {kept}/5 kept: {top_text(row.top, full_ids)}")
    return lines


def _narrow_lines(result: PrunePreview, full_ids: set[int]) -> list[str]:
    width = max(len(row.method) for row in result.methods)
    lines = [f"Next token with the full cache: {top_text(result.full_top[:3])}"]
    for row in result.methods:
        if row.error is not None:
            lines.append(f"{row.method:<{width}}  cannot run: {row.error}")
            continue
        first = "same top-1" if row.top1_kept else f"top-1 now {top_text(row.top[:1])}"
        kept = len(full_ids & {c.token_id for c in row.top})
        lines.append(f"{row.method:<{width}}  KL {row.kl:6.3f} {first}, {kept}/5 of the top 5 stay")
    return lines
