"""Submits settled in seconds and bounded, cancels confirmed promptly, rate limits that
cannot stop everything (issue 10, items 1 to 3), against the fal emulator.

- A cancelled job reads ``cancelled`` soon after fal cancelled it, webhooks on or off (fal
  sends no webhook for a cancelled request, so the webhook safety net must not apply).
- A submit answered 500 with the request's id is adopted by a status poll, not resent.
- Eight runs of one batch file at once all end with every line submitted exactly once.
- A ``Retry-After: 86400`` pauses a provider for at most the cap; a waiter can be
  cancelled; a submit through the API that would wait longer than a bound answers at once
  with the job recorded, and the server's resolver sends it once the pause is over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from support.managers import local_settings, open_manager
from support.waiting import async_wait_for

from jobs import AsyncJobManager, State
from jobs.batch import read_lines, submit_batch
from jobs.config import Secret, Settings
from jobs.errors import ConfigError
from jobs.poller import Poller
from jobs.providers.fal import FalProvider
from jobs.providers.http import RateGate, RetryPolicy, make_client
from jobs.testing import FakeFal, FakeFalConfig, FakeFalServer, input_hash
from jobs.web import create_app

pytestmark = pytest.mark.timeout(60)

APP = "fal-ai/flux/dev"
RETRY = RetryPolicy(attempts=4, base=0.05, cap=0.4, max_retry_after=2.0)


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    config = FakeFalConfig(duration=0.3, queue_time=0.05, seed=11, webhook_retries=0)
    with FakeFalServer(config) as server:
        yield server


def _provider(fal: FakeFalServer, retry: RetryPolicy = RETRY) -> FalProvider:
    return FalProvider(queue_url=fal.url, key=Secret("test-key"), client=make_client(), retry=retry)


async def _reads(manager: AsyncJobManager, job_id: str, state: State, timeout: float) -> None:
    async def reached() -> bool:
        return (await manager.status(job_id)).state is state

    await async_wait_for(reached, timeout, f"job {job_id} to read {state.value}")


# --- item 1: cancel ---------------------------------------------------------------------------


@pytest.mark.parametrize("webhook", [True, False], ids=["webhooks-on", "webhooks-off"])
async def test_a_cancelled_job_reads_cancelled_promptly(
    tmp_path: Path, fal: FakeFalServer, webhook: bool
) -> None:
    # Like fal: the runner stops a moment after the cancel, and no webhook follows it.
    fal.config.update({"duration": 60.0, "cancel_delay": 0.5, "webhook_on_cancel": False})
    # Webhooks point at a port nobody serves: none arrives, as for a real cancel.
    public_url = "http://127.0.0.1:9" if webhook else None
    settings = local_settings(tmp_path, fal.url, public_url=public_url)
    async with open_manager(settings, providers={"fal": _provider(fal)}) as manager:
        job = await manager.submit(APP, {"prompt": "stop me"})
        assert job.webhook is webhook

        async def running() -> bool:
            request = fal.fake.get_request(job.request_id or "")
            return request is not None and request.state(fal.fake._clock()) == "IN_PROGRESS"

        await async_wait_for(running, 10, "the request to run")
        poller = Poller(manager, tick=0.05)
        poller.start()
        try:
            # What POST /v1/jobs/{id}/cancel does: ask fal, answer without waiting.
            await manager.cancel(job.id, wait=0.0)
            # fal ends the request 0.5 s later; the job must read so within 5 s of that.
            await _reads(manager, job.id, State.CANCELLED, 5.5)
        finally:
            await poller.stop()


# --- item 2: ambiguous submits ----------------------------------------------------------------


class SubmitFaults(FakeFal):
    """Faults on submits only: polls answer normally."""

    def _draw_fault(self, kind: str) -> str | None:
        return super()._draw_fault(kind) if kind == "submit" else None


async def test_a_500_that_names_the_request_is_adopted_not_resent(tmp_path: Path) -> None:
    server = FakeFalServer(FakeFalConfig(duration=0.2, queue_time=0.05, error_500_rate=1.0))
    server.fake = SubmitFaults(server.fake.config)
    with server:
        settings = local_settings(tmp_path, server.url)
        async with open_manager(settings, providers={"fal": _provider(server)}) as manager:
            job = await manager.submit(APP, {"prompt": "queued after all"})
            assert job.state is State.QUEUED and job.attempts == 1
            assert job.request_id is not None
            assert server.fake.stats.submits_by_input == {
                input_hash({"prompt": "queued after all"}): 1
            }
            resolved = [
                e for e in manager.store.events(job.id) if e["kind"] == "ambiguous_resolved"
            ]
            assert [e["reason"] for e in resolved] == ["poll"]
            done = await manager.result(job.id, wait=True, timeout=20)
            assert done["prompt"] == "queued after all"


async def test_eight_runs_of_one_file_submit_every_line_once_and_all_succeed(
    tmp_path: Path, fal: FakeFalServer
) -> None:
    lines = read_lines(f'{{"prompt": "line {i}"}}' for i in range(30))
    settings = local_settings(tmp_path, fal.url)
    managers = [AsyncJobManager(settings, providers={"fal": _provider(fal)}) for _ in range(8)]
    try:
        reports = await asyncio.gather(
            *(submit_batch(m, APP, lines, batch="shared", concurrency=8) for m in managers)
        )
    finally:
        for manager in managers:
            await manager.aclose()
            manager.store.close()
    for report in reports:
        assert report.ok, report.summary()
        assert set(report.counts) <= {"submitted", "existing"}
        assert sum(report.counts.values()) == 30
    assert fal.fake.stats.submits == 30
    assert set(fal.fake.stats.submits_by_input.values()) == {1}


# --- item 3: rate limits ----------------------------------------------------------------------


async def test_a_huge_retry_after_pauses_at_most_the_cap() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    gate = RateGate(sleep=sleep, max_pause=120.0)
    gate.pause(86400)
    assert 119.0 < gate.remaining() <= 120.0
    await gate.wait()
    assert len(slept) == 1 and slept[0] <= 120.0
    # The provider caps it further at its own max_retry_after.
    async with httpx.AsyncClient() as client:
        provider = FalProvider(
            queue_url="http://fal.invalid", key=None, client=client, retry=RETRY, gate=gate
        )
        provider.gate.pause(86400)
    assert provider.gate.max_pause == RETRY.max_retry_after


async def test_a_waiter_on_a_paused_gate_can_be_cancelled() -> None:
    gate = RateGate()
    gate.pause(3600)
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, timeout=5)


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[tuple[AsyncJobManager, FakeFalServer]]:
    config = FakeFalConfig(duration=0.2, queue_time=0.05)
    with FakeFalServer(config) as server:
        # A cap just above the API's bound (5 s), so the test waits it out in seconds.
        retry = RetryPolicy(attempts=2, base=0.05, cap=0.1, max_retry_after=6.0)
        settings = local_settings(tmp_path, server.url)
        async with open_manager(settings, providers={"fal": _provider(server, retry)}) as m:
            yield m, server


async def test_an_api_submit_behind_a_long_pause_is_recorded_and_sent_later(
    limited: tuple[AsyncJobManager, FakeFalServer],
) -> None:
    manager, server = limited
    provider = manager.provider("fal")
    assert isinstance(provider, FalProvider)
    provider.gate.pause(86400)  # as after a 429 with Retry-After: 86400 (capped: 6 s)
    app = create_app(manager, settings=manager.settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        # Answers at once (no wait of the pause) with the job recorded and not yet sent.
        async with asyncio.timeout(10):
            reply = await client.post(
                "/v1/jobs", json={"application": APP, "arguments": {"prompt": "later"}}
            )
    assert reply.status_code < 300, reply.text
    job_id = reply.json()["id"]
    job = await manager.status(job_id)
    assert job.state is State.SUBMITTING and job.attempts == 0
    assert server.fake.stats.submit_attempts == 0
    kinds = [e["kind"] for e in manager.store.events(job_id)]
    assert kinds[-1] == "submit_deferred"
    # The server's resolver picks the deferred job without the 120 s grace, and sends it
    # once the pause is over.
    poller = Poller(manager, tick=0.05, ambiguous_period=0.1)
    poller.start()
    try:
        await _reads(manager, job_id, State.SUCCEEDED, 20)
    finally:
        await poller.stop()
    assert server.fake.stats.submits == 1


# --- settings -----------------------------------------------------------------------------


def test_the_new_settings_are_read_and_checked() -> None:
    env = {
        "JOBS_MAX_SUBMIT_ATTEMPTS": "5",
        "JOBS_DUPLICATE_POLICY": "cancel",
        "JOBS_FAL_USER_ID": "acct-1",
    }
    settings = Settings.from_env(env)
    assert settings.max_submit_attempts == 5
    assert (settings.duplicate_policy, settings.fal_user_id) == ("cancel", "acct-1")
    assert Settings.from_env({}).max_submit_attempts == 3
    for bad in ({"JOBS_MAX_SUBMIT_ATTEMPTS": "0"}, {"JOBS_DUPLICATE_POLICY": "nuke"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Settings.from_env(bad)


async def test_an_api_cancel_behind_a_long_pause_answers_at_once(
    limited: tuple[AsyncJobManager, FakeFalServer],
) -> None:
    manager, server = limited
    job = await manager.submit(APP, {"prompt": "keep", "_fake": {"duration": 30}})
    provider = manager.provider("fal")
    assert isinstance(provider, FalProvider)
    provider.gate.pause(86400)
    app = create_app(manager, settings=manager.settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        async with asyncio.timeout(10):
            reply = await client.post(f"/v1/jobs/{job.id}/cancel")
    assert reply.status_code == 502, reply.text
    assert int(reply.headers["retry-after"]) >= 5
    assert "rate limiting" in reply.json()["error"]["message"]
    assert server.fake.stats.cancels == 0
    assert (await manager.status(job.id)).cancel_requested_at is None
