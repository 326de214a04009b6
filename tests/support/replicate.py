"""Replicate's side of the tests: a manager wired to a served emulator, a live app that
receives the emulator's webhooks, and the environment of ``jobsctl`` processes.

Every helper here takes a :class:`FakeReplicateServer` (token ``TOKEN`` by default), so a
test names only what it changes: faults, durations, whether webhooks come back.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from jobs import AsyncJobManager, Settings
from jobs.backoff import PollPolicy
from jobs.config import Secret
from jobs.providers.http import RetryPolicy, make_client
from jobs.providers.replicate import ReplicateProvider
from jobs.testing import FakeReplicate, FakeReplicateConfig, FakeReplicateServer
from jobs.testing._asgi import Receive, Scope, Send
from jobs.web import create_app

TOKEN = "r8_twins-test-token-0001"
APP = "acme/echo"  # an official model: POST /v1/models/acme/echo/predictions
# Quick retries, and a 429's pause capped well under a second, so faults cost little time.
RETRY = RetryPolicy(attempts=4, base=0.05, cap=0.4, max_retry_after=0.3)
# Polls scaled down (a safety poll every ~2 s instead of every 330 s) for tests that must
# see a lost webhook caught without waiting minutes.
FAST_POLLS = PollPolicy(initial=0.2, factor=1.6, ceiling=1.0, retention_cap=2.0)
START_TIMEOUT = 10.0


def config(**changes: Any) -> FakeReplicateConfig:
    """The emulator's config with our token, short predictions and ``changes``."""
    values: dict[str, Any] = {"token": TOKEN, "queue_time": 0.05, "duration": 0.3, "seed": 7}
    return FakeReplicateConfig(**{**values, **changes})


class RecordingFakeReplicate(FakeReplicate):
    """The emulator, plus the wall time at which each prediction was read (a GET of
    ``/v1/predictions/{id}``): two replicas polling one prediction in the same round show as
    two reads milliseconds apart."""

    def __init__(self, config: FakeReplicateConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.reads: list[tuple[float, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            parts = scope["path"].strip("/").split("/")
            if len(parts) == 3 and parts[:2] == ["v1", "predictions"]:
                self.reads.append((asyncio.get_running_loop().time(), parts[2]))
        await super().__call__(scope, receive, send)

    def read_times(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = defaultdict(list)
        for at, prediction_id in list(self.reads):
            found[prediction_id].append(at)
        return dict(found)


def recording_server(
    cfg: FakeReplicateConfig,
) -> tuple[FakeReplicateServer, RecordingFakeReplicate]:
    """A :class:`FakeReplicateServer` (not started) serving a :class:`RecordingFakeReplicate`."""
    server = FakeReplicateServer(cfg)
    fake = RecordingFakeReplicate(cfg)
    server.fake = fake  # start() serves whatever `fake` is
    return server, fake


def advance(server: FakeReplicateServer, seconds: float) -> None:
    """Move a served emulator's clock forward, on its own event loop (webhooks it sends
    because of that are scheduled there, as they must be)."""
    response = httpx.post(f"{server.url}/_fake/advance", json={"seconds": seconds}, timeout=10)
    response.raise_for_status()


def settings(
    database_url: str,
    server: FakeReplicateServer,
    *,
    cache_dir: Path | None = None,
    public_url: str | None = None,
    **extra: Any,
) -> Settings:
    """Settings for ``database_url`` and the emulator: its token and webhook secret, its
    file URLs (127.0.0.1) allowed in the file cache, webhooks to ``public_url`` if given."""
    values: dict[str, Any] = {"cache_allow_hosts": ("127.0.0.1",), **extra}
    if cache_dir is not None:
        values["cache_dir"] = str(cache_dir)
    return Settings.from_env(
        {},
        database_url=database_url,
        replicate_api_url=server.url,
        replicate_api_token=Secret(TOKEN),
        replicate_webhook_secret=Secret(server.config.webhook_secret),
        public_url=public_url,
        **values,
    )


def provider(settings: Settings, *, retry: RetryPolicy = RETRY) -> ReplicateProvider:
    return ReplicateProvider(
        api_url=settings.replicate_api_url,
        token=settings.replicate_api_token,
        client=make_client(timeout=httpx.Timeout(10.0, connect=5.0)),
        webhook_secrets=settings.replicate_webhook_secrets,
        retry=retry,
    )


def manager(
    settings: Settings, *, poll_policy: PollPolicy | None = None, retry: RetryPolicy = RETRY
) -> AsyncJobManager:
    """A manager whose Replicate provider retries quickly (the caller closes it)."""
    return AsyncJobManager(
        settings, providers={"replicate": provider(settings, retry=retry)}, poll_policy=poll_policy
    )


@asynccontextmanager
async def open_manager(
    settings: Settings, *, poll_policy: PollPolicy | None = None, retry: RetryPolicy = RETRY
) -> AsyncIterator[AsyncJobManager]:
    made = manager(settings, poll_policy=poll_policy, retry=retry)
    try:
        yield made
    finally:
        await made.aclose()
        made.store.close()


@asynccontextmanager
async def live_app(
    make_manager: Callable[[str], AsyncJobManager],
) -> AsyncIterator[tuple[AsyncJobManager, str]]:
    """``make_manager(public_url)`` behind the app ``jobsctl serve`` runs, on a free port of
    127.0.0.1, so the emulator can deliver webhooks to ``/v1/webhooks/replicate``. Yields the
    manager and the URL; the manager is closed at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    made = make_manager(url)
    try:
        app = create_app(made, settings=made.settings)
        uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        server = uvicorn.Server(uv)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not server.started:
                    await asyncio.sleep(0.01)
            yield made, url
        finally:
            server.should_exit = True
            await task
    finally:
        sock.close()
        await made.aclose()
        made.store.close()


def env(
    database_url: str,
    server: FakeReplicateServer | str,
    *,
    secret: str | None = None,
    public_url: str | None = None,
    cache_dir: Path | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of a ``jobsctl`` process talking to the emulator (a server, or a
    URL with ``secret`` given): nothing of the developer's ``JOBS_*``/``FAL_*``/
    ``REPLICATE_*`` leaks in."""
    url = server if isinstance(server, str) else server.url
    if secret is None and not isinstance(server, str):
        secret = server.config.webhook_secret
    values = {
        k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_", "REPLICATE_"))
    }
    values.update(
        JOBS_DATABASE_URL=database_url,
        JOBS_REPLICATE_API_URL=url,
        REPLICATE_API_TOKEN=TOKEN,
        JOBS_CACHE_ALLOW_HOSTS="127.0.0.1",  # the emulator serves the output files
        **extra,
    )
    if secret is not None:
        values["JOBS_REPLICATE_WEBHOOK_SECRET"] = secret
    if public_url is not None:
        values["JOBS_PUBLIC_URL"] = public_url
    if cache_dir is not None:
        values["JOBS_CACHE_DIR"] = str(cache_dir)
    return values
