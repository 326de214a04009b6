"""Jobs in every state, written straight into a store, for the dashboard's page tests and
browser tests: no provider is contacted to make them."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.results import DOWNLOADED, cache_path, find_files
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


def png(width: int = 96, height: int = 64) -> bytes:
    """A small gradient PNG, built by hand (no imaging library needed)."""
    rows = b"".join(
        b"\0" + bytes(v for x in range(width) for v in (40 + x * 2, 80 + y * 2, 160))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def cache_image(store: Store, job: Job, cache_dir: Path) -> None:
    """Record the job's result files and put the first one in the cache as downloaded."""
    _, stored = store.result(job.id)
    files = store.add_files(job.id, find_files(stored, "fal"))
    data = png()
    digest = hashlib.sha256(data).hexdigest()
    path = cache_path(cache_dir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    store.set_file(job.id, files[0].n, state=DOWNLOADED, sha256=digest, size=len(data))


def seed(store: Store, *, cache_dir: Path | None = None) -> Seeded:
    """One job per state in batch ``lighthouses`` (index = position in :class:`State`), the
    succeeded one with an image in its result (in the cache when ``cache_dir`` is given) and
    log lines, plus one ``evil`` job."""
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
            if cache_dir is not None:
                cache_image(store, job, cache_dir)
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
