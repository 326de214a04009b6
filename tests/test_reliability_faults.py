"""Provider faults against the in-process poller: the fal emulator answers 10 % of queue
requests with 500, 5 % with 429 and a ``Retry-After``, drops 2 % of connections, delays
some replies past the client's read timeout, reports an unknown status and sends bodies
that are not JSON. Every job still ends in the state its input asks for, with the right
failure reason; a result that expired before the first poll fails as
``result_unavailable``; the poll tick survives it all; and the emulator's accounting shows
the status requests per job stay bounded. A submit whose reply timed out is never sent
twice by the provider (the bytes left: only the ambiguous-submit policy may decide)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from support.waiting import async_wait_for

from jobs import AsyncJobManager, Settings, State
from jobs.backoff import PollPolicy
from jobs.config import Secret
from jobs.poller import Poller
from jobs.providers.fal import FalProvider
from jobs.providers.http import RetryPolicy, make_client
from jobs.testing import FakeFalConfig, FakeFalServer, input_hash

pytestmark = pytest.mark.timeout(120)

APP = "fal-ai/flux/dev"
FAL_KEY = "fal-reliability-key-0001"
# The client gives up on a reply after this long; the emulator's slow replies take longer.
READ_TIMEOUT = 0.5
SLOW_SECONDS = 1.2
# Same shape as the defaults (retries with jittered backoff, Retry-After honoured), scaled
# down so a test takes seconds.
RETRY = RetryPolicy(attempts=4, base=0.05, cap=0.4, max_retry_after=1.0)
POLICY = PollPolicy(initial=0.2, factor=1.6, ceiling=1.0, retention_cap=5.0)
FAULTS: dict[str, Any] = {
    "error_500_rate": 0.10,
    "rate_limit_rate": 0.05,
    "retry_after": 0.2,
    "drop_rate": 0.02,
    # Not fixed by the issue; 3 % makes each of them near certain to occur in a run.
    "slow_rate": 0.03,
    "slow_seconds": SLOW_SECONDS,
    "unknown_status_rate": 0.03,
    "invalid_json_rate": 0.03,
}


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    config = FakeFalConfig(duration=1.0, queue_time=0.1, seed=20, key=FAL_KEY)
    with FakeFalServer(config) as server:
        yield server


def _manager(db_url: str, fal: FakeFalServer, policy: PollPolicy = POLICY) -> AsyncJobManager:
    settings = Settings.from_env(
        {}, database_url=db_url, fal_queue_url=fal.url, fal_key=Secret(FAL_KEY)
    )
    client = make_client(timeout=httpx.Timeout(READ_TIMEOUT, connect=READ_TIMEOUT))
    provider = FalProvider(queue_url=fal.url, key=settings.fal_key, client=client, retry=RETRY)
    return AsyncJobManager(settings, providers={"fal": provider}, poll_policy=policy)


@pytest.fixture
async def manager(sqlite_migrated_url: str, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    jm = _manager(sqlite_migrated_url, fal)
    try:
        yield jm
    finally:
        await jm.aclose()
        jm.store.close()


@asynccontextmanager
async def running(poller: Poller) -> AsyncIterator[Poller]:
    poller.start()
    try:
        yield poller
    finally:
        await poller.stop(timeout=SLOW_SECONDS + 1)


async def wait_terminal(manager: AsyncJobManager, ids: list[str], timeout: float) -> None:
    async def done() -> bool:
        states = [(await manager.status(job_id)).state for job_id in ids]
        return all(state.terminal for state in states)

    await async_wait_for(done, timeout, f"{len(ids)} jobs to finish", every=0.2)


async def events(manager: AsyncJobManager, job_id: str) -> list[dict[str, Any]]:
    return await asyncio.to_thread(manager.store.events, job_id)


def _inputs() -> list[dict[str, Any]]:
    """Mostly successes of assorted lengths, some remote failures (a 422 and a 500)."""
    inputs: list[dict[str, Any]] = [
        {"n": i, "_fake": {"duration": 0.4 + (i % 6) * 0.3}} for i in range(36)
    ]
    inputs += [{"n": 100 + i, "_fake": {"duration": 0.3, "fail": 422}} for i in range(3)]
    inputs += [{"n": 200 + i, "_fake": {"duration": 0.3, "fail": 500}} for i in range(3)]
    return inputs


def _expected(arguments: dict[str, Any]) -> tuple[State, str | None]:
    if "fail" in arguments["_fake"]:
        return State.FAILED, "remote_error"
    return State.SUCCEEDED, None


@pytest.mark.slow
async def test_every_job_ends_right_through_a_fault_storm(
    manager: AsyncJobManager, fal: FakeFalServer
) -> None:
    fal.config.update(FAULTS)  # on from the start: submits meet the faults too
    poller = Poller(manager, tick=0.05, lease=10, ambiguous_grace=1.0, ambiguous_period=0.5)
    async with running(poller):
        jobs = await asyncio.gather(*(manager.submit(APP, data) for data in _inputs()))
        await wait_terminal(manager, [job.id for job in jobs], 60)
        faults = dict(fal.stats.faults)
        # The tick outlived every fault: with the faults off, a new job goes through the
        # same poller from submit to result.
        fal.config.update({name: 0.0 for name in FAULTS if name.endswith("_rate")})
        late = await manager.submit(APP, {"n": "after the storm", "_fake": {"duration": 0.2}})
        await wait_terminal(manager, [late.id], 15)
    assert (await manager.status(late.id)).state is State.SUCCEEDED

    # Every kind of fault really happened, on submits and polls alike.
    assert set(faults) >= {"error_500", "rate_limit", "drop", "slow", "invalid_json"}, faults
    assert faults.get("unknown_status", 0) > 0, faults
    polls = []
    for job in jobs:
        final = await manager.status(job.id)
        state, reason = _expected(job.arguments)
        assert (final.state, final.failure_reason) == (state, reason), (job.arguments, final)
        assert final.request_id is not None
        found, result = await asyncio.to_thread(manager.store.result, job.id)
        if state is State.SUCCEEDED:
            request = fal.fake.get_request(final.request_id)
            assert request is not None
            assert found and result == request.output()
        else:
            assert not found  # a failed job never has a stored result
        changes = [e for e in await events(manager, job.id) if e["kind"] == "state"]
        assert [e["to_state"] for e in changes if e["to_state"] in ("succeeded", "failed")] == [
            state.value
        ]
        counters = fal.stats.requests[final.request_id]
        assert counters.result_fetches <= RETRY.attempts * 2, counters
        polls.append(counters.status_polls)
    # Bounded: a job lives about 0.5 to 2.5 s; the backoff (0.2 s, x1.6, 1 s ceiling) polls it
    # about 2 to 7 times, each poll sending at most RETRY.attempts status requests, and a poll
    # that fails whole doubles the next interval. Runs here show at most 9 requests for a job
    # and about 4 on average; a retry loop without a bound would show dozens or hundreds.
    assert max(polls) <= 5 * RETRY.attempts, sorted(polls)
    assert sum(polls) / len(polls) <= 8, sorted(polls)
    # Resubmitted ambiguous submits are the only inputs that reached the queue twice, and
    # each such resubmission is recorded on its job.
    for job in jobs:
        sent = [e for e in await events(manager, job.id) if e["kind"] == "submit_sent"]
        assert fal.stats.submits_by_input[input_hash(job.arguments)] <= len(sent)


async def test_expired_results_fail_as_result_unavailable(
    sqlite_migrated_url: str, fal: FakeFalServer
) -> None:
    # fal forgets a finished request after its retention; here 1 s, while the first poll
    # comes 3 s after the submit.
    fal.config.update({"retention": 1.0})
    late_policy = PollPolicy(initial=3.0, factor=1.6, ceiling=3.0, retention_cap=5.0)
    manager = _manager(sqlite_migrated_url, fal, late_policy)
    try:
        gone = [await manager.submit(APP, {"n": i, "_fake": {"duration": 0.1}}) for i in range(4)]
        # Finishes at about 2.4 s: the first poll, at 3 s, finds it still kept.
        kept = await manager.submit(APP, {"n": "kept", "_fake": {"duration": 2.3}})
        async with running(Poller(manager, tick=0.05, lease=10)):
            await wait_terminal(manager, [job.id for job in [*gone, kept]], 20)
        for job in gone:
            final = await manager.status(job.id)
            assert final.state is State.FAILED
            assert final.failure_reason == "result_unavailable"
            assert "retention" in final.error["message"]
            assert await asyncio.to_thread(manager.store.result, job.id) == (False, None)
        assert (await manager.status(kept.id)).state is State.SUCCEEDED
    finally:
        await manager.aclose()
        manager.store.close()


async def test_a_submit_whose_reply_timed_out_is_sent_once_per_counted_attempt(
    manager: AsyncJobManager, fal: FakeFalServer
) -> None:
    # The emulator enqueues the request, then answers after the client stopped waiting.
    fal.config.update({"slow_rate": 1.0, "slow_seconds": SLOW_SECONDS})
    job = await manager.submit(APP, {"prompt": "slow reply"})
    # The provider never resends a submit whose bytes left; only the policy does, each
    # time as a new counted attempt, up to JOBS_MAX_SUBMIT_ATTEMPTS (3).
    assert job.state is State.FAILED and job.failure_reason == "ambiguous_submit"
    assert job.attempts == 3 and job.request_id is None
    kinds = [e["kind"] for e in await events(manager, job.id)]
    assert kinds.count("submit_sent") == kinds.count("submit_ambiguous") == 3
    assert fal.stats.submits_by_input == {input_hash({"prompt": "slow reply"}): 3}
    assert fal.stats.submit_attempts == 3
    fal.config.update({"slow_rate": 0.0})
    await asyncio.sleep(SLOW_SECONDS)  # let the emulator finish the slow reply before it stops
