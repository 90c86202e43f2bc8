"""The history screen (h): every turn and branch saved in the snapshot store, as a tree, to go back to.

Entries come from the store (``tracer.usecases.list_store``), read in a
thread worker, never on the event loop. Each node is an entry; its children
are the entries saved from it (the next turn, a branch), newest first. Enter
resumes the highlighted entry (the app loads it through the runner); entries
of another model or that cannot be read are shown but not offered.
"""

from __future__ import annotations

import time

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static, Tree

from kvstore.errors import SnapshotError
from kvstore.state import ModelFingerprint
from kvstore.store import EntryInfo
from tracer.token_text import printable
from tracer.usecases import list_store
from tui_app.formatting import age, short_bytes

EMPTY = "Nothing is saved in {store} yet: every finished turn and branch is saved there while autosave is on."


def tree_of(entries: list[EntryInfo]) -> list[tuple[EntryInfo, list]]:
    """``(entry, children)`` roots: an entry whose parent is not in the store is a root; newest first everywhere."""
    names = {e.name for e in entries}
    children: dict[str | None, list[EntryInfo]] = {}
    for entry in entries:
        children.setdefault(entry.parent if entry.parent in names else None, []).append(entry)

    def build(parent: str | None, seen: frozenset[str]) -> list[tuple[EntryInfo, list]]:
        level = sorted(children.get(parent, []), key=lambda e: -e.saved)
        return [(e, build(e.name, seen | {e.name})) for e in level if e.name not in seen]

    return build(None, frozenset())


class HistoryScreen(ModalScreen[str | None]):
    """Pick an entry of the store to resume; dismissed with its name, or None."""

    BINDINGS = [Binding("escape,h", "close", "Close")]

    def __init__(self, store: str, model: ModelFingerprint) -> None:
        super().__init__()
        self.store = store
        self.model = model

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide"):
            yield Label("History: every saved turn and branch, newest first (Enter resumes it, Escape closes)",
                        classes="title")
            yield Label(printable(self.store), classes="muted")
            with Horizontal(id="picker"):
                tree: Tree[EntryInfo] = Tree("saved", id="history")
                tree.show_root = False
                yield tree
                with VerticalScroll(id="info-scroll"):
                    yield Static("Reading the store…", id="entry")

    def on_mount(self) -> None:
        self.query_one("#history", Tree).focus()
        self._read()

    @work(thread=True, exclusive=True)
    def _read(self) -> None:
        try:
            entries = list_store(self.store)
        except SnapshotError as error:
            entries, message = [], EMPTY.format(store=self.store) if "no snapshot store" in str(error) else str(error)
        else:
            message = EMPTY.format(store=self.store) if not entries else ""
        self.app.call_from_thread(self._show, entries, message, time.time())

    def _show(self, entries: list[EntryInfo], message: str, now: float) -> None:
        tree = self.query_one("#history", Tree)
        tree.clear()

        def add(node, items) -> None:
            for entry, children in items:
                label = self._label(entry, now)
                child = node.add(label, data=entry, expand=True) if children else node.add_leaf(label, data=entry)
                add(child, children)

        add(tree.root, tree_of(entries))
        self.query_one("#entry", Static).update(message or "Highlight an entry to see its chat.")
        if entries:
            tree.move_cursor_to_line(0)

    def _label(self, entry: EntryInfo, now: float) -> str:
        if entry.error:
            return f"{entry.name} (unreadable)"
        other = " (another model)" if self.model.differences(entry.fingerprint) else ""
        text = printable(entry.label or entry.name)
        return f"{age(entry.saved, now)} · {text} · {entry.tokens} tokens{other}"

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        entry = event.node.data
        if entry is None:
            return
        if entry.error:
            self.query_one("#entry", Static).update(printable(entry.error))
            return
        lines = [f"{entry.name} · {entry.model} · {entry.tokens} tokens ({entry.cached} cached)",
                 f"own {short_bytes(entry.own_bytes)}, shared with other entries {short_bytes(entry.shared_bytes)}"]
        differences = self.model.differences(entry.fingerprint)
        if differences:
            lines += ["", "Made by another model, so it cannot be resumed here:", *differences]
        messages = entry.metadata.get("messages") or []
        lines += [""] + [f"{m.get('role')}: {m.get('content')}" for m in messages[-4:] if isinstance(m, dict)]
        reply = entry.metadata.get("reply")
        if isinstance(reply, str) and reply:
            lines.append(f"assistant: {reply}")
        self.query_one("#entry", Static).update(printable("\n".join(str(line) for line in lines),
                                                          keep_newlines=True))

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        event.stop()
        entry = event.node.data
        if entry is None or entry.error:
            self.notify("This entry cannot be read.", severity="warning")
        elif self.model.differences(entry.fingerprint):
            self.notify("This entry was made by another model.", severity="warning")
        else:
            self.dismiss(entry.name)

    def action_close(self) -> None:
        self.dismiss(None)
