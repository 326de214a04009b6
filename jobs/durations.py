"""Durations as people type them: ``90`` (seconds), ``90s``, ``10m``, ``2h``, ``7d``, ``2w``
or a sum like ``1d12h``. Every duration option and setting reads them here."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ``ValueError`` with a one-line reason."""
    compact = text.strip().lower().replace(" ", "")
    try:
        seconds = float(compact)
    except ValueError:
        parts = _PART.findall(compact)
        if not compact or "".join(n + u for n, u in parts) != compact:
            raise ValueError(
                f"{text!r} is not a duration like 90, 90s, 10m, 2h, 7d or 1d12h"
            ) from None
        return sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a duration: give a positive number of seconds")
    return seconds
