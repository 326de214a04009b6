"""The acceptance test of Replicate as a provider: a batch of predictions through 10 % 500s,
5 % 429s and lost webhooks ends with every result right, none created twice, none lost to
Replicate's one-hour retention.

A batch goes in with ``submit_batch`` (what ``jobsctl submit --inputs … --provider
replicate`` runs) to a manager behind a live app the emulator calls back; the emulator
answers 10 % of every API request (creates, polls, listings) with a 500 (a create so
answered WAS made: an ambiguous create, settled by listing), 5 % with a 429, loses a third of
its webhooks and sends a tenth twice. Every fourth input asks for two output files, which
the job downloads. ``wait_batch`` (``jobsctl wait``) follows the batch to its end. Then:

- every job succeeded with the emulator's own output for its prediction;
- the emulator made exactly one prediction per input (the per-input create counts);
- the emulator's clock is moved past the hour of retention: its predictions now read
  ``data_removed`` and their files are gone, while our results, events and cached files
  are all still here, byte for byte.

The 200 run with ``JOBS_TEST_SLOW=1`` (about 15 s); the default suite runs 60, and 40
without webhooks, settled by listing and polling alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import replicate as rp
from support.waiting import async_wait_for

from jobs import AsyncJobManager, State
from jobs.batch import read_lines, submit_batch, wait_batch
from jobs.providers.http import RetryPolicy
from jobs.records import SubmitOptions
from jobs.store import Job
from jobs.testing import FakeReplicateServer, expected_file_bytes, input_hash

pytestmark = pytest.mark.timeout(240)

FAULTS: dict[str, Any] = {
    "error_500_rate": 0.10,
    "rate_limit_rate": 0.05,
    "webhook_loss_rate": 0.33,
    "webhook_duplicate_rate": 0.10,
}
RETENTION = 3600.0
# Six tries per request: a listing that settles an ambiguous create fails only if six
# draws in a row are faults (about 1 in 100,000), which would make the create unknowable.
RETRY = RetryPolicy(attempts=6, base=0.05, cap=0.4, max_retry_after=0.3)
FILES_EVERY = 4  # every fourth input has output files
FILES = 2


@pytest.fixture
def server() -> Iterator[FakeReplicateServer]:
    cfg = rp.config(
        duration=0.4, webhook_retries=3, webhook_retry_base=0.2, file_size=3000, **FAULTS
    )
    with FakeReplicateServer(cfg) as served:
        yield served


def _lines(count: int) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for i in range(count):
        line: dict[str, Any] = {"prompt": f"prediction {i}", "seed": i}
        if i % FILES_EVERY == 0:
            line["_fake"] = {"files": FILES}
        lines.append(line)
    return lines


async def _run(
    tmp_path: Path, db_url: str, server: FakeReplicateServer, count: int, *, webhooks: bool
) -> None:
    settings = rp.settings(db_url, server, cache_dir=tmp_path / "cache")

    def make(public_url: str) -> AsyncJobManager:
        public = public_url if webhooks else None
        return rp.manager(
            settings.replace(public_url=public), poll_policy=rp.FAST_POLLS, retry=RETRY
        )

    async with rp.live_app(make) as (manager, _):
        lines = _lines(count)
        options = SubmitOptions(provider="replicate", download=True)
        report = await submit_batch(
            manager,
            rp.APP,
            read_lines(json.dumps(line) for line in lines),
            batch="accept",
            concurrency=16,
            options=options,
        )
        assert report.ok, report.summary()
        assert report.counts == {"submitted": count}, report.summary()
        waited = await wait_batch(manager, batch="accept", timeout=120)
        assert not waited.timed_out and waited.all_succeeded, waited.counts
        jobs = await manager.batch_jobs("accept")
        assert [job.arguments for job in jobs] == lines

        async def delivered() -> bool:
            return server.fake.pending_webhooks == 0

        await async_wait_for(delivered, 30, "the emulator's webhook retries to end")
        stats = server.stats
        assert stats.faults.get("error_500", 0) > 0 and stats.faults.get("rate_limit", 0) > 0
        if webhooks:
            assert all(job.webhook for job in jobs)
            assert stats.webhooks_lost > 0 and stats.webhooks_duplicated > 0
        else:
            assert stats.webhook_attempts == 0
        ambiguous = sum(
            1
            for job in jobs
            for e in manager.store.events(job.id)
            if e["kind"] == "submit_ambiguous"
        )
        assert ambiguous > 0, "no create was ambiguous: the run checked nothing"

        # One prediction per input, and each job holds that prediction's own output.
        assert len(stats.creates_by_input) == count
        assert stats.duplicate_inputs() == {}
        outputs = {}
        for job in jobs:
            assert job.state is State.SUCCEEDED, (job.id, job.state, job.error)
            assert stats.creates_by_input[input_hash(job.arguments)] == 1
            prediction = server.fake.get_prediction(job.request_id or "")
            assert prediction is not None and prediction.input == job.arguments
            expected = server.fake.prediction_json(prediction)["output"]
            assert await manager.result(job.id) == expected
            outputs[job.id] = expected
        await _files_cached(manager, server, jobs)

        # An hour and a second later the emulator has removed every output; we have not.
        rp.advance(server, RETENTION + 1)
        for job in jobs:
            gone = httpx.get(
                f"{server.url}/v1/predictions/{job.request_id}",
                headers={"Authorization": f"Bearer {rp.TOKEN}"},
                timeout=10,
            )
            if gone.status_code == 200:  # a drawn fault answers otherwise; that is fine
                assert gone.json()["data_removed"] is True and gone.json()["output"] is None
            again = await manager.status(job.id, refresh=True)
            assert again.state is State.SUCCEEDED
            assert await manager.result(job.id) == outputs[job.id]
        await _files_cached(manager, server, jobs)
        first = next(job for job in jobs if job.arguments.get("_fake"))
        url = f"{server.url}/_fake/files/{first.request_id}/0.png"
        assert httpx.get(url, timeout=10).status_code == 404  # the emulator's copy is gone


async def _files_cached(
    manager: AsyncJobManager, server: FakeReplicateServer, jobs: list[Job]
) -> None:
    """Every output file is in our cache with the bytes the emulator served."""
    await manager.files.drain()
    for job in jobs:
        files = await manager.job_files(job.id)
        wanted = FILES if job.arguments.get("_fake") else 0
        assert len(files) == wanted, (job.id, files)
        for file in files:
            assert file.state == "downloaded", (job.id, file)
            path = manager.files.cached(file)
            assert path is not None, (job.id, file.n)
            data = expected_file_bytes(job.request_id or "", file.n, server.config.file_size)
            assert path.read_bytes() == data


@pytest.mark.slow
async def test_two_hundred_predictions_through_faults_are_right_once_and_kept(
    tmp_path: Path, sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    await _run(tmp_path, sqlite_migrated_url, server, 200, webhooks=True)


async def test_sixty_predictions_through_faults_are_right_once_and_kept(
    tmp_path: Path, sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    await _run(tmp_path, sqlite_migrated_url, server, 60, webhooks=True)


async def test_without_webhooks_listing_and_polling_alone_do_the_same(
    tmp_path: Path, sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    await _run(tmp_path, sqlite_migrated_url, server, 40, webhooks=False)
