"""HTTP plumbing shared by providers: client set-up, retry timing, rate gates, and the one
question submit safety depends on: did a failed request provably never reach the server?

httpx is the client API. Underneath, the aiohttp transport (httpx-aiohttp) is the engine:
httpx's own pool measured at a few percent of the ideal under concurrency, aiohttp near
98 % (docs/internals.md §6).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver
from httpx_aiohttp import AiohttpTransport

from ..errors import ProviderUnavailable

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# The longest a Retry-After is honoured (seconds): one huge value must not stop a provider.
MAX_RETRY_AFTER = 120.0
# Statuses worth retrying for idempotent calls (status, result, cancel).
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def make_client(
    *,
    max_connections: int = 256,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    resolver: AbstractResolver | None = None,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` on aiohttp's connection engine; ``resolver`` (the file
    cache's :class:`~jobs.egress.GuardedResolver`) decides which addresses it connects to."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    transport = AiohttpTransport(limits=limits)
    if resolver is not None:
        ssl_context = transport.ssl_context

        def session() -> aiohttp.ClientSession:  # made inside the event loop, on first use
            connector = aiohttp.TCPConnector(
                limit=max_connections, ssl=ssl_context, resolver=resolver
            )
            return aiohttp.ClientSession(connector=connector)

        transport.client = session
    return httpx.AsyncClient(transport=transport, timeout=timeout)


def never_sent(exc: BaseException) -> bool:
    """True only when the request provably did not reach the server (no connection was made).

    The aiohttp transport maps both 'connection refused' and 'server disconnected' to
    ``httpx.ConnectTimeout``, so the original aiohttp error decides.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError | asyncio.TimeoutError):
        return isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; ``Retry-After`` wins when the server sends one."""

    attempts: int = 5
    base: float = 0.25
    cap: float = 10.0
    max_retry_after: float = MAX_RETRY_AFTER

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (1 = first retry)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        ceiling = min(self.cap, self.base * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


class RateGate:
    """One per provider: a 429 from any request pauses every request to that provider until
    the server's ``Retry-After`` has passed, instead of each job backing off on its own.

    A pause is capped at ``max_pause`` seconds (a ``Retry-After: 86400`` would otherwise
    hold every submit and poll until a restart). Waiting is a plain sleep, so cancelling
    the waiting task ends it; :meth:`remaining` lets a caller decide not to wait at all."""

    def __init__(
        self,
        on_wait: Callable[[float], None] | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_pause: float = MAX_RETRY_AFTER,
    ) -> None:
        self._resume_at = 0.0
        self._on_wait = on_wait
        self._sleep = sleep
        self.max_pause = max_pause

    def pause(self, seconds: float) -> None:
        seconds = min(max(0.0, seconds), self.max_pause)
        self._resume_at = max(self._resume_at, time.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds until requests may go again (0 when the gate is open)."""
        return max(0.0, self._resume_at - time.monotonic())

    async def wait(self) -> None:
        delay = self.remaining()
        if delay > 0:
            if self._on_wait is not None:
                self._on_wait(delay)
            await self._sleep(min(delay, self.max_pause))


def header_retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header of a reply, in seconds."""
    return parse_retry_after(response.headers.get("retry-after"))


async def send_repeatable(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider: str,
    headers: Mapping[str, str],
    retry: RetryPolicy,
    gate: RateGate,
    sleep: Callable[[float], Awaitable[None]],
    params: Mapping[str, str] | None = None,
    retry_after: Callable[[httpx.Response], float | None] = header_retry_after,
    final: Callable[[httpx.Response], bool] = lambda response: False,
) -> httpx.Response:
    """Send a request that is safe to repeat (a status read, a cancel) to ``provider``,
    retrying transport errors and :data:`RETRY_STATUSES` unless ``final(response)`` says
    the reply is the answer itself; a 429 pauses ``gate`` for every request to it.
    Raises ``ProviderUnavailable`` once ``retry.attempts`` are spent."""
    for attempt in range(1, retry.attempts + 1):
        last = attempt == retry.attempts
        await gate.wait()
        try:
            response = await client.request(method, url, params=params, headers=headers)
        except httpx.TransportError as exc:
            if last:
                raise ProviderUnavailable(
                    f"{provider} could not be reached: {type(exc).__name__}: {exc}"
                ) from None
            await sleep(retry.delay(attempt))
            continue
        code = response.status_code
        if code not in RETRY_STATUSES or final(response):
            return response
        wait = retry_after(response)
        if code == 429:
            gate.pause(retry.delay(attempt, wait))
        if last:
            raise ProviderUnavailable(
                f"{provider} kept answering HTTP {code} ({attempt} attempts)",
                status_code=code,
                retry_after=wait,
            )
        await sleep(0 if code == 429 else retry.delay(attempt, wait))
    raise AssertionError("unreachable: the loop returns or raises")
