"""Names for lines of generation that stay put while the session swaps them around.

A session keeps one current line and a list of the others (``branches``);
``branch`` appends the line it leaves and ``switch_branch(i)`` swaps the
current line with entry ``i``, so list indices say nothing a person can hold
on to ("switched to branch 0; the line you left is now branch 0"). The runner
numbers every line once, when it is made, and keeps the numbers in step with
the session's swaps: line 1 is the first reply, line 2 the first branch, and
so on, whatever is current.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tracer.records import StepRecord

SNIPPET = 32  # characters of a line's text in its label


def snippet(text: str, limit: int = SNIPPET) -> str:
    """``text`` cut to about ``limit`` characters at a word boundary, an ellipsis where it was cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,.;:") + "…"


def divergence(records: Sequence[StepRecord], other: Sequence[StepRecord]) -> int:
    """The index of the first generated token where two lines differ (the shorter length if one extends the other)."""
    for i, (a, b) in enumerate(zip(records, other)):
        if a.token_id != b.token_id or a.position != b.position:
            return i
    return min(len(records), len(other))


def line_label(records: Sequence[StepRecord], current: Sequence[StepRecord]) -> str:
    """What a line says from where it leaves the current one: ``from #3: “ dog ran far…”``."""
    start = divergence(records, current)
    text = "".join(r.text for r in records[start:])
    return f"from #{start}: “{snippet(text)}”" if text.strip() else f"the first {len(records)} tokens"


@dataclass(frozen=True)
class LineSummary:
    """One line other than the current one, as the palette lists it."""

    number: int
    label: str
    name: str = ""  # what a person called it ("": unnamed)
    steps: int = 0  # generated tokens on it


class LineNumbers:
    """The number of the current line and of each entry of the session's branch list, kept in step."""

    def __init__(self) -> None:
        self.current = 1
        self.others: list[int] = []
        self.names: dict[int, str] = {}  # line number -> the name a person gave it
        self._next = 2

    def branched(self) -> None:
        """The session appended the line it left and made a new one current."""
        self.others.append(self.current)
        self.current = self._next
        self._next += 1

    def switched(self, index: int) -> None:
        """The session swapped the current line with branch ``index``."""
        self.current, self.others[index] = self.others[index], self.current

    def restart(self) -> None:
        """The session dropped every line (a snapshot of another transcript was loaded)."""
        self.current, self.others, self._next = 1, [], 2
        self.names.clear()

    def index_of(self, number: int) -> int:
        """The session's index of line ``number``: -1 for the current line, else its place in ``branches``."""
        if number == self.current:
            return -1
        if number not in self.others:
            raise KeyError(number)
        return self.others.index(number)

    def summaries(self, branches: Sequence[Sequence[StepRecord]], current: Sequence[StepRecord]) -> tuple[LineSummary, ...]:
        if len(branches) != len(self.others):  # the session's list changed under us: number afresh
            self.others = list(range(self._next, self._next + len(branches)))
            self._next += len(branches)
        return tuple(LineSummary(n, line_label(records, current), self.names.get(n, ""), len(records))
                     for n, records in zip(self.others, branches))
