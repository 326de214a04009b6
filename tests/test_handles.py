"""The native API's fal_client powers: handles from submit, run, get_handle, stream,
cumulative logs, and the module-level encoders."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.managers import local_settings, open_manager

import jobs
from jobs import (
    AsyncJobHandle,
    AsyncJobManager,
    Completed,
    InProgress,
    Job,
    JobFailed,
    JobManager,
    Queued,
    State,
    SyncJobHandle,
)
from jobs.errors import ConfigError, JobsError, ProviderRejected
from jobs.testing import FakeFalConfig, FakeFalServer

APP = "fal-ai/flux/dev"


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.2, queue_time=0.05)) as server:
        yield server


def _settings(tmp_path: Path, fal: FakeFalServer) -> Any:
    return local_settings(tmp_path, fal.url, fal_rest_url=fal.url, fal_run_url=fal.run_url)


@pytest.fixture
async def jm(tmp_path: Path, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    async with open_manager(_settings(tmp_path, fal)) as manager:
        yield manager


async def test_submit_returns_a_handle_that_is_a_job(jm: AsyncJobManager) -> None:
    handle = await jm.submit(APP, {"prompt": "h", "_fake": {"logs": 2}})
    assert isinstance(handle, AsyncJobHandle) and isinstance(handle, Job)
    assert handle.state is State.QUEUED and handle.request_id and handle.id
    assert handle.to_dict()["request_id"] == handle.request_id
    first = await handle.status()
    assert isinstance(first, Queued | InProgress | Completed)
    events = [e async for e in handle.iter_events(with_logs=True, interval=0.01)]
    final = events[-1]
    assert isinstance(final, Completed) and final.state == "succeeded"
    assert [line["message"] for line in final.logs or []] == ["step 1/2", "step 2/2"]
    done = await handle.status(with_logs=True)
    assert isinstance(done, Completed) and done.logs == final.logs
    assert isinstance(await handle.status(), Completed)
    assert (await handle.get())["prompt"] == "h"
    assert (await handle.reload()).state is State.SUCCEEDED


async def test_handle_cancel(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    handle = await jm.submit(APP, {"_fake": {"queue_time": 30}})
    await handle.cancel()
    assert (await handle.reload()).state is State.CANCELLED
    with pytest.raises(JobFailed):
        await handle.get()
    assert fal.fake.stats.cancels == 1


async def test_run_and_get_handle(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    result = await jm.run(APP, {"prompt": "run"}, idempotency_key="run-1")
    again = await jm.run(APP, {"prompt": "run"}, idempotency_key="run-1")
    assert result["prompt"] == again["prompt"] == "run"
    assert fal.fake.stats.submits == 1  # the re-run resumed, it was not sent twice
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{fal.url}/{APP}", json={"prompt": "elsewhere"})
    request_id = reply.json()["request_id"]
    handle = await jm.get_handle(APP, request_id)
    assert handle.request_id == request_id
    assert (await handle.get())["prompt"] == "elsewhere"
    assert (await jm.get_handle(APP, request_id)).id == handle.id


async def test_stream_records_events_and_result(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    events = [e async for e in jm.stream(APP, {"prompt": "s", "_fake": {"events": 3}})]
    assert [e["step"] for e in events] == [1, 2, 3] and events[-1]["partial"] is False
    [job] = await jm.list_jobs()
    assert job.state is State.SUCCEEDED and job.path == "/stream"
    assert await jm.result(job.id) == events[-1]
    recorded = [e["detail"] for e in jm.store.events(job.id) if e["kind"] == "stream_event"]
    assert recorded == events
    assert fal.fake.stats.stream_runs == 1 and fal.fake.stats.submits == 0


async def test_stream_failure_and_abandon(jm: AsyncJobManager) -> None:
    with pytest.raises(ProviderRejected, match="HTTP 422"):
        async for _ in jm.stream(APP, {"_fake": {"fail": 422}}):
            pass
    failed = (await jm.list_jobs())[0]
    assert failed.state is State.FAILED and failed.error is not None
    stream = jm.stream(APP, {"_fake": {"events": 5}})
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    abandoned = (await jm.list_jobs())[0]
    assert abandoned.state is State.FAILED
    assert abandoned.error is not None and abandoned.error["type"] == "stream_abandoned"


async def test_stream_idempotency_key_cannot_replay(jm: AsyncJobManager) -> None:
    assert [e async for e in jm.stream(APP, {}, idempotency_key="s-1")]
    with pytest.raises(JobsError, match="cannot be replayed"):
        async for _ in jm.stream(APP, {}, idempotency_key="s-1"):
            pass


async def test_stream_bad_input_records_nothing(jm: AsyncJobManager) -> None:
    with pytest.raises(ConfigError):
        async for _ in jm.stream("not-an-app", {}):
            pass
    assert await jm.list_jobs() == []


def test_sync_manager(tmp_path: Path, fal: FakeFalServer) -> None:
    with JobManager(_settings(tmp_path, fal)) as sync_jm:
        handle = sync_jm.submit(APP, {"prompt": "sync"})
        assert isinstance(handle, SyncJobHandle) and handle.state is State.QUEUED
        assert isinstance(list(handle.iter_events())[-1], Completed)
        assert handle.get()["prompt"] == "sync"
        assert sync_jm.run(APP, {"prompt": "r"})["prompt"] == "r"
        same = SyncJobHandle.from_request_id(sync_jm, APP, handle.request_id or "")
        assert same.id == handle.id and isinstance(same.status(), Completed)
        streamed = list(sync_jm.stream(APP, {"prompt": "s"}))
        assert streamed[-1]["prompt"] == "s"
        for _ in sync_jm.stream(APP, {"_fake": {"events": 4}}):
            break  # leaving early closes the stream and records it
        assert sync_jm.store.list_jobs(limit=1)[0].state is State.FAILED
        url = sync_jm.upload(b"sync bytes", "text/plain")
        assert fal.fake.cdn.file(url.url) is not None


def test_module_level_encoders(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hi")
    assert jobs.encode_file(path) == "data:text/plain;base64,aGk="
    assert jobs.encode(b"hi", "text/plain") == "data:text/plain;base64,aGk="

    class FakeImage:
        def save(self, buffer: Any, format: str) -> None:
            buffer.write(b"IMG-" + format.encode())

    assert jobs.encode_image(FakeImage(), "png") == "data:image/png;base64,SU1HLXBuZw=="
