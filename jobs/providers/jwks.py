"""Fetching and caching fal's webhook signing keys (a JWKS document), apart from verifying.

Verification is a pure function in :mod:`jobs.providers.signatures`; this module only
decides *when* to ask the JWKS URL and what to do when it does not answer:

- keys are fetched lazily (the first webhook), then kept for ``max_age`` seconds, never
  more than 24 hours because fal rotates them (docs/protocol.md §11);
- a signature that matches no cached key may mean a rotation: :meth:`JwksCache.refresh_after_miss`
  refetches, but at most once per ``refresh_interval``, so a flood of forged deliveries
  cannot turn us into a load generator against the JWKS URL;
- when the URL is down, keys we already have stay in use (a webhook is better verified
  against yesterday's keys than dropped); with no keys at all :class:`JwksUnavailable` is
  raised so the receiver fails closed and answers 503 (fal retries for about two hours).

Concurrent callers share one fetch (one task in flight), so a burst of first deliveries
fetches once. The fetch is bounded as a whole (a host that sends one byte every few seconds
cannot hold it open), and while keys are cached no caller waits for a refresh: expired keys
keep verifying until the background fetch replaces them, and a signature that matches none
of them joins that fetch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .base import WebhookUnavailable
from .signatures import fal_public_keys

log = logging.getLogger(__name__)

MAX_AGE = 3600.0
MAX_AGE_CEILING = 24 * 3600.0
REFRESH_INTERVAL = 60.0
FETCH_TIMEOUT = 10.0  # seconds for a whole fetch


class JwksUnavailable(WebhookUnavailable):
    """No signing key is known and the JWKS URL could not provide one."""


class JwksCache:
    """fal's public keys from ``url``, fetched with ``client`` and cached.

    ``clock`` is monotonic seconds (injectable for tests). ``max_age`` is how long a fetched
    key set is trusted before the next use refetches it; ``refresh_interval`` is the least
    time between the end of one fetch attempt and the start of the next, after the first;
    ``fetch_timeout`` bounds a whole fetch (connecting, sending, and reading every byte).
    """

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        max_age: float = MAX_AGE,
        refresh_interval: float = REFRESH_INTERVAL,
        fetch_timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < max_age <= MAX_AGE_CEILING:
            raise ValueError(f"max_age must be in (0, {MAX_AGE_CEILING:g}] seconds, not {max_age}")
        if refresh_interval < 0:
            raise ValueError(f"refresh_interval must not be negative, not {refresh_interval}")
        self.url = url
        self._client = client
        self.max_age = max_age
        self.refresh_interval = refresh_interval
        self.fetch_timeout = fetch_timeout
        self._clock = clock
        self._keys: list[Ed25519PublicKey] | None = None
        self._fetched_at: float | None = None  # end of the last successful fetch
        self._attempted_at: float | None = None  # end of the last attempt, successful or not
        self._running: asyncio.Task[None] | None = None  # the one fetch in flight

    async def keys(self) -> list[Ed25519PublicKey]:
        """The current keys. With none cached, waits for a fetch (bounded by
        ``fetch_timeout``); with keys older than ``max_age``, returns them at once and
        refreshes in the background, so no webhook waits on a slow JWKS host.

        Raises :class:`JwksUnavailable` only when no key has ever been fetched."""
        if self._keys is not None:
            if not self._fresh():
                self._start()
            return self._keys
        await self._join()
        if self._keys is None:
            raise JwksUnavailable(f"no fal webhook keys: the JWKS at {self.url} did not answer")
        return self._keys

    async def refresh_after_miss(self, tried: Sequence[Ed25519PublicKey] | None = None) -> bool:
        """A signature matched none of ``tried`` (by default, the keys cached now): refetch,
        unless the last attempt ended less than ``refresh_interval`` ago (a fetch already
        running is joined). True when the cached keys now differ from ``tried`` (by this
        fetch or a concurrent one), i.e. verifying again with :meth:`keys` is worth it."""
        before = self._keys if tried is None else tried
        if self._keys is before:
            await self._join()
        return self._keys is not None and self._keys is not before

    async def idle(self) -> None:
        """Wait for a fetch in flight (tests; a shutdown that wants it finished)."""
        if self._running is not None:
            await asyncio.shield(self._running)

    async def aclose(self) -> None:
        """Cancel a fetch in flight."""
        if self._running is not None:
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)

    def _fresh(self) -> bool:
        return (
            self._keys is not None
            and self._fetched_at is not None
            and self._clock() - self._fetched_at < self.max_age
        )

    def _rate_limited(self) -> bool:
        return (
            self._attempted_at is not None
            and self._clock() - self._attempted_at < self.refresh_interval
        )

    def _start(self) -> None:
        """Start a fetch unless one runs or the last attempt ended too recently."""
        if self._running is None and not self._rate_limited():
            self._running = asyncio.get_running_loop().create_task(self._fetch())
            self._running.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if self._running is task:
            self._running = None

    async def _join(self) -> None:
        """Start a fetch if allowed, and wait for the one in flight (one per cache: a burst
        of callers shares it). Shielded: a caller that gives up does not cancel it."""
        self._start()
        if self._running is not None:
            await asyncio.shield(self._running)

    async def _fetch(self) -> None:
        """One GET of the JWKS, bounded as a whole; on any failure keep what we had."""
        try:
            async with asyncio.timeout(self.fetch_timeout):
                response = await self._client.get(self.url, timeout=self.fetch_timeout)
                response.raise_for_status()
                keys = fal_public_keys(response.json())
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            reason = (
                f"no answer within {self.fetch_timeout:g} s"
                if isinstance(exc, TimeoutError)
                else exc
            )
            log.warning("fetching fal's JWKS from %s failed: %s", self.url, reason)
            return
        finally:
            self._attempted_at = self._clock()
        if not keys:
            log.warning("the JWKS at %s holds no Ed25519 key; keeping the previous keys", self.url)
            return
        # The list is replaced only when the keys changed: its identity tells callers so.
        if self._keys is None or _raw(keys) != _raw(self._keys):
            self._keys = keys
        self._fetched_at = self._attempted_at


def _raw(keys: list[Ed25519PublicKey]) -> list[bytes]:
    return [key.public_bytes_raw() for key in keys]


__all__ = ["JwksCache", "JwksUnavailable"]
