"""The load dialog (ctrl+o): pick a snapshot, read its header, then load it.

The header is shown before anything is loaded (what ``kvtrace info`` shows),
so a snapshot from another model is visible before the user commits to it.
Headers are read in a thread worker (the newest request wins), never on the
event loop, and never through the session.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DirectoryTree, Input, Label, Static
from textual.worker import get_current_worker

from kvstore.errors import SnapshotError
from kvstore.snapshot import read_info
from kvstore.state import ModelFingerprint
from tui_app.screens.form import FormScreen
from tui_app.snapshot_info import lines


class SnapshotTree(DirectoryTree):
    """Folders and ``.kvs`` files only, with plain icons that every terminal font has."""

    ICON_NODE = "▸ "
    ICON_NODE_EXPANDED = "▾ "
    ICON_FILE = "  "

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".kvs")]


def describe(path: str, model: ModelFingerprint) -> str:
    """The header of the snapshot at ``path`` and whether it fits ``model``; never raises."""
    try:
        info = read_info(path)
    except (SnapshotError, OSError) as error:
        return f"Cannot read this snapshot: {error}"
    return "\n".join(lines(info, model=model))


class LoadScreen(FormScreen[str | None]):

    def __init__(self, model: ModelFingerprint, folder: str = ".") -> None:
        super().__init__()
        self.model = model
        self.folder = folder

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide"):
            yield Label("Load a snapshot (the current session stays as it is unless loading succeeds)",
                        classes="title")
            yield Input(placeholder="path to a .kvs file (Tab: pick from the folder tree)", id="path")
            with Horizontal(id="picker"):
                yield SnapshotTree(Path(self.folder).resolve(), id="tree")
                with VerticalScroll(id="info-scroll"):
                    yield Static("Type a path or pick a .kvs file to see its header.", id="info")
            yield self.buttons("Load")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()
        tree = self.query_one(SnapshotTree)
        tree.root.set_label(f"{tree.path}/")  # where the tree starts, in full

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.query_one("#path", Input).value = str(event.path)
        self.query_one("#submit", Button).focus()

    def on_tree_node_highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:
        path = getattr(event.node.data, "path", None)
        if path is not None and Path(path).is_file():
            self.query_one("#path", Input).value = str(path)

    def on_input_changed(self, event: Input.Changed) -> None:
        path = str(Path(event.value.strip()).expanduser()) if event.value.strip() else ""
        if path:
            self._describe(path)

    @work(thread=True, exclusive=True, group="describe")
    def _describe(self, path: str) -> None:
        text = describe(path, self.model) if Path(path).is_file() else f"No file at {path}."
        if not get_current_worker().is_cancelled:  # a newer path was typed meanwhile
            self.app.call_from_thread(self._show_info, text)

    def _show_info(self, text: str) -> None:
        self.query_one("#info", Static).update(text)

    def _submit(self) -> None:
        path = str(Path(self.query_one("#path", Input).value.strip()).expanduser())
        if not Path(path).is_file():
            self.notify("Pick an existing .kvs file first.", severity="warning")
            return
        self.dismiss(path)
