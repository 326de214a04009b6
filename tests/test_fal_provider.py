"""The fal provider: URL rules, reply mapping, and retry/submit safety with a mock transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from jobs.config import Secret
from jobs.errors import ConfigError, ProviderProtocolError, ProviderRejected, ProviderUnavailable
from jobs.providers.base import RemoteRef, SubmitRequest
from jobs.providers.fal import (
    AppId,
    FalProvider,
    check_request,
    loads,
    observation_from_result,
    observation_from_status,
    observation_from_webhook,
    request_ref,
    submit_url,
)
from jobs.providers.http import RetryPolicy, parse_retry_after
from jobs.states import FailureReason, State

Q = "https://queue.test"


@pytest.mark.parametrize(
    ("endpoint", "submit", "status"),
    [
        ("fal-ai/fast-sdxl", "/fal-ai/fast-sdxl", "/fal-ai/fast-sdxl/requests/R/status"),
        ("fal-ai/flux/dev", "/fal-ai/flux/dev", "/fal-ai/flux/requests/R/status"),
        ("fal-ai/flux-lora/a/b", "/fal-ai/flux-lora/a/b", "/fal-ai/flux-lora/requests/R/status"),
        (
            "workflows/alice/my-flow",
            "/workflows/alice/my-flow",
            "/workflows/alice/my-flow/requests/R/status",
        ),
        ("12345-myapp", "/12345-myapp", "/12345/myapp/requests/R/status"),
    ],
)
def test_urls_follow_the_spec_table(endpoint: str, submit: str, status: str) -> None:
    assert submit_url(Q, endpoint, None, None) == Q + submit
    ref = request_ref(Q, endpoint, "R")
    assert ref.status_url == Q + status
    assert ref.response_url == Q + status.removesuffix("/status")
    assert ref.cancel_url == Q + status.removesuffix("/status") + "/cancel"


@pytest.mark.parametrize("bad", ["flux", "fal-ai/", "/", "workflows/alice"])
def test_bad_endpoint_ids_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="endpoint id"):
        AppId.parse(bad)


def test_webhook_url_is_one_encoded_parameter() -> None:
    url = submit_url(Q, "fal-ai/flux/dev", "extra", "https://me.example/hook?job=abc&x=1")
    assert url == (
        Q + "/fal-ai/flux/dev/extra?fal_webhook=https%3A%2F%2Fme.example%2Fhook%3Fjob%3Dabc%26x%3D1"
    )


def test_status_mapping() -> None:
    queued = observation_from_status({"status": "IN_QUEUE", "queue_position": 3})
    assert (queued.state, queued.queue_position) == (State.QUEUED, 3)
    running = observation_from_status({"status": "IN_PROGRESS", "logs": [{"message": "hi"}]})
    assert running.state is State.IN_PROGRESS and running.logs == ({"message": "hi"},)
    done = observation_from_status({"status": "COMPLETED", "logs": None, "metrics": {"t": 1}})
    assert done.needs_result and done.error is None and done.metrics == {"t": 1}
    failed = observation_from_status(
        {"status": "COMPLETED", "logs": [], "error": "Runner gone", "error_type": "runner_x"}
    )
    assert failed.needs_result and failed.error == {"type": "runner_x", "message": "Runner gone"}
    with pytest.raises(ProviderProtocolError, match="unknown status"):
        observation_from_status({"status": "FAILED"})
    with pytest.raises(ProviderProtocolError):
        observation_from_status(["not", "an", "object"])


def _response(code: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("GET", Q + "/x")
    if isinstance(body, str):
        return httpx.Response(code, text=body, headers=headers, request=request)
    return httpx.Response(code, json=body, headers=headers, request=request)


def test_result_mapping() -> None:
    ok = observation_from_result(_response(200, {"images": []}))
    assert ok.state is State.SUCCEEDED and ok.result == {"images": []}
    validation = observation_from_result(
        _response(
            422,
            {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]},
            {"x-fal-request-id": "R"},
        )
    )
    assert validation.state is State.FAILED
    assert validation.failure_reason is FailureReason.REMOTE_ERROR
    assert validation.error is not None
    assert validation.error["message"] == "prompt: field required"
    assert validation.error["status_code"] == 422 and validation.error["request_id"] == "R"
    timeout = observation_from_result(
        _response(504, {"detail": "Request timed out", "error_type": "request_timeout"})
    )
    assert timeout.error is not None and timeout.error["type"] == "request_timeout"
    gone = observation_from_result(_response(404, {"detail": "not found"}))
    assert gone.failure_reason is FailureReason.RESULT_UNAVAILABLE
    cancelled = observation_from_result(_response(499, {"detail": "cancelled"}))
    assert cancelled.state is State.CANCELLED
    early = observation_from_result(_response(400, "not done"))
    assert early.state is State.IN_PROGRESS


def test_webhook_payload_mapping() -> None:
    ok = observation_from_webhook({"request_id": "r", "status": "OK", "payload": {"seed": 7}})
    assert ok.state is State.SUCCEEDED and ok.result == {"seed": 7}
    error = observation_from_webhook(
        {
            "request_id": "r",
            "status": "ERROR",
            "error": "Invalid status code: 422",
            "payload": {"detail": [{"loc": ["body", "x"], "msg": "bad"}]},
        }
    )
    assert error.state is State.FAILED and error.error is not None
    assert error.error["status_code"] == 422
    assert error.error["detail"] == {"detail": [{"loc": ["body", "x"], "msg": "bad"}]}
    missing = observation_from_webhook(
        {"request_id": "r", "status": "OK", "payload": None, "payload_error": "too big"}
    )
    assert missing.needs_result and missing.state is State.IN_PROGRESS
    cancelled = observation_from_webhook(
        {"request_id": "r", "status": "ERROR", "error": "Invalid status code: 499", "payload": {}}
    )
    assert cancelled.state is State.CANCELLED
    with pytest.raises(ValueError, match="neither OK nor ERROR"):
        observation_from_webhook({"request_id": "r", "status": "MAYBE", "payload": {}})


def test_non_finite_numbers_are_read_as_null() -> None:
    body = b'{"a": NaN, "b": -Infinity, "c": 1e400, "d": 1.5, "e": [Infinity]}'
    assert loads(body) == {"a": None, "b": None, "c": None, "d": 1.5, "e": [None]}


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- the sending side, scripted with a mock transport ---------------------------------


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


ACCEPTED = {
    "request_id": "R1",
    "status_url": Q + "/fal-ai/flux/requests/R1/status",
    "response_url": Q + "/fal-ai/flux/requests/R1",
    "cancel_url": Q + "/fal-ai/flux/requests/R1/cancel",
    "queue_position": 0,
}


@pytest.fixture
def make_provider() -> Any:
    clients: list[httpx.AsyncClient] = []

    def build(script: Script, key: str | None = "secret-key") -> tuple[FalProvider, Recorder]:
        recorder = Recorder(script)
        client = httpx.AsyncClient(transport=httpx.MockTransport(recorder.handle))
        clients.append(client)
        provider = FalProvider(
            queue_url=Q,
            key=Secret(key) if key else None,
            client=client,
            retry=RetryPolicy(attempts=4),
            sleep=recorder.sleep,
        )
        return provider, recorder

    yield build
    # Clients are closed by the tests' event loop; MockTransport holds no sockets.


REQ = SubmitRequest(
    application="fal-ai/flux/dev",
    arguments={"prompt": "a cat"},
    priority="low",
    hint="lora:a",
    webhook_url="https://me/hook?job=J",
)


async def test_submit_sends_headers_and_records_urls(make_provider: Any) -> None:
    provider, rec = make_provider([reply(200, ACCEPTED)])
    submitted = await provider.submit(REQ)
    assert submitted.ref.request_id == "R1" and submitted.ref.status_url == ACCEPTED["status_url"]
    sent = rec.requests[0]
    assert sent.headers["authorization"] == "Key secret-key"
    assert sent.headers["x-fal-queue-priority"] == "low"
    assert sent.headers["x-fal-runner-hint"] == "lora:a"
    assert sent.url.params["fal_webhook"] == "https://me/hook?job=J"


@pytest.mark.parametrize(
    "first",
    [
        reply(429, {"detail": "slow down"}, {"retry-after": "2"}),
        reply(502, "<html>502 Bad Gateway nginx</html>"),
        raise_(httpx.ConnectError),
    ],
    ids=["429", "ingress-502", "connection-refused"],
)
async def test_submit_retries_only_what_never_reached_the_queue(
    make_provider: Any, first: Any
) -> None:
    provider, rec = make_provider([first, reply(200, ACCEPTED)])
    assert (await provider.submit(REQ)).ref.request_id == "R1"
    assert len(rec.requests) == 2


@pytest.mark.parametrize(
    ("first", "request_id"),
    [
        (raise_(httpx.ReadTimeout), None),
        (raise_(httpx.RemoteProtocolError), None),
        (reply(500, {"detail": "oops"}, {"x-fal-request-id": "R9"}), "R9"),
        (reply(502, "<html>nginx</html>", {"x-fal-request-id": "R8"}), "R8"),
        (reply(200, "not json"), None),
    ],
    ids=["read-timeout", "dropped", "500", "502-from-fal", "2xx-unreadable"],
)
async def test_submit_never_retries_after_the_bytes_left(
    make_provider: Any, first: Any, request_id: str | None
) -> None:
    provider, rec = make_provider([first])
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.submit(REQ)
    assert caught.value.reached and caught.value.request_id == request_id
    assert len(rec.requests) == 1


async def test_submit_gives_up_when_never_reached(make_provider: Any) -> None:
    provider, rec = make_provider([raise_(httpx.ConnectError)] * 4)
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.submit(REQ)
    assert not caught.value.reached and len(rec.requests) == 4


async def test_submit_rejected_keeps_the_remote_message(make_provider: Any) -> None:
    body = {"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}
    provider, rec = make_provider([reply(422, body)])
    with pytest.raises(ProviderRejected, match="prompt: field required") as caught:
        await provider.submit(REQ)
    assert caught.value.status_code == 422 and len(rec.requests) == 1


async def test_missing_key_is_a_clear_config_error(make_provider: Any) -> None:
    provider, rec = make_provider([], key=None)
    with pytest.raises(ConfigError, match="FAL_KEY is not set"):
        provider.check(REQ)
    with pytest.raises(ConfigError, match="FAL_KEY"):
        await provider.submit(REQ)
    assert rec.requests == []


REF = RemoteRef(application="fal-ai/flux/dev", request_id="R1")


async def test_status_retries_and_honours_retry_after(make_provider: Any) -> None:
    provider, rec = make_provider(
        [
            reply(503, "busy"),
            reply(429, {"detail": "x"}, {"retry-after": "7"}),
            raise_(httpx.ReadTimeout),
            reply(202, {"status": "IN_QUEUE", "queue_position": 1}),
        ]
    )
    obs = await provider.status(REF)
    assert obs.state is State.QUEUED and len(rec.requests) == 4
    assert rec.requests[0].url.path == "/fal-ai/flux/requests/R1/status"
    assert rec.requests[0].url.params["logs"] == "1"
    # 429 pauses the provider's gate (shared by every job): the wait happens at the gate.
    assert any(6.9 < s <= 7.0 for s in rec.sleeps)


async def test_status_gives_up_after_the_attempts(make_provider: Any) -> None:
    provider, rec = make_provider([reply(500, "x")] * 4)
    with pytest.raises(ProviderUnavailable, match="HTTP 500"):
        await provider.status(REF)
    assert len(rec.requests) == 4


async def test_result_errors_after_a_clean_status_are_retried(make_provider: Any) -> None:
    hiccup = {"detail": "Internal server error", "error_type": "internal_error"}
    provider, rec = make_provider([reply(500, hiccup), reply(200, {"ok": True})])
    obs = await provider.result(REF, failed=False)
    assert obs.state is State.SUCCEEDED and len(rec.requests) == 2


async def test_result_replayed_error_after_a_failed_status_is_final(make_provider: Any) -> None:
    provider, rec = make_provider([reply(500, {"detail": "model crashed"})])
    obs = await provider.result(REF, failed=True)
    assert obs.state is State.FAILED and len(rec.requests) == 1
    assert obs.error is not None and obs.error["message"] == "model crashed"


async def test_a_rate_limit_on_a_failed_result_is_retried(make_provider: Any) -> None:
    provider, rec = make_provider(
        [reply(429, {"detail": "Rate limit exceeded"}), reply(422, {"detail": "bad prompt"})]
    )
    obs = await provider.result(REF, failed=True)
    assert obs.error is not None and obs.error["message"] == "bad prompt"
    assert len(rec.requests) == 2


async def test_cancel_outcomes(make_provider: Any) -> None:
    provider, rec = make_provider(
        [
            reply(202, {"status": "CANCELLATION_REQUESTED"}),
            reply(400, {"status": "ALREADY_COMPLETED"}),
        ]
    )
    assert await provider.cancel(REF) is True
    assert await provider.cancel(REF) is False
    assert rec.requests[0].method == "PUT"
    assert rec.requests[0].url.path == "/fal-ai/flux/requests/R1/cancel"


@pytest.mark.parametrize(
    ("application", "path"),
    [
        ("fal-ai/flux/dev", "../../../_fake/reset"),
        ("fal-ai/flux/dev", "a/../b"),
        ("fal-ai/flux/dev", "./x"),
        ("fal-ai/flux/dev", "a//b"),
        ("fal-ai/flux/dev", "%2e%2e/_fake/reset"),
        ("fal-ai/flux/dev", "a%2Fb"),
        ("fal-ai/flux/dev", "a?fal_webhook=http://evil"),
        ("fal-ai/flux/dev", "a#b"),
        ("fal-ai/flux/dev", "a\\..\\b"),
        ("fal-ai/../_fake/reset", None),
        ("fal-ai//flux", None),
        ("fal-ai/%2e%2e/x", None),
        ("fal-ai/flux?x=1", None),
    ],
)
def test_paths_that_leave_the_application_are_refused(application: str, path: str | None) -> None:
    """A path or application that climbs, escapes or ends the URL path would reach another
    endpoint than the one named (a 2xx without a request id: ambiguous forever)."""
    with pytest.raises(ConfigError, match="plain path segments"):
        check_request(SubmitRequest(application=application, arguments={}, path=path))


def test_plain_sub_paths_are_accepted() -> None:
    check_request(SubmitRequest(application="fal-ai/flux/dev", arguments={}, path="image-to-image"))
    check_request(SubmitRequest(application="workflows/alice/flow", arguments={}, path="/v2/run/"))
