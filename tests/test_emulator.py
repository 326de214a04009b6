"""The fal emulator against spec/queue-protocols.md sections 1 and 2, driven with httpx.

Every test starts its own emulator on a free port (a fraction of a second) so config
changes never leak between tests. Waits are loops bounded both in count and in time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from jobs.providers.signatures import fal_public_keys, verify_fal
from jobs.testing import (
    FakeFal,
    FakeFalConfig,
    FakeFalServer,
    expected_file_bytes,
    input_hash,
)

Serve = Callable[..., FakeFalServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start an emulator with the given config fields; all are stopped after the test."""
    servers: list[FakeFalServer] = []

    def start(**fields: Any) -> FakeFalServer:
        server = FakeFalServer(FakeFalConfig(**fields)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        yield c


def submit(
    client: httpx.Client,
    server: FakeFalServer,
    app: str = "fal-ai/flux/dev",
    body: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    response = client.post(f"{server.url}/{app}", json=body or {"prompt": "a cat"}, **kwargs)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def wait_completed(client: httpx.Client, status_url: str) -> httpx.Response:
    responses: list[httpx.Response] = []

    def done() -> bool:
        responses.append(client.get(status_url))
        return responses[-1].status_code == 200

    wait_for(done)
    return responses[-1]


# --- submit and URLs (spec 1.2, 1.4) -------------------------------------------------------

URL_EXAMPLES = [
    ("fal-ai/fast-sdxl", "fal-ai/fast-sdxl"),
    ("fal-ai/flux/dev", "fal-ai/flux"),
    ("fal-ai/flux-lora/a/b", "fal-ai/flux-lora"),
    ("workflows/alice/my-flow", "workflows/alice/my-flow"),
    ("12345-myapp", "12345/myapp"),
    ("comfy/bob/graph/run", "comfy/bob/graph"),
]


@pytest.mark.parametrize(("endpoint", "app"), URL_EXAMPLES)
def test_submit_response_and_urls(
    serve: Serve, client: httpx.Client, endpoint: str, app: str
) -> None:
    server = serve(queue_time=5)
    data = submit(client, server, endpoint)
    rid = data["request_id"]
    base = f"{server.url}/{app}/requests/{rid}"
    assert data == {
        "request_id": rid,
        "response_url": base,
        "status_url": base + "/status",
        "cancel_url": base + "/cancel",
        "status": "IN_QUEUE",
        "queue_position": 0,
        "gateway_request_id": rid,
    }
    assert client.get(base + "/status").status_code == 202
    assert client.get(base + "/status/").status_code == 202  # fal's own SDK adds a slash
    request = server.fake.get_request(rid)
    assert request is not None and request.route.endpoint_id == endpoint
    if endpoint != app:  # keeping the sub-path (or the legacy id) is a client bug: 404
        assert client.get(f"{server.url}/{endpoint}/requests/{rid}/status").status_code == 404


def test_bad_paths(serve: Serve, client: httpx.Client) -> None:
    server = serve()
    assert client.post(f"{server.url}/justaname", json={}).status_code == 404
    assert client.post(f"{server.url}/workflows/alice", json={}).status_code == 404
    assert client.get(f"{server.url}/fal-ai/flux").status_code == 405
    assert client.post(f"{server.url}/fal-ai/flux", content=b"{nope").status_code == 422
    assert client.get(f"{server.url}/fal-ai/flux/requests/nope/status").status_code == 404
    assert server.fake.stats.submits == 0


# --- status (spec 1.5) ---------------------------------------------------------------------


def test_status_progression(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0.15, duration=0.15)
    status_url = submit(client, server)["status_url"]
    seen: list[tuple[str, int]] = []

    def completed() -> bool:
        response = client.get(status_url)
        seen.append((response.json()["status"], response.status_code))
        return response.status_code == 200

    wait_for(completed)
    states = [s for s, _ in seen]
    assert {code for s, code in seen if s != "COMPLETED"} == {202}
    assert seen[-1] == ("COMPLETED", 200)
    assert states[0] == "IN_QUEUE" and "IN_PROGRESS" in states
    order = {"IN_QUEUE": 0, "IN_PROGRESS": 1, "COMPLETED": 2}
    assert [order[s] for s in states] == sorted(order[s] for s in states)
    final = client.get(status_url).json()
    assert final["metrics"]["inference_time"] == pytest.approx(0.15, abs=0.01)
    assert "error" not in final


@pytest.mark.parametrize(
    ("flag", "expect_list"),
    [("1", True), ("true", True), ("0", False), ("false", False), (None, False)],
)
def test_logs_key_always_present(
    serve: Serve, client: httpx.Client, flag: str | None, expect_list: bool
) -> None:
    server = serve(queue_time=0.1, duration=0.2)
    status_url = submit(client, server, body={"prompt": "x", "_fake": {"logs": 3}})["status_url"]
    params = {"logs": flag} if flag is not None else {}
    bodies: list[dict[str, Any]] = []

    def completed() -> bool:
        bodies.append(client.get(status_url, params=params).json())
        return bool(bodies[-1]["status"] == "COMPLETED")

    wait_for(completed)
    for body in bodies:
        assert "logs" in body
        assert isinstance(body["logs"], list) if expect_list else body["logs"] is None
    if expect_list:
        lines = bodies[-1]["logs"]
        assert [line["message"] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
        assert all(line["timestamp"].endswith("Z") for line in lines)


def test_queue_positions(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=30, duration=1)
    order = ["normal", "low", "normal", "low", "normal"]
    subs = [
        submit(client, server, body={"i": i}, headers={"X-Fal-Queue-Priority": p})
        for i, p in enumerate(order)
    ]
    assert [s["queue_position"] for s in subs] == [0, 1, 1, 3, 2]

    def positions() -> list[int | None]:
        return [client.get(s["status_url"]).json().get("queue_position") for s in subs]

    assert positions() == [0, 3, 1, 4, 2]
    assert client.put(subs[0]["cancel_url"]).status_code == 202
    assert positions() == [None, 2, 0, 3, 1]


# --- result (spec 1.7) ---------------------------------------------------------------------


def test_result_lifecycle_and_files(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0.05, duration=0.1, retention=0.5, file_size=3000)
    body = {"prompt": "a cat", "num_images": 2, "seed": 7}
    data = submit(client, server, body=body)
    early = client.get(data["response_url"])
    assert early.status_code == 400
    assert early.headers["x-fal-request-id"] == data["request_id"]
    wait_completed(client, data["status_url"])
    result = client.get(data["response_url"])
    assert result.status_code == 200
    assert result.headers["x-fal-request-id"] == data["request_id"]
    output = result.json()
    rid = data["request_id"]
    assert output["seed"] == 7 and output["prompt"] == "a cat" and output["input"] == body
    assert [image["url"] for image in output["images"]] == [
        f"{server.url}/_fake/files/{rid}/{n}.png" for n in range(2)
    ]
    first = output["images"][0]
    assert first["file_name"] == f"{rid}-0.png" and first["file_size"] == 3000
    assert (first["content_type"], first["width"], first["height"]) == ("image/png", 64, 64)
    for n, image in enumerate(output["images"]):
        download = client.get(image["url"])
        assert download.headers["content-type"] == "image/png"
        assert download.content == expected_file_bytes(rid, n, 3000)
    assert client.get(f"{server.url}/_fake/files/{rid}/2.png").status_code == 404
    # the same input again: same output apart from the request id
    again = submit(client, server, body=body)
    wait_completed(client, again["status_url"])
    assert client.get(again["response_url"]).json()["seed"] == 7
    # gone after the retention window
    wait_for(lambda: client.get(data["response_url"]).status_code == 404)
    assert client.get(data["status_url"]).status_code == 404


def test_result_padding(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0, duration=0, result_padding=20_000)
    data = submit(client, server)
    wait_completed(client, data["status_url"])
    assert len(client.get(data["response_url"]).content) > 20_000


@pytest.mark.parametrize(
    ("fail", "error_type"),
    [
        (422, "validation_error"),
        (500, "runner_server_error"),
        (503, "runner_disconnected"),
        (504, "request_timeout"),
    ],
)
def test_error_results_replay(
    serve: Serve, client: httpx.Client, fail: int, error_type: str
) -> None:
    server = serve(queue_time=0, duration=0.05)
    data = submit(client, server, body={"prompt": "x", "_fake": {"fail": fail}})
    status = wait_completed(client, data["status_url"]).json()
    assert status["status"] == "COMPLETED"
    assert status["error_type"] == error_type and status["error"]
    result = client.get(data["response_url"])
    assert result.status_code == fail
    assert result.headers["x-fal-error-type"] == error_type
    assert result.headers["x-fal-request-id"] == data["request_id"]
    detail = result.json()["detail"]
    if fail == 422:
        assert detail == [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]
    else:
        assert isinstance(detail, str) and result.json()["error_type"] == error_type


def test_fail_rate(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0, duration=0, fail_rate=1.0, fail_status=503)
    data = submit(client, server)
    wait_completed(client, data["status_url"])
    assert client.get(data["response_url"]).status_code == 503


def test_start_timeout_header(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=30)
    data = submit(client, server, headers={"X-Fal-Request-Timeout": "0.1"})
    status = wait_completed(client, data["status_url"]).json()
    assert status["error_type"] == "request_timeout"
    result = client.get(data["response_url"])
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"


# --- cancel (spec 1.8) ---------------------------------------------------------------------


def test_cancel_queued(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=30)
    data = submit(client, server)
    response = client.put(data["cancel_url"])
    assert (response.status_code, response.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    status = client.get(data["status_url"])
    assert status.status_code == 200
    assert status.json()["error_type"] == "client_cancelled"
    result = client.get(data["response_url"])
    assert result.status_code == 499 and result.headers["x-fal-error-type"] == "client_cancelled"
    again = client.put(data["cancel_url"])
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})


def test_cancel_in_progress(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0, duration=30)
    data = submit(client, server)
    assert client.get(data["status_url"]).json()["status"] == "IN_PROGRESS"
    assert client.put(data["cancel_url"]).status_code == 202
    assert client.get(data["response_url"]).status_code == 499


def test_cancel_finished_and_unknown(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0, duration=0)
    data = submit(client, server)
    wait_completed(client, data["status_url"])
    finished = client.put(data["cancel_url"])
    assert (finished.status_code, finished.json()) == (400, {"status": "ALREADY_COMPLETED"})
    unknown = client.put(f"{server.url}/fal-ai/flux/requests/no-such-id/cancel")
    assert (unknown.status_code, unknown.json()) == (404, {"status": "NOT_FOUND"})
    assert client.get(data["response_url"]).status_code == 200  # a late cancel changes nothing


# --- headers, auth -------------------------------------------------------------------------


def test_priority_and_hint_recorded(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=30)
    headers = {"X-Fal-Queue-Priority": "low", "X-Fal-Runner-Hint": "lora:a"}
    rid = submit(client, server, headers=headers)["request_id"]
    debug = client.get(f"{server.url}/_fake/requests/{rid}").json()
    assert (debug["priority"], debug["hint"]) == ("low", "lora:a")
    assert debug["headers"]["x-fal-runner-hint"] == "lora:a"
    bad = client.post(f"{server.url}/fal-ai/flux", json={}, headers={"X-Fal-Queue-Priority": "hi"})
    assert bad.status_code == 422
    assert server.fake.stats.submits == 1 and server.fake.stats.submit_attempts == 2


def test_auth_key(serve: Serve, client: httpx.Client) -> None:
    server = serve(key="sekret", queue_time=30)
    url = f"{server.url}/fal-ai/flux"
    assert client.post(url, json={}).status_code == 401
    assert client.post(url, json={}, headers={"Authorization": "Key wrong"}).status_code == 401
    good = {"Authorization": "Key sekret"}
    data = submit(client, server, "fal-ai/flux", headers=good)
    assert client.get(data["status_url"]).status_code == 401
    assert client.get(data["status_url"], headers=good).status_code == 202
    assert client.get(f"{server.url}/_fake/stats").status_code == 200  # control: no key
    assert server.fake.stats.submits == 1


# --- faults --------------------------------------------------------------------------------


def test_ingress_error_and_rate_limit_do_not_enqueue(serve: Serve, client: httpx.Client) -> None:
    server = serve(ingress_error_rate=1.0)
    url = f"{server.url}/fal-ai/flux"
    ingress = client.post(url, json={})
    assert ingress.status_code == 502 and "nginx" in ingress.text
    assert "x-fal-request-id" not in ingress.headers
    server.config.ingress_error_rate = 0
    server.config.rate_limit_rate = 1.0
    server.config.retry_after = 2
    limited = client.post(url, json={})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    stats = server.fake.stats
    assert (stats.submits, stats.submit_attempts) == (0, 2)
    assert stats.faults == {"ingress_error": 1, "rate_limit": 1}


def test_error_500_on_submit_is_ambiguous(serve: Serve, client: httpx.Client) -> None:
    server = serve(error_500_rate=1.0, queue_time=30)
    response = client.post(f"{server.url}/fal-ai/flux/dev", json={"prompt": "x"})
    assert response.status_code == 500
    rid = response.headers["x-fal-request-id"]
    assert server.fake.stats.submits == 1
    server.config.error_500_rate = 0
    status = client.get(f"{server.url}/fal-ai/flux/requests/{rid}/status")
    assert status.status_code == 202  # it was enqueued after all


def test_drop_on_submit_enqueues_and_on_status_does_nothing(
    serve: Serve, client: httpx.Client
) -> None:
    server = serve(drop_rate=1.0, queue_time=30)
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{server.url}/fal-ai/flux", json={"prompt": "x"})
    assert server.fake.stats.submits == 1
    server.config.drop_rate = 0
    data = submit(client, server, "fal-ai/flux")
    server.config.drop_rate = 1.0
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(data["status_url"])
    assert server.fake.stats.faults["drop"] == 2


def test_slow_response(serve: Serve, client: httpx.Client) -> None:
    server = serve(slow_rate=1.0, slow_seconds=0.5, queue_time=30)
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"{server.url}/fal-ai/flux", json={}, timeout=0.1)
    assert server.fake.stats.submits == 1  # enqueued before the delay


def test_unknown_status_and_invalid_json(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=30)
    data = submit(client, server)
    server.config.unknown_status_rate = 1.0
    odd = client.get(data["status_url"])
    assert odd.status_code == 202 and odd.json()["status"] == "UNKNOWN_FAKE_STATE"
    server.config.unknown_status_rate = 0
    server.config.invalid_json_rate = 1.0
    garbled = client.get(data["status_url"])
    assert garbled.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        garbled.json()
    assert server.fake.stats.faults == {"unknown_status": 1, "invalid_json": 1}


def test_seed_makes_faults_reproducible(serve: Serve, client: httpx.Client) -> None:
    def run() -> list[int]:
        server = serve(seed=42, ingress_error_rate=0.3, rate_limit_rate=0.3, queue_time=30)
        codes = [client.post(f"{server.url}/fal-ai/flux", json={}).status_code for _ in range(30)]
        server.stop()
        return codes

    first, second = run(), run()
    assert first == second and {200, 429, 502} <= set(first)


def test_latency(serve: Serve, client: httpx.Client) -> None:
    server = serve(latency=0.2, queue_time=30)
    started = time.monotonic()
    submit(client, server)
    assert 0.2 <= time.monotonic() - started < 3.0


# --- stats and control endpoints -----------------------------------------------------------


def test_stats_counters_over_http(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0, duration=0.05)
    first = submit(client, server, body={"prompt": "a"})
    submit(client, server, body={"prompt": "b"})
    submit(client, server, body={"prompt": "a"})
    wait_completed(client, first["status_url"])
    client.get(first["response_url"])
    client.put(first["cancel_url"])
    stats = client.get(f"{server.url}/_fake/stats").json()
    rid = first["request_id"]
    assert stats["submits"] == 3 and stats["result_fetches"] == 1 and stats["cancels"] == 1
    assert stats["status_polls"] == stats["requests"][rid]["status_polls"] >= 1
    assert stats["requests"][rid]["result_fetches"] == 1
    assert stats["submits_by_input"][input_hash({"prompt": "a"})] == 2
    assert server.fake.stats.duplicate_inputs() == {input_hash({"prompt": "a"}): 2}
    assert "requests" not in client.get(f"{server.url}/_fake/stats?per_request=0").json()
    assert client.post(f"{server.url}/_fake/reset").status_code == 200
    assert client.get(f"{server.url}/_fake/stats").json()["submits"] == 0


def test_config_endpoint(serve: Serve, client: httpx.Client) -> None:
    server = serve(key="sekret")
    url = f"{server.url}/_fake/config"
    assert client.get(url).json()["key"] == "***"
    changed = client.post(url, json={"duration": 2, "fail_rate": 0.5, "key": None})
    assert changed.status_code == 200 and changed.json()["duration"] == 2.0
    assert server.config.fail_rate == 0.5 and server.config.key is None
    assert client.post(url, json={"nope": 1}).status_code == 400
    assert client.post(url, json={"fail_rate": 2}).status_code == 400
    assert client.post(url, json={"duration": "slow"}).status_code == 400
    assert server.config.duration == 2.0


def test_status_stream(serve: Serve, client: httpx.Client) -> None:
    server = serve(queue_time=0.05, duration=0.1)
    data = submit(client, server)
    events = []
    with client.stream("GET", data["status_url"] + "/stream", params={"logs": "1"}) as response:
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events[-1]["status"] == "COMPLETED" and events[-1]["logs"] == []
    assert events[0]["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert server.fake.stats.stream_requests == 1


# --- webhooks (spec 2) ---------------------------------------------------------------------


class Receiver:
    """A tiny webhook receiver answering with scripted status codes (then 200).

    Header names are stored lower-cased: HTTP names are case-insensitive (spec 2.4).
    """

    def __init__(self, codes: list[int] | None = None) -> None:
        self.deliveries: list[tuple[str, dict[str, str], bytes]] = []
        self.codes = list(codes or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(codes: list[int] | None = None) -> Receiver:
        made.append(Receiver(codes))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_webhook_signed_and_verifiable(
    serve: Serve, client: httpx.Client, receiver: Callable[..., Receiver]
) -> None:
    server = serve(queue_time=0.02, duration=0.05, user_id="user-7")
    hook = receiver()
    params = {"fal_webhook": f"{hook.url}/v1/webhooks/fal?job=j-1&x=2"}
    data = submit(client, server, body={"prompt": "café"}, params=params)
    wait_for(lambda: len(hook.deliveries) == 1)  # nobody polls: the loop delivers
    path, headers, body = hook.deliveries[0]
    assert path == "/v1/webhooks/fal?job=j-1&x=2"
    keys = fal_public_keys(client.get(f"{server.url}/.well-known/jwks.json").json())
    assert verify_fal(headers, body, keys, time.time()) == data["request_id"]
    assert headers["x-fal-webhook-user-id"] == "user-7"
    payload = json.loads(body)
    assert payload["status"] == "OK" and payload["request_id"] == data["request_id"]
    assert payload["gateway_request_id"] == data["request_id"]
    assert payload["payload"]["prompt"] == "café" and payload["payload"]["images"]
    assert server.fake.stats.status_polls == 0
    wait_for(lambda: server.fake.stats.webhook_successes == 1)


def test_webhook_error_payload(
    serve: Serve, client: httpx.Client, receiver: Callable[..., Receiver]
) -> None:
    server = serve(queue_time=0, duration=0.02)
    hook = receiver()
    body = {"_fake": {"fail": 422}}
    submit(client, server, body=body, params={"fal_webhook": hook.url + "/h"})
    wait_for(lambda: len(hook.deliveries) == 1)
    payload = json.loads(hook.deliveries[0][2])
    assert payload["status"] == "ERROR" and payload["error"] == "Invalid status code: 422"
    assert payload["payload"]["detail"][0]["loc"] == ["body", "prompt"]


def test_webhook_retried_after_failure(
    serve: Serve, client: httpx.Client, receiver: Callable[..., Receiver]
) -> None:
    server = serve(queue_time=0, duration=0.02, webhook_retry_delay=0.05)
    hook = receiver(codes=[500, 503])
    rid = submit(client, server, params={"fal_webhook": hook.url + "/h"})["request_id"]
    wait_for(lambda: server.fake.stats.webhook_successes == 1)
    assert len(hook.deliveries) == 3
    stats = server.fake.stats
    assert (stats.webhook_attempts, stats.webhook_failures) == (3, 0)
    assert stats.requests[rid].webhook_attempts == 3
    stamps = {d[1]["x-fal-webhook-request-id"] for d in hook.deliveries}
    assert stamps == {rid}


def test_webhook_gives_up_and_duplicates(
    serve: Serve, client: httpx.Client, receiver: Callable[..., Receiver]
) -> None:
    server = serve(queue_time=0, duration=0.02, webhook_retries=1, webhook_retry_delay=0.02)
    hook = receiver(codes=[500, 500])
    submit(client, server, params={"fal_webhook": hook.url + "/h"})
    wait_for(lambda: server.fake.stats.webhook_failures == 1)
    assert server.fake.stats.webhook_attempts == 2
    server.config.webhook_duplicate_rate = 1.0
    submit(client, server, params={"fal_webhook": hook.url + "/h"})
    wait_for(lambda: server.fake.stats.webhook_successes == 2)
    assert len(hook.deliveries) == 4


def test_webhook_on_cancel(
    serve: Serve, client: httpx.Client, receiver: Callable[..., Receiver]
) -> None:
    server = serve(queue_time=30)
    hook = receiver()
    data = submit(client, server, params={"fal_webhook": hook.url + "/h"})
    client.put(data["cancel_url"])
    wait_for(lambda: len(hook.deliveries) == 1)
    assert json.loads(hook.deliveries[0][2])["error"] == "Invalid status code: 499"


# --- in process, on a scripted clock -------------------------------------------------------


async def test_in_process_with_a_scripted_clock() -> None:
    now = [1000.0]
    fake = FakeFal(FakeFalConfig(queue_time=1, duration=2, retention=10), clock=lambda: now[0])
    transport = httpx.ASGITransport(app=fake)
    async with httpx.AsyncClient(transport=transport, base_url="http://fal.test") as client:
        data = (await client.post("/fal-ai/flux/dev", json={"prompt": "x"})).json()
        assert data["status_url"].startswith("http://fal.test/fal-ai/flux/requests/")
        states = []
        for at in (1000.5, 1001.0, 1002.9, 1003.0):
            now[0] = at
            states.append((await client.get(data["status_url"])).json()["status"])
        assert states == ["IN_QUEUE", "IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]
        fake.tick()
        assert fake.stats.completed == 1
        now[0] = 1013.0
        fake.tick()
        assert fake.get_request(data["request_id"]) is None
        assert (await client.get(data["response_url"])).status_code == 404


@pytest.mark.parametrize("received", [b"", b'{"prompt": "a c'])
async def test_a_body_cut_off_midway_queues_nothing(received: bytes) -> None:
    fake = FakeFal(FakeFalConfig())
    messages: list[MutableMapping[str, Any]] = [
        {"type": "http.request", "body": received, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/fal-ai/flux/dev",
        "query_string": b"",
        "headers": [(b"host", b"fal.test"), (b"content-type", b"application/json")],
    }
    await fake(scope, receive, send)
    assert fake.stats.submits == 0 and len(fake.queue) == 0
