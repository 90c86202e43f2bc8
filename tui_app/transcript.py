"""The transcript as stretches the cache holds, has dropped, or is about to drop: the prune dialog's
preview and the chat's note on pruned text both come from here.

A pruned token stays in the transcript (and in the chat) but is no longer in
the KV cache, so the model no longer sees it; these helpers make that visible.
The pending token (the last one: chosen, not yet fed) is never "pruned".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from rich.text import Text

from tracer.token_text import printable
from tui_app.snapshot_info import ranges

KEPT, DROPPING, PRUNED = "kept", "dropping", "pruned"
STYLES = {KEPT: "", DROPPING: "bold red strike", PRUNED: "dim"}
EDGE = 24  # characters shown at each end of a long stretch


@dataclass(frozen=True)
class Stretch:
    kind: str
    start: int  # first position
    end: int  # one past the last

    @property
    def length(self) -> int:
        return self.end - self.start


def stretches(count: int, cached: Collection[int], dropping: Collection[int] = ()) -> list[Stretch]:
    """Positions 0 .. ``count - 1`` as runs of one kind: kept, about to be dropped, or already pruned."""
    out: list[Stretch] = []
    for position in range(count):
        if position in dropping:
            kind = DROPPING
        elif position in cached or position == count - 1:
            kind = KEPT
        else:
            kind = PRUNED
        if out and out[-1].kind == kind:
            out[-1] = Stretch(kind, out[-1].start, position + 1)
        else:
            out.append(Stretch(kind, position, position + 1))
    return out


def excerpt(texts: Sequence[str], stretch: Stretch, edge: int = EDGE) -> str:
    """The stretch's text on one line, its middle left out when long."""
    text = printable("".join(texts[stretch.start:stretch.end]))
    return text if len(text) <= 2 * edge + 1 else f"{text[:edge]}…{text[-edge:]}"


def marked(texts: Sequence[str], runs: list[Stretch]) -> Text:
    """The transcript with what is dropped struck through in red and what was pruned shown as ``[…n pruned…]``."""
    out = Text()
    for run in runs:
        if run.kind == PRUNED:
            out.append(f"[…{run.length} pruned…]", STYLES[PRUNED])
        else:
            out.append(excerpt(texts, run), STYLES[run.kind])
    return out


def pruned_note(texts: Sequence[str], cached: Collection[int]) -> str | None:
    """One line on what the cache no longer holds (None: it holds everything)."""
    gone = [run for run in stretches(len(texts), cached) if run.kind == PRUNED]
    if not gone:
        return None
    positions = [p for run in gone for p in range(run.start, run.end)]
    first = excerpt(texts, gone[0], edge=12)
    return (f"pruned: positions {ranges(positions)} ({len(positions)} tokens, from “{first}”) are no longer in "
            "the cache; the model does not see them")
