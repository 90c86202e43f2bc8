"""The snapshot store's folder: its layout, its lock, and how files appear in it atomically.

::

    DIR/kvtrace-store            marker (JSON: kind and version)
    DIR/lock                     what saves, readers and gc lock (flock)
    DIR/entries/NAME.kve         named entries
    DIR/chunks/ab/<key>.kvc      K/V chunks, by key (64 hex digits; "ab" = its first two)
    DIR/blocks/ab/<digest>.kvb   trace blocks, by the SHA-256 of their bytes
    DIR/tmp/                     temporaries of saves in progress

Every file is written to ``tmp/``, fsynced, then linked (chunks and blocks:
``link`` fails if the name exists, so a file is never replaced under a
reader) or renamed (entries: the newest save of a name wins) into place.
Saves and readers hold a shared lock on ``DIR/lock`` for their whole run and
``gc`` an exclusive one, so garbage collection never removes a chunk that a
save has decided to reuse or a reader is about to open; two saves run side by
side. A save killed halfway leaves only temporaries, which ``gc`` removes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvstore.atomic import fsync_folder, umask
from kvstore.entry_file import valid_name
from kvstore.errors import SnapshotError
from kvstore.safe_io import reason

MARKER = "kvtrace-store"
KIND = "kvtrace-store"
VERSION = 1
HEX = re.compile(r"[0-9a-f]{64}")
SUFFIXES = {"chunks": ".kvc", "blocks": ".kvb"}


def default_store_path() -> Path:
    """``$XDG_DATA_HOME/kvtrace/store`` (``~/.local/share/kvtrace/store`` when the variable is unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "kvtrace" / "store"


class StoreDir:
    """An opened store folder (see the module docstring for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> StoreDir:
        """The store at ``path``; with ``create``, a missing folder (or an empty one) becomes a new store."""
        root = Path(path).expanduser()
        try:
            if create and not root.exists():
                root.mkdir(parents=True, exist_ok=True)
            mode = root.stat().st_mode
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot store at {path}") from None
        except OSError as error:
            raise SnapshotError(f"cannot open the snapshot store {path}: {reason(error)}") from None
        if not stat.S_ISDIR(mode):
            raise SnapshotError(f"{path} is not a folder, so not a snapshot store")
        store = cls(root)
        marker = root / MARKER
        if not marker.exists():
            if not create:
                raise SnapshotError(f"{path} is not a kvtrace snapshot store (it has no {MARKER} file)")
            if any(root.iterdir()):
                raise SnapshotError(f"{path} is a folder with other files, not a kvtrace snapshot store; "
                                    "name a new or empty folder")
            store._initialize()
        store._check_marker()
        return store

    def _initialize(self) -> None:
        try:
            for name in ("entries", "chunks", "blocks", "tmp"):
                (self.root / name).mkdir(exist_ok=True)
            self.publish(json.dumps({"kind": KIND, "version": VERSION}).encode() + b"\n", self.root / MARKER)
            fsync_folder(self.root)
        except OSError as error:
            raise SnapshotError(f"cannot create the snapshot store {self.root}: {reason(error)}") from None

    def _check_marker(self) -> None:
        try:
            with open(self.root / MARKER, "rb") as f:
                doc = json.loads(f.read(4096))
        except (OSError, ValueError):
            doc = None
        if not (isinstance(doc, dict) and doc.get("kind") == KIND and isinstance(doc.get("version"), int)):
            raise SnapshotError(f"{self.root} is not a kvtrace snapshot store (its {MARKER} file is damaged)")
        if doc["version"] > VERSION:
            raise SnapshotError(f"the snapshot store {self.root} has version {doc['version']}; this kvtrace reads "
                                f"version {VERSION}")

    # ---------------------------------------------------------------------------- locking
    @contextmanager
    def locked(self, exclusive: bool = False) -> Iterator[None]:
        """Hold the store's lock (shared: saves and readers; exclusive: gc) for the block.

        A read-only store without a lock file is read unlocked: nobody can write to it.
        """
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            try:
                fd = os.open(self.root / "lock", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                yield
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ---------------------------------------------------------------------------- paths
    def entry_path(self, name: str) -> Path:
        return self.root / "entries" / f"{name}.kve"

    def content_path(self, kind: str, digest: bytes) -> Path:
        """Where the chunk (``kind`` "chunks") or block ("blocks") of ``digest`` lives."""
        text = digest.hex()
        return self.root / kind / text[:2] / f"{text}{SUFFIXES[kind]}"

    def entry_names(self) -> list[str]:
        try:
            names = os.listdir(self.root / "entries")
        except OSError as error:
            raise SnapshotError(f"cannot list the snapshot store {self.root}: {reason(error)}") from None
        return sorted(n[:-4] for n in names if n.endswith(".kve") and valid_name(n[:-4]))

    def content_files(self, kind: str) -> Iterator[tuple[bytes, Path]]:
        """``(digest, path)`` of every chunk or block file (names that are not one are left alone)."""
        folder = self.root / kind
        for sub in sorted(os.listdir(folder)):
            if not (len(sub) == 2 and (folder / sub).is_dir()):
                continue
            for name in sorted(os.listdir(folder / sub)):
                stem = name[: -len(SUFFIXES[kind])]
                if name.endswith(SUFFIXES[kind]) and HEX.fullmatch(stem) and stem.startswith(sub):
                    yield bytes.fromhex(stem), folder / sub / name

    def temporaries(self) -> list[Path]:
        return [self.root / "tmp" / n for n in os.listdir(self.root / "tmp")]

    # ---------------------------------------------------------------------------- writing
    def _temporary(self, data: bytes) -> str:
        """``data`` in a new, fsynced temporary file with a plain file's permissions; its path."""
        fd, temp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o666 & ~umask())
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(temp)
            raise
        return temp

    def publish(self, data: bytes, target: Path) -> bool:
        """Make ``target`` hold ``data`` unless it exists already (then it is left as it is); True if written."""
        temp = self._temporary(data)
        try:
            target.parent.mkdir(exist_ok=True)
            os.link(temp, target)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temp)

    def replace(self, data: bytes, target: Path) -> None:
        """Make ``target`` hold ``data``, atomically replacing what is there."""
        temp = self._temporary(data)
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(temp, target)
        except BaseException:
            os.unlink(temp)
            raise
