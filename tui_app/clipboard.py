"""Copying text out of the app: the terminal's clipboard through OSC 52, and a file beside it.

OSC 52 works over SSH and inside tmux (with ``set-clipboard on``), but no
terminal says whether it honoured it, so the text is also written to a file
and the notification names both. Where there is no terminal (a headless run)
or the text is too long for terminals to accept, only the file is written.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App

FALLBACK = "kvtrace-copy.txt"
OSC52_LIMIT = 74_994  # bytes of text whose base64 fits the 100,000-byte sequences terminals (and tmux) take


def copy(app: App, text: str, what: str, folder: Path | None = None) -> tuple[str, bool]:
    """Copy ``text`` (described as ``what``); returns the sentence to tell the user and whether it failed."""
    path = (folder or Path.cwd()) / FALLBACK
    if app.is_headless:
        unavailable = "no terminal here"
    elif len(text.encode("utf-8")) > OSC52_LIMIT:
        unavailable = "too long for the terminal's clipboard"
    else:
        unavailable = None
        app.copy_to_clipboard(text)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        if unavailable is None:
            return (f"Copied {what} to the clipboard (OSC 52); {path} could not be written: "
                    f"{error.strerror or error}.", False)
        return f"Could not copy {what}: {unavailable}, and {path} could not be written.", True
    if unavailable is None:
        return f"Copied {what} to the clipboard (OSC 52) and to {path}.", False
    return f"Wrote {what} to {path} ({unavailable}).", False
