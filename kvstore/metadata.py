"""The free metadata of a snapshot, made safe for the code that reads it.

``metadata`` is free data, but some fields are read by kvtrace (the session
restores ``messages`` and ``reply_start``, ``info`` prints ``sampling``,
``token_texts`` and ``created``). A crafted file may put anything there, so
each known field whose value does not have the expected shape is dropped
(a snapshot without it still loads) rather than passed on to crash a caller.
Keys that are not strings are dropped too; unknown string-keyed fields pass
through untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from kvstore import format as fmt


def plain(value: Any) -> bool:
    """JSON-like: None, bool, int, float, str, and lists and string-keyed maps of those (no bytes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return False


def _message(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("role"), str)
            and isinstance(value.get("content"), str) and plain(value))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def sanitize(metadata: dict[Any, Any], token_count: int) -> dict[str, Any]:
    """``metadata`` without the known fields that have the wrong shape, nor non-string keys."""
    checks: dict[str, Callable[[Any], bool]] = {
        "messages": lambda v: isinstance(v, list) and all(_message(m) for m in v),
        "reply_start": lambda v: _count(v) and v <= token_count,
        "sampling": lambda v: isinstance(v, dict) and plain(v),
        "token_texts": lambda v: isinstance(v, list) and len(v) == token_count and all(_text(t) for t in v),
        "created": lambda v: _text(v) or sane_time(v) is not None,
        "stop_reason": lambda v: v is None or _text(v),
        "reply": _text,
        "rendered": _text,
        "model": _text,
        "label": _text,
    }
    return {k: v for k, v in metadata.items()
            if isinstance(k, str) and (k not in checks or checks[k](v))}


def sane_time(value: Any) -> float | None:
    """``value`` as Unix seconds when it is a finite number between 1970 and the year 9999, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value) if abs(value) < 1e300 else math.inf
    return seconds if math.isfinite(seconds) and 0 <= seconds <= fmt.MAX_CREATED else None


def unix_time(value: Any) -> float:
    """Creation time as Unix seconds from a number or an ISO 8601 string; now when absent or absurd."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value).timestamp()
        except (ValueError, OverflowError, OSError):
            value = None
    seconds = sane_time(value)
    return time.time() if seconds is None else seconds
