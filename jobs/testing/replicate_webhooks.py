"""Webhook delivery for the Replicate emulator: Standard Webhooks signatures, retries, faults.

Each message is one event of one prediction (``start``, ``output``, ``logs``,
``completed``): the prediction object as ``GET /v1/predictions/{id}`` would return it at
that moment, POSTed as JSON and signed per Standard Webhooks (HMAC-SHA256 over
``"{webhook-id}.{webhook-timestamp}.{body}"`` with the key inside ``whsec_…``). One
``v1,<signature>`` entry per signing secret, so a rotation (``extra_signing_secrets``)
shows as several space-separated entries.

What Replicate documents and the emulator does: only the terminal message is retried (on
a transport error or any non-2xx answer, a redirect included: redirects are never
followed), with exponential backoff, by default 1, 2, 4 … 32 s (the last retry about a
minute after completion); intermediate messages are sent once. The ``webhook-id`` stays
the same across retries and duplicates of one message, the ``webhook-timestamp`` is the
time of each attempt (re-signed, so a late retry still passes a receiver's window).

Choices of ours: the messages of one prediction are delivered one after another, in the
order their events happened (a receiver sees ``start`` before ``completed``); the
timestamp comes from the real wall clock even when the emulator's clock was moved with
``advance``, because receivers check it against their own clock. Like the fal sender, all
deliveries share one ``httpx.AsyncClient`` on httpx-aiohttp's transport and a semaphore
caps those in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from httpx_aiohttp import AiohttpTransport

from jobs.providers.standard_webhooks import sign as sign_one
from jobs.testing.replicate_model import FakeReplicateConfig, FakeReplicateStats

log = logging.getLogger(__name__)

MAX_CONCURRENT_DELIVERIES = 64
_ID_CHARS = string.ascii_letters + string.digits


def sign(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, one ``v1`` signature per secret."""
    signed = [sign_one(secret, msg_id, timestamp, body) for secret in secrets]
    headers = signed[0]
    headers["webhook-signature"] = " ".join(h["webhook-signature"] for h in signed)
    return headers


@dataclass(frozen=True, slots=True)
class Message:
    """One webhook message: an event of one prediction, with the body as of that event."""

    prediction_id: str
    event: str
    url: str
    body: bytes
    msg_id: str
    terminal: bool


class WebhookSender:
    """Delivers signed webhook messages; lives inside the server's event loop."""

    def __init__(
        self,
        config: Callable[[], FakeReplicateConfig],
        stats: FakeReplicateStats,
        rng: random.Random,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._stats = stats
        self._rng = rng
        self._wall = wall_clock
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The last task per prediction: the next message of that prediction waits for it.
        self._tails: dict[str, asyncio.Task[None]] = {}

    @property
    def pending(self) -> int:
        return len(self._tasks)

    @property
    def running(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        if self._client is not None:
            return
        limits = httpx.Limits(
            max_connections=MAX_CONCURRENT_DELIVERIES,
            max_keepalive_connections=MAX_CONCURRENT_DELIVERIES,
        )
        # trust_env=False: a proxy in the environment must not intercept local deliveries.
        transport = AiohttpTransport(limits=limits, trust_env=False)
        self._client = httpx.AsyncClient(
            transport=transport, trust_env=False, follow_redirects=False
        )
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tails.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def new_id(self) -> str:
        return "msg_" + "".join(self._rng.choice(_ID_CHARS) for _ in range(27))

    def send(self, prediction_id: str, event: str, url: str, body: bytes, terminal: bool) -> None:
        """Queue one message (dropped silently or doubled per the configured rates)."""
        if self._client is None:
            return
        config, stats = self._config(), self._stats
        stats.webhook_events[event] = stats.webhook_events.get(event, 0) + 1
        message = Message(prediction_id, event, url, body, self.new_id(), terminal)
        if config.webhook_loss_rate > 0 and self._rng.random() < config.webhook_loss_rate:
            stats.webhooks_lost += 1
            return
        duplicate = (
            config.webhook_duplicate_rate > 0 and self._rng.random() < config.webhook_duplicate_rate
        )
        if duplicate:
            stats.webhooks_duplicated += 1
        previous = self._tails.get(prediction_id)
        task = asyncio.get_running_loop().create_task(self._deliver(message, duplicate, previous))
        self._tasks.add(task)
        self._tails[prediction_id] = task
        task.add_done_callback(lambda t: self._done(prediction_id, t))

    def _done(self, prediction_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._tails.get(prediction_id) is task:
            del self._tails[prediction_id]

    async def _deliver(
        self, message: Message, duplicate: bool, previous: asyncio.Task[None] | None
    ) -> None:
        try:
            if previous is not None:
                # Wait for the prediction's earlier message; its failure is not ours.
                await asyncio.wait({previous})
            for _ in range(2 if duplicate else 1):
                await self._deliver_once(message)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not kill the loop or go unseen
            log.exception("webhook delivery for %s crashed", message.prediction_id)

    async def _deliver_once(self, message: Message) -> bool:
        assert self._client is not None and self._slots is not None
        stats = self._stats
        counters = stats.predictions.get(message.prediction_id)
        config = self._config()
        retries = max(0, config.webhook_retries) if message.terminal else 0
        for attempt in range(1 + retries):
            if attempt:
                await asyncio.sleep(self._config().webhook_retry_base * 2 ** (attempt - 1))
                stats.webhook_retries += 1
            config = self._config()
            headers = sign(
                config.signing_secrets(), message.msg_id, int(self._wall()), message.body
            )
            headers["content-type"] = "application/json"
            headers["user-agent"] = "fake-replicate-webhook/1"
            stats.webhook_attempts += 1
            if counters is not None:
                counters.webhook_attempts += 1
            try:
                async with self._slots:
                    response = await self._client.post(
                        message.url,
                        content=message.body,
                        headers=headers,
                        timeout=config.webhook_timeout,
                    )
            except Exception as exc:  # any transport failure is a failed attempt
                log.debug("webhook to %s failed: %r", message.url, exc)
                continue
            if 200 <= response.status_code < 300:
                stats.webhook_deliveries += 1
                if counters is not None:
                    counters.webhook_deliveries += 1
                return True
            log.debug("webhook to %s answered %s", message.url, response.status_code)
        stats.webhook_failures += 1
        return False
