"""Batches of 100 through submit faults, with and without webhooks (issue 10, "Done when").

The emulator answers 10 % of queue requests with 500, 5 % with 429 and a ``Retry-After``,
and drops 2 % of connections; on a submit, a 500 or a drop comes *after* the request was
queued (processed, then the answer lost: an ambiguous submit), and 8 % more submits are
processed, then dropped. What the batch commands
must do through that, checked per job:

- ``submit --inputs`` (``submit_batch``) settles every ambiguous submit before it returns,
  so every line ends submitted (exit 0), or failed as ``ambiguous_submit`` after
  ``JOBS_MAX_SUBMIT_ATTEMPTS`` sends (exit 1), never "not confirmed";
- ``wait`` (``wait_batch``) drives every job to ``succeeded`` with its own input's result;
- no input reaches the emulator more often than the job counted sends (``attempts``), and
  never more than ``JOBS_MAX_SUBMIT_ATTEMPTS`` times;
- every surplus remote request is explained: without webhooks by an attempt recorded as
  ambiguous (the price of at-least-once); with webhooks, each one is recorded on its job
  as a ``duplicate_request`` (found from its callback or from the later submit's reply),
  and with ``JOBS_DUPLICATE_POLICY=cancel`` the ones found still running are cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.live import live_app
from support.managers import local_settings
from support.waiting import async_wait_for

from jobs import AsyncJobManager, State
from jobs.backoff import PollPolicy
from jobs.batch import BatchReport, read_lines, submit_batch, wait_batch
from jobs.config import Settings
from jobs.providers.fal import FalProvider
from jobs.providers.http import RetryPolicy, make_client
from jobs.store import Job
from jobs.testing import FakeFalConfig, FakeFalServer, input_hash

pytestmark = pytest.mark.timeout(90)

APP = "fal-ai/flux/dev"
FAL_KEY = "fal-reliability-key-0002"
LINES = 100
MAX_ATTEMPTS = 3
RETRY = RetryPolicy(attempts=4, base=0.05, cap=0.4, max_retry_after=1.0)
POLICY = PollPolicy(initial=0.2, factor=1.6, ceiling=1.0, retention_cap=3.0)
FAULTS: dict[str, Any] = {
    "error_500_rate": 0.10,
    "rate_limit_rate": 0.05,
    "retry_after": 0.2,
    "drop_rate": 0.02,
    # Submits queued, then their answer lost, beyond the drops above: duplicates for sure.
    "processed_drop_rate": 0.08,
}


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    config = FakeFalConfig(
        duration=0.3, queue_time=0.05, seed=41, key=FAL_KEY, webhook_retries=5, **FAULTS
    )
    with FakeFalServer(config) as server:
        yield server


def _manager(settings: Settings, fal: FakeFalServer) -> AsyncJobManager:
    client = make_client(timeout=httpx.Timeout(5.0, connect=5.0))
    provider = FalProvider(queue_url=fal.url, key=settings.fal_key, client=client, retry=RETRY)
    return AsyncJobManager(settings, providers={"fal": provider}, poll_policy=POLICY)


def _settings(tmp_path: Path, fal: FakeFalServer, **extra: Any) -> Settings:
    return local_settings(
        tmp_path, fal.url, fal_key=FAL_KEY, max_submit_attempts=MAX_ATTEMPTS, **extra
    )


def _lines() -> list[dict[str, Any]]:
    return [{"prompt": f"reliable {i}", "seed": i} for i in range(LINES)]


async def _run_batch(manager: AsyncJobManager) -> tuple[BatchReport, list[Job]]:
    lines = read_lines(json.dumps(line) for line in _lines())
    report = await submit_batch(manager, APP, lines, batch="faults", concurrency=16)
    waited = await wait_batch(manager, batch="faults", timeout=60)
    assert not waited.timed_out, waited.counts
    jobs = await manager.list_jobs(batch="faults", limit=LINES + 1)
    return report, jobs


def _check_outcomes(report: BatchReport, jobs: list[Job], fal: FakeFalServer) -> None:
    """What every command shows, and that no job was sent more than it counted."""
    assert len(jobs) == LINES
    failed = [job for job in jobs if job.state is State.FAILED]
    # Exit 0 exactly when every line ended submitted; a failed line failed for the bound.
    assert report.ok is (not failed), report.summary()
    assert set(report.counts) <= {"submitted", "failed"}, report.summary()
    for job in failed:
        assert job.failure_reason == "ambiguous_submit" and job.attempts == MAX_ATTEMPTS
    for job in jobs:
        sent = fal.fake.stats.submits_by_input.get(input_hash(job.arguments), 0)
        assert 1 <= sent <= job.attempts <= MAX_ATTEMPTS, (job.id, sent, job.attempts)
        if job.state is not State.FAILED:
            assert job.state is State.SUCCEEDED, (job.id, job.state, job.error)
    faults = fal.fake.stats.faults
    assert faults.get("processed_drop", 0) > 0, "no ambiguous submit: nothing was checked"


def _kinds(manager: AsyncJobManager, job: Job, kind: str) -> list[dict[str, Any]]:
    return [e for e in manager.store.events(job.id) if e["kind"] == kind]


async def test_a_batch_without_webhooks_settles_through_submit_faults(
    tmp_path: Path, fal: FakeFalServer
) -> None:
    manager = _manager(_settings(tmp_path, fal), fal)
    try:
        report, jobs = await _run_batch(manager)
        _check_outcomes(report, jobs, fal)
        for job in jobs:
            if job.state is State.SUCCEEDED:
                result = await manager.result(job.id)
                assert result["input"] == job.arguments
            sent = fal.fake.stats.submits_by_input[input_hash(job.arguments)]
            # Each surplus request is an attempt that ended ambiguous and was sent again.
            assert sent - 1 <= len(_kinds(manager, job, "submit_ambiguous"))
    finally:
        await manager.aclose()
        manager.store.close()


@pytest.mark.parametrize("duplicates", ["keep", "cancel"])
async def test_a_batch_with_webhooks_records_every_duplicate_request(
    tmp_path: Path, fal: FakeFalServer, duplicates: str
) -> None:
    settings = _settings(tmp_path, fal, duplicate_policy=duplicates)

    def make(public_url: str) -> AsyncJobManager:
        return _manager(settings.replace(public_url=public_url), fal)

    async with live_app(make, fal.url) as (manager, _url):
        report, jobs = await _run_batch(manager)

        async def delivered() -> bool:
            return fal.fake.pending_webhooks == 0

        await async_wait_for(delivered, 30, "every webhook to be delivered")
        _check_outcomes(report, jobs, fal)
        surplus = 0
        for job in jobs:
            if job.state is State.SUCCEEDED:
                assert (await manager.result(job.id))["input"] == job.arguments
            sent = fal.fake.stats.submits_by_input[input_hash(job.arguments)]
            recorded = _kinds(manager, job, "duplicate_request")
            # Every request beyond the one kept was seen and recorded, once each (all of
            # them for a job that failed after its last ambiguous attempt: none was kept).
            kept = 1 if job.request_id is not None else 0
            assert len(recorded) == sent - kept, (job.id, sent, recorded)
            assert len({e["detail"]["request_id"] for e in recorded}) == len(recorded)
            for event in recorded:
                assert event["detail"]["kept"] == job.request_id
            surplus += sent - 1
            if duplicates == "keep":
                assert not _kinds(manager, job, "duplicate_cancelled")
        assert surplus > 0, "the faults made no duplicate: the run checked nothing"
