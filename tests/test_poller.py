"""The poller against the fal emulator, in-process: jobs finish with few polls, a 429 storm
pauses the provider instead of each job, faults and bugs never stop the tick, ambiguous
submits are decided (and recorded) by policy, a dead owner's leases are taken over, a poll's
slot is free once the provider replied (bounded while writes wait), and stop is bounded and
hands the leases back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from support.waiting import async_wait_for

from jobs import AsyncJobManager, Settings, State
from jobs.backoff import PollPolicy
from jobs.config import Secret
from jobs.metrics import REGISTRY
from jobs.poller import Poller
from jobs.providers.base import Observation, RemoteRef
from jobs.providers.fal import FalProvider
from jobs.providers.http import make_client
from jobs.store import Callback, Claimed, Job, NewJob, Polled, Store
from jobs.testing import FakeFalConfig, FakeFalServer, input_hash

pytestmark = pytest.mark.timeout(60)

APP = "fal-ai/flux/dev"
# Fast enough for tests, same shape as the defaults (1 s initial, x1.6, 30 s ceiling).
POLICY = PollPolicy(initial=0.2, factor=1.6, ceiling=1.0, retention_cap=5.0)


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=1.0, queue_time=0.1, seed=11)) as server:
        yield server


def _settings(db_url: str, fal_url: str, **extra: Any) -> Settings:
    return Settings.from_env(
        {}, database_url=db_url, fal_queue_url=fal_url, fal_key=Secret("test-key"), **extra
    )


@pytest.fixture
async def manager(sqlite_migrated_url: str, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    jm = AsyncJobManager(_settings(sqlite_migrated_url, fal.url), poll_policy=POLICY)
    yield jm
    await jm.aclose()
    jm.store.close()


@asynccontextmanager
async def running(poller: Poller) -> AsyncIterator[Poller]:
    poller.start()
    try:
        yield poller
    finally:
        await poller.stop()


async def wait_all_terminal(manager: AsyncJobManager, count: int, timeout: float) -> None:
    async def done() -> bool:
        counts = await asyncio.to_thread(manager.store.count_by_state)
        return sum(n for state, n in counts.items() if state.terminal) >= count

    await async_wait_for(done, timeout, f"{count} jobs to finish", every=0.1)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def expected_result(fal: FakeFalServer, job: Job) -> Any:
    request = fal.fake.get_request(job.request_id or "")
    assert request is not None
    return request.output(fal.config.result_padding)


async def events(manager: AsyncJobManager, job: Job) -> list[dict[str, Any]]:
    return await asyncio.to_thread(manager.store.events, job.id)


async def test_jobs_finish_with_few_polls(manager: AsyncJobManager, fal: FakeFalServer) -> None:
    inputs: list[dict[str, Any]] = [
        {"n": i, "_fake": {"duration": 2.5 + (i % 5) * 0.1}} for i in range(30)
    ]
    inputs += [{"n": 100 + i, "_fake": {"duration": 0.5, "fail": 422}} for i in range(4)]
    jobs = await asyncio.gather(*(manager.submit(APP, data) for data in inputs))
    async with running(Poller(manager, tick=0.05, lease=10)):
        await wait_all_terminal(manager, len(jobs), 30)

    for job in jobs:
        final = await manager.status(job.id)
        counters = fal.fake.stats.requests[job.request_id or ""]
        assert counters.result_fetches == 1  # fetched once, then cached
        if job.arguments["n"] >= 100:
            assert final.state is State.FAILED and final.failure_reason == "remote_error"
            continue
        assert final.state is State.SUCCEEDED
        assert await manager.result(job.id) == expected_result(fal, job)
    polls = [fal.fake.stats.requests[job.request_id or ""].status_polls for job in jobs]
    # Backoff: about 6 polls for a 3 s job; polling every 0.2 s would take about 15.
    assert max(polls) <= 9, polls


async def test_a_429_storm_pauses_the_provider_not_each_job(
    manager: AsyncJobManager, fal: FakeFalServer
) -> None:
    jobs = await asyncio.gather(
        *(manager.submit(APP, {"n": i, "_fake": {"duration": 3.0}}) for i in range(24))
    )
    waits = metric("jobs_rate_limit_waits_total", provider="fal")
    concurrency, storm, retry_after = 6, 2.5, 1.0
    async with running(Poller(manager, tick=0.05, concurrency=concurrency, lease=20)):
        await asyncio.sleep(0.5)
        before = fal.fake.stats.status_polls
        fal.config.update({"rate_limit_rate": 1.0, "retry_after": retry_after})
        await asyncio.sleep(storm)
        fal.config.update({"rate_limit_rate": 0.0})
        during = fal.fake.stats.status_polls - before
        await wait_all_terminal(manager, len(jobs), 30)

    # While paused, the provider sends nothing: about one wave of `concurrency` requests per
    # Retry-After. Jobs retrying on their own would send several per job and second.
    assert 0 < during <= concurrency * (storm / retry_after + 2), during
    assert metric("jobs_rate_limit_waits_total", provider="fal") > waits
    for job in jobs:
        assert (await manager.status(job.id)).state is State.SUCCEEDED
        # The pause absorbed the storm: no poll gave up and pushed its job back.
        assert not [e for e in await events(manager, job) if e["kind"] == "poll_failed"]


class FlakyStore(Store):
    """A database that fails the first few claims (a restart, a lock timeout)."""

    failing_claims = 3

    def claim_due(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        batch: str | None = None,
        now: float | None = None,
    ) -> list[Claimed]:
        if self.failing_claims > 0:
            self.failing_claims -= 1
            raise RuntimeError("the database went away")
        return super().claim_due(
            owner, limit=limit, lease_seconds=lease_seconds, batch=batch, now=now
        )


class BuggyFal(FalProvider):
    """A provider with a bug: the first few status calls raise something unexpected."""

    bugs = 3

    async def status(self, ref: RemoteRef, *, logs: bool = True) -> Observation:
        if self.bugs > 0:
            self.bugs -= 1
            raise KeyError("a bug, not a ProviderError")
        return await super().status(ref, logs=logs)


async def test_faults_and_bugs_never_stop_the_tick(
    sqlite_migrated_url: str, fal: FakeFalServer
) -> None:
    settings = _settings(sqlite_migrated_url, fal.url)
    provider = BuggyFal(queue_url=fal.url, key=settings.fal_key, client=make_client())
    manager = AsyncJobManager(
        settings,
        store=FlakyStore.open(sqlite_migrated_url),
        providers={"fal": provider},
        poll_policy=POLICY,
    )
    errors = {w: metric("jobs_poller_errors_total", where=w) for w in ("claim", "poll")}
    try:
        jobs = await asyncio.gather(*(manager.submit(APP, {"n": i}) for i in range(24)))
        fal.config.update(
            {
                "error_500_rate": 0.1,
                "drop_rate": 0.05,
                "invalid_json_rate": 0.05,
                "unknown_status_rate": 0.05,
            }
        )
        async with running(Poller(manager, tick=0.05, lease=3)):
            await wait_all_terminal(manager, len(jobs), 40)
        for job in jobs:
            final = await manager.status(job.id)
            assert final.state is State.SUCCEEDED
            assert await manager.result(job.id) == expected_result(fal, job)
        seen = {e["reason"] for job in jobs for e in await events(manager, job)}
        assert "ProviderProtocolError" in seen  # invalid JSON / unknown status: poll again
    finally:
        await manager.aclose()
        manager.store.close()
    assert set(fal.fake.stats.faults) >= {"error_500", "drop", "invalid_json", "unknown_status"}
    assert metric("jobs_poller_errors_total", where="claim") - errors["claim"] == 3
    # The 3 injected bugs, plus any poll that random faults slowed past the 3 s test lease.
    assert metric("jobs_poller_errors_total", where="poll") - errors["poll"] >= 3


async def _submitted_elsewhere(fal: FakeFalServer, data: dict[str, Any]) -> str:
    async with httpx.AsyncClient() as client:
        reply = await client.post(f"{fal.url}/{APP}", json=data, headers={"Authorization": "Key k"})
    request_id: str = reply.json()["request_id"]
    return request_id


@pytest.mark.parametrize("policy", ["resubmit", "fail"])
async def test_ambiguous_submits_are_decided_and_recorded(
    manager: AsyncJobManager, fal: FakeFalServer, policy: str
) -> None:
    store = manager.store
    past = time.time() - 60
    # Its submitter sent it, then died before any reply: attempts 1, no request id.
    lost, _ = store.create_job(NewJob(application=APP, arguments={"prompt": "lost"}), now=past)
    assert store.begin_submit(lost.id, 0, now=past)
    # A submitter died between recording the job and sending it: attempts 0.
    never, _ = store.create_job(NewJob(application=APP, arguments={"prompt": "never"}), now=past)
    # A webhook named the job, then the process died before applying it.
    adopted, _ = store.create_job(NewJob(application=APP, arguments={"prompt": "adopted"}))
    assert store.begin_submit(adopted.id, 0, now=past)
    request_id = await _submitted_elsewhere(fal, {"prompt": "adopted"})
    # The webhook came without its payload: the job is adopted and must be polled.
    no_payload = Observation(state=State.IN_PROGRESS, needs_result=True, source="webhook")
    callback = Callback(
        no_payload,
        provider="fal",
        request_id=request_id,
        user_id="u-1",
        job_id=adopted.id,
        account="u-1",
    )
    assert store.write_many([callback], now=past)[0].applied is not None
    await asyncio.sleep(0.6)
    # Recorded a moment ago: its submitter may still be at work.
    fresh, _ = store.create_job(NewJob(application=APP, arguments={"prompt": "fresh"}))

    poller = Poller(
        manager,
        tick=0.05,
        ambiguous_grace=0.5,
        ambiguous_policy=policy,  # type: ignore[arg-type]
    )
    assert await poller.resolve_ambiguous() == 2  # lost and never; adopted is due instead
    assert await poller.resolve_ambiguous() == 0  # decided once
    adopted_now = await manager.status(adopted.id)
    assert adopted_now.next_poll_at is not None and adopted_now.next_poll_at <= time.time()

    def sent_reasons(evs: list[dict[str, Any]]) -> list[str]:
        return [e["reason"] for e in evs if e["kind"] == "submit_sent"]

    never_after = await manager.status(never.id)
    assert never_after.state is State.QUEUED and never_after.attempts == 1
    assert sent_reasons(await events(manager, never)) == ["never sent"]
    lost_after = await manager.status(lost.id)
    lost_events = await events(manager, lost)
    submits = fal.fake.stats.submits_by_input
    if policy == "resubmit":
        assert lost_after.state is State.QUEUED and lost_after.attempts == 2
        assert sent_reasons(lost_events) == ["submit", "ambiguous resubmit"]
        assert submits[input_hash({"prompt": "lost"})] == 1  # the first send never arrived
    else:
        assert lost_after.state is State.FAILED and lost_after.failure_reason == "ambiguous_submit"
        assert lost_events[-1]["to_state"] == "failed"
        assert lost_events[-1]["reason"] == "ambiguous_submit"
        assert input_hash({"prompt": "lost"}) not in submits
    assert "ambiguous_resolved" in [e["kind"] for e in await events(manager, adopted)]
    fresh_now = await manager.status(fresh.id)
    assert fresh_now.state is State.SUBMITTING and fresh_now.attempts == 0

    # Running, the scheduled resolver sends the fresh job once it is old enough, and the
    # tick takes every sent job to the end.
    poller.ambiguous_period = 0.2
    async with running(poller):
        await wait_all_terminal(manager, 4, 20)
    assert (await manager.status(fresh.id)).state is State.SUCCEEDED
    assert (await manager.status(adopted.id)).state is State.SUCCEEDED
    assert submits[input_hash({"prompt": "fresh"})] == 1
    assert submits[input_hash({"prompt": "never"})] == 1


async def test_a_dead_owners_jobs_are_taken_over(
    manager: AsyncJobManager, fal: FakeFalServer
) -> None:
    jobs = await asyncio.gather(
        *(manager.submit(APP, {"n": i, "_fake": {"duration": 0.3}}) for i in range(10))
    )
    await asyncio.sleep(POLICY.initial * 1.5)  # all due
    # Another poller claims them all and dies with the lease.
    claimed = manager.store.claim_due("dead-host:1:0", limit=100, lease_seconds=1.0)
    assert len(claimed) == len(jobs)
    takeovers = metric("jobs_lease_takeovers_total")
    poller = Poller(manager, tick=0.05)
    assert await poller.tick() == 0  # a live lease is respected
    await asyncio.sleep(1.0)  # the dead owner's lease ends
    assert await poller.tick() == len(jobs)
    await poller.idle()
    assert metric("jobs_lease_takeovers_total") - takeovers == len(jobs)
    async with running(poller):
        await wait_all_terminal(manager, len(jobs), 20)
    for job in jobs:
        assert (await manager.status(job.id)).state is State.SUCCEEDED


async def test_stop_lets_polls_finish_then_hands_the_leases_back(
    manager: AsyncJobManager, fal: FakeFalServer
) -> None:
    jobs = await asyncio.gather(
        *(manager.submit(APP, {"n": i, "_fake": {"duration": 60}}) for i in range(5))
    )
    owner = manager.owner

    # Polls that finish within the timeout are applied normally: the lease ends with them.
    fal.config.latency = 0.3
    poller = Poller(manager, tick=0.05, lease=30)
    poller.start()
    await async_wait_for(_true(lambda: poller.in_flight == 5), 5, "5 polls in flight")
    await poller.stop(timeout=5)
    for job in jobs:
        after = await manager.status(job.id)
        # On a loaded machine a job may come due and be polled again before stop() is called.
        assert after.lease_owner is None and after.polls >= 1
        assert after.next_poll_at is not None and after.next_poll_at > time.time()

    # Polls cut off by the timeout: stop returns promptly and the jobs are due at once.
    fal.config.latency = 5.0
    poller = Poller(manager, tick=0.05, lease=30)
    poller.start()
    await async_wait_for(_true(lambda: poller.in_flight == 5), 5, "5 polls in flight")
    assert {(await manager.status(j.id)).lease_owner for j in jobs} == {owner}
    started = time.monotonic()
    await poller.stop(timeout=0.2)
    assert time.monotonic() - started < 1.5
    for job in jobs:
        after = await manager.status(job.id)
        assert after.lease_owner is None
        assert after.next_poll_at is not None and after.next_poll_at <= time.time()


class HeldStore(Store):
    """A database whose poll writes wait until ``release`` is set (a slow group commit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def write_many(self, writes: Any, *, now: float | None = None) -> list[Any]:
        if any(isinstance(write, Polled) for write in writes):
            self.release.wait(20)
        return super().write_many(writes, now=now)


async def test_a_poll_frees_its_slot_when_the_reply_is_in(
    sqlite_migrated_url: str, fal: FakeFalServer
) -> None:
    """While replies wait for their write, the poller claims and polls more jobs, up to
    ``concurrency`` more than its slots; the waiting ones keep their leases."""
    store = HeldStore.open(sqlite_migrated_url)
    manager = AsyncJobManager(
        _settings(sqlite_migrated_url, fal.url), store=store, poll_policy=POLICY
    )
    try:
        jobs = [await manager.submit(APP, {"n": i, "_fake": {"duration": 60}}) for i in range(6)]
        await asyncio.sleep(POLICY.initial * 1.5)  # all due
        poller = Poller(manager, tick=60, concurrency=2)
        assert await poller.tick() == 2
        # Both replies come in, their writes wait: the freed slots are refilled at once.
        await async_wait_for(_true(lambda: poller.in_flight == 4), 10, "4 polls")
        assert await poller.tick() == 0  # writes waiting for as many polls as there are slots
        held = {j.id for j in jobs if (await manager.status(j.id)).lease_owner == manager.owner}
        assert len(held) == 4
        store.release.set()

        async def all_polled() -> bool:
            found = [await manager.status(j.id) for j in jobs]
            return all(j.polls >= 1 and j.lease_owner is None for j in found)

        await async_wait_for(all_polled, 20, "every job polled once")  # the backlog goes on
        await poller.stop()
    finally:
        store.release.set()
        await manager.aclose()
        store.close()


def _true(check: Any) -> Any:
    async def wrapped() -> bool:
        return bool(check())

    return wrapped


async def test_the_poller_refuses_nonsense(manager: AsyncJobManager) -> None:
    with pytest.raises(ValueError, match="ambiguous_policy"):
        Poller(manager, ambiguous_policy="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch"):
        Poller(manager, concurrency=0)
    poller = Poller(manager)
    poller.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            poller.start()
    finally:
        await poller.stop()
