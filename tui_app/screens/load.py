"""The load dialog (ctrl+o): pick a snapshot, read its header, then load it.

The header is shown before anything is loaded (what ``kvtrace info`` shows),
so a snapshot from another model is visible before the user commits to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DirectoryTree, Input, Label, Static

from tui_app.screens.form import FormScreen


class SnapshotTree(DirectoryTree):
    """Folders and ``.kvs`` files only, with plain icons that every terminal font has."""

    ICON_NODE = "▸ "
    ICON_NODE_EXPANDED = "▾ "
    ICON_FILE = "  "

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".kvs")]


class LoadScreen(FormScreen[str | None]):

    def __init__(self, describe: Callable[[str], str], folder: str = ".") -> None:
        super().__init__()
        self.describe = describe
        self.folder = folder

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide"):
            yield Label("Load a snapshot (the current session stays as it is unless loading succeeds)",
                        classes="title")
            yield Input(placeholder="path to a .kvs file", id="path")
            with Horizontal(id="picker"):
                yield SnapshotTree(self.folder, id="tree")
                with VerticalScroll(id="info-scroll"):
                    yield Static("Pick a .kvs file to see its header.", id="info")
            yield self.buttons("Load")

    def on_mount(self) -> None:
        self.query_one("#tree", SnapshotTree).focus()

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
        info = self.query_one("#info", Static)
        if path and Path(path).is_file():
            info.update(self.describe(path))
        elif path:
            info.update(f"No file at {path}.")

    def _submit(self) -> None:
        path = str(Path(self.query_one("#path", Input).value.strip()).expanduser())
        if not Path(path).is_file():
            self.notify("Pick an existing .kvs file first.", severity="warning")
            return
        self.dismiss(path)
