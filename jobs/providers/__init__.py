"""Remote queue APIs. Everything ``jobs`` knows about fal (and later Replicate) lives here.

:func:`create` builds a provider from the settings and imports its HTTP stack only then, so
commands that never talk to a provider (``jobs status``, ``jobs list``) start quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Provider

NAMES = ("fal",)


def create(
    name: str, settings: Settings, *, on_rate_wait: Callable[[float], None] | None = None
) -> Provider:
    """The provider called ``name``, configured from ``settings``."""
    if name == "fal":
        from .fal import FalProvider
        from .http import RateGate, make_client

        return FalProvider(
            queue_url=settings.fal_queue_url,
            key=settings.fal_key,
            client=make_client(),
            gate=RateGate(on_wait=on_rate_wait),
        )
    raise ConfigError(f"unknown provider {name!r}; this version knows {', '.join(NAMES)}")
