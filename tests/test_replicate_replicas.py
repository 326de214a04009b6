"""Two ``jobsctl serve`` replicas on one PostgreSQL database share the polling of Replicate
predictions without ever reading one prediction twice in a round, and when one is SIGKILLed
the other finishes everything: the twin of tests/test_replicas.py.

"Never twice in a round" is checked from outside, as there: the emulator records when each
``GET /v1/predictions/{id}`` arrives. One replica spaces a job's polls by the backoff (at
least the 1 s initial interval, less 10 % jitter); two replicas polling one job in the same
round would show as two reads milliseconds apart. Each replica's JSON log says which jobs it
polled, and the two logs together account for exactly the reads the emulator saw.
"""

from __future__ import annotations

import itertools
import random
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import replicate as rp
from support.serve import ServeProcess
from support.waiting import wait_for

from jobs import JobManager, Settings
from jobs.states import State
from jobs.store import Job, Store
from jobs.testing import FakeReplicateServer

# Slow: the fal twin (tests/test_replicas.py) runs the same claims by default; this one adds
# Replicate's own reads and kill to the slow suite.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MIN_GAP = 0.5  # seconds; the backoff's smallest spacing is 0.9 s (1 s initial, -10 % jitter)
SERVE_ARGS = ("--tick", "0.1", "--lease", "3", "--log-level", "debug", "--log-format", "json")
POLL_MESSAGES = {"polled", "job succeeded", "job failed", "job cancelled"}


@pytest.fixture
def replicate() -> Iterator[tuple[FakeReplicateServer, rp.RecordingFakeReplicate]]:
    server, fake = rp.recording_server(rp.config(duration=1.0, queue_time=0.2, seed=5))
    with server:
        yield server, fake


def _submit(settings: Settings, count: int, tag: str, rng: random.Random) -> list[str]:
    with JobManager(settings) as jm:
        return [
            jm.submit(
                rp.APP,
                {"prompt": f"{tag}{i}", "_fake": {"duration": round(rng.uniform(1, 4), 2)}},
                provider="replicate",
            ).id
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
    return [
        Counter(r["job_id"] for r in serve.log_records() if r["message"] in POLL_MESSAGES)
        for serve in replicas
    ]


def _right(fake: rp.RecordingFakeReplicate, store: Store, job: Job) -> None:
    """Succeeded with its own prediction's output, made once for its input."""
    assert job.state is State.SUCCEEDED, (job.id, job.state, job.error)
    prediction = fake.get_prediction(job.request_id or "")
    assert prediction is not None and prediction.input == job.arguments
    assert store.result(job.id) == (True, fake.prediction_json(prediction)["output"])
    assert fake.stats.creates_by_input[prediction.input_hash] == 1


def test_two_replicas_share_predictions_and_survive_a_kill(
    tmp_path: Path,
    postgres_url: str,
    replicate: tuple[FakeReplicateServer, rp.RecordingFakeReplicate],
) -> None:
    server, fake = replicate
    env = rp.env(postgres_url, server)  # no JOBS_PUBLIC_URL: polling is all there is
    settings = rp.settings(postgres_url, server)
    rng = random.Random(5)
    store = Store.open(postgres_url)
    first = ServeProcess(env, tmp_path / "first.log", *SERVE_ARGS)
    second = ServeProcess(env, tmp_path / "second.log", *SERVE_ARGS)
    try:
        first.start(wait=False)
        second.start()
        first.wait_ready()

        # Round one: both replicas poll; no prediction is read by both in one round.
        round_one = _submit(settings, 80, "one-", rng)
        jobs = _wait_terminal(store, round_one, 60)
        for job in jobs:
            _right(fake, store, job)
        reads = fake.read_times()
        for job in jobs:
            times = reads[job.request_id or ""]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps, default=MIN_GAP) >= MIN_GAP, (job.id, times)
        by_replica = _polls_by_replica([first, second])
        assert all(sum(counts.values()) > 0 for counts in by_replica), by_replica
        for job in jobs:
            seen = len(reads[job.request_id or ""])
            assert by_replica[0][job.id] + by_replica[1][job.id] == seen, job.id
        print(f"polls by replica: {[sum(c.values()) for c in by_replica]}")

        # Round two: one replica dies holding leases (its reads are slow, so it holds some);
        # the other takes them over when they expire and finishes every job.
        round_two = _submit(settings, 60, "two-", rng)
        server.config.latency = 2.0
        owner = next(r["owner"] for r in first.log_records() if r["message"] == "poller started")
        wait_for(lambda: _leases(store, owner) > 0, 20, "the first replica to hold leases")
        first.kill()
        server.config.latency = 0.0
        for job in _wait_terminal(store, round_two, 60):
            _right(fake, store, job)
        took_over = [
            r
            for r in second.log_records()
            if r["message"] == "took over the job from an expired lease"
        ]
        assert took_over
        code, took = second.stop(signal.SIGTERM)
        assert code == 0 and took < 15
    finally:
        first.kill()
        second.kill()
        store.close()
