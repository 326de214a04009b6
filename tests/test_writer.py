"""Group commit: concurrent observations share transactions; a bad one fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import pytest

from jobs.backoff import Backoff, PollPolicy
from jobs.errors import JobNotFound
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.states import State
from jobs.store import Change, NewJob, Store, Write
from jobs.writer import GroupWriter

T = TypeVar("T")


class CountingStore(Store):
    """Counts the transactions ``write_many`` runs."""

    def __init__(self, url: str) -> None:
        opened = Store.open(url)
        super().__init__(opened.engine)
        self.transactions: list[int] = []

    def write_many(self, writes: Sequence[Write[T]], *, now: float | None = None) -> list[T]:
        self.transactions.append(len(writes))
        return super().write_many(writes, now=now)


@pytest.fixture
def store(sqlite_migrated_url: str) -> Iterator[CountingStore]:
    s = CountingStore(sqlite_migrated_url)
    yield s
    s.close()


def _queued(store: Store, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job, _ = store.create_job(NewJob(application="a/b", arguments={"i": i}))
        store.begin_submit(job.id, 0)
        ref = RemoteRef(application="a/b", request_id=f"r{i}")
        store.mark_submitted(
            job.id, Submitted(ref=ref, observation=Observation(state=State.QUEUED)), next_poll_at=0
        )
        ids.append(job.id)
    return ids


async def test_concurrent_applies_share_transactions(store: CountingStore) -> None:
    ids = _queued(store, 200)
    store.transactions.clear()
    writer = GroupWriter(store)
    done = Observation(state=State.SUCCEEDED, result={"ok": True})
    outcomes = await asyncio.gather(
        *(writer.write(Change(done, request_id=f"r{i}")) for i in range(len(ids)))
    )
    assert all(o is not None and o.changed for o in outcomes)
    assert sum(store.transactions) == 200 and len(store.transactions) < 50
    assert all(store.result(i) == (True, {"ok": True}) for i in ids)


async def test_one_bad_change_fails_alone(store: CountingStore) -> None:
    ids = _queued(store, 3)
    writer = GroupWriter(store)

    class Boom(Backoff):
        def after(self, **facts: Any) -> tuple[float, float]:
            raise ValueError("bad schedule")

    running = Observation(state=State.IN_PROGRESS)
    results = await asyncio.gather(
        writer.write(Change(running, job_id=ids[0])),
        writer.write(Change(running, job_id=ids[1], backoff=Boom(PollPolicy()))),
        writer.write(Change(running, job_id=ids[2])),
        writer.write(Change(running, request_id="unknown")),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert results[3] is None  # an unknown request stores nothing
    assert store.get(ids[0]).state is State.IN_PROGRESS
    assert store.get(ids[1]).state is State.QUEUED
    assert store.get(ids[2]).state is State.IN_PROGRESS
    with pytest.raises(JobNotFound):
        store.apply("missing", running)
