"""How numbers are written on screen, shared by the widgets (token text: ``tracer.token_text.visible``)."""

from __future__ import annotations


def short_bytes(n: int) -> str:
    """A short human figure ("1.9 MB"), exact below 10,000 bytes: for the narrow status bar."""
    if n >= 10_000:
        for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
            if n >= size:
                return f"{n / size:.1f} {unit}"
    return f"{n:,} B"


def byte_count(n: int) -> str:
    """Exact bytes with thousands separators, and the short human figure for large values."""
    return f"{n:,} B" if n < 10_000 else f"{n:,} B ({short_bytes(n)})"


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of ``width`` cells filled to ``fraction`` (eighth-cell resolution)."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + ("" if rest == 0 else " ▏▎▍▌▋▊▉"[rest])).ljust(width)


def signed_bar(fraction: float, half: int) -> str:
    """A bar of ``2 * half + 1`` cells around a centre mark: to the left for a negative ``fraction`` of the
    scale, to the right for a positive one."""
    filled = round(min(abs(fraction), 1.0) * half)
    if fraction < 0:
        return " " * (half - filled) + "█" * filled + "│" + " " * half
    return " " * half + "│" + "█" * filled + " " * (half - filled)


def loading_text(stage: str, elapsed: float | None, expected: float | None, width: int = 24) -> str:
    """A loading stage; for timed work a bar of the time spent against the time it should take."""
    if elapsed is None or not expected:
        return f"Loading: {stage}"
    left = expected - elapsed
    estimate = f"about {round(left)} s left" if left >= 1 else f"taking longer than the usual {round(expected)} s"
    return (f"Loading: {stage}\n{bar(min(elapsed / expected, 0.99), width).replace(' ', '·')} "
            f"{round(elapsed)} s · {estimate}")


def age(saved: float, now: float) -> str:
    """How long ago ``saved`` was (Unix seconds): ``12 s``, ``5 min``, ``3 h``, ``2 d``; ``?`` when unknown."""
    if saved <= 0:
        return "?"
    seconds = max(0.0, now - saved)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"
