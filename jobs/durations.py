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


# fal_client's names for upload lifetimes besides plain durations ("immediate" is about a
# minute: the CDN reads 0 as "no expiry").
_NAMED_LIFETIMES: dict[str, int | None] = {"never": None, "immediate": 60}


def parse_lifetime(text: str) -> int | None:
    """Whole seconds in an upload lifetime (``JOBS_UPLOAD_TTL``): a duration, ``immediate``,
    or ``never`` (None); raises ``ValueError`` with a one-line reason."""
    value = text.strip().lower()
    if value in _NAMED_LIFETIMES:
        return _NAMED_LIFETIMES[value]
    seconds = int(parse_duration(value))
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a lifetime: give at least one second, or 'never'")
    return seconds
