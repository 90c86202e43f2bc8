"""Autosave: the app's runner keeps every finished turn and every branch in a snapshot store.

Entries are named ``<when the app started>-<random>-<n>`` and linked to the
entry their line came from (``parent``), so the store holds the session as a
tree the app's history shows (turns, branches), and any node can be resumed
after a restart. Rules, in the runner's worker thread after each job:

* a new turn, a branch, or the first save after a load, a prune or a branch
  switch writes a **new** entry whose parent is the current one;
* more of the same turn (``g``, ``n``) **replaces** the current entry when this
  app wrote it (so a reply grown in steps is one entry), never an entry of an
  earlier run;
* a branch sets the current entry aside with the line the session sets aside,
  and a switch swaps them back, as ``TraceSession.switch_branch`` does.

Every save goes through ``tracer.usecases.save``, so only the chunks the store
does not hold yet are written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvstore.format import DEFAULT_CODEC
from tracer import usecases
from tracer.protocol import Session
from tracer.references import parse

LABEL_TEXT = 60  # characters of the last user message in an entry's label


def new_session_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()


class Autosave:
    """Which entry holds the session's current line, and what the next save writes (see the module docstring)."""

    def __init__(self, store: str | os.PathLike[str], codec: str = DEFAULT_CODEC) -> None:
        self.store = Path(store).expanduser()
        self.codec = codec
        self.session_id = new_session_id()
        self._count = 0
        self.current: str | None = None  # the entry holding the current line
        self._parent: str | None = None  # ``current``'s parent, kept when it is replaced
        self._ours = False  # ``current`` was written by this app for the turn going on
        self._set_aside: list[str | None] = []  # per branch the session holds: the entry of that line
        self.last: str | None = None  # the reference of the last save (where the session was saved)

    def reference(self, name: str) -> str:
        return f"{self.store}:{name}"

    def save(self, session: Session, kind: str) -> str:
        """Save after a run of ``kind`` ("turn", "more" or "branch"); returns what was written (one line)."""
        if kind == "branch":
            self._set_aside.append(self.current)
            self._ours = False
        if kind == "turn":
            self._ours = False
        if self._ours and self.current is not None:
            name, parent = self.current, self._parent
        else:
            self._count += 1
            name, parent = f"{self.session_id}-{self._count}", self.current
        turns = sum(m.get("role") == "user" for m in session.messages)
        asked = next((m["content"] for m in reversed(session.messages) if m.get("role") == "user"), "")
        label = f"{'branch, ' if kind == 'branch' else ''}turn {turns}: {' '.join(asked.split())[:LABEL_TEXT]}"
        saved = usecases.save(session, self.reference(name), self.codec, label,
                              self.reference(parent) if parent else None)
        self.current, self._parent, self._ours = name, parent, True
        self.last = saved.path
        return saved.describe()

    def loaded(self, reference: str) -> None:
        """The session now continues from ``reference`` (a file, or an entry of this or another store)."""
        ref = parse(reference)
        ours = ref.store is not None and os.path.realpath(ref.store) == os.path.realpath(self.store)
        self.current = ref.name if ours else None
        self._ours = False
        self._set_aside = []

    def changed(self) -> None:
        """The session's cache changed outside a run (a prune): the next save is a new entry."""
        self._ours = False

    def switched(self, index: int) -> None:
        """The session swapped its line with branch ``index``."""
        if index < len(self._set_aside):
            self.current, self._set_aside[index] = self._set_aside[index], self.current
        else:
            self.current = None
        self._ours = False
