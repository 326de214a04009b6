"""The real fal_client (1.0.3) against the emulator: proof that it speaks fal's protocol.

fal_client only builds ``https://`` URLs, from ``QUEUE_URL_FORMAT``, which it computes
once at import from ``FAL_QUEUE_RUN_HOST`` / ``FAL_RUN_HOST``. Setting the environment
variable after import changes nothing, so the tests patch the module constant to the
emulator's base URL. The emulator serves TLS with a trustme CA, and ``SSL_CERT_FILE``
makes httpx (which fal_client uses with ``trust_env``) trust it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client as fal_client_module
import httpx
import pytest

from jobs.testing import FakeFalConfig, FakeFalServer

KEY = "test-key-id:test-key-secret"
APP = "fal-ai/flux/dev"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFalServer]:
    config = FakeFalConfig(key=KEY, queue_time=0.05, duration=0.15, webhook_retries=0)
    with FakeFalServer(config, ssl=True) as srv:
        assert srv.ca_cert_path is not None
        monkeypatch.setenv("FAL_KEY", KEY)
        monkeypatch.setenv("SSL_CERT_FILE", srv.ca_cert_path)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        host = srv.url.removeprefix("https://")
        monkeypatch.setenv("FAL_QUEUE_RUN_HOST", host)  # documents intent; read at import
        monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"https://{host}/")
        # the other hosts fal_client talks to, all served by the emulator (fal_cdn, fal_run)
        monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", srv.run_url + "/")
        monkeypatch.setattr(fal_client_module, "REST_URL", srv.url)
        monkeypatch.setattr(fal_client_module, "CDN_URL", srv.url)
        yield srv


@pytest.fixture
def sync_client(server: FakeFalServer) -> Iterator[fal_client.SyncClient]:
    client = fal_client.SyncClient(key=KEY)
    yield client
    if "_client" in client.__dict__:
        client._client.close()


@pytest.fixture
async def async_client(server: FakeFalServer) -> AsyncIterator[fal_client.AsyncClient]:
    client = fal_client.AsyncClient(key=KEY)
    yield client
    await (await client._client).aclose()


def test_sync_submit_status_result(
    server: FakeFalServer, sync_client: fal_client.SyncClient
) -> None:
    handle = sync_client.submit(APP, {"prompt": "a cat", "_fake": {"logs": 2}})
    assert handle.status_url == f"{server.url}/fal-ai/flux/requests/{handle.request_id}/status"
    events = list(handle.iter_events(with_logs=True, interval=0.02))
    assert isinstance(events[0], fal_client.Queued) and events[0].position == 0
    assert any(isinstance(e, fal_client.InProgress) for e in events)
    final = events[-1]
    assert isinstance(final, fal_client.Completed)
    assert final.error is None and final.metrics["inference_time"] > 0
    assert final.logs is not None
    assert [line["message"] for line in final.logs] == ["step 1/2", "step 2/2"]
    result = handle.get(interval=0.02)
    assert result["prompt"] == "a cat" and result["images"][0]["width"] == 64
    # re-attaching by request id builds the URLs itself (spec 1.2: sub-path dropped)
    status = sync_client.status(APP, handle.request_id, with_logs=False)
    assert isinstance(status, fal_client.Completed) and status.logs is None
    assert sync_client.result(APP, handle.request_id) == result
    stats = server.fake.stats
    assert stats.submits == 1 and stats.result_fetches == 2


def test_sync_cancel(server: FakeFalServer, sync_client: fal_client.SyncClient) -> None:
    handle = sync_client.submit(APP, {"prompt": "slow", "_fake": {"queue_time": 30}})
    status = handle.status()
    assert isinstance(status, fal_client.Queued)
    sync_client.cancel(APP, handle.request_id)
    status = handle.status()
    assert isinstance(status, fal_client.Completed)
    assert status.error_type == "client_cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as result_error:
        handle.get()
    assert result_error.value.status_code == 499
    assert result_error.value.error_type == "client_cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as cancel_error:
        handle.cancel()
    assert cancel_error.value.status_code == 400


def test_sync_failure_surfaces_at_result(sync_client: fal_client.SyncClient) -> None:
    handle = sync_client.submit(APP, {"_fake": {"fail": 422, "duration": 0.02}})
    with pytest.raises(fal_client.FalClientHTTPError) as error:
        handle.get(interval=0.02)
    assert error.value.status_code == 422
    assert error.value.error_type == "validation_error"
    detail: Any = error.value.message  # fal_client passes the body's "detail" through
    assert detail[0]["loc"] == ["body", "prompt"]


def test_sync_headers_and_webhook_recorded(
    server: FakeFalServer, sync_client: fal_client.SyncClient
) -> None:
    hook = "https://example.invalid/v1/webhooks/fal?job=abc&x=1"
    handle = sync_client.submit(
        APP, {"prompt": "x"}, priority="low", hint="lora:a", webhook_url=hook
    )
    request = server.fake.get_request(handle.request_id)
    assert request is not None
    assert (request.priority, request.hint, request.webhook_url) == ("low", "lora:a", hook)
    assert request.route.endpoint_id == APP


def test_sync_retries_ingress_errors(
    server: FakeFalServer, sync_client: fal_client.SyncClient
) -> None:
    # seed 1: the first draw (0.13) hits ingress_error, so the submit is retried by fal_client
    server.fake.update_config({"seed": 1, "ingress_error_rate": 0.15, "rate_limit_rate": 0.15})
    result = sync_client.subscribe(APP, {"prompt": "retry me"}, interval=0.02)
    assert result["prompt"] == "retry me"
    stats = server.fake.stats
    assert stats.faults.get("ingress_error", 0) >= 1
    assert stats.submits == 1 and stats.submit_attempts >= 2  # never received twice


async def test_async_subscribe_with_logs(
    server: FakeFalServer, async_client: fal_client.AsyncClient
) -> None:
    updates: list[Any] = []
    result = await async_client.subscribe(
        APP,
        {"prompt": "async", "_fake": {"logs": 1}},
        with_logs=True,
        interval=0.02,
        on_queue_update=updates.append,
        priority="normal",
    )
    assert result["prompt"] == "async"
    assert isinstance(updates[-1], fal_client.Completed)
    assert updates[-1].logs and updates[-1].logs[0]["message"] == "step 1/1"


async def test_async_submit_status_cancel(
    server: FakeFalServer, async_client: fal_client.AsyncClient
) -> None:
    handle = await async_client.submit(
        APP, {"prompt": "x", "_fake": {"queue_time": 0, "duration": 30}}
    )
    status = await async_client.status(APP, handle.request_id, with_logs=True)
    assert isinstance(status, fal_client.InProgress) and status.logs == []
    await handle.cancel()
    status = await handle.status()
    assert isinstance(status, fal_client.Completed) and status.error_type == "client_cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as error:
        await async_client.result(APP, handle.request_id)
    assert error.value.status_code == 499
    assert server.fake.stats.cancels == 1


def test_sync_upload_single(server: FakeFalServer, sync_client: fal_client.SyncClient) -> None:
    url = sync_client.upload(b"hello cdn", "text/plain", file_name="hello.txt")
    stored = server.fake.cdn.file(url)
    assert stored is not None and stored.content == b"hello cdn"
    assert stored.content_type == "text/plain"
    assert url.endswith("/hello.txt")
    stats = server.fake.stats
    assert (stats.cdn_tokens, stats.cdn_uploads, stats.cdn_multipart_initiated) == (1, 1, 0)
    # the served file is what was sent
    with httpx.Client() as http:
        assert http.get(url).content == b"hello cdn"


def test_sync_upload_file_with_lifecycle(
    tmp_path: Path, server: FakeFalServer, sync_client: fal_client.SyncClient
) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"\x89PNG fake")
    url = sync_client.upload_file(path, lifecycle=fal_client.StorageSettings(expires_in="1d"))
    stored = server.fake.cdn.file(url)
    assert stored is not None and stored.content_type == "image/png"
    assert stored.lifecycle == {"expiration_duration_seconds": 86400}
    # one token serves several uploads
    sync_client.upload(b"again", "text/plain")
    assert server.fake.stats.cdn_tokens == 1 and server.fake.stats.cdn_uploads == 2


def test_sync_upload_file_multipart(
    tmp_path: Path, server: FakeFalServer, sync_client: fal_client.SyncClient
) -> None:
    size = fal_client_module.MULTIPART_THRESHOLD + 1024  # just over 100 MiB: multipart
    path = tmp_path / "big.bin"
    block = bytes(range(256)) * 4096
    with path.open("wb") as out:
        written = 0
        while written < size:
            piece = block[: size - written]
            out.write(piece)
            written += len(piece)
    url = sync_client.upload_file(path)
    stored = server.fake.cdn.file(url)
    assert stored is not None and len(stored.content) == size
    assert stored.content == path.read_bytes()
    stats = server.fake.stats
    assert stats.cdn_multipart_initiated == 1 and stats.cdn_completes == 1
    (parts,) = stats.cdn_parts.values()
    assert sorted(parts) == list(range(1, 12)) and set(parts.values()) == {1}


def test_sync_upload_refused(server: FakeFalServer, sync_client: fal_client.SyncClient) -> None:
    server.fake.update_config({"cdn_refuse_status": 403})
    with pytest.raises(fal_client.FalClientHTTPError) as error:
        sync_client.upload(b"x", "text/plain", fallback_repository=[])
    assert error.value.status_code == 403
    assert server.fake.stats.cdn_uploads == 0


def test_sync_stream(server: FakeFalServer, sync_client: fal_client.SyncClient) -> None:
    events = list(sync_client.stream(APP, {"prompt": "streamed", "_fake": {"events": 4}}))
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert events[-1] == {"partial": False, "step": 4, "of": 4, "prompt": "streamed"}
    assert server.fake.stats.stream_runs == 1 and server.fake.stats.submits == 0


async def test_async_upload_and_stream(
    server: FakeFalServer, async_client: fal_client.AsyncClient
) -> None:
    url = await async_client.upload(json.dumps({"a": 1}), "application/json")
    stored = server.fake.cdn.file(url)
    assert stored is not None and json.loads(stored.content) == {"a": 1}
    events = [e async for e in async_client.stream(APP, {"prompt": "a"})]
    assert len(events) == 3 and events[-1]["partial"] is False
