"""Replicate deletes an API prediction's output, logs and files an hour after it ends. With a
webhook asked for, polling is only a safety net; these tests prove that net catches a
prediction whose webhook was lost well inside that hour, files included, under the
product's default backoff (``PollPolicy()``, the one ``jobsctl serve`` uses).

How, without waiting an hour: the two clocks move in step. Our side is asked which jobs are
due at the instant of the next scheduled poll (``store.claim_due(now=next_poll_at)``) and
the emulator's clock is moved forward by the same gap (``POST /_fake/advance``); then the
job is polled for real, over HTTP. The twin of fal's 6-minute retention test
(tests/test_reliability_faults.py): there the retention is shortened, here both clocks jump.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import replicate as rp
from support.waiting import async_wait_for

from jobs import AsyncJobManager, State
from jobs.backoff import RETENTION_CAP
from jobs.store import Job
from jobs.testing import FakeReplicateServer, expected_file_bytes

pytestmark = pytest.mark.timeout(60)

RETENTION = 3600.0  # Replicate's, for API predictions
LEASE = 60.0
MAX_POLLS = 40  # a bound on each replay loop; an hour of safety polls is about 11


@pytest.fixture
def server() -> Iterator[FakeReplicateServer]:
    # Every webhook is lost: only the safety net can learn how a prediction ended.
    with FakeReplicateServer(rp.config(webhook_loss_rate=1.0)) as served:
        yield served


async def _poll_when_due(manager: AsyncJobManager, server: FakeReplicateServer, job: Job) -> Job:
    """Jump both clocks to the job's next scheduled poll and poll it there."""
    assert job.next_poll_at is not None
    gap = max(0.0, job.next_poll_at - time.time())
    rp.advance(server, gap)
    claimed = manager.store.claim_due(
        manager.owner, limit=100, lease_seconds=LEASE, now=job.next_poll_at
    )
    assert [c.job.id for c in claimed] == [job.id], "the job was not due when scheduled"
    await manager.refresh(claimed[0].job)
    return manager.store.get(job.id)


async def _lost_webhook_job(
    manager: AsyncJobManager, server: FakeReplicateServer, seconds: float
) -> Job:
    arguments = {"prompt": "its webhook is lost", "_fake": {"duration": seconds, "files": 2}}
    job = await manager.submit(rp.APP, arguments, provider="replicate", download=True)
    assert job.webhook and job.state is State.QUEUED
    return job


async def _its_webhook_was_lost(server: FakeReplicateServer) -> None:
    async def lost() -> bool:
        return server.stats.webhooks_lost >= 1

    await async_wait_for(lost, 10, "the emulator to lose the completed webhook")


async def test_a_lost_webhook_is_caught_by_the_safety_net_with_its_files(
    tmp_path: Path, sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    settings = rp.settings(sqlite_migrated_url, server, cache_dir=tmp_path / "cache")

    def make(public_url: str) -> AsyncJobManager:
        return rp.manager(settings.replace(public_url=public_url))  # the default backoff

    async with rp.live_app(make) as (manager, _):
        # A 50-minute prediction: its safety polls must keep coming all the while, and the
        # last one must still find its output and files.
        job = await _lost_webhook_job(manager, server, 50 * 60)
        prediction = server.fake.get_prediction(job.request_id or "")
        assert prediction is not None
        gaps: list[float] = []
        for _ in range(MAX_POLLS):
            assert job.next_poll_at is not None
            gaps.append(job.next_poll_at - time.time())
            job = await _poll_when_due(manager, server, job)
            if job.terminal:
                break
        assert job.state is State.SUCCEEDED, (job.state, job.error)
        assert server.stats.webhooks_lost == 1 and server.stats.webhook_attempts == 0
        # Each safety poll came within the cap: the result was known at most that long
        # after the prediction ended, far inside the hour.
        assert max(gaps) <= RETENTION_CAP < RETENTION / 10
        ended_ago = server.fake.now() - prediction.finish_at
        assert 0 <= ended_ago <= RETENTION_CAP
        await manager.files.drain()
        files = await manager.job_files(job.id)
        assert [f.state for f in files] == ["downloaded", "downloaded"]

        # An hour later Replicate has removed everything; our copy stays.
        rp.advance(server, RETENTION)
        removed = server.fake.prediction_json(prediction)
        assert removed["data_removed"] is True and removed["output"] is None
        assert await manager.result(job.id) == [
            f"{server.url}/_fake/files/{job.request_id}/{n}.png" for n in range(2)
        ]
        for file in files:
            path = manager.files.cached(file)
            assert path is not None
            assert path.read_bytes() == expected_file_bytes(
                job.request_id or "", file.n, server.config.file_size
            )
            assert httpx.get(file.url, timeout=10).status_code == 404


async def test_polled_only_after_the_hour_the_job_fails_as_unavailable(
    tmp_path: Path, sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    # What the safety net prevents: the same lost webhook, the first look an hour too late.
    settings = rp.settings(sqlite_migrated_url, server, cache_dir=tmp_path / "cache")

    def make(public_url: str) -> AsyncJobManager:
        return rp.manager(settings.replace(public_url=public_url))

    async with rp.live_app(make) as (manager, _):
        job = await _lost_webhook_job(manager, server, 0.2)
        await _its_webhook_was_lost(server)
        rp.advance(server, RETENTION + 1)
        late = await _poll_when_due(manager, server, job)
        assert late.state is State.FAILED and late.failure_reason == "result_unavailable"
        assert late.error is not None and "retention" in late.error["message"]
        found, _ = await manager.stored_result(job.id)
        assert not found and await manager.job_files(job.id) == []


def test_the_emulator_clock_moves_only_forward_by_a_number(server: FakeReplicateServer) -> None:
    for bad in ({"seconds": -1}, {"seconds": "1"}, {"seconds": True}, {}, [1]):
        response = httpx.post(f"{server.url}/_fake/advance", json=bad, timeout=10)
        assert response.status_code == 400, bad
    before = server.fake.now()
    rp.advance(server, 5)
    assert server.fake.now() >= before + 5
