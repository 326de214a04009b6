"""Replicate callbacks end to end, in-process: ``POST /v1/webhooks/replicate`` verifies the
Standard Webhooks signature with ``JOBS_REPLICATE_WEBHOOK_SECRET`` and applies the
prediction it carries to the job tracking it."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from jobs.config import Settings
from jobs.errors import ConfigError
from jobs.manager import AsyncJobManager
from jobs.providers.standard_webhooks import sign
from jobs.states import State
from jobs.web import create_app

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "replicate_webhook_signature.json").read_text()
)
SECRET = VECTORS["secret"]
CASE = VECTORS["cases"][0]  # the succeeded prediction 035g9pfx14gc86vpkytikbaoy0
BODY = base64.b64decode(CASE["body_base64"])
PREDICTION = json.loads(BODY)["id"]


@asynccontextmanager
async def _served(
    url: str, secret: str | None
) -> AsyncIterator[tuple[AsyncJobManager, httpx.AsyncClient]]:
    env = {"REPLICATE_API_TOKEN": "r8_test-token", "JOBS_REPLICATE_API_URL": "http://127.0.0.1:9"}
    if secret:
        env["JOBS_REPLICATE_WEBHOOK_SECRET"] = secret
    settings = Settings.from_env(env, database_url=url)
    manager = AsyncJobManager(settings)
    app = create_app(manager, settings=settings)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield manager, client
    finally:
        await manager.aclose()
        manager.store.close()


async def _deliver(
    client: httpx.AsyncClient, body: bytes, job: str | None = None
) -> httpx.Response:
    headers = sign(SECRET, "msg_e2e", int(time.time()), BODY)
    return await client.post(
        "/v1/webhooks/replicate",
        content=body,
        headers={**headers, "content-type": "application/json"},
    )


async def test_a_signed_callback_finishes_the_job(sqlite_migrated_url: str) -> None:
    async with _served(sqlite_migrated_url, SECRET) as (manager, client):
        job = await manager.track("jobs-test/echo", PREDICTION, provider="replicate")
        response = await _deliver(client, BODY)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "applied"
        done = await manager.status(job.id)
        assert done.state is State.SUCCEEDED
        assert await manager.result(job.id) == "hello Zoë"
        again = await _deliver(client, BODY)  # Replicate retries the terminal webhook
        assert again.status_code == 200 and again.json()["outcome"] == "duplicate"


async def test_a_tampered_callback_is_refused(sqlite_migrated_url: str) -> None:
    async with _served(sqlite_migrated_url, SECRET) as (manager, client):
        job = await manager.track("jobs-test/echo", PREDICTION, provider="replicate")
        tampered = BODY.replace(b'"hello Zo', b'"HELLO Zo')
        response = await _deliver(client, tampered)
        assert response.status_code == 401
        assert SECRET not in response.text
        assert (await manager.status(job.id)).state is State.QUEUED


async def test_without_a_secret_callbacks_are_refused_for_a_retry(
    sqlite_migrated_url: str,
) -> None:
    async with _served(sqlite_migrated_url, None) as (_, client):
        response = await _deliver(client, BODY)
        assert response.status_code == 503
        assert "JOBS_REPLICATE_WEBHOOK_SECRET is not set" in response.text


async def test_the_webhook_events_asked_for_are_a_setting() -> None:
    """``JOBS_REPLICATE_WEBHOOK_EVENTS`` reaches the create's ``webhook_events_filter``; an
    event Replicate does not know is refused when the settings load."""
    from jobs.providers import create
    from jobs.providers.replicate import ReplicateProvider

    settings = Settings.from_env({"JOBS_REPLICATE_WEBHOOK_EVENTS": "start, logs,completed"})
    provider = create("replicate", settings)
    assert isinstance(provider, ReplicateProvider)
    assert provider.webhook_events == ("start", "logs", "completed")
    await provider.close()
    assert Settings.from_env({}).replicate_webhook_events == ("completed",)
    with pytest.raises(ConfigError, match="JOBS_REPLICATE_WEBHOOK_EVENTS"):
        Settings.from_env({"JOBS_REPLICATE_WEBHOOK_EVENTS": "done"})
