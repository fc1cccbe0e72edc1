"""Durations as users write them (`--time-budget 1h30m`) and as messages show them."""

from __future__ import annotations

import re

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd])")


def parse_duration(text: str | float | int) -> float:
    """'12h', '90m', '600s', '1h30m', '1.5h' or a plain number of seconds -> seconds (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(raw)
        except ValueError:
            parts = _PART.findall(raw)
            if not parts or "".join(n + u for n, u in parts) != raw:
                raise ValueError(f"expected a duration such as 12h, 90m, 600s or 1h30m, got {text!r}") from None
            seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"must be a positive duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> '3h 05m', '12m 30s' or '42s' for messages."""
    seconds = max(0.0, float(seconds))
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.2f}s"


__all__ = ["UNITS", "format_duration", "parse_duration"]
