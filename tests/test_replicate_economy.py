"""Request economy on Replicate: what one 30 s prediction costs in requests, against the
emulator's counters, and against replicate-python's ``wait()`` (a GET every 0.5 s), as
bench/request_economy.py compares the fal side with fal_client.

- With a webhook: the create and the webhook; no poll at all (the safety poll, 330 s out,
  never comes for a job that finished by its webhook). The emulator's clock jumps the 30 s.
- Without one: a bounded number of GETs, the product's own backoff (1 s, growing by 1.5,
  at most 15 s) run for real, with the two clocks moved in step (our side asked what is due
  at the next scheduled poll, the emulator's clock moved by the same gap).
- replicate-python: its real ``wait()`` against the emulator, in time scaled tenfold (a 3 s
  prediction polled every 0.05 s, the same 60 polls as 30 s at 0.5 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from replicate.client import Client
from support import replicate as rp
from support.waiting import async_wait_for

from jobs import AsyncJobManager, State
from jobs.store import Job
from jobs.testing import FakeReplicateServer

pytestmark = pytest.mark.timeout(60)

SECONDS = 30.0  # the prediction's running time
QUEUE = 0.2
# The backoff's polls over 30.2 s: 1 (it runs: the interval starts again at 1 s), 2, 3.5,
# 5.8, 9.1, 14.2, 21.8, 33.2 s; jitter (+-10 %) may add one.
MAX_GETS = 9
SCALE = 10.0  # replicate-python's run is time scaled down by this


@pytest.fixture
def server() -> Iterator[FakeReplicateServer]:
    with FakeReplicateServer(rp.config(queue_time=QUEUE, duration=SECONDS)) as served:
        yield served


def _gets(server: FakeReplicateServer, prediction_id: str) -> int:
    counters = server.stats.counters(prediction_id)
    assert counters is not None
    return counters.gets


async def test_with_a_webhook_a_30s_prediction_costs_a_create_and_a_webhook(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    settings = rp.settings(sqlite_migrated_url, server)

    def make(public_url: str) -> AsyncJobManager:
        return rp.manager(settings.replace(public_url=public_url))  # the default backoff

    async with rp.live_app(make) as (manager, _):
        job = await manager.submit(rp.APP, {"prompt": "thirty seconds"}, provider="replicate")
        assert job.webhook and job.next_poll_at is not None
        safety = job.next_poll_at - time.time()
        assert safety > 5 * SECONDS  # the safety poll is far behind the prediction
        rp.advance(server, QUEUE + SECONDS)

        async def finished() -> bool:
            return (await manager.status(job.id)).state is State.SUCCEEDED

        await async_wait_for(finished, 10, "the completed webhook")
        done = await manager.status(job.id)
        assert done.next_poll_at is None  # finished: no safety poll will come
        stats = server.stats
        assert stats.create_attempts == 1 and stats.lists == 0
        assert _gets(server, job.request_id or "") == 0
        assert stats.webhook_attempts == 1 == stats.webhook_deliveries
        print("with a webhook: 1 create + 1 webhook, 0 polls")


async def test_without_webhooks_a_30s_prediction_costs_a_few_gets(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    settings = rp.settings(sqlite_migrated_url, server)
    async with rp.open_manager(settings) as manager:  # the default backoff
        handle = await manager.submit(rp.APP, {"prompt": "thirty seconds"}, provider="replicate")
        assert not handle.webhook
        job: Job = handle
        for _ in range(3 * MAX_GETS):
            assert job.next_poll_at is not None
            rp.advance(server, max(0.0, job.next_poll_at - time.time()))
            claimed = manager.store.claim_due(
                manager.owner, limit=10, lease_seconds=60, now=job.next_poll_at
            )
            assert [c.job.id for c in claimed] == [job.id]
            await manager.refresh(claimed[0].job)
            job = manager.store.get(job.id)
            if job.terminal:
                break
        assert job.state is State.SUCCEEDED
        ours = _gets(server, job.request_id or "")
        assert ours <= MAX_GETS and server.stats.create_attempts == 1
        baseline = _replicate_python_gets(server)
        # replicate-python reads the prediction every 0.5 s for its whole run: about 60
        # (fewer on a busy machine, where each read also takes its time).
        assert baseline >= 0.6 * SECONDS / 0.5
        assert baseline >= 4 * ours
        print(f"without webhooks: ours {ours} GETs, replicate-python's wait() {baseline}")


def _replicate_python_gets(server: FakeReplicateServer) -> int:
    """GETs replicate-python's ``predictions.create(...).wait()`` spends on the same
    prediction, its interval and the prediction's time both divided by ``SCALE``."""
    client = Client(api_token=rp.TOKEN, base_url=server.url, trust_env=False)
    client.poll_interval = 0.5 / SCALE
    try:
        prediction = client.models.predictions.create(
            model=rp.APP,
            input={
                "prompt": "baseline",
                "_fake": {"duration": SECONDS / SCALE, "queue_time": QUEUE / SCALE},
            },
        )
        prediction.wait()
        assert prediction.status == "succeeded"
        return _gets(server, prediction.id)
    finally:
        client._client.close()
