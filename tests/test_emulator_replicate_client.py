"""The real ``replicate`` client (1.0.7) against the emulator: proof that it speaks
Replicate's predictions API and signs webhooks as Replicate does.

``Client(api_token=..., base_url=server.url)`` talks to a served emulator; the
poll interval comes from ``REPLICATE_POLL_INTERVAL``, which the client reads when it is
built. Webhooks go to a small receiver on a free port and are checked with the client's
own validator (``replicate.webhook.Webhooks.validate``) and with the Standard Webhooks
reference package. Every client is closed by the test that opened it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import standardwebhooks
from replicate.client import Client
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput
from replicate.pagination import async_paginate, paginate
from replicate.prediction import Prediction
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret
from support.waiting import wait_for
from test_emulator_replicate import Receiver

from jobs.testing import (
    FakeReplicateConfig,
    FakeReplicateServer,
    expected_file_bytes,
    input_hash,
)
from jobs.testing.replicate_model import version_for

TOKEN = "r8_emulator_test_token"
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeReplicateServer]:
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.02")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    config = FakeReplicateConfig(
        token=TOKEN, queue_time=0.05, duration=0.1, webhook_retry_base=0.02
    )
    with FakeReplicateServer(config) as srv:
        yield srv


def _close(client: Client) -> None:
    sync: httpx.Client | None = getattr(client, "_Client__client", None)
    if sync is not None:
        sync.close()


@pytest.fixture
def client(server: FakeReplicateServer) -> Iterator[Client]:
    made = Client(api_token=TOKEN, base_url=server.url)
    yield made
    _close(made)


@pytest.fixture
async def async_client(server: FakeReplicateServer) -> AsyncIterator[Client]:
    made = Client(api_token=TOKEN, base_url=server.url)
    yield made
    opened: httpx.AsyncClient | None = getattr(made, "_Client__async_client", None)
    if opened is not None:
        await opened.aclose()
    _close(made)


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def build(codes: list[int] | None = None) -> Receiver:
        made.append(Receiver(codes))
        return made[-1]

    yield build
    for r in made:
        r.close()


def raw_get(server: FakeReplicateServer, prediction_id: str) -> dict[str, Any]:
    """The prediction's JSON exactly as the API sends it (not through the client's model)."""
    response = httpx.get(
        f"{server.url}/v1/predictions/{prediction_id}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        trust_env=False,
    )
    data: dict[str, Any] = response.json()
    return data


# --- create, wait, get ------------------------------------------------------------------------


def test_create_for_a_model_then_wait(server: FakeReplicateServer, client: Client) -> None:
    assert client.poll_interval == 0.02
    prediction = client.predictions.create(
        model="acme/echo", input={"text": "Zoë", "_fake": {"logs": 3}}
    )
    first_status = prediction.status
    assert isinstance(prediction, Prediction) and first_status == "starting"
    assert prediction.urls is not None
    assert prediction.urls["get"] == f"{server.url}/v1/predictions/{prediction.id}"
    prediction.wait()
    assert prediction.status == "succeeded"
    assert prediction.output == {"echo": {"text": "Zoë", "_fake": {"logs": 3}}}
    assert prediction.metrics is not None and prediction.metrics["predict_time"] == 0.1
    progress = prediction.progress  # parsed by the client from the logs string
    assert progress is not None and (progress.current, progress.total) == (3, 3)
    assert prediction.model == "acme/echo" and prediction.version == version_for("acme/echo")
    stats = server.stats
    counters = stats.counters(prediction.id)
    assert stats.creates == 1 and counters is not None and counters.gets == stats.gets >= 1


def test_create_for_a_version(server: FakeReplicateServer, client: Client) -> None:
    by_ref = client.predictions.create(version=f"acme/tuned:{VERSION}", input={"v": 1})
    assert (by_ref.model, by_ref.version) == ("acme/tuned", VERSION)
    bare = client.predictions.create(VERSION, {"v": 2})  # positional, as the client allows
    assert (bare.model, bare.version) == ("acme/tuned", VERSION)
    got = client.predictions.get(bare.id)
    assert got.id == bare.id and got.input == {"v": 2}
    with pytest.raises(ReplicateError) as error:
        client.predictions.create(version="not-a-version", input={})
    assert error.value.status == 422 and error.value.title == "Input validation failed"
    assert server.stats.creates == 2


def test_create_for_a_deployment(server: FakeReplicateServer, client: Client) -> None:
    deployment = client.deployments.get("acme/prod")
    assert deployment.id == "acme/prod" and deployment.current_release is not None
    prediction = deployment.predictions.create(input={"d": 1})
    assert prediction.model == "acme/prod"
    assert prediction.version == deployment.current_release.version
    other = client.predictions.create(deployment="acme/prod", input={"d": 2})
    other.wait()
    assert other.output == {"echo": {"d": 2}}
    found = server.fake.get_prediction(other.id)
    assert found is not None and found.deployment == "acme/prod"


def test_cancel(server: FakeReplicateServer, client: Client) -> None:
    slow = client.predictions.create(model="acme/echo", input={"_fake": {"queue_time": 30}})
    canceled = client.predictions.cancel(slow.id)
    assert canceled.status == "canceled" and canceled.started_at is None
    running = client.predictions.create(model="acme/echo", input={"_fake": {"duration": 30}})
    wait_for(lambda: client.predictions.get(running.id).status == "processing", 5, "a start")
    running.cancel()  # the object's own method updates it in place
    assert running.status == "canceled" and running.metrics is not None
    again = client.predictions.cancel(running.id)  # already terminal: unchanged
    assert again.status == "canceled" and again.completed_at == running.completed_at
    with pytest.raises(ReplicateError) as error:
        client.predictions.cancel("no-such-prediction")
    assert error.value.status == 404
    assert server.stats.cancels == 4


def test_list_pages_through_every_prediction(server: FakeReplicateServer, client: Client) -> None:
    server.fake.update_config({"queue_time": 60})
    made = [client.predictions.create(model="acme/echo", input={"i": i}).id for i in range(105)]
    pages = list(paginate(client.predictions.list))
    assert [len(page) for page in pages] == [100, 5]
    assert [p.id for page in pages for p in page] == made[::-1]  # newest first
    assert pages[1].previous is not None
    back = client.predictions.list(pages[1].previous)
    assert [p.id for p in back] == [p.id for p in pages[0]]
    assert server.stats.lists == 3


# --- run (Prefer: wait) -------------------------------------------------------------------------


def test_run_holds_the_create_until_done(server: FakeReplicateServer, client: Client) -> None:
    assert client.run("acme/echo", input={"prompt": "a cat"}) == {"echo": {"prompt": "a cat"}}
    assert client.run(f"acme/echo:{VERSION}", input={"n": 2}) == {"echo": {"n": 2}}
    stats = server.stats
    assert stats.creates == 2 and stats.gets == 0  # Prefer: wait answered without polling
    assert stats.version_gets == 1  # run() looks up the version it was given


def test_run_polls_when_the_wait_runs_out_while_starting(
    server: FakeReplicateServer, client: Client
) -> None:
    output = client.run("acme/echo", input={"_fake": {"queue_time": 1.5}, "k": 1}, wait=1)
    assert output == {"echo": {"_fake": {"queue_time": 1.5}, "k": 1}}
    assert server.stats.gets >= 1


def test_run_trusts_a_processing_reply(server: FakeReplicateServer, client: Client) -> None:
    # The client treats any status but "starting" after Prefer: wait as final (the spec's
    # pain point P13): a prediction still processing when the wait ran out gives None.
    output = client.run("acme/echo", input={"_fake": {"queue_time": 0, "duration": 30}}, wait=1)
    assert output is None
    (prediction,) = server.fake.table.page(None, None, None, None, 1)[0]
    assert prediction.status(server.fake.now()) == "processing"


def test_run_raises_model_error_for_a_failed_prediction(client: Client) -> None:
    with pytest.raises(ModelError) as error:
        client.run("acme/echo", input={"_fake": {"fail": "CUDA out of memory"}})
    assert error.value.prediction.status == "failed"
    assert str(error.value) == "CUDA out of memory"


def test_run_returns_file_outputs_over_https(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.02")
    config = FakeReplicateConfig(token=TOKEN, queue_time=0.02, duration=0.05, file_size=300)
    with FakeReplicateServer(config, ssl=True) as server:
        assert server.ca_cert_path is not None
        monkeypatch.setenv("SSL_CERT_FILE", server.ca_cert_path)  # httpx trusts the test CA
        client = Client(api_token=TOKEN, base_url=server.url)
        try:
            files = client.run("acme/painter", input={"_fake": {"files": 2}})
            assert isinstance(files, list) and len(files) == 2
            assert all(isinstance(f, FileOutput) for f in files)
            pid = files[0].url.split("/")[-2]
            assert [f.read() for f in files] == [expected_file_bytes(pid, n, 300) for n in (0, 1)]
            assert server.stats.file_downloads == 2
        finally:
            _close(client)


# --- errors and faults as the client sees them ---------------------------------------------------


def test_wrong_token_is_a_replicate_error(server: FakeReplicateServer) -> None:
    wrong = Client(api_token="r8_wrong", base_url=server.url)
    try:
        with pytest.raises(ReplicateError) as error:
            wrong.predictions.create(model="acme/echo", input={})
    finally:
        _close(wrong)
    assert (error.value.status, error.value.title) == (401, "Unauthenticated")
    assert server.stats.creates == 0


def test_throttled_get_is_retried_but_a_create_is_not(
    server: FakeReplicateServer, client: Client
) -> None:
    made = client.predictions.create(model="acme/echo", input={"x": 1})
    # seed 7: the first draws are 0.32, 0.15, 0.65: two 429s (Retry-After: 0), then a 200
    server.fake.update_config({"seed": 7, "rate_limit_rate": 0.5, "retry_after": 0})
    assert client.predictions.get(made.id).id == made.id
    assert server.stats.responses_429 == 2 and server.stats.gets == 3
    server.fake.update_config({"rate_limit_rate": 1.0})
    with pytest.raises(ReplicateError) as error:
        client.predictions.create(model="acme/echo", input={"x": 2})  # POST: not retried
    assert error.value.status == 429
    assert error.value.detail == "Request was throttled. Expected available in 0 seconds."
    assert server.stats.creates == 1 and server.stats.create_attempts == 2


def test_create_limit_fails_the_second_create(server: FakeReplicateServer, client: Client) -> None:
    server.fake.update_config({"create_limit_per_minute": 6, "create_limit_burst": 1})
    client.predictions.create(model="acme/echo", input={"first": 1})
    with pytest.raises(ReplicateError) as error:
        client.predictions.create(model="acme/echo", input={"second": 1})
    assert error.value.status == 429
    assert server.stats.creates == 1 and server.stats.create_limited == 1


def test_ambiguous_creates_are_found_by_listing(
    server: FakeReplicateServer, client: Client
) -> None:
    server.fake.update_config({"drop_rate": 1.0})
    with pytest.raises(httpx.RemoteProtocolError):
        client.predictions.create(model="acme/echo", input={"job": "dropped"})
    server.fake.update_config({"drop_rate": 0, "error_500_rate": 1.0})
    with pytest.raises(ReplicateError) as error:
        client.predictions.create(model="acme/echo", input={"job": "500"})
    assert error.value.status == 500
    server.fake.update_config({"error_500_rate": 0})
    listed = {p.input["job"]: p for p in client.predictions.list() if p.input}
    assert set(listed) == {"dropped", "500"}
    assert server.stats.creates_by_input[input_hash({"job": "dropped"})] == 1


def test_an_aborted_prediction_breaks_the_client(
    server: FakeReplicateServer, client: Client
) -> None:
    # Cancel-After before the start: "aborted", a status replicate-python 1.0.7 does not
    # know (the spec's pain point P10), so even a get fails to parse it.
    response = httpx.post(
        f"{server.url}/v1/models/acme/echo/predictions",
        json={"input": {"_fake": {"queue_time": 30}}},
        headers={"Authorization": f"Bearer {TOKEN}", "Cancel-After": "50ms"},
        trust_env=False,
    )
    pid = response.json()["id"]
    wait_for(lambda: raw_get(server, pid)["status"] == "aborted", 5, "the deadline")
    with pytest.raises(ValueError, match="permitted"):
        client.predictions.get(pid)


# --- webhooks, verified by the client's validator and by standardwebhooks -----------------------


def test_webhooks_verify_with_both_validators(
    server: FakeReplicateServer, client: Client, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver()
    prediction = client.predictions.create(
        model="acme/echo",
        input={"text": "Zoë"},
        webhook=f"{hook.url}/v1/webhooks/replicate?job=j-1",
        webhook_events_filter=["start", "completed"],
    )
    wait_for(lambda: len(hook.deliveries) == 2, 5, "two webhooks")
    secret = client.webhooks.default.secret()
    assert secret.key == server.fake.webhook_secret
    verifier = standardwebhooks.Webhook(secret.key)
    for path, headers, body in hook.deliveries:
        assert path == "/v1/webhooks/replicate?job=j-1"
        Webhooks.validate(headers=headers, body=body.decode(), secret=secret, tolerance=300)
        request = httpx.Request("POST", hook.url, headers=headers, content=body)
        Webhooks.validate(request=request, secret=secret)
        assert verifier.verify(body, headers) == json.loads(body)
    start, completed = (json.loads(body) for _, _, body in hook.deliveries)
    assert start["status"] == "processing" and start["id"] == prediction.id
    assert completed == raw_get(server, prediction.id)
    assert completed["status"] == "succeeded"
    # a tampered body fails both
    _, headers, body = hook.deliveries[1]
    tampered = body.replace(b'"succeeded"', b'"failed"')
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=headers, body=tampered.decode(), secret=secret)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(tampered, headers)


def test_webhooks_during_a_secret_rotation(
    server: FakeReplicateServer, client: Client, receiver: Callable[..., Receiver]
) -> None:
    old = server.fake.webhook_secret
    new = FakeReplicateConfig().webhook_secret
    server.fake.update_config({"webhook_secret": new, "extra_signing_secrets": [old]})
    hook = receiver(codes=[503])  # the terminal message is retried, the same webhook-id
    client.predictions.create(model="acme/echo", input={}, webhook=hook.url)
    wait_for(lambda: server.stats.webhook_deliveries == 1, 5, "a retried webhook")
    assert len(hook.deliveries) == 2
    assert len({h["webhook-id"] for _, h, _ in hook.deliveries}) == 1
    assert client.webhooks.default.secret().key == new
    _, headers, body = hook.deliveries[-1]
    for key in (new, old):
        Webhooks.validate(headers=headers, body=body.decode(), secret=WebhookSigningSecret(key=key))
        standardwebhooks.Webhook(key).verify(body, headers)


# --- async variants ---------------------------------------------------------------------------


async def test_async_create_wait_get_cancel_list(
    server: FakeReplicateServer, async_client: Client
) -> None:
    prediction = await async_client.predictions.async_create(model="acme/echo", input={"a": 1})
    await prediction.async_wait()
    assert (prediction.status, prediction.output) == ("succeeded", {"echo": {"a": 1}})
    by_version = await async_client.predictions.async_create(
        version=f"acme/echo:{VERSION}", input={"a": 2}
    )
    fetched = await async_client.predictions.async_get(by_version.id)
    assert fetched.version == VERSION
    deployment = await async_client.deployments.async_get("acme/prod")
    deployed = await deployment.predictions.async_create(input={"a": 3})
    canceled = await async_client.predictions.async_cancel(deployed.id)
    assert canceled.status == "canceled"
    ids = [p.id async for page in async_paginate(async_client.predictions.async_list) for p in page]
    assert ids == [deployed.id, by_version.id, prediction.id]
    secret = await async_client.webhooks.default.async_secret()
    assert secret.key == server.fake.webhook_secret


async def test_async_run(server: FakeReplicateServer, async_client: Client) -> None:
    assert await async_client.async_run("acme/echo", input={"b": 1}) == {"echo": {"b": 1}}
    assert server.stats.gets == 0


# --- the command ------------------------------------------------------------------------------


def test_jobsctl_fake_replicate_serves_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.02")
    command = [sys.executable, "-m", "jobs", "fake-replicate", "--port", "0", "--duration", "0.1"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("fake replicate API on http://127.0.0.1:")
        url = line.split("JOBS_REPLICATE_API_URL=")[1].rstrip(")\n")
        client = Client(api_token="any", base_url=url)
        try:
            assert client.run("acme/echo", input={"c": 1}) == {"echo": {"c": 1}}
        finally:
            _close(client)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
