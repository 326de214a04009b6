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

Concurrent callers share one fetch (a lock), so a burst of first deliveries fetches once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .signatures import fal_public_keys

log = logging.getLogger(__name__)

MAX_AGE = 3600.0
MAX_AGE_CEILING = 24 * 3600.0
REFRESH_INTERVAL = 60.0
FETCH_TIMEOUT = 10.0


class JwksUnavailable(Exception):
    """No signing key is known and the JWKS URL could not provide one."""


class JwksCache:
    """fal's public keys from ``url``, fetched with ``client`` and cached.

    ``clock`` is monotonic seconds (injectable for tests). ``max_age`` is how long a fetched
    key set is trusted before the next use refetches it; ``refresh_interval`` is the least
    time between two fetch attempts of any kind after the first.
    """

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        max_age: float = MAX_AGE,
        refresh_interval: float = REFRESH_INTERVAL,
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
        self._clock = clock
        self._keys: list[Ed25519PublicKey] | None = None
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch attempt, successful or not
        self._lock = asyncio.Lock()

    async def keys(self) -> list[Ed25519PublicKey]:
        """The current keys, fetching them when none are cached or the cache is too old.

        Raises :class:`JwksUnavailable` only when no key has ever been fetched."""
        if self._fresh():
            assert self._keys is not None
            return self._keys
        async with self._lock:
            if not self._fresh() and not self._rate_limited():
                await self._fetch()
            if self._keys is None:
                raise JwksUnavailable(f"no fal webhook keys: the JWKS at {self.url} did not answer")
            return self._keys

    async def refresh_after_miss(self, tried: Sequence[Ed25519PublicKey] | None = None) -> bool:
        """A signature matched none of ``tried`` (by default, the keys cached now): refetch,
        unless a fetch was attempted less than ``refresh_interval`` ago. True when the cached
        keys now differ from ``tried`` (by this fetch or a concurrent one), i.e. verifying
        again with :meth:`keys` is worth it."""
        before = self._keys if tried is None else tried
        async with self._lock:
            if self._keys is before and not self._rate_limited():
                await self._fetch()
            return self._keys is not None and self._keys is not before

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

    async def _fetch(self) -> None:
        """One GET of the JWKS; on any failure keep what we had."""
        self._attempted_at = self._clock()
        try:
            response = await self._client.get(self.url, timeout=FETCH_TIMEOUT)
            response.raise_for_status()
            keys = fal_public_keys(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("fetching fal's JWKS from %s failed: %s", self.url, exc)
            return
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
