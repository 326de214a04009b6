"""Remote queue APIs. Everything ``jobs`` knows about fal and Replicate lives here.

:func:`create` builds a provider from the settings and imports its HTTP stack only then, so
commands that never talk to a provider (``jobs status``, ``jobs list``) start quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Provider
    from .fal_cdn import FalCdn
    from .fal_stream import FalStream

NAMES = ("fal", "replicate")


def configured(settings: Settings) -> list[str]:
    """The providers whose credentials are set (``FAL_KEY``, ``REPLICATE_API_TOKEN``)."""
    keys = {"fal": settings.fal_key, "replicate": settings.replicate_api_token}
    return [name for name in NAMES if keys[name] is not None]


def create(
    name: str, settings: Settings, *, on_rate_wait: Callable[[float], None] | None = None
) -> Provider:
    """The provider called ``name``, configured from ``settings``."""
    if name == "fal":
        from .fal import FalProvider
        from .http import RateGate, make_client
        from .jwks import JwksCache

        client = make_client()
        return FalProvider(
            queue_url=settings.fal_queue_url,
            key=settings.fal_key,
            client=client,
            keys=JwksCache(settings.fal_jwks_url, client),
            account=settings.fal_user_id,
            gate=RateGate(on_wait=on_rate_wait),
        )
    if name == "replicate":
        from .http import RateGate, make_client
        from .replicate import ReplicateProvider

        return ReplicateProvider(
            api_url=settings.replicate_api_url,
            token=settings.replicate_api_token,
            client=make_client(),
            webhook_secrets=settings.replicate_webhook_secrets,
            webhook_events=settings.replicate_webhook_events,
            gate=RateGate(on_wait=on_rate_wait),
        )
    raise ConfigError(f"unknown provider {name!r}; this version knows {', '.join(NAMES)}")


# A value of a result that is a file: (url, file name, content type).
FileOf = Callable[[Any], "tuple[str, str | None, str | None] | None"]


def file_reader(name: str) -> FileOf:
    """How provider ``name`` marks a file in a result (see :func:`jobs.results.find_files`)."""
    if name == "fal":
        from .fal import file_of

        return file_of
    if name == "replicate":
        from .replicate import file_of as replicate_file_of

        return replicate_file_of
    raise ConfigError(f"unknown provider {name!r}; this version knows {', '.join(NAMES)}")


def create_cdn(settings: Settings) -> FalCdn:
    """fal's CDN client (uploads), configured from ``settings``."""
    import httpx

    from .fal_cdn import FalCdn
    from .http import make_client

    # A 100 MiB single upload or a 10 MiB part needs longer than a queue call.
    timeout = httpx.Timeout(600.0, connect=10.0)
    return FalCdn(
        rest_url=settings.fal_rest_url,
        key=settings.fal_key,
        client=make_client(max_connections=32, timeout=timeout),
    )


def create_stream(settings: Settings) -> FalStream:
    """fal's streaming endpoint client, configured from ``settings``."""
    import httpx

    from .fal_stream import FalStream
    from .http import make_client

    # no read timeout by default: a stream may pause for as long as its model thinks
    return FalStream(
        run_url=settings.fal_run_url,
        key=settings.fal_key,
        client=make_client(max_connections=16, timeout=httpx.Timeout(None, connect=10.0)),
    )
