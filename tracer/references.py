"""Snapshot references: a ``.kvs`` file or ``DIR:NAME``, an entry of a snapshot store, wherever a snapshot is named.

The rule, the same for every command and the app:

* a reference ending in ``.kvs`` is a file (entry names cannot end in ``.kvs``);
* otherwise a reference holding a ``:`` is ``DIR:NAME``, split at the **last**
  colon (entry names hold none, so ``DIR`` may): entry NAME of the store in
  folder DIR; an empty DIR (``:NAME``) is the default store
  (``$XDG_DATA_HOME/kvtrace/store``);
* anything else is a file.

So a file whose name holds a colon is named with its ``.kvs`` suffix
(``./a:b.kvs``). Reading resolves a reference; writing to ``DIR:NAME`` creates
the store when DIR does not exist yet (or is empty).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvstore import snapshot
from kvstore.atomic import output_target
from kvstore.entry_file import check_name
from kvstore.errors import SnapshotError
from kvstore.snapshot import SnapshotInfo
from kvstore.state import KVState, ModelFingerprint
from kvstore.store import Store, default_store_path
from kvstore.verify import VerifyReport, verify as verify_file


@dataclass(frozen=True)
class Reference:
    """A parsed reference: ``file`` for a ``.kvs`` path, else ``store`` and ``name``."""

    text: str
    file: Path | None = None
    store: Path | None = None
    name: str | None = None

    def __str__(self) -> str:
        return self.text

    def open_store(self, *, create: bool = False) -> Store:
        assert self.store is not None
        return Store.open(self.store, create=create)

    def same_store(self, other: Reference) -> bool:
        return self.store is not None and other.store is not None and \
            os.path.realpath(self.store) == os.path.realpath(other.store)


def parse(text: str | os.PathLike[str]) -> Reference:
    """The reference ``text`` names (see the module docstring); ``SnapshotError`` for a malformed entry name."""
    text = os.fspath(text)
    if text.endswith(".kvs") or ":" not in text:
        return Reference(text, file=Path(text).expanduser())
    folder, name = text.rsplit(":", 1)
    if not name:
        raise SnapshotError(f"{text} names no store entry after its ':' (a file with a ':' in its name must end "
                            "in .kvs)")
    check_name(name)
    return Reference(text, store=Path(folder).expanduser() if folder else default_store_path(), name=name)


def read_info(ref: Reference) -> SnapshotInfo:
    """The snapshot's header (a file's, or a store entry's); no payload is read."""
    if ref.file is not None:
        return snapshot.read_info(ref.file)
    return ref.open_store().info(ref.name)


def verify(ref: Reference, *, deep: bool = False) -> VerifyReport:
    """Every record's checksum (``deep``: also its decoding); ``SnapshotError`` naming the first damage."""
    if ref.file is not None:
        return verify_file(ref.file, deep=deep)
    return ref.open_store().verify(ref.name, deep=deep)


def load(ref: Reference, *, expected: ModelFingerprint | None = None, max_tokens: int | None = None,
         max_bytes: int | None = None) -> KVState:
    if ref.file is not None:
        return snapshot.load(ref.file, expected=expected, max_tokens=max_tokens, max_bytes=max_bytes)
    return ref.open_store().load(ref.name, expected=expected, max_tokens=max_tokens, max_bytes=max_bytes)


@dataclass(frozen=True)
class Written:
    """What a save wrote: all of a file, or a store entry's new chunks (``shared``: what it reuses)."""

    written: int
    shared: int | None = None


def save(state: KVState, ref: Reference, codec: str, parent: Reference | None = None) -> Written:
    """Write ``state`` to ``ref``; in a store, ``parent`` (an entry of the same store) is recorded and shared from."""
    if ref.file is not None:
        return Written(snapshot.save(state, ref.file, codec=codec))
    store = ref.open_store(create=True)
    parent_name = parent.name if parent is not None and parent.same_store(ref) else None
    saved = store.save(state, ref.name, codec=codec, parent=parent_name)
    return Written(saved.written, saved.shared)


def check_output(ref: Reference) -> None:
    """Refuse an output that cannot be written, before any slow work (nothing is created yet)."""
    if ref.file is not None:
        output_target(ref.file)
        return
    folder = ref.store
    if folder.exists():
        if folder.is_dir() and not any(folder.iterdir()):
            return
        Store.open(folder)  # an existing folder must be a store
        if not os.access(folder, os.W_OK):
            raise SnapshotError(f"cannot write to the snapshot store {folder}: permission denied")
        return
    existing = folder.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise SnapshotError(f"cannot create the snapshot store {folder}: {existing} is not a writable folder")
