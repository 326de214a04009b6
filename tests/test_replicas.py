"""Two ``jobs serve`` replicas on one PostgreSQL database share the polling without ever
polling one job twice in a round, and when one is SIGKILLed the other finishes everything.

How "never twice in a round" is checked, honestly and from outside: the emulator records
when each status request arrives. Within one replica, a job's polls are spaced by the
backoff (at least the 1 s initial interval, less 10 % jitter). If both replicas claimed the
same job in the same round, two polls of it would arrive milliseconds apart. Which replica
made each poll comes from its own JSON log (one ``polled`` line per poll, with the job id),
and the two logs together must account for exactly the polls the emulator saw.
"""

from __future__ import annotations

import itertools
import random
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.recording import RecordingFakeFal, recording_server
from support.serve import ServeProcess, jobs_env
from support.waiting import wait_for

from jobs import JobManager, Settings
from jobs.config import Secret
from jobs.states import State
from jobs.store import Job, Store
from jobs.testing import FakeFalConfig

pytestmark = pytest.mark.timeout(180)

APP = "fal-ai/flux/dev"
MIN_GAP = 0.5  # seconds; the backoff's smallest spacing is 0.9 s (1 s initial, -10 % jitter)
SERVE_ARGS = ("--tick", "0.1", "--lease", "3", "--log-level", "debug", "--log-format", "json")
POLL_MESSAGES = {"polled", "job succeeded", "job failed", "job cancelled"}


@pytest.fixture
def fal() -> Iterator[tuple[object, RecordingFakeFal]]:
    server, fake = recording_server(FakeFalConfig(duration=1.0, queue_time=0.2, seed=5))
    with server:
        yield server, fake


def _submit(settings: Settings, count: int, tag: str, rng: random.Random) -> list[str]:
    with JobManager(settings) as jm:
        return [
            jm.submit(APP, {"prompt": f"{tag}{i}", "_fake": {"duration": rng.uniform(1, 4)}}).id
            for i in range(count)
        ]


def _wait_terminal(store: Store, ids: list[str], timeout: float) -> list[Job]:
    def done() -> bool:
        return all(store.get(i).terminal for i in ids)

    wait_for(done, timeout, f"{len(ids)} jobs to finish", every=0.25)
    return [store.get(i) for i in ids]


def _leases(store: Store, owner: str) -> int:
    return sum(1 for job in store.list_jobs(limit=1000) if job.lease_owner == owner)


def _polls_by_replica(replicas: list[ServeProcess]) -> list[Counter[str]]:
    """Per replica: how many polls it made of each job (by job id), from its log."""
    return [
        Counter(r["job_id"] for r in serve.log_records() if r["message"] in POLL_MESSAGES)
        for serve in replicas
    ]


def test_two_replicas_share_the_work_and_survive_a_kill(
    tmp_path: Path, postgres_url: str, fal: tuple[object, RecordingFakeFal]
) -> None:
    server, fake = fal
    url = server.url  # type: ignore[attr-defined]
    env = jobs_env(postgres_url, url)
    settings = Settings.from_env(
        {}, database_url=postgres_url, fal_queue_url=url, fal_key=Secret("k")
    )
    rng = random.Random(5)
    store = Store.open(postgres_url)
    first = ServeProcess(env, tmp_path / "first.log", *SERVE_ARGS)
    second = ServeProcess(env, tmp_path / "second.log", *SERVE_ARGS)
    try:
        first.start(wait=False)
        second.start()
        first.wait_ready()

        # Round one: both replicas poll; no job is polled by both in one round.
        round_one = _submit(settings, 80, "one-", rng)
        jobs = _wait_terminal(store, round_one, 60)
        assert all(job.state is State.SUCCEEDED for job in jobs)
        polls = fake.times("status")
        for job in jobs:
            times = polls[job.request_id or ""]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps, default=MIN_GAP) >= MIN_GAP, (job.id, times)
        by_replica = _polls_by_replica([first, second])
        assert all(sum(counts.values()) > 0 for counts in by_replica), by_replica
        for job in jobs:
            seen = len(polls[job.request_id or ""])
            assert by_replica[0][job.id] + by_replica[1][job.id] == seen, job.id
        shares = [sum(c.values()) for c in by_replica]
        print(f"polls by replica: {shares}")

        # Round two: one replica dies holding leases (its polls are slow, so it holds some);
        # the other takes them over when they expire and finishes every job.
        round_two = _submit(settings, 60, "two-", rng)
        fake.config.latency = 2.0
        owner = next(r["owner"] for r in first.log_records() if r["message"] == "poller started")
        wait_for(lambda: _leases(store, owner) > 0, 20, "the first replica to hold leases")
        first.kill()
        fake.config.latency = 0.0
        jobs = _wait_terminal(store, round_two, 60)
        for job in jobs:
            assert job.state is State.SUCCEEDED
            request = fake.get_request(job.request_id or "")
            assert request is not None
            assert store.result(job.id) == (True, request.output(fake.config.result_padding))
        took_over = [
            r
            for r in second.log_records()
            if r["message"] == "took over the job from an expired lease"
        ]
        assert took_over
        print(f"survivor took over {len(took_over)} leases")
        code, took = second.stop(signal.SIGTERM)
        assert code == 0 and took < 15
    finally:
        first.kill()
        second.kill()
        store.close()
