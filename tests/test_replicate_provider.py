"""The Replicate provider: naming, request shape, reply mapping, submit safety, finding a
lost submit and webhooks, scripted with a mock transport (no network, no emulator)."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.config import Secret, Settings
from jobs.errors import ConfigError, ProviderProtocolError, ProviderRejected, ProviderUnavailable
from jobs.providers import NAMES, create
from jobs.providers.base import RemoteRef, SubmitRequest, WebhookUnavailable
from jobs.providers.http import RetryPolicy
from jobs.providers.replicate import (
    ReplicateProvider,
    check_request,
    format_duration,
    log_entries,
    observation_from_prediction,
)
from jobs.providers.signatures import SignatureError
from jobs.providers.standard_webhooks import sign
from jobs.states import FailureReason, State
from jobs.store.transitions import _log_key

API = "https://api.replicate.test"
TOKEN = "r8_do-not-show-this-token"
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "replicate_webhook_signature.json").read_text()
)
SECRET = VECTORS["secret"]

Script = list[Callable[[httpx.Request], httpx.Response]]


class Recorder:
    def __init__(self, script: Script) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.script.pop(0)(request)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def reply(code: int, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    def make(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(code, text=body, headers=headers)
        return httpx.Response(code, json=body, headers=headers)

    return make


def raise_(exc: type[httpx.TransportError]) -> Any:
    def make(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    return make


def prediction(pid: str = "q3kabc123", status: str = "starting", **fields: Any) -> dict[str, Any]:
    return {
        "id": pid,
        "model": "acme/echo",
        "version": VERSION,
        "input": {"text": "hi"},
        "output": None,
        "logs": "",
        "error": None,
        "status": status,
        "created_at": "2026-01-01T01:00:00.000000Z",
        "data_removed": False,
        "source": "api",
        "metrics": {},
        "urls": {"get": f"https://elsewhere.test/v1/predictions/{pid}"},
        **fields,
    }


Build = Callable[..., tuple[ReplicateProvider, Recorder]]


@pytest.fixture
def make_provider() -> Iterator[Build]:
    def build(
        script: Script,
        *,
        token: str | None = TOKEN,
        secrets: tuple[str, ...] = (SECRET,),
        **options: Any,
    ) -> tuple[ReplicateProvider, Recorder]:
        recorder = Recorder(script)
        client = httpx.AsyncClient(transport=httpx.MockTransport(recorder.handle))
        provider = ReplicateProvider(
            api_url=API + "/",
            token=Secret(token) if token else None,
            client=client,
            webhook_secrets=[Secret(s) for s in secrets],
            retry=RetryPolicy(attempts=4, max_retry_after=30.0),
            sleep=recorder.sleep,
            **options,
        )
        return provider, recorder

    yield build  # MockTransport holds no sockets: nothing to close


REQ = SubmitRequest(
    application="acme/echo",
    arguments={"text": "hi"},
    webhook_url="https://me.example/v1/webhooks/replicate?job=J1&attempt=1",
)


# --- naming and the request ------------------------------------------------------------


@pytest.mark.parametrize(
    ("application", "path", "version"),
    [
        ("acme/echo", "/v1/models/acme/echo/predictions", None),
        ("stability-ai/sdxl.v2_x", "/v1/models/stability-ai/sdxl.v2_x/predictions", None),
        (f"acme/echo:{VERSION}", "/v1/predictions", VERSION),
        (VERSION, "/v1/predictions", VERSION),
        ("deployments/acme/echo-prod", "/v1/deployments/acme/echo-prod/predictions", None),
    ],
)
async def test_each_naming_form_posts_to_its_endpoint(
    make_provider: Build, application: str, path: str, version: str | None
) -> None:
    provider, rec = make_provider([reply(201, prediction())])
    request = SubmitRequest(application=application, arguments={"text": "hi"})
    provider.check(request)
    submitted = await provider.submit(request)
    sent = rec.requests[0]
    assert (sent.method, sent.url.path) == ("POST", path)
    body = json.loads(sent.content)
    assert body.get("version") == version
    assert body["input"] == {"text": "hi"}
    assert "webhook" not in body and "webhook_events_filter" not in body
    # the ref is built from the id on the configured API, never from the reply's urls
    assert submitted.ref == RemoteRef(
        application=application,
        request_id="q3kabc123",
        status_url=f"{API}/v1/predictions/q3kabc123",
        response_url=f"{API}/v1/predictions/q3kabc123",
        cancel_url=f"{API}/v1/predictions/q3kabc123/cancel",
    )
    assert submitted.observation.state is State.QUEUED


async def test_submit_sends_bearer_cancel_after_and_webhook_fields(make_provider: Build) -> None:
    provider, rec = make_provider([reply(201, prediction())], webhook_events=("start", "completed"))
    await provider.submit(dataclasses.replace(REQ, cancel_after=90.0))
    sent = rec.requests[0]
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["cancel-after"] == "1m30s"
    assert "prefer" not in sent.headers  # never sync mode: every job is tracked durably
    assert json.loads(sent.content) == {
        "input": {"text": "hi"},
        "webhook": REQ.webhook_url,
        "webhook_events_filter": ["start", "completed"],
    }


async def test_default_webhook_events_are_completed_only(make_provider: Build) -> None:
    provider, rec = make_provider([reply(201, prediction())])
    await provider.submit(REQ)
    assert json.loads(rec.requests[0].content)["webhook_events_filter"] == ["completed"]
    assert "cancel-after" not in rec.requests[0].headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(1, "1s"), (59.2, "1m"), (90, "1m30s"), (300, "5m"), (3600, "1h"), (3723, "1h2m3s")],
)
def test_cancel_after_is_a_replicate_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_unknown_webhook_events_are_refused() -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    with pytest.raises(ConfigError, match="webhook events must be some of"):
        ReplicateProvider(api_url=API, token=None, client=client, webhook_events=("done",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"application": "flux"}, "is not owner/name"),
        ({"application": "a/b/c"}, "is not owner/name"),
        ({"application": "acme/echo/"}, "is not owner/name"),
        ({"application": "../acme/echo"}, "is not owner/name"),
        ({"application": "acme/.."}, "is not owner/name"),
        ({"application": "acme/ec ho"}, "is not owner/name"),
        ({"application": "acme/echo?x=1"}, "is not owner/name"),
        ({"application": "acme/echo%2f"}, "is not owner/name"),
        ({"application": "deployments/acme"}, "is not owner/name"),
        ({"application": "deployments/acme/echo:" + VERSION}, "is not owner/name"),
        ({"application": "acme/echo:1234"}, "not 64 lowercase hex"),
        ({"application": "acme/echo:" + VERSION.upper()}, "not 64 lowercase hex"),
        ({"path": "image-to-image"}, "Replicate has no sub-paths"),
        ({"priority": "low"}, "Replicate has no queue priority"),
        ({"hint": "lora:a"}, "Replicate has no runner hint"),
        ({"start_timeout": 30.0}, "Replicate has no start timeout.*cancel_after"),
        ({"cancel_after": 0.5}, "cancel_after must be at least 1 second"),
        ({"cancel_after": float("nan")}, "cancel_after must be"),
        ({"cancel_after": float("inf")}, "cancel_after must be"),
        ({"arguments": {"x": float("nan")}}, "cannot be sent as JSON"),
        ({"arguments": {"x": object()}}, "cannot be sent as JSON"),
    ],
)
def test_check_refuses_what_replicate_cannot_receive(
    make_provider: Build, change: dict[str, Any], message: str
) -> None:
    provider, rec = make_provider([])
    request = dataclasses.replace(REQ, **change)
    with pytest.raises(ConfigError, match=message) as caught:
        provider.check(request)
    assert "\n" not in str(caught.value)
    assert rec.requests == []


async def test_a_missing_token_is_one_clear_line(make_provider: Build) -> None:
    provider, rec = make_provider([], token=None)
    expected = (
        "REPLICATE_API_TOKEN is not set: export REPLICATE_API_TOKEN=<your Replicate API "
        "token> and retry"
    )
    with pytest.raises(ConfigError) as caught:
        provider.check(REQ)
    assert str(caught.value) == expected
    with pytest.raises(ConfigError, match="REPLICATE_API_TOKEN is not set"):
        await provider.submit(REQ)
    with pytest.raises(ConfigError, match="REPLICATE_API_TOKEN is not set"):
        provider.track_ref("acme/echo", "q3kabc123")
    assert rec.requests == []


@pytest.mark.parametrize("bad", ["", "Q3KABC", "q3k/abc", "q3k-abc", "q" * 65, "q3k?x"])
def test_track_ref_validates_the_prediction_id(make_provider: Build, bad: str) -> None:
    provider, _ = make_provider([])
    with pytest.raises(ConfigError, match="not a Replicate prediction id"):
        provider.track_ref("acme/echo", bad)


def test_track_ref_builds_the_urls(make_provider: Build) -> None:
    provider, _ = make_provider([])
    ref = provider.track_ref(f"acme/echo:{VERSION}", "q3kabc123")
    assert ref.status_url == f"{API}/v1/predictions/q3kabc123"
    assert ref.cancel_url == f"{API}/v1/predictions/q3kabc123/cancel"
    with pytest.raises(ConfigError, match="is not owner/name"):
        provider.track_ref("nope", "q3kabc123")


# --- reading predictions -----------------------------------------------------------------


def test_status_mapping() -> None:
    assert observation_from_prediction(prediction(status="starting")).state is State.QUEUED
    running = observation_from_prediction(prediction(status="processing", output=["partial"]))
    # a filled output does not make a prediction finished (only the four statuses do)
    assert running.state is State.IN_PROGRESS and running.result is None

    done = observation_from_prediction(
        prediction(status="succeeded", output="hello", metrics={"predict_time": 8.5})
    )
    assert (done.state, done.result) == (State.SUCCEEDED, "hello")
    assert done.metrics == {"predict_time": 8.5, "inference_time": 8.5}

    failed = observation_from_prediction(prediction(status="failed", error="CUDA out of memory"))
    assert failed.state is State.FAILED
    assert failed.failure_reason is FailureReason.REMOTE_ERROR
    assert failed.error is not None and failed.error["message"] == "CUDA out of memory"

    cancelled = observation_from_prediction(prediction(status="canceled"))
    assert cancelled.state is State.CANCELLED and cancelled.failure_reason is None

    aborted = observation_from_prediction(prediction(status="aborted"))
    assert aborted.state is State.CANCELLED
    assert aborted.failure_reason is FailureReason.TIMEOUT
    assert aborted.error is not None and "deadline passed before it started" in str(
        aborted.error["message"]
    )


def test_a_removed_result_is_unavailable_not_succeeded() -> None:
    gone = observation_from_prediction(prediction(status="succeeded", data_removed=True))
    assert gone.state is State.FAILED
    assert gone.failure_reason is FailureReason.RESULT_UNAVAILABLE
    assert gone.error is not None and "one-hour retention" in gone.error["message"]
    # a failure keeps its own message when Replicate still has it
    failed = observation_from_prediction(
        prediction(status="failed", error="boom", data_removed=True)
    )
    assert failed.failure_reason is FailureReason.REMOTE_ERROR


@pytest.mark.parametrize("body", [prediction(status="queued"), ["not", "an", "object"]])
def test_unknown_replies_are_protocol_errors(body: Any) -> None:
    with pytest.raises(ProviderProtocolError, match="Replicate"):
        observation_from_prediction(body)


def test_logs_are_stable_across_polls() -> None:
    """Each poll's lines are the same entries as before plus new ones: the store's
    de-duplication key sees a line once, repeated identical lines stay apart, and a line
    still being written (a progress bar redrawn with \\r) waits until it is complete."""
    polls = [
        "",
        "Loading model\nstep\nstep\n  0%|          | 0/10\r 40%|####",
        "Loading model\nstep\nstep\n  0%|          | 0/10\r 40%|####\r100%|##########\ndone",
    ]
    seen = [log_entries(text, finished=False) for text in polls]
    final = log_entries(polls[-1], finished=True)
    assert seen[0] == ()
    assert [e["message"] for e in seen[1]] == ["Loading model", "step", "step"]
    assert [e["message"] for e in seen[2]] == ["Loading model", "step", "step", "100%|##########"]
    assert [e["message"] for e in final] == [e["message"] for e in seen[2]] + ["done"]
    for earlier, later in itertools.pairwise([*seen, final]):
        assert later[: len(earlier)] == earlier
    keys = [_log_key(entry) for entry in final]
    assert len(set(keys)) == len(keys) == 5
    assert {"level", "source", "timestamp", "message"} <= set(final[0])
    # CRLF line ends and blank lines
    assert [e["message"] for e in log_entries("a\r\n\r\nb\r\n", finished=False)] == ["a", "b"]


async def test_status_reads_the_prediction_with_retries(make_provider: Build) -> None:
    provider, rec = make_provider(
        [
            reply(503, "busy"),
            reply(429, {"detail": "throttled"}, {"retry-after": "7"}),
            raise_(httpx.ReadTimeout),
            reply(200, prediction(status="processing", logs="hello\n")),
        ]
    )
    ref = provider.ref_for("acme/echo", "q3kabc123")
    observation = await provider.status(ref)
    assert observation.state is State.IN_PROGRESS
    assert [e["message"] for e in observation.logs] == ["hello"]
    assert len(rec.requests) == 4
    assert all(r.url == f"{API}/v1/predictions/q3kabc123" for r in rec.requests)
    assert rec.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert any(6.9 < s <= 7.0 for s in rec.sleeps)  # waited at the gate
    no_logs = await _status_once(make_provider, prediction(status="processing", logs="x\n"))
    assert no_logs.logs == ()


async def _status_once(make_provider: Build, body: Any) -> Any:
    provider, _ = make_provider([reply(200, body)])
    return await provider.status(provider.ref_for("acme/echo", "q3kabc123"), logs=False)


async def test_status_of_an_unknown_prediction_and_refusals(make_provider: Build) -> None:
    provider, _ = make_provider(
        [reply(404, {"detail": "Not found"}), reply(401, {"detail": "Invalid token"})]
    )
    ref = provider.ref_for("acme/echo", "q3kabc123")
    gone = await provider.status(ref)
    assert gone.failure_reason is FailureReason.RESULT_UNAVAILABLE
    with pytest.raises(ProviderRejected, match="check REPLICATE_API_TOKEN"):
        await provider.status(ref)


async def test_status_gives_up_after_the_attempts(make_provider: Build) -> None:
    provider, rec = make_provider([reply(500, "x")] * 4)
    with pytest.raises(ProviderUnavailable, match="HTTP 500"):
        await provider.status(provider.ref_for("acme/echo", "q3kabc123"))
    assert len(rec.requests) == 4


async def test_result_is_a_status_read(make_provider: Build) -> None:
    provider, rec = make_provider([reply(200, prediction(status="succeeded", output=[1, 2]))])
    outcome = await provider.result(provider.ref_for("acme/echo", "q3kabc123"), failed=False)
    assert (outcome.state, outcome.result, outcome.source) == (State.SUCCEEDED, [1, 2], "result")
    assert rec.requests[0].url.path == "/v1/predictions/q3kabc123"


async def test_cancel_outcomes(make_provider: Build) -> None:
    provider, rec = make_provider(
        [
            reply(200, prediction(status="canceled")),
            reply(200, prediction(status="succeeded")),
            reply(404, {"detail": "Not found"}),
        ]
    )
    ref = provider.ref_for("acme/echo", "q3kabc123")
    assert await provider.cancel(ref) is True
    assert await provider.cancel(ref) is False  # it had finished already
    assert await provider.cancel(ref) is False
    assert rec.requests[0].method == "POST"
    assert rec.requests[0].url.path == "/v1/predictions/q3kabc123/cancel"


# --- submit safety ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [reply(429, {"detail": "slow down"}, {"retry-after": "2"}), raise_(httpx.ConnectError)],
    ids=["429", "connection-refused"],
)
async def test_submit_retries_only_what_created_nothing(make_provider: Build, first: Any) -> None:
    provider, rec = make_provider([first, reply(201, prediction())])
    assert (await provider.submit(REQ)).ref.request_id == "q3kabc123"
    assert len(rec.requests) == 2


@pytest.mark.parametrize(
    "first",
    [
        raise_(httpx.ReadTimeout),
        raise_(httpx.RemoteProtocolError),
        raise_(httpx.WriteError),
        reply(500, {"detail": "oops"}),
        reply(502, "<html>bad gateway</html>"),
        reply(503, {"detail": "unavailable"}),
        reply(408, {"detail": "timeout"}),
        reply(201, "not json"),
        reply(201, {"status": "starting"}),
        reply(201, {"id": "NOT/AN/ID"}),
    ],
    ids=[
        "read-timeout",
        "dropped",
        "write-error",
        "500",
        "502",
        "503",
        "408",
        "2xx-unreadable",
        "2xx-no-id",
        "2xx-bad-id",
    ],
)
async def test_submit_never_retries_after_the_bytes_left(make_provider: Build, first: Any) -> None:
    provider, rec = make_provider([first])
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.submit(REQ)
    assert caught.value.reached  # the manager records it as ambiguous
    assert len(rec.requests) == 1


async def test_submit_gives_up_when_never_reached(make_provider: Build) -> None:
    provider, rec = make_provider([raise_(httpx.ConnectError)] * 4)
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.submit(REQ)
    assert not caught.value.reached and len(rec.requests) == 4


async def test_submit_rate_limited_to_the_end_created_nothing(make_provider: Build) -> None:
    provider, rec = make_provider([reply(429, {"detail": "x", "retry_after": 5})] * 4)
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.submit(REQ)
    assert not caught.value.reached and caught.value.status_code == 429
    assert caught.value.retry_after == 5
    assert len(rec.requests) == 4


@pytest.mark.parametrize(
    ("reply_", "message"),
    [
        (
            reply(
                422,
                {
                    "type": "https://replicate.com/docs/errors",
                    "title": "Input validation failed",
                    "status": 422,
                    "detail": "- input.text: is required\n- input.n: must be >= 1",
                },
            ),
            r"HTTP 422\): - input.text: is required - input.n: must be >= 1$",
        ),
        (reply(404, {"title": "Model not found", "status": 404}), r"HTTP 404\): Model not found"),
        (reply(400, "plain text"), r"HTTP 400\): Replicate answered HTTP 400"),
        (reply(401, {"detail": "Unauthenticated"}), "Unauthenticated; check REPLICATE_API_TOKEN"),
    ],
)
async def test_submit_rejected_keeps_the_problem_detail(
    make_provider: Build, reply_: Any, message: str
) -> None:
    provider, rec = make_provider([reply_])
    with pytest.raises(ProviderRejected, match=message) as caught:
        await provider.submit(REQ)
    assert "\n" not in str(caught.value)
    assert len(rec.requests) == 1


@pytest.mark.parametrize(
    ("headers", "body", "wait"),
    [
        ({"retry-after": "7"}, {"detail": "Request was throttled."}, 7.0),
        ({}, {"detail": "Request was throttled.", "status": 429, "retry_after": 9}, 9.0),
        ({"retry-after": "3"}, {"detail": "x", "retry_after": 11}, 11.0),
        ({"retry-after": "12"}, {"detail": "x", "retry_after": 4}, 12.0),
        ({"retry-after": "10000"}, {"detail": "x"}, 30.0),  # capped (max_retry_after)
    ],
    ids=["header", "body", "body-larger", "header-larger", "capped"],
)
async def test_a_429_pauses_every_request_for_the_longer_wait(
    make_provider: Build, headers: dict[str, str], body: Any, wait: float
) -> None:
    provider, rec = make_provider([reply(429, body, headers), reply(201, prediction())])
    await provider.submit(REQ)
    assert len(rec.requests) == 2
    # the second create waited at the provider's gate, which every request passes
    assert any(wait - 0.1 < s <= wait for s in rec.sleeps), rec.sleeps
    assert wait - 0.1 < provider.send_delay() <= wait  # (the mock sleep lets no time pass)


# --- finding a lost submit -------------------------------------------------------------

SINCE = datetime(2026, 1, 1, 1, 0, 0, tzinfo=UTC).timestamp()


def listing(*predictions: dict[str, Any], next_url: str | None = None) -> Any:
    return reply(200, {"previous": None, "next": next_url, "results": list(predictions)})


def _hooked(pid: str, job: str, **fields: Any) -> dict[str, Any]:
    url = f"https://me.example/v1/webhooks/replicate?job={job}&attempt=1"
    return prediction(pid, webhook=url, **fields)


async def test_find_submitted_by_job_id_in_the_webhook(make_provider: Build) -> None:
    provider, rec = make_provider(
        [listing(_hooked("aaa111", "J2"), _hooked("bbb222", "J1", input={"other": 1}))]
    )
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert found.certain and found.submitted is not None
    assert found.submitted.ref.request_id == "bbb222"
    sent = rec.requests[0]
    assert sent.url.path == "/v1/predictions"
    # looked back a little further than the send, for clock skew
    assert sent.url.params["created_after"] == "2026-01-01T00:59:00Z"


async def test_find_submitted_by_input_when_webhooks_are_not_listed(make_provider: Build) -> None:
    provider, _ = make_provider(
        [
            listing(
                prediction("aaa111", input={"text": "other"}),
                prediction("bbb222", model="acme/other"),
                prediction("ccc333", source="web"),
                prediction("ddd444"),
            )
        ]
    )
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert found.certain and found.submitted is not None
    assert found.submitted.ref.request_id == "ddd444"


async def test_find_submitted_several_by_input_cannot_tell(make_provider: Build) -> None:
    provider, _ = make_provider([listing(prediction("aaa111"), prediction("bbb222"))])
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert not found.certain and found.submitted is None
    assert "2 predictions match" in found.detail


async def test_find_submitted_skips_what_other_jobs_hold(make_provider: Build) -> None:
    # The same input asked twice: the other job's prediction is never ours.
    asked: list[list[str]] = []

    async def held(ids: Sequence[str]) -> set[str]:
        asked.append(list(ids))
        return {"aaa111"}

    provider, _ = make_provider([listing(prediction("aaa111"))])
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE, held=held)
    assert found.certain and found.submitted is None and asked == [["aaa111"]]
    provider, _ = make_provider([listing(prediction("aaa111"), prediction("bbb222"))])
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE, held=held)
    assert found.submitted is not None and found.submitted.ref.request_id == "bbb222"


async def test_find_submitted_none_is_certain(make_provider: Build) -> None:
    provider, _ = make_provider(
        [listing(_hooked("aaa111", "J2"), prediction("bbb222", input={"text": "other"}))]
    )
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert found.certain and found.submitted is None  # safe to send again


async def test_find_submitted_version_form_matches_the_version(make_provider: Build) -> None:
    request = SubmitRequest(application=VERSION, arguments={"text": "hi"})
    provider, _ = make_provider(
        [listing(prediction("aaa111", version="f" * 64), prediction("bbb222"))]
    )
    found = await provider.find_submitted(request, job_id="J1", since=SINCE)
    assert found.submitted is not None and found.submitted.ref.request_id == "bbb222"


async def test_find_submitted_deployment_without_a_deployment_field_is_unsure(
    make_provider: Build,
) -> None:
    request = SubmitRequest(application="deployments/acme/prod", arguments={"text": "hi"})
    provider, _ = make_provider([listing(prediction("aaa111"))])
    found = await provider.find_submitted(request, job_id="J1", since=SINCE)
    assert not found.certain and "do not name their deployment" in found.detail
    provider, _ = make_provider([listing(prediction("aaa111", deployment="acme/prod"))])
    found = await provider.find_submitted(request, job_id="J1", since=SINCE)
    assert found.certain and found.submitted is not None


@pytest.mark.parametrize(
    "failure",
    [[reply(500, "down")] * 4, [reply(200, "not json")], [reply(200, {"results": "x"})]],
    ids=["5xx", "not-json", "no-results"],
)
async def test_find_submitted_never_raises_for_a_failed_listing(
    make_provider: Build, failure: Script
) -> None:
    provider, _ = make_provider(failure)
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert (found.submitted, found.certain) == (None, False)
    assert found.detail and TOKEN not in found.detail


async def test_find_submitted_follows_pages_then_stops(make_provider: Build) -> None:
    page2 = f"{API}/v1/predictions?cursor=p2"
    provider, rec = make_provider(
        [
            listing(_hooked("aaa111", "J2"), next_url=page2),
            listing(_hooked("bbb222", "J1"), next_url=f"{API}/v1/predictions?cursor=p3"),
        ]
    )
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert found.submitted is not None and found.submitted.ref.request_id == "bbb222"
    assert str(rec.requests[1].url) == page2 and len(rec.requests) == 2


async def test_find_submitted_reads_a_bounded_number_of_pages(make_provider: Build) -> None:
    pages = [
        listing(_hooked(f"p{n}", "J2"), next_url=f"{API}/v1/predictions?cursor={n}")
        for n in range(10)
    ]
    provider, rec = make_provider(pages, list_pages=3)
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert (found.submitted, found.certain) == (None, False)
    assert "more than 3 pages" in found.detail
    assert len(rec.requests) == 3


async def test_find_submitted_stops_at_predictions_older_than_the_window(
    make_provider: Build,
) -> None:
    old = _hooked("old111", "J1", created_at="2026-01-01T00:30:00Z")  # before the window
    provider, rec = make_provider(
        [listing(_hooked("new111", "J2"), old, next_url=f"{API}/v1/predictions?cursor=2")]
    )
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert found.certain and found.submitted is None
    assert len(rec.requests) == 1


async def test_find_submitted_never_sends_the_token_elsewhere(make_provider: Build) -> None:
    provider, rec = make_provider([listing(next_url="https://evil.example/v1/predictions?c=1")])
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert not found.certain and "outside the configured API" in found.detail
    assert len(rec.requests) == 1


# --- webhooks --------------------------------------------------------------------------


def _vector(name: str) -> tuple[dict[str, str], bytes, int]:
    case = next(c for c in VECTORS["cases"] if c["name"] == name)
    return case["headers"], base64.b64decode(case["body_base64"]), case["verify_at_unix"]


async def test_parse_webhook_reads_a_signed_prediction(make_provider: Build) -> None:
    provider, rec = make_provider([])
    headers, body, now = _vector("valid_succeeded_prediction")
    delivery = await provider.parse_webhook(headers, body, now=now, job_id="J1", attempt=2)
    assert delivery.request_id == "035g9pfx14gc86vpkytikbaoy0"
    assert delivery.delivery_id == headers["webhook-id"]
    assert (delivery.user_id, delivery.job_id, delivery.attempt) == (None, "J1", 2)
    assert delivery.observation.state is State.SUCCEEDED
    assert delivery.observation.result == "hello Zoë"
    assert delivery.observation.source == "webhook"
    assert provider.account is None and rec.requests == []

    headers, body, now = _vector("valid_failed_prediction")
    failed = await provider.parse_webhook(headers, body, now=now)
    assert failed.observation.state is State.FAILED
    assert failed.observation.error is not None
    assert failed.observation.error["message"] == "CUDA out of memory"


@pytest.mark.parametrize("name", ["tampered_body", "wrong_secret", "stale_timestamp"])
async def test_parse_webhook_refuses_what_is_not_authentic(make_provider: Build, name: str) -> None:
    provider, _ = make_provider([])
    headers, body, now = _vector(name)
    with pytest.raises(SignatureError) as caught:
        await provider.parse_webhook(headers, body, now=now)
    assert SECRET not in str(caught.value)


async def test_parse_webhook_accepts_either_secret_while_rotating(make_provider: Build) -> None:
    other = "whsec_" + base64.b64encode(b"n" * 32).decode()
    provider, _ = make_provider([], secrets=(other, SECRET))
    headers, body, now = _vector("valid_succeeded_prediction")
    assert (await provider.parse_webhook(headers, body, now=now)).request_id


async def test_parse_webhook_without_a_secret_is_unavailable(make_provider: Build) -> None:
    provider, _ = make_provider([], secrets=())
    headers, body, now = _vector("valid_succeeded_prediction")
    with pytest.raises(WebhookUnavailable, match="JOBS_REPLICATE_WEBHOOK_SECRET is not set"):
        await provider.parse_webhook(headers, body, now=now)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "Expecting value"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"status": "succeeded"}', "no prediction id"),
        (json.dumps(prediction(status="paused")).encode(), "unknown prediction status"),
    ],
)
async def test_parse_webhook_authentic_but_unreadable(
    make_provider: Build, body: bytes, message: str
) -> None:
    provider, _ = make_provider([])
    headers = sign(SECRET, "msg_1", 1_000_000, body)
    with pytest.raises(ValueError, match=message):
        await provider.parse_webhook(headers, body, now=1_000_000)


def test_a_malformed_webhook_secret_is_refused_without_showing_it() -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    bad = "whsec_c2hvcnQtc2VjcmV0"
    with pytest.raises(ConfigError, match="key bytes") as caught:
        ReplicateProvider(api_url=API, token=None, client=client, webhook_secrets=[Secret(bad)])
    assert "c2hvcnQtc2VjcmV0" not in str(caught.value)


# --- secrets and wiring ----------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        reply(401, {"detail": "bad token"}),
        reply(500, {"detail": "oops"}),
        raise_(httpx.ReadTimeout),
        reply(201, "not json"),
    ],
)
async def test_the_token_never_appears_in_errors(make_provider: Build, failure: Any) -> None:
    provider, _ = make_provider([failure])
    with pytest.raises((ProviderRejected, ProviderUnavailable)) as caught:
        await provider.submit(REQ)
    assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value.body)
    assert TOKEN not in repr(provider.__dict__)


async def test_create_builds_the_replicate_provider_from_settings() -> None:
    assert "replicate" in NAMES
    settings = Settings.from_env(
        {
            "REPLICATE_API_TOKEN": TOKEN,
            "JOBS_REPLICATE_API_URL": API + "/",
            "JOBS_REPLICATE_WEBHOOK_SECRET": SECRET,
        }
    )
    provider = create("replicate", settings)
    try:
        assert isinstance(provider, ReplicateProvider)
        assert provider.api_url == API
        assert provider.webhook_secrets == (Secret(SECRET),)
        provider.check(REQ)
    finally:
        await provider.close()


def test_check_request_returns_the_target() -> None:
    target = check_request(SubmitRequest(application=f"acme/echo:{VERSION}", arguments={}))
    assert (target.kind, target.owner, target.name, target.version) == (
        "version",
        "acme",
        "echo",
        VERSION,
    )


async def test_find_submitted_with_removed_inputs_cannot_tell(make_provider: Build) -> None:
    """A prediction whose input Replicate already removed might be the lost one: sending
    again on the strength of "nothing matched" could pay twice."""
    provider, _ = make_provider([listing(prediction("aaa111", input=None, data_removed=True))])
    found = await provider.find_submitted(REQ, job_id="J1", since=SINCE)
    assert (found.submitted, found.certain) == (None, False)
    assert "input was removed" in found.detail and "aaa111" in found.detail
