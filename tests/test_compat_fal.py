"""``jobs.compat.fal``: fal_client's documented examples, changed only in the import line,
run against the emulator in fresh processes; then the details of the translation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobs.compat.fal as fal_client
from jobs.compat.fal.auth import MissingCredentialsError
from jobs.errors import ConfigError
from jobs.testing import FakeFalConfig, FakeFalServer

KEY = "compat-key"
IMPORT = "import jobs.compat.fal as fal_client"

# fal_client 1.0.3's README, section by section; only `import fal_client` was changed.
README_EXAMPLES = {
    "getting_started": """
        import fal_client

        response = fal_client.run("fal-ai/fast-sdxl", arguments={"prompt": "a cute cat, realistic, orange"})
        print(response["images"][0]["url"])
    """,
    "asynchronous": """
        import asyncio
        import fal_client

        async def main():
            response = await fal_client.run_async("fal-ai/fast-sdxl", arguments={"prompt": "a cute cat, realistic, orange"})
            print(response["images"][0]["url"])


        asyncio.run(main())
    """,
    "uploading_files": """
        import fal_client

        audio_url = fal_client.upload_file("path/to/audio.wav")
        response = fal_client.run("fal-ai/whisper", arguments={"audio_url": audio_url})
        print(response["text"])
    """,
    "encoding_files": """
        import fal_client

        audio_data_url = fal_client.encode_file("path/to/audio.wav")
        response = fal_client.run("fal-ai/whisper", arguments={"audio_url": audio_data_url})
        print(response["text"])
    """,
    "queuing_requests": """
        import asyncio
        import fal_client

        async def main():
            response = await fal_client.submit_async("fal-ai/fast-sdxl", arguments={"prompt": "a cute cat, realistic, orange"})

            logs_index = 0
            async for event in response.iter_events(with_logs=True):
                if isinstance(event, fal_client.Queued):
                    print("Queued. Position:", event.position)
                elif isinstance(event, (fal_client.InProgress, fal_client.Completed)):
                    new_logs = event.logs[logs_index:]
                    for log in new_logs:
                        print(log["message"])
                    logs_index = len(event.logs)

            result = await response.get()
            print(result["images"][0]["url"])


        asyncio.run(main())
    """,
    # fal_client's API reference: subscribe with queue updates, then the request-id calls.
    "subscribe": """
        import fal_client

        def on_queue_update(update):
            if isinstance(update, fal_client.InProgress):
                for log in update.logs:
                    print(log["message"])

        result = fal_client.subscribe(
            "fal-ai/flux/dev",
            arguments={"prompt": "a cat", "_fake": {"logs": 2}},
            with_logs=True,
            on_queue_update=on_queue_update,
        )
        print(result["prompt"])
    """,
    "request_id": """
        import fal_client

        handler = fal_client.submit("fal-ai/flux/dev", arguments={"prompt": "a dog"})
        request_id = handler.request_id
        status = fal_client.status("fal-ai/flux/dev", request_id, with_logs=True)
        print(type(status).__name__)
        result = fal_client.result("fal-ai/flux/dev", request_id)
        print(result["prompt"])
    """,
    "stream": """
        import fal_client

        for event in fal_client.stream("fal-ai/flux/dev", arguments={"prompt": "streamed"}):
            print(event["step"])
    """,
}

EXPECTED_OUTPUT = {
    "getting_started": ["/_fake/files/"],
    "asynchronous": ["/_fake/files/"],
    "uploading_files": ["transcript of http://"],
    "encoding_files": ["transcript of data:audio/x-wav;base64,"],
    "queuing_requests": ["Queued. Position: 0", "step 1/2", "step 2/2", "/_fake/files/"],
    "subscribe": ["a cat"],
    "request_id": ["a dog"],
    "stream": ["1", "2", "3"],
}


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    config = FakeFalConfig(key=KEY, queue_time=0.05, duration=0.2, webhook_retries=0)
    with FakeFalServer(config) as server:
        yield server


def _env(tmp_path: Path, fal: FakeFalServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_"))}
    env.update(
        FAL_KEY=KEY,
        JOBS_DATABASE_URL=f"sqlite:///{tmp_path}/jobs.db",
        JOBS_FAL_QUEUE_URL=fal.url,
        JOBS_FAL_REST_URL=fal.url,
        JOBS_FAL_RUN_URL=fal.run_url,
    )
    return env


def _script(source: str) -> str:
    code = textwrap.dedent(source).strip()
    assert code.count("import fal_client") == 1
    code = code.replace("import fal_client", IMPORT)
    # make the fake queue log two lines for the README's log-printing example
    return code.replace(
        '"a cute cat, realistic, orange"}', '"a cute cat, realistic, orange", "_fake": {"logs": 2}}'
    )


@pytest.mark.parametrize("name", sorted(README_EXAMPLES))
def test_documented_example_runs_with_one_changed_import(
    name: str, tmp_path: Path, fal: FakeFalServer
) -> None:
    audio = tmp_path / "path" / "to" / "audio.wav"
    audio.parent.mkdir(parents=True)
    audio.write_bytes(b"RIFF fake wav")
    env = _env(tmp_path, fal)
    code = _script(README_EXAMPLES[name])
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # nothing left unclosed at exit, no warnings
    for expected in EXPECTED_OUTPUT[name]:
        assert expected in run.stdout, (expected, run.stdout)
    # every call is a recorded job, shown by the CLI
    listed = subprocess.run(
        [sys.executable, "-m", "jobs", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [row["state"] for row in rows] == ["succeeded"], rows


# --- in-process: the translation ------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, fal: FakeFalServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, value in _env(tmp_path, fal).items():
        if name.startswith(("JOBS_", "FAL_")):
            monkeypatch.setenv(name, value)
    return tmp_path


@pytest.fixture
def client(env: Path) -> Iterator[fal_client.SyncClient]:
    client = fal_client.SyncClient()
    yield client
    client.close()


def test_missing_credentials_before_anything(
    env: Path, fal: FakeFalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAL_KEY")
    client = fal_client.SyncClient()
    with pytest.raises(MissingCredentialsError):
        client.submit("fal-ai/flux/dev", {"prompt": "x"})
    with pytest.raises(fal_client.MissingCredentialsError):
        client.upload(b"x", "text/plain")
    assert fal_client.auth.MissingCredentialsError is MissingCredentialsError
    assert not (env / "jobs.db").exists() and fal.fake.stats.submit_attempts == 0
    # an explicit key wins over the environment, as in fal_client
    keyed = fal_client.SyncClient(key=KEY)
    assert keyed.run("fal-ai/flux/dev", {"prompt": "k"})["prompt"] == "k"
    keyed.close()


def test_failure_is_fal_client_http_error(client: fal_client.SyncClient) -> None:
    handle = client.submit("fal-ai/flux/dev", {"_fake": {"fail": 422, "duration": 0.05}})
    events = list(handle.iter_events(with_logs=True))
    final = events[-1]
    assert isinstance(final, fal_client.Completed)
    assert final.error is not None and final.error_type is not None
    with pytest.raises(fal_client.FalClientHTTPError) as error:
        handle.get()
    assert error.value.status_code == 422
    detail: Any = error.value.message
    assert detail[0]["loc"] == ["body", "prompt"]
    with pytest.raises(fal_client.FalClientHTTPError) as late:
        handle.cancel()
    assert late.value.status_code == 400


def test_status_result_cancel_by_request_id_adopt(
    client: fal_client.SyncClient, fal: FakeFalServer
) -> None:
    import httpx

    reply = httpx.post(
        f"{fal.url}/fal-ai/flux/dev",
        json={"prompt": "made elsewhere", "_fake": {"queue_time": 30}},
        headers={"Authorization": f"Key {KEY}"},
    )
    request_id = reply.json()["request_id"]
    status = client.status("fal-ai/flux/dev", request_id)
    assert isinstance(status, fal_client.Queued) and status.position == 0
    client.cancel("fal-ai/flux/dev", request_id)
    with pytest.raises(fal_client.FalClientHTTPError) as error:
        client.result("fal-ai/flux/dev", request_id)
    assert error.value.status_code == 499
    [job] = client.manager.store.list_jobs()
    assert job.request_id == request_id and job.state.value == "cancelled"


def test_client_timeout_cancels(client: fal_client.SyncClient, fal: FakeFalServer) -> None:
    # a start timeout longer than the client's, so the client gives up first (fal_client
    # warns about exactly that)
    with (
        pytest.raises(fal_client.FalClientTimeoutError) as error,
        pytest.warns(UserWarning, match="larger than client_timeout"),
    ):
        client.subscribe(
            "fal-ai/flux/dev",
            {"_fake": {"queue_time": 30}},
            client_timeout=1.5,
            start_timeout=60,
            interval=0.05,
        )
    assert error.value.request_id and error.value.timeout == 1.5
    assert isinstance(error.value, TimeoutError)
    assert fal.fake.stats.cancels == 1


def test_idempotency_key_resumes_instead_of_paying_twice(
    client: fal_client.SyncClient, fal: FakeFalServer
) -> None:
    first = client.run("fal-ai/flux/dev", {"prompt": "once"}, idempotency_key="train-1")
    again = client.run("fal-ai/flux/dev", {"prompt": "once"}, idempotency_key="train-1")
    assert first == again and fal.fake.stats.submits == 1
    handle = client.submit("fal-ai/flux/dev", {"prompt": "l"}, labels={"team": "a"}, batch="b1")
    assert handle.job.labels == {"team": "a"} and handle.job.batch == "b1"
    with pytest.raises(TypeError, match="unexpected keyword"):
        client.submit("fal-ai/flux/dev", {}, colour="blue")


def test_what_cannot_be_honoured_is_refused(client: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.FalClientError, match="webhook_url"):
        client.submit("fal-ai/flux/dev", {}, webhook_url="https://example.invalid/hook")
    with pytest.raises(fal_client.FalClientError, match="custom headers"):
        client.submit("fal-ai/flux/dev", {}, headers={"X-Other": "1"})
    with pytest.raises(fal_client.FalClientError, match="JOBS_UPLOAD_TTL"):
        client.upload(b"x", "text/plain", lifecycle=object())
    handle = client.submit("fal-ai/flux/dev", {}, headers={"X-Fal-Queue-Priority": "low"})
    assert handle.job.priority == "low"


def test_upload_folder_once_and_stream(
    env: Path, client: fal_client.SyncClient, fal: FakeFalServer
) -> None:
    photos = env / "photos"
    photos.mkdir()
    (photos / "1.jpg").write_bytes(b"one")
    (photos / "2.jpg").write_bytes(b"two")
    url = client.upload_file(photos)
    assert isinstance(url, str) and url == client.upload_file(photos)
    assert fal.fake.stats.cdn_uploads == 1
    events = list(client.stream("fal-ai/flux/dev", {"prompt": "s"}))
    assert events[-1]["prompt"] == "s"


async def test_async_client(env: Path, fal: FakeFalServer) -> None:
    client = fal_client.AsyncClient()
    try:
        handle = await client.submit("fal-ai/flux/dev", {"prompt": "a", "_fake": {"logs": 1}})
        statuses = [s async for s in handle.iter_events(with_logs=True)]
        assert isinstance(statuses[-1], fal_client.Completed)
        assert (await handle.get())["prompt"] == "a"
        again = await fal_client.AsyncRequestHandle.from_request_id(
            client, "fal-ai/flux/dev", handle.request_id
        )
        assert again.job.id == handle.job.id
        assert isinstance(
            await client.status("fal-ai/flux/dev", handle.request_id), fal_client.Completed
        )
        url = await client.upload(b"async bytes", "text/plain")
        assert fal.fake.cdn.file(url) is not None
        events = [e async for e in client.stream("fal-ai/flux/dev", {"prompt": "s"})]
        assert len(events) == 3
        updates: list[Any] = []
        result = await client.subscribe(
            "fal-ai/flux/dev", {"prompt": "sub"}, on_queue_update=updates.append
        )
        assert result["prompt"] == "sub" and isinstance(updates[-1], fal_client.Completed)
    finally:
        client.close()


def test_start_timeout_is_sent_and_kept(client: fal_client.SyncClient, fal: FakeFalServer) -> None:
    handle = client.submit("fal-ai/flux/dev", {"prompt": "t"}, start_timeout=30)
    request = fal.fake.get_request(handle.request_id)
    assert request is not None and request.fal_headers["x-fal-request-timeout"] == "30.0"
    assert handle.job.start_timeout == 30
    # fal ends a request that could not start in time with 504 (timeout type "user")
    with pytest.raises(fal_client.FalClientHTTPError) as error:
        client.subscribe("fal-ai/flux/dev", {"_fake": {"queue_time": 30}}, start_timeout=1.5)
    assert error.value.status_code == 504
    with pytest.raises(ConfigError, match="more than 1 second"):
        client.submit("fal-ai/flux/dev", {}, start_timeout=1)
    with pytest.warns(UserWarning, match="larger than client_timeout"):
        client.subscribe("fal-ai/flux/dev", {"prompt": "w"}, start_timeout=60, client_timeout=30)
