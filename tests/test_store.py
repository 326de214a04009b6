"""The store contract, on SQLite and PostgreSQL: creation, idempotency, compare-and-set
transitions (stale, duplicated, out-of-order and concurrent observations), claims and leases,
and the group fast paths of polls and webhooks (a group decides as its writes one by one)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from jobs.backoff import Backoff, PollPolicy
from jobs.errors import JobNotFound
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.states import FailureReason, State
from jobs.store import Callback, Delivered, Job, NewJob, Polled, PollJob, Store


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def _submitted(request_id: str) -> Submitted:
    ref = RemoteRef(
        application="fal-ai/flux/dev",
        request_id=request_id,
        status_url=f"http://q/fal-ai/flux/requests/{request_id}/status",
        response_url=f"http://q/fal-ai/flux/requests/{request_id}",
        cancel_url=f"http://q/fal-ai/flux/requests/{request_id}/cancel",
    )
    return Submitted(ref=ref, observation=Observation(state=State.QUEUED, queue_position=2))


def _queued(store: Store, request_id: str = "req-1", **new: object) -> Job:
    new_job = NewJob(application="fal-ai/flux/dev", arguments={"p": 1}, **new)  # type: ignore[arg-type]
    job, created = store.create_job(new_job)
    assert created
    assert store.begin_submit(job.id, 0)
    return store.mark_submitted(job.id, _submitted(request_id), next_poll_at=0.0)


OK = Observation(state=State.SUCCEEDED, result={"images": [1]}, source="webhook")
STALE = Observation(state=State.QUEUED, queue_position=5)
RUNNING = Observation(state=State.IN_PROGRESS, logs=({"message": "step 1", "timestamp": "t1"},))


def test_create_then_submit_records_everything(store: Store) -> None:
    job, created = store.create_job(
        NewJob(
            application="fal-ai/flux/dev",
            arguments={"prompt": "a cat"},
            labels={"team": "a"},
            batch="b1",
            priority="low",
        )
    )
    assert created and job.state is State.SUBMITTING and job.request_id is None
    assert store.begin_submit(job.id, 0)
    job = store.mark_submitted(job.id, _submitted("r-9"), next_poll_at=123.0)
    assert job.state is State.QUEUED
    assert (job.request_id, job.queue_position, job.next_poll_at) == ("r-9", 2, 123.0)
    assert store.get("r-9").id == job.id  # found by request id too
    assert job.labels == {"team": "a"} and job.batch == "b1" and job.attempts == 1
    kinds = [e["kind"] for e in store.events(job.id)]
    assert kinds == ["created", "submit_sent", "submitted"]


def test_unknown_job(store: Store) -> None:
    with pytest.raises(JobNotFound, match="nope"):
        store.get("nope")


def test_idempotency_key_returns_the_first_job(store: Store) -> None:
    new = NewJob(application="a/b", arguments={}, idempotency_key="k1")
    first, created = store.create_job(new)
    again, created_again = store.create_job(new)
    assert created and not created_again and again.id == first.id


def test_idempotency_key_under_concurrency(store: Store) -> None:
    new = NewJob(application="a/b", arguments={}, idempotency_key="race")
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: store.create_job(new), range(8)))
    assert len({job.id for job, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1


def test_begin_submit_is_compare_and_set(store: Store) -> None:
    job, _ = store.create_job(NewJob(application="a/b", arguments={}))
    assert store.begin_submit(job.id, 0)
    assert not store.begin_submit(job.id, 0)  # another sender already counted attempt 1
    assert store.unsend(job.id, {"type": "ConnectError"}).attempts == 0
    assert store.begin_submit(job.id, 0)


def test_forward_only_a_stale_poll_cannot_undo_a_result(store: Store) -> None:
    job = _queued(store)
    applied = store.apply(job.id, OK)
    assert applied.changed and applied.finished and applied.job.state is State.SUCCEEDED
    assert applied.job.next_poll_at is None  # terminal jobs leave the poll index
    stale = store.apply(job.id, STALE)
    assert not stale.changed and stale.job.state is State.SUCCEEDED
    failed = store.apply(
        job.id,
        Observation(state=State.FAILED, failure_reason=FailureReason.REMOTE_ERROR),
    )
    assert not failed.changed and store.get(job.id).state is State.SUCCEEDED
    assert store.result(job.id) == (True, {"images": [1]})


def test_duplicate_result_is_stored_once(store: Store) -> None:
    job = _queued(store)
    assert store.apply(job.id, OK).changed
    other = Observation(state=State.SUCCEEDED, result={"images": [2]})
    assert not store.apply(job.id, other).changed
    assert store.result(job.id) == (True, {"images": [1]})
    transitions = [e for e in store.events(job.id) if e["kind"] == "state"]
    assert len(transitions) == 1


def test_out_of_order_observations(store: Store) -> None:
    job = _queued(store)
    store.apply(job.id, RUNNING)
    back = store.apply(job.id, STALE)  # an IN_QUEUE reply that arrived late
    assert not back.changed and back.job.state is State.IN_PROGRESS
    assert back.job.started_at is not None


def test_concurrent_terminal_observations_store_one_outcome(store: Store) -> None:
    job = _queued(store)
    outcomes = [
        Observation(state=State.SUCCEEDED, result={"n": i})
        if i % 2
        else Observation(state=State.FAILED, failure_reason=FailureReason.REMOTE_ERROR)
        for i in range(10)
    ]
    barrier = threading.Barrier(10)

    def race(obs: Observation) -> bool:
        barrier.wait()
        return store.apply(job.id, obs).changed

    with ThreadPoolExecutor(10) as pool:
        changed = list(pool.map(race, outcomes))
    assert sum(changed) == 1
    final = store.get(job.id)
    found, data = store.result(job.id)
    assert found == (final.state is State.SUCCEEDED)
    assert len([e for e in store.events(job.id) if e["to_state"] in {"succeeded", "failed"}]) == 1
    del data


def test_logs_are_deduplicated(store: Store) -> None:
    job = _queued(store)
    first = ({"message": "a", "timestamp": "1"}, {"message": "b", "timestamp": "2"})
    store.apply(job.id, Observation(state=State.IN_PROGRESS, logs=first))
    store.apply(
        job.id,
        Observation(state=State.IN_PROGRESS, logs=(*first, {"message": "c", "timestamp": "3"})),
    )
    assert [e["message"] for _, e in store.logs(job.id)] == ["a", "b", "c"]
    assert [e["message"] for _, e in store.logs(job.id, after=2)] == ["c"]


def test_claim_due_takes_each_job_once_and_leases_expire(store: Store) -> None:
    ids = {_queued(store, f"r{i}").id for i in range(5)}
    first = store.claim_due("A", limit=3, lease_seconds=30, now=100.0)
    second = store.claim_due("B", limit=10, lease_seconds=30, now=100.0)
    assert len(first) == 3 and len(second) == 2
    assert {c.job.id for c in first} | {c.job.id for c in second} == ids
    assert not store.claim_due("C", limit=10, lease_seconds=30, now=100.0)
    # A dies: its leases end at 130 and B takes over.
    later = store.claim_due("B", limit=10, lease_seconds=30, now=131.0)
    assert {c.job.id for c in later} == ids
    assert sum(c.took_over for c in later) == 3  # the ones A held
    assert all(c.job.lease_owner == "B" for c in later)


def test_concurrent_claims_never_overlap(store: Store) -> None:
    for i in range(60):
        _queued(store, f"c{i}")
    barrier = threading.Barrier(4)

    def claim(owner: str) -> list[str]:
        barrier.wait()
        got: list[str] = []
        for _ in range(10):
            got += [c.job.id for c in store.claim_due(owner, limit=5, lease_seconds=60, now=1e9)]
        return got

    with ThreadPoolExecutor(4) as pool:
        claimed = list(pool.map(claim, "WXYZ"))
    flat = [i for chunk in claimed for i in chunk]
    assert len(flat) == len(set(flat)) == 60


def test_terminal_jobs_are_never_claimed(store: Store) -> None:
    job = _queued(store)
    store.apply(job.id, OK)
    assert store.claim_due("A", limit=10, lease_seconds=30, now=1e12) == []
    assert store.claim_job(job.id, "A", lease_seconds=30, now=1e12) is None


def test_release_leases_makes_jobs_due(store: Store) -> None:
    job = _queued(store)
    store.claim_due("A", limit=10, lease_seconds=300, now=10.0)
    assert store.release_leases("A", now=11.0) == 1
    assert store.get(job.id).next_poll_at == 11.0


def test_a_webhook_adopts_an_ambiguous_submit(store: Store) -> None:
    job, _ = store.create_job(NewJob(application="a/b", arguments={}))
    assert store.begin_submit(job.id, 0)  # sent, then the process died
    # A webhook names our job (from its URL) and a request id no job has yet: adopted.
    adopt = Callback(
        OK, provider="fal", request_id="from-webhook", user_id="me", job_id=job.id, account="me"
    )
    [delivered] = store.write_many([adopt])
    assert delivered.applied is not None and delivered.applied.job.request_id == "from-webhook"
    assert delivered.applied.job.state is State.SUCCEEDED
    # Another request id cannot take the job over: it is a duplicate remote request.
    again = Callback(
        OK, provider="fal", request_id="again", user_id="me", job_id=job.id, account="me", attempt=2
    )
    [second] = store.write_many([again])
    assert second.applied is None and second.refused == "duplicate_request"
    assert second.duplicate is not None and second.duplicate.request_id == "again"
    assert store.get(job.id).request_id == "from-webhook"


def test_the_provider_account_is_learned_once(store: Store) -> None:
    first, second = _queued(store, "r-1"), _queued(store, "r-2")
    learn = Callback(RUNNING, provider="fal", request_id=first.request_id or "", user_id="u-1")
    assert store.write_many([learn])[0].applied is not None
    # A replica that saw another account first cannot overwrite it: the first one stays.
    other = Callback(RUNNING, provider="fal", request_id=second.request_id or "", user_id="u-2")
    assert store.write_many([other])[0].refused == "foreign"
    assert store.account("fal") == "u-1"


def test_a_callback_user_id_the_store_cannot_hold_is_malformed() -> None:
    for user_id in ("u" * 256, "u\x00"):
        with pytest.raises(ValueError, match="user id"):
            Callback(RUNNING, provider="fal", request_id="r", user_id=user_id)


def test_a_tracked_request_teaches_no_account(store: Store) -> None:
    ref = RemoteRef(application="fal-ai/flux/dev", request_id="r-t")
    new = NewJob(application="fal-ai/flux/dev", arguments={})
    tracked = store.track_job(new, ref, next_poll_at=4102444800.0)
    callback = Callback(RUNNING, provider="fal", request_id="r-t", user_id="someone-else")
    assert store.write_many([callback])[0].applied is not None
    assert store.get(tracked.id).state is State.IN_PROGRESS
    assert store.account("fal") is None


def test_list_and_counts(store: Store) -> None:
    jobs = [_queued(store, f"l{i}", batch="x" if i % 2 else None) for i in range(5)]
    store.apply(jobs[0].id, OK)
    page = store.list_jobs(limit=2)
    assert [j.id for j in page] == [jobs[4].id, jobs[3].id]
    rest = store.list_jobs(limit=10, before=page[-1].id)
    assert [j.id for j in rest] == [jobs[2].id, jobs[1].id, jobs[0].id]
    assert [j.id for j in store.list_jobs(batch="x")] == [jobs[3].id, jobs[1].id]
    assert store.count_by_state()[State.QUEUED] == 4
    assert store.count_by_state(batch="x")[State.SUCCEEDED] == 0


def test_a_repeated_message_is_answered_without_touching_the_job(store: Store) -> None:
    """Replicate retries its final webhook with the same webhook-id: the repeat is a
    duplicate, even when it says something else (a replay cannot undo a result), until the
    id is forgotten."""
    job = _queued(store, "pred-1", provider="replicate")
    first = Callback(OK, provider="replicate", request_id="pred-1", user_id=None, delivery_id="m1")
    failed = Observation(state=State.FAILED, error={"message": "x"}, source="webhook")
    again = Callback(
        failed, provider="replicate", request_id="pred-1", user_id=None, delivery_id="m1"
    )
    [delivered] = store.write_many([first], now=1000.0)
    assert delivered.applied is not None and delivered.applied.job.state is State.SUCCEEDED
    [repeat] = store.write_many([again], now=1001.0)
    assert repeat.applied is None and repeat.refused == "duplicate"
    assert store.get(job.id).state is State.SUCCEEDED
    # The same id from another provider is another message.
    assert store.write_many([dataclasses.replace(first, provider="fal", user_id="u")])
    assert store.forget_deliveries(older_than=1000.5) == 1
    [later] = store.write_many([again], now=1002.0)
    assert later.refused is None and later.applied is not None and not later.applied.changed


def test_a_message_that_must_come_again_is_not_remembered(store: Store) -> None:
    """A callback deferred until the account is known (``unverified``) is delivered again
    by the provider with the same message id: that retry must be applied."""
    job, _ = store.create_job(NewJob(application="fal-ai/flux/dev", arguments={"p": 2}))
    assert store.begin_submit(job.id, 0)
    callback = Callback(
        OK, provider="fal", request_id="r-new", user_id="u-9", job_id=job.id, delivery_id="m2"
    )
    [deferred] = store.write_many([callback])
    assert deferred.refused == "unverified"
    [applied] = store.write_many([dataclasses.replace(callback, account="u-9")])
    assert applied.applied is not None and applied.applied.job.state is State.SUCCEEDED


# --- group fast paths -------------------------------------------------------------------------


def test_a_claim_returns_what_a_poll_needs_and_nothing_large(store: Store) -> None:
    job = _queued(store, "slim", labels={"k": "v"}, batch="b", batch_index=7)
    [claimed] = store.claim_due("A", limit=10, lease_seconds=30, now=100.0)
    assert type(claimed.job) is PollJob
    # Every field the claim returns is the row's, as a full read sees it.
    assert claimed.job == claimed.job.with_row(store.get(job.id))
    assert claimed.job.batch_index == 7 and claimed.job.lease_owner == "A"
    assert not hasattr(claimed.job, "arguments") and not hasattr(claimed.job, "labels")
    assert claimed.job.ref() == job.ref()


def test_a_group_of_polls_applies_to_the_claimed_rows(store: Store) -> None:
    """Polls applied together by compare-and-set on the claimed rows: each job ends as a
    full read then shows it, and the record each poll gets back is that row."""
    ids = [_queued(store, f"p{i}").id for i in range(4)]
    claimed = {c.job.id: c.job for c in store.claim_due("A", limit=10, lease_seconds=30, now=10.0)}
    seen = [
        Observation(state=State.QUEUED, queue_position=2),  # no change
        Observation(state=State.IN_PROGRESS),  # started
        Observation(state=State.SUCCEEDED, result={"n": 3}, metrics={"inference_time": 1.5}),
        Observation(state=State.QUEUED, queue_position=1),  # moved up the queue
    ]
    policy = Backoff(PollPolicy(), rand=0.5)
    polls = [Polled(claimed[i], obs, policy) for i, obs in zip(ids, seen, strict=True)]
    outcomes = [o for o in store.write_many(polls, now=20.0) if o is not None]
    assert len(outcomes) == len(ids)
    for job_id, outcome in zip(ids, outcomes, strict=True):
        assert type(outcome.job) is PollJob
        assert outcome.job == claimed[job_id].with_row(store.get(job_id))
        assert outcome.job.lease_owner is None
    same, started, finished, moved_up = (store.get(i) for i in ids)
    assert not outcomes[0].changed and same.next_poll_at is not None and same.polls == 1
    assert outcomes[1].changed and started.started_at == 20.0
    assert outcomes[2].finished and store.result(finished.id) == (True, {"n": 3})
    assert finished.next_poll_at is None and finished.metrics == {"inference_time": 1.5}
    assert moved_up.queue_position == 1 and moved_up.last_change_at == 20.0
    assert same.last_change_at != 20.0  # nothing changed: the backoff slows down
    assert [(e["from_state"], e["to_state"]) for e in store.events(ids[1])][-1] == (
        "queued",
        "in_progress",
    )


def test_a_poll_of_a_row_that_moved_since_its_claim_is_decided_from_the_row(
    store: Store,
) -> None:
    """A cancel asked for between claim and apply makes the job a fresh poll again (no
    webhook will come): the poll's schedule is decided from the row, not from the claim."""
    ids = [_queued(store, f"w{i}", webhook=True).id for i in range(3)]
    claimed = {c.job.id: c.job for c in store.claim_due("A", limit=10, lease_seconds=30, now=10.0)}
    store.mark_cancel_requested(ids[1], now=11.0)
    store.apply(ids[2], OK, now=12.0)  # a webhook finished this one meanwhile
    policy = Backoff(PollPolicy(), rand=0.5)
    still = Observation(state=State.QUEUED, queue_position=2)
    outcomes = store.write_many([Polled(claimed[i], still, policy) for i in ids], now=20.0)
    safety, cancelled, done = (store.get(i) for i in ids)
    assert safety.next_poll_at is not None and safety.next_poll_at > 20.0 + 300  # safety net
    assert cancelled.next_poll_at is not None and cancelled.next_poll_at < 20.0 + 60
    assert done.state is State.SUCCEEDED and outcomes[2] is not None
    assert not outcomes[2].changed and outcomes[2].job.state is State.SUCCEEDED
    for job_id, outcome in zip(ids, outcomes, strict=True):
        assert outcome is not None and outcome.job == claimed[job_id].with_row(store.get(job_id))


def _ambiguous(store: Store) -> Job:
    job, _ = store.create_job(NewJob(application="fal-ai/flux/dev", arguments={}))
    assert store.begin_submit(job.id, 0)
    return job


def _webhooks(store: Store, p: str) -> list[Callback]:
    """One of each kind of callback the full path tells apart, about jobs of their own
    (request ids prefixed ``p``), some twice in a row."""
    _queued(store, f"{p}-q")
    running = _queued(store, f"{p}-r")
    store.apply(running.id, RUNNING)
    ended = _queued(store, f"{p}-e")
    store.apply(ended.id, OK)
    _queued(store, f"{p}-m", provider="replicate")
    _queued(store, f"{p}-k", provider="replicate")
    _queued(store, f"{p}-l")
    _queued(store, f"{p}-n")
    store.write_many(
        [
            Callback(
                OK, provider="replicate", request_id=f"{p}-k", user_id=None, delivery_id=f"{p}-d"
            )
        ]
    )
    adoptable = _ambiguous(store)
    failed = Observation(
        state=State.FAILED, error={"message": "boom"}, failure_reason=FailureReason.REMOTE_ERROR
    )
    logged = dataclasses.replace(OK, logs=({"message": "done", "timestamp": "t9"},))

    def me(obs: Observation, request_id: str, **more: Any) -> Callback:
        return Callback(obs, provider="fal", request_id=request_id, user_id="me", **more)

    return [
        me(OK, f"{p}-q"),
        me(failed, f"{p}-q"),  # the same request again: too late
        me(failed, f"{p}-r"),
        me(OK, f"{p}-e"),  # already ended
        Callback(OK, request_id=f"{p}-l", provider="fal", user_id="someone else"),
        me(OK, f"{p}-unknown"),
        me(OK, f"{p}-adopted", job_id=adoptable.id),
        Callback(OK, provider="replicate", request_id=f"{p}-m", user_id=None, delivery_id=f"{p}-x"),
        Callback(OK, provider="replicate", request_id=f"{p}-m", user_id=None, delivery_id=f"{p}-x"),
        Callback(OK, provider="replicate", request_id=f"{p}-k", user_id=None, delivery_id=f"{p}-d"),
        me(RUNNING, f"{p}-n"),  # not terminal: the full path
        me(logged, f"{p}-n", account="me"),
    ]


def _summary(store: Store, delivered: Delivered) -> tuple[Any, ...]:
    applied = delivered.applied
    if applied is None:
        return (delivered.refused, delivered.duplicate is not None)
    job = store.get(applied.job.id)
    events = [
        (e["kind"], e["from_state"], e["to_state"], e["reason"]) for e in store.events(job.id)
    ]
    return (
        delivered.refused,
        applied.changed,
        applied.previous,
        applied.job.state,
        applied.job == applied.job.with_row(job),
        job.state,
        job.failure_reason,
        job.error,
        job.next_poll_at is None,
        store.result(job.id),
        [e for _, e in store.logs(job.id)],
        events[1:],
    )


def test_a_group_of_webhooks_decides_as_they_would_one_by_one(store: Store) -> None:
    """Refusals, duplicates (a request or a message twice in one group), adoption,
    learning nothing, logs: the group's answers and what it leaves in the database are
    those of the same callbacks sent one at a time."""
    _queued(store, "learn")
    store.write_many([Callback(RUNNING, provider="fal", request_id="learn", user_id="me")])
    assert store.account("fal") == "me"
    group, single = _webhooks(store, "g"), _webhooks(store, "s")
    together = store.write_many(group, now=50.0)
    apart = [store.write_many([callback], now=50.0)[0] for callback in single]
    assert [_summary(store, d) for d in together] == [_summary(store, d) for d in apart]
    outcomes = [
        d.refused or ("applied" if d.applied and d.applied.changed else "same") for d in apart
    ]
    assert outcomes == [
        "applied",
        "same",
        "applied",
        "same",
        "foreign",
        "unknown",
        "applied",
        "applied",
        "duplicate",
        "duplicate",
        "applied",
        "applied",
    ]
