"""Webhook delivery for the fal emulator: payloads and signatures per docs/protocol.md §10-11.

A delivery is the only per-request asyncio task the emulator ever creates, and only for
requests submitted with ``fal_webhook``. All deliveries share one ``httpx.AsyncClient``
(connections to a receiver are reused) and a semaphore caps how many are in flight, so a
burst of 10,000 completions queues up instead of opening 10,000 sockets. The client runs
on httpx-aiohttp's transport (docs/internals.md §6): httpx's own pool measured ~190 requests/s at
concurrency 64, which made a 5,000-webhook burst take ~25 s; aiohttp's engine behind the
same httpx API delivers it about five times faster on the same machine.

Choices where fal's behaviour is not documented (spec section 5, item 4): any non-2xx
answer or transport error counts as a failed attempt; attempts are re-signed with a fresh
timestamp (so a late retry still passes the receiver's 300 s window); a request cancelled
by the client also gets an ERROR delivery (``Invalid status code: 499``) unless
``webhook_on_cancel`` is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from httpx_aiohttp import AiohttpTransport

from jobs.providers.signatures import sign_fal
from jobs.testing._asgi import dumps
from jobs.testing.fal_model import FakeFalConfig, FakeFalStats, FakeRequest, error_body

log = logging.getLogger(__name__)

MAX_CONCURRENT_DELIVERIES = 64


def webhook_payload(request: FakeRequest, padding: int = 0) -> dict[str, Any]:
    """The JSON body fal POSTs when ``request`` finishes (docs/protocol.md §10)."""
    body: dict[str, Any] = {
        "request_id": request.request_id,
        "gateway_request_id": request.request_id,
    }
    if request.fail_status is None:
        body["status"] = "OK"
        body["payload"] = request.output(padding)
    else:
        body["status"] = "ERROR"
        body["error"] = f"Invalid status code: {request.fail_status}"
        body["payload"] = error_body(request.fail_status)
    return body


class WebhookSender:
    """Delivers signed webhooks with retries; lives inside the server's event loop."""

    def __init__(
        self,
        config: Callable[[], FakeFalConfig],
        stats: FakeFalStats,
        private_key: Ed25519PrivateKey,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._stats = stats
        self._key = private_key
        self._wall = wall_clock
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        limits = httpx.Limits(
            max_connections=MAX_CONCURRENT_DELIVERIES,
            max_keepalive_connections=MAX_CONCURRENT_DELIVERIES,
        )
        # trust_env=False: a proxy in the environment must not intercept local deliveries.
        transport = AiohttpTransport(limits=limits, trust_env=False)
        self._client = httpx.AsyncClient(transport=transport, trust_env=False)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def schedule(self, request: FakeRequest, duplicate: bool) -> None:
        """Start delivering ``request``'s webhook (twice when ``duplicate``)."""
        if self._client is None or request.webhook_url is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(request, duplicate))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, request: FakeRequest, duplicate: bool) -> None:
        try:
            body = dumps(webhook_payload(request, self._config().result_padding))
            for _ in range(2 if duplicate else 1):
                await self._deliver_once(request, body)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not kill the loop or go unseen
            log.exception("webhook delivery for %s crashed", request.request_id)

    async def _deliver_once(self, request: FakeRequest, body: bytes) -> bool:
        assert self._client is not None and self._slots is not None
        url = request.webhook_url
        assert url is not None
        counters = self._stats.requests.get(request.request_id)
        attempts = 1 + max(0, self._config().webhook_retries)
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._config().webhook_retry_delay)
            headers = sign_fal(
                self._key, request.request_id, self._config().user_id, int(self._wall()), body
            )
            headers["Content-Type"] = "application/json"
            self._stats.webhook_attempts += 1
            if counters is not None:
                counters.webhook_attempts += 1
            try:
                async with self._slots:
                    response = await self._client.post(
                        url, content=body, headers=headers, timeout=self._config().webhook_timeout
                    )
            except Exception as exc:  # any transport failure is a failed attempt, retried
                log.debug("webhook to %s failed: %r", url, exc)
                continue
            if 200 <= response.status_code < 300:
                self._stats.webhook_successes += 1
                if counters is not None:
                    counters.webhook_successes += 1
                return True
            log.debug("webhook to %s answered %s", url, response.status_code)
        self._stats.webhook_failures += 1
        return False
