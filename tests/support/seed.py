"""Jobs in every state, written straight into a store, for the dashboard's page tests and
browser tests: no provider is contacted to make them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.states import FailureReason, State
from jobs.store import Job, NewJob, Store

APP = "fal-ai/flux/dev"
BATCH = "lighthouses"
EVIL = "<script>alert(1)</script>"


@dataclass
class Seeded:
    """The jobs made, by state; ``evil`` carries markup in every field people see."""

    by_state: dict[State, Job]
    evil: Job
    batch: str = BATCH


def _submitted(store: Store, job: Job, request_id: str, *, poll_in: float = 3600.0) -> Job:
    ref = RemoteRef(application=job.application, request_id=request_id)
    observation = Observation(state=State.QUEUED, queue_position=3, source="submit")
    store.begin_submit(job.id, job.attempts)
    return store.mark_submitted(
        job.id, Submitted(ref=ref, observation=observation), next_poll_at=time.time() + poll_in
    )


def seed(store: Store) -> Seeded:
    """One job per state in batch ``lighthouses`` (index = position in :class:`State`), the
    succeeded one with an image in its result and log lines, plus one ``evil`` job."""
    made: dict[State, Job] = {}
    for index, state in enumerate(State):
        job, _ = store.create_job(
            NewJob(
                application=APP,
                arguments={"prompt": f"a lighthouse, {state.value}", "seed": index},
                batch=BATCH,
                batch_index=index,
                labels={"team": "research", "state": state.value},
                idempotency_key=f"lighthouse-{index}",
            )
        )
        if state is not State.SUBMITTING:
            job = _submitted(store, job, f"req-{state.value}-{index}")
        if state in (State.IN_PROGRESS, State.SUCCEEDED):
            logs = ({"message": "loading weights", "level": "INFO", "timestamp": "t1"},)
            job = store.apply(job.id, Observation(state=State.IN_PROGRESS, logs=logs)).job
        if state is State.SUCCEEDED:
            image = {"url": "https://media.invalid/lighthouse.png", "content_type": "image/png"}
            observation = Observation(
                state=state,
                result={"images": [image], "seed": index},
                metrics={"inference_time": 0.5},
                logs=({"message": "done", "level": "INFO", "timestamp": "t2"},),
            )
            job = store.apply(job.id, observation).job
        if state is State.FAILED:
            job = store.fail(
                job.id, FailureReason.REMOTE_ERROR, {"message": "CUDA out of memory"}
            ).job
        if state is State.CANCELLED:
            job = store.apply(job.id, Observation(state=state, source="cancel")).job
        made[state] = job
    evil, _ = store.create_job(
        NewJob(
            application=f"fal-ai/{EVIL}",
            arguments={"prompt": EVIL, "blob": "z" * 5000},
            labels={"who": EVIL},
            batch=f"b{EVIL}",
        )
    )
    evil = store.fail(
        evil.id, FailureReason.REMOTE_ERROR, {"message": EVIL, "url": "javascript:alert(1)"}
    ).job
    return Seeded(by_state=made, evil=evil)
