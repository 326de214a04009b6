"""Query parameters of the read routes and the dashboard, checked in one place: each bad
value is an :class:`~jobs.web.errors.InvalidRequest` naming the parameter."""

from __future__ import annotations

import re

from ..config import decimal
from ..states import State
from .errors import InvalidRequest

# A label key becomes a JSON path in the query (jobs.store.Store.list_jobs): plain names only.
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def int_param(raw: str | None, name: str, *, default: int, maximum: int) -> int:
    """A whole number from 1 to ``maximum``; ``default`` when absent."""
    if raw is None:
        return default
    value = decimal(raw)
    if value is None or not 1 <= value <= maximum:
        raise InvalidRequest(f"'{name}' must be an integer from 1 to {maximum}", field=name)
    return value


def state_param(raw: str | None) -> State | None:
    if raw is None:
        return None
    try:
        return State(raw)
    except ValueError:
        names = ", ".join(s.value for s in State)
        raise InvalidRequest(f"'state' must be one of {names}", field="state") from None


def label_param(raw: str | None) -> tuple[str, str] | None:
    """``KEY=VALUE`` as a pair."""
    if raw is None:
        return None
    key, sep, value = raw.partition("=")
    if not sep or not _LABEL_KEY.match(key):
        message = "'label' must be KEY=VALUE, the key letters, digits, '_', '.' or '-'"
        raise InvalidRequest(message, field="label")
    return key, value


def flag_param(raw: str | None, name: str) -> bool:
    if raw is None or raw in ("0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise InvalidRequest(f"'{name}' must be true or false", field=name)
