"""Atomic file replacement: a crash at any moment leaves either the old file or the new one.

The new content goes to a temporary file ``.NAME.XXXXXXXX.tmp`` in the
target's folder (so the rename never crosses file systems), is fsynced,
renamed over the target, and the folder is fsynced so the rename itself
survives a power loss. The new file gets the permissions a plain ``open``
would give it (or keeps those of the file it replaces), not the owner-only
mode of a temporary file.

Targets: a new path or an existing regular file. A symlink is followed and its
final target replaced (the link stays a link, as when a program writes through
it with ``open``); folders, FIFOs, devices and sockets are refused, so even as
root ``-o /dev/null`` cannot replace ``/dev/null`` with a regular file.

A writer holds an exclusive ``flock`` on its temporary file until the rename;
a save killed halfway leaves an unlocked temporary behind, which the next save
to the same target removes. Every ``OSError`` (a full disk, a read-only file
system, a missing permission) becomes one ``SnapshotError`` line naming the
user's path, and the old file is left as it was.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from kvstore.errors import SnapshotError
from kvstore.safe_io import reason, special_kind


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces ``path``, on an error it vanishes."""
    target = output_target(path)
    folder = target.parent
    remove_stale_temporaries(target)
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise SnapshotError(_write_error(path, folder, error)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer's temporary is never taken for a stale one
        os.fchmod(fd, _mode_for(target))
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
            os.replace(temp, target)  # while the lock is still held
    except OSError as error:
        _discard(temp)
        raise SnapshotError(_write_error(path, folder, error)) from None
    except BaseException:
        _discard(temp)
        raise
    fsync_folder(folder)


def output_target(path: str | os.PathLike[str]) -> Path:
    """The file a write to ``path`` replaces (symlinks followed); ``SnapshotError`` when it cannot be written.

    Callers use it before slow work too (loading a model, generating), so a typo in an output path
    costs nothing: anything but a new path or a regular file in an existing, writable folder is refused.
    """
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        raise SnapshotError(f"cannot write {path}: the folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise SnapshotError(f"cannot write {path}: the folder {target.parent} is not writable")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as error:
        raise SnapshotError(_write_error(path, target.parent, error)) from None
    if stat.S_ISDIR(mode):
        raise SnapshotError(f"{path} is a folder; give a file name to write")
    if not stat.S_ISREG(mode):
        raise SnapshotError(f"cannot write {path}: it is {special_kind(mode)}, and kvtrace writes only regular files")
    return target


def remove_stale_temporaries(target: Path) -> list[str]:
    """Delete the temporaries of earlier, killed saves to ``target``; returns their names.

    Only files named like this module's temporaries for this very target, and
    only those no live writer holds locked, are removed.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    try:
        names = [n for n in os.listdir(target.parent) if pattern.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        candidate = target.parent / name
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(candidate, follow_symlinks=False).st_ino == info.st_ino:
                os.unlink(candidate)
                removed.append(name)
        except OSError:  # locked by a live writer, or gone meanwhile
            continue
        finally:
            os.close(fd)
    return removed


def _write_error(path: str | os.PathLike[str], folder: Path, error: OSError) -> str:
    if error.errno == errno.ENOENT and not folder.is_dir():
        return f"cannot write {path}: the folder {folder} does not exist"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied"
    return f"cannot write {path}: {reason(error)}"


def _discard(temp: str) -> None:
    try:
        os.unlink(temp)
    except OSError:
        pass


def _mode_for(target: Path) -> int:
    """The replaced file's mode, or what ``open`` gives a new file (0666 less the umask)."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~umask()


def umask() -> int:
    """The process umask, read without changing it where the platform allows (threads may be running)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
