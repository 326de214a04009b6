"""The store contract with what Replicate really says, on SQLite and PostgreSQL: the twin of
tests/test_store.py, fed by the provider's own mapping (``observation_from_prediction``)
of prediction objects rather than hand-made observations.

A late poll of a prediction whose data Replicate removed cannot fail a job whose result was
captured; a stale ``processing`` after the webhook cannot move it back, and the result is
stored once; Replicate's single, growing ``logs`` string is stored line by line, once each;
one id on both providers names two jobs; a cancel and a success racing store one outcome.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.providers.replicate import observation_from_prediction
from jobs.states import State
from jobs.store import Callback, Job, NewJob, Store

APP = "acme/echo"


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def _queued(store: Store, prediction_id: str, provider: str = "replicate") -> Job:
    new = NewJob(application=APP, arguments={"prompt": prediction_id}, provider=provider)
    job, created = store.create_job(new)
    assert created and store.begin_submit(job.id, 0)
    ref = RemoteRef(application=APP, request_id=prediction_id)
    submitted = Submitted(ref=ref, observation=Observation(state=State.QUEUED, source="submit"))
    return store.mark_submitted(job.id, submitted, next_poll_at=0.0)


def _seen(prediction_id: str, status: str, *, source: str = "poll", **fields: Any) -> Observation:
    body: dict[str, Any] = {
        "id": prediction_id,
        "status": status,
        "output": {"echo": prediction_id} if status == "succeeded" else None,
        "logs": "",
        "error": None,
        "data_removed": False,
        "metrics": {"predict_time": 2.0} if status in ("succeeded", "failed") else {},
    }
    body.update(fields)
    return observation_from_prediction(body, source=source)


def test_a_late_poll_of_a_removed_prediction_never_fails_a_captured_job(store: Store) -> None:
    job = _queued(store, "pred1")
    assert store.apply(job.id, _seen("pred1", "succeeded", source="webhook")).changed
    removed = _seen("pred1", "succeeded", data_removed=True, output=None)
    assert removed.state is State.FAILED  # what a poll after the hour would say alone
    late = store.apply(job.id, removed)
    assert not late.changed and late.job.state is State.SUCCEEDED
    assert store.result(job.id) == (True, {"echo": "pred1"})


def test_a_stale_poll_after_the_webhook_changes_nothing_and_one_result_is_kept(
    store: Store,
) -> None:
    job = _queued(store, "pred2")
    store.apply(job.id, _seen("pred2", "processing"))
    done = store.apply(job.id, _seen("pred2", "succeeded", source="webhook"))
    assert done.changed and done.job.state is State.SUCCEEDED
    for stale in (_seen("pred2", "processing"), _seen("pred2", "starting")):
        assert not store.apply(job.id, stale).changed
    again = store.apply(job.id, _seen("pred2", "succeeded", output={"echo": "other"}))
    assert not again.changed
    assert store.result(job.id) == (True, {"echo": "pred2"})
    finished = [e for e in store.events(job.id) if e["to_state"] == "succeeded"]
    assert len(finished) == 1 and finished[0]["reason"] == "webhook"


def test_the_growing_log_string_is_stored_line_by_line_once(store: Store) -> None:
    job = _queued(store, "pred3")
    polls = [
        "loading\n",
        "loading\nstep\nstep\n 10%|#",  # the last line is still being drawn
        "loading\nstep\nstep\n 10%|#\r 50%|#####\r100%|##########\n",
    ]
    for text in polls:
        store.apply(job.id, _seen("pred3", "processing", logs=text))
    store.apply(job.id, _seen("pred3", "succeeded", logs=polls[-1] + "done"))
    lines = [entry["message"] for _, entry in store.logs(job.id)]
    # Repeated identical lines are kept apart; a redrawn progress bar is its last drawing.
    assert lines == ["loading", "step", "step", "100%|##########", "done"]


def test_one_id_on_both_providers_names_two_jobs(store: Store) -> None:
    replicate = _queued(store, "same1", provider="replicate")
    fal = _queued(store, "same1", provider="fal")
    callback = Callback(
        _seen("same1", "failed", source="webhook", error="boom"),
        request_id="same1",
        user_id=None,
        provider="replicate",
        delivery_id="msg_same",
    )
    [delivered] = store.write_many([callback])
    assert delivered.applied is not None and delivered.applied.job.id == replicate.id
    assert store.get(replicate.id).state is State.FAILED
    assert store.get(fal.id).state is State.QUEUED


def test_a_cancel_and_a_success_racing_store_one_outcome(store: Store) -> None:
    job = _queued(store, "pred4")
    outcomes = [
        _seen("pred4", "succeeded", source="webhook") if i % 2 else _seen("pred4", "canceled")
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
    assert final.state in (State.SUCCEEDED, State.CANCELLED)
    found, _ = store.result(job.id)
    assert found == (final.state is State.SUCCEEDED)
    ends = [e for e in store.events(job.id) if e["to_state"] in ("succeeded", "cancelled")]
    assert len(ends) == 1
