"""Opening snapshot inputs safely: only regular files, never blocking on a FIFO or a device.

A file named ``x.kvs`` may be a FIFO (``open`` would wait forever for a
writer), a character device, a folder or a symlink to any of those. Inputs are
opened non-blocking, checked with ``fstat`` (which sees what the descriptor
really is, so no race between a check and the open), and only then switched
back to blocking reads. Every failure is one ``SnapshotError`` line naming the
user's path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import BinaryIO

from kvstore.errors import SnapshotError


def open_regular(path: str | os.PathLike[str], what: str = "snapshot") -> BinaryIO:
    """``path`` opened for binary reading, refused unless it is a regular file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise SnapshotError(describe_read_error(path, error, what)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SnapshotError(
                f"{path} is a folder, not a {what} file" if stat.S_ISDIR(mode)
                else f"{path} is {special_kind(mode)}, not a regular {what} file"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def pread_exact(fd: int, count: int, offset: int) -> bytes:
    """``count`` bytes at ``offset``; fewer only when the file ends (the caller checks the length)."""
    parts, done = [], 0
    while done < count:
        part = os.pread(fd, count - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def special_kind(mode: int) -> str:
    """'a FIFO', 'a character device', ... for a non-regular file mode."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a special file"


def describe_read_error(path: str | os.PathLike[str], error: OSError, what: str) -> str:
    if error.errno == errno.ENOENT:
        return f"no {what} at {path}"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied reading {path}"
    if error.errno == errno.ELOOP:
        return f"{path} is a symlink loop"
    return f"cannot read {path}: {reason(error)}"


def reason(error: OSError) -> str:
    """The system's wording for ``error`` as a lowercase fragment ('no space left on device')."""
    text = os.strerror(error.errno) if error.errno else str(error)
    return text[:1].lower() + text[1:]
