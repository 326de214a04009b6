"""The Python API against the fal emulator: submit, wait, idempotency, failures, cancel,
track, events and durable subscribe."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.managers import local_settings, open_manager

from jobs import (
    AsyncJobManager,
    CancelTooLate,
    Completed,
    InProgress,
    JobFailed,
    JobManager,
    JobNotFinished,
    JobNotFound,
    Queued,
    State,
    WaitTimeout,
)
from jobs.errors import ConfigError
from jobs.migrate import upgrade
from jobs.store import Store
from jobs.testing import FakeFalConfig, FakeFalServer, input_hash


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.3, queue_time=0.1, seed=7)) as server:
        yield server


@pytest.fixture
async def jm(tmp_path: Path, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    async with open_manager(local_settings(tmp_path, fal.url)) as manager:
        yield manager


async def test_submit_and_wait_for_the_result(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    job = await jm.submit("fal-ai/flux/dev", {"prompt": "a cat"}, labels={"k": "v"})
    assert job.state is State.QUEUED and job.request_id
    result = await jm.result(job.id, wait=True, timeout=20)
    assert result["prompt"] == "a cat" and result["input"] == {"prompt": "a cat"}
    done = await jm.status(job.request_id or "")
    assert done.state is State.SUCCEEDED and done.finished_at is not None
    # Cached: reading again asks the provider nothing.
    fetched = fal.fake.stats.result_fetches
    assert await jm.result(job.id) == result
    assert fal.fake.stats.result_fetches == fetched == 1


async def test_idempotency_key_sends_once(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    first = await jm.submit("fal-ai/flux/dev", {"prompt": "x"}, idempotency_key="k-1")
    again = await jm.submit("fal-ai/flux/dev", {"prompt": "x"}, idempotency_key="k-1")
    assert again.id == first.id and fal.fake.stats.submits == 1


async def test_not_finished_and_unknown(jm: AsyncJobManager) -> None:
    job = await jm.submit("fal-ai/flux/dev", {"_fake": {"duration": 30}})
    with pytest.raises(JobNotFinished):
        await jm.result(job.id)
    with pytest.raises(WaitTimeout, match="still"):
        await jm.result(job.id, wait=True, timeout=0.3)
    with pytest.raises(JobNotFound):
        await jm.status("no-such-job")


async def test_remote_failure_keeps_the_error(jm: AsyncJobManager) -> None:
    job = await jm.submit("fal-ai/flux/dev", {"_fake": {"fail": 422}})
    with pytest.raises(JobFailed) as caught:
        await jm.result(job.id, wait=True, timeout=20)
    failed = await jm.status(job.id)
    assert failed.state is State.FAILED and failed.failure_reason == "remote_error"
    assert caught.value.error == failed.error
    assert failed.error["status_code"] == 422 and failed.error["request_id"] == job.request_id
    assert failed.error["detail"]["detail"]  # fal's validation detail, as reported


async def test_rejected_submit(tmp_path: Path) -> None:
    with FakeFalServer(FakeFalConfig(key="the-right-key")) as server:
        manager = AsyncJobManager(local_settings(tmp_path, server.url))
        try:
            job = await manager.submit("fal-ai/flux/dev", {"prompt": "x"})
        finally:
            await manager.aclose()
            manager.store.close()
    assert job.state is State.FAILED and job.failure_reason == "submit_rejected"
    assert job.error["status_code"] == 401
    assert "test-key" not in str(job.error)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_queue(tmp_path: Path, fal: FakeFalServer) -> None:
    down = AsyncJobManager(local_settings(tmp_path, f"http://127.0.0.1:{_closed_port()}"))
    try:
        plain = await down.submit("fal-ai/flux/dev", {"prompt": "x"})
        assert plain.state is State.FAILED and plain.failure_reason == "submit_unreachable"
        keyed = await down.submit("fal-ai/flux/dev", {"prompt": "y"}, idempotency_key="k")
        assert keyed.state is State.SUBMITTING and keyed.attempts == 0
    finally:
        await down.aclose()
        down.store.close()
    # The queue is back: the same call with the same key sends the job now, once.
    up = AsyncJobManager(local_settings(tmp_path, fal.url))
    try:
        sent = await up.submit("fal-ai/flux/dev", {"prompt": "y"}, idempotency_key="k")
        assert sent.id == keyed.id and sent.state is State.QUEUED
        assert fal.fake.stats.submits == 1
    finally:
        await up.aclose()
        up.store.close()


async def test_bad_input_is_refused_before_recording(jm: AsyncJobManager) -> None:
    with pytest.raises(ConfigError, match="endpoint id"):
        await jm.submit("flux", {})
    with pytest.raises(ConfigError, match="priority"):
        await jm.submit("fal-ai/flux/dev", {}, priority="urgent")
    assert await jm.store.aio.run(jm.store.list_jobs) == []


async def test_an_always_dropped_submit_is_sent_a_bounded_number_of_times(
    jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    fal.config.drop_rate = 1.0  # the queue takes the request, then the connection drops
    job = await jm.submit("fal-ai/flux/dev", {"prompt": "lost?"})
    # Settled before submit returned: resubmitted (the default policy) up to
    # JOBS_MAX_SUBMIT_ATTEMPTS (3) sends, then failed; never resent forever.
    assert job.state is State.FAILED and job.failure_reason == "ambiguous_submit"
    assert job.attempts == 3 and job.request_id is None
    kinds = [e["kind"] for e in await jm.store.aio.run(jm.store.events, job.id)]
    assert kinds.count("submit_sent") == kinds.count("submit_ambiguous") == 3
    assert fal.fake.stats.submits == 3  # each send once: no blind retry inside a send


async def test_ambiguous_submit_fails_at_once_under_policy_fail(
    tmp_path: Path, fal: FakeFalServer
) -> None:
    fal.config.drop_rate = 1.0
    settings = local_settings(tmp_path, fal.url, ambiguous_policy="fail")
    async with open_manager(settings) as manager:
        job = await manager.submit("fal-ai/flux/dev", {"prompt": "lost?"})
    # No webhook was asked for, so nothing could ever adopt it: decided now, not in 120 s.
    assert job.state is State.FAILED and job.failure_reason == "ambiguous_submit"
    assert job.attempts == 1 and fal.fake.stats.submits == 1


async def test_jobs_finish_through_provider_faults(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    jobs = [await jm.submit("fal-ai/flux/dev", {"n": i}) for i in range(6)]
    fal.config.update({"error_500_rate": 0.1, "rate_limit_rate": 0.05, "retry_after": 0.2})
    fal.config.update({"drop_rate": 0.02, "invalid_json_rate": 0.02, "unknown_status_rate": 0.02})
    results = await asyncio.gather(*(jm.result(j.id, wait=True, timeout=60) for j in jobs))
    assert [r["input"] for r in results] == [{"n": i} for i in range(6)]
    for job in jobs:
        # A fetch that met an injected fault is retried (bounded); stored once all the same.
        assert fal.fake.stats.requests[job.request_id or ""].result_fetches <= 5
        events = await jm.store.aio.run(jm.store.events, job.id)
        assert [e["to_state"] for e in events if e["kind"] == "state"] == ["succeeded"]


async def test_cancel(jm: AsyncJobManager) -> None:
    job = await jm.submit("fal-ai/flux/dev", {"_fake": {"queue_time": 30}})
    cancelled = await jm.cancel(job.id)
    assert cancelled.state is State.CANCELLED
    with pytest.raises(CancelTooLate):
        await jm.cancel(job.id)


async def test_track_adopts_a_foreign_request(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{fal.url}/fal-ai/flux/dev",
            json={"prompt": "elsewhere"},
            headers={"Authorization": "Key x"},
        )
    request_id = reply.json()["request_id"]
    job = await jm.track("fal-ai/flux/dev", request_id)
    assert (await jm.track("fal-ai/flux/dev", request_id)).id == job.id
    assert (await jm.result(request_id, wait=True, timeout=20))["prompt"] == "elsewhere"


async def test_iter_events_like_fal_client(jm: AsyncJobManager) -> None:
    job = await jm.submit(
        "fal-ai/flux/dev", {"_fake": {"queue_time": 0.3, "duration": 1.0, "logs": 3}}
    )
    events = [e async for e in jm.iter_events(job.id, timeout=30)]
    assert isinstance(events[0], Queued)
    assert isinstance(events[-1], Completed) and events[-1].state == "succeeded"
    assert any(isinstance(e, InProgress) for e in events)
    # cumulative, as fal's logs=1: each event holds every line so far (the README idiom
    # `event.logs[seen:]` then prints each line once)
    with_logs = [e.logs or [] for e in events if isinstance(e, InProgress | Completed)]
    assert [line["message"] for line in with_logs[-1]] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(with_logs))


async def test_subscribe_is_durable(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    enqueued: list[str] = []
    updates: list[Any] = []
    task = asyncio.create_task(
        jm.subscribe(
            "fal-ai/flux/dev",
            {"prompt": "resume me", "_fake": {"duration": 1.0}},
            idempotency_key="sub-1",
            on_enqueue=enqueued.append,
            on_queue_update=updates.append,
        )
    )
    for _ in range(100):
        if enqueued:
            break
        await asyncio.sleep(0.02)
    task.cancel()  # the notebook kernel was interrupted
    with pytest.raises(asyncio.CancelledError):
        await task
    job = await jm.status(enqueued[0])
    result = await jm.subscribe("fal-ai/flux/dev", job_id=job.id, on_queue_update=updates.append)
    assert result["prompt"] == "resume me"
    assert (
        fal.fake.stats.submits_by_input[
            input_hash({"prompt": "resume me", "_fake": {"duration": 1.0}})
        ]
        == 1
    )
    assert isinstance(updates[-1], Completed)


def test_sync_manager_works_inside_a_running_loop(tmp_path: Path, fal: FakeFalServer) -> None:
    async def notebook_cell() -> Any:
        with JobManager(local_settings(tmp_path, fal.url)) as sync_jm:  # a notebook cell
            job = sync_jm.submit("fal-ai/flux/dev", {"prompt": "sync"})
            statuses = list(sync_jm.iter_events(job.id))
            return sync_jm.result(job.id, wait=True, timeout=20), statuses

    result, statuses = asyncio.run(notebook_cell())
    assert result["prompt"] == "sync" and isinstance(statuses[-1], Completed)


# What only the service uses (the poller, the web layer, batches), not a user of JobManager.
ASYNC_ONLY = {
    "aclose",  # JobManager.close
    "ambiguous_decision",
    "apply",
    "batch_jobs",
    "fail_ambiguous",
    "failures",
    "files",
    "handle_webhook",
    "look_up",
    "job_files",
    "new_job",
    "overview",
    "ping",
    "provider",
    "record_many",
    "refresh",
    "send",
    "stored_result",
    "stored_results",
    "uploader",
    "watch",
}


def test_the_sync_manager_offers_every_user_facing_method_with_its_signature() -> None:
    import inspect

    public = {
        name: member
        for name, member in vars(AsyncJobManager).items()
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }
    missing = sorted(set(public) - ASYNC_ONLY - set(vars(JobManager)))
    assert missing == [], f"JobManager lacks {missing}"
    for name in sorted(set(public) - ASYNC_ONLY):
        ours = inspect.signature(getattr(JobManager, name)).parameters
        theirs = inspect.signature(public[name]).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in theirs.values()
        ], name


def _pooled(store: Store) -> int:
    """Connections the store's pool holds open."""
    return int(getattr(store.engine.pool, "checkedin")())  # noqa: B009 (not in Pool's type)


async def test_aclose_closes_the_store_it_opened(tmp_path: Path, fal: FakeFalServer) -> None:
    manager = AsyncJobManager(local_settings(tmp_path, fal.url))
    await manager.list_jobs()
    assert _pooled(manager.store) >= 1
    await manager.aclose()
    assert _pooled(manager.store) == 0

    given = Store.open(f"sqlite:///{tmp_path}/given.db")
    upgrade(given.engine)
    try:
        borrowed = AsyncJobManager(local_settings(tmp_path, fal.url), store=given)
        await borrowed.list_jobs()
        await borrowed.aclose()
        assert _pooled(given) >= 1  # the caller's store stays open
    finally:
        given.close()
