"""The Replicate emulator against Replicate's predictions API, driven with httpx.

Most tests mount the app in-process (``httpx.ASGITransport``) on a frozen clock that only
:meth:`FakeReplicate.advance` moves, so states, retention and throttling are exact and
nothing waits. Webhook tests also run the app's background loop and a small receiver on a
free port; connection faults (drop, slow) need a real socket and use
:class:`FakeReplicateServer`. Every wait is bounded in time and count.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from support.waiting import async_wait_for

from jobs.providers.signatures import SignatureError
from jobs.providers.standard_webhooks import verify
from jobs.testing import (
    FakeReplicate,
    FakeReplicateConfig,
    FakeReplicateServer,
    expected_file_bytes,
    input_hash,
)
from jobs.testing.replicate_model import parse_duration, version_for

T0 = 1000.0  # the frozen monotonic clock
WALL0 = 1767229190.5  # 2026-01-01T00:59:50.500000Z (exact in binary)
BASE = "http://replicate.test"
TOKEN = "r8_test_token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

Make = Callable[..., tuple[FakeReplicate, httpx.AsyncClient]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """An emulator on a frozen clock with an in-process client; ``real_wall`` keeps the real
    wall clock (webhook timestamps must be current for a verifier)."""
    opened: list[tuple[FakeReplicate, httpx.AsyncClient]] = []

    def build(real_wall: bool = False, **fields: Any) -> tuple[FakeReplicate, httpx.AsyncClient]:
        fields.setdefault("token", TOKEN)
        config = FakeReplicateConfig(**fields)
        if real_wall:
            fake = FakeReplicate(config, clock=lambda: T0)
        else:
            fake = FakeReplicate(config, clock=lambda: T0, wall_clock=lambda: WALL0)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=fake), base_url=BASE, headers=AUTH
        )
        opened.append((fake, client))
        return fake, client

    yield build
    for fake, client in opened:
        await client.aclose()
        await fake.stop()


async def create(
    client: httpx.AsyncClient,
    input: Any = None,
    path: str = "/v1/models/acme/echo/predictions",
    **body: Any,
) -> dict[str, Any]:
    response = await client.post(path, json={"input": input or {"text": "hi"}, **body})
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


async def get(client: httpx.AsyncClient, prediction_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/predictions/{prediction_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


# --- create (spec: the three create endpoints and the prediction object) --------------------


async def test_create_reply_is_the_prediction_object(make: Make) -> None:
    _, client = make(queue_time=1, duration=2)
    data = await create(client, {"text": "Zoë"})
    pid = data["id"]
    assert re.fullmatch(r"[0-9a-z]{26}", pid)
    assert data == {
        "id": pid,
        "model": "acme/echo",
        "version": version_for("acme/echo"),
        "input": {"text": "Zoë"},
        "logs": "",
        "output": None,
        "data_removed": False,
        "error": None,
        "source": "api",
        "status": "starting",
        "created_at": "2026-01-01T00:59:50.500000Z",
        "started_at": None,
        "completed_at": None,
        "metrics": {},
        "urls": {
            "get": f"{BASE}/v1/predictions/{pid}",
            "cancel": f"{BASE}/v1/predictions/{pid}/cancel",
            "web": f"{BASE}/p/{pid}",
        },
    }
    assert await get(client, pid) == data


async def test_three_create_endpoints(make: Make) -> None:
    _, client = make(default_model="fake/default")
    by_ref = await create(client, path="/v1/predictions", version=f"acme/tuned:{VERSION}")
    assert (by_ref["model"], by_ref["version"]) == ("acme/tuned", VERSION)
    # a bare id takes the model it was last seen with; an unknown one the default model
    again = await create(client, path="/v1/predictions", version=VERSION)
    assert again["model"] == "acme/tuned"
    other = "0" * 64
    unknown = await create(client, path="/v1/predictions", version=other)
    assert (unknown["model"], unknown["version"]) == ("fake/default", other)
    deployed = await create(client, path="/v1/deployments/acme/prod/predictions")
    assert (deployed["model"], deployed["version"]) == ("acme/prod", version_for("acme/prod"))
    deployment = (await client.get("/v1/deployments/acme/prod")).json()
    assert deployment["current_release"]["version"] == deployed["version"]
    version = (await client.get(f"/v1/models/acme/tuned/versions/{VERSION}")).json()
    assert version["id"] == VERSION and "openapi_schema" in version


@pytest.mark.parametrize(
    ("path", "body", "headers", "says"),
    [
        ("/v1/models/acme/echo/predictions", {}, {}, "input is required"),
        ("/v1/models/acme/echo/predictions", {"input": [1]}, {}, "must be an object"),
        ("/v1/predictions", {"input": {}}, {}, "version is required"),
        ("/v1/predictions", {"input": {}, "version": "abc"}, {}, "invalid version"),
        ("/v1/predictions", {"input": {}, "version": f"acme:{VERSION}"}, {}, "invalid version"),
        ("/v1/models/acme/echo/predictions", {"input": {"_fake": {"nope": 1}}}, {}, "nope"),
        ("/v1/models/acme/echo/predictions", {"input": {"_fake": {"fail": 3}}}, {}, "fail"),
        (
            "/v1/models/acme/echo/predictions",
            {"input": {}, "webhook_events_filter": ["done"]},
            {},
            "done",
        ),
        ("/v1/models/acme/echo/predictions", {"input": {}, "webhook": "ftp://x"}, {}, "http"),
        ("/v1/models/acme/echo/predictions", {"input": {}}, {"Cancel-After": "soon"}, "Cancel"),
        ("/v1/models/acme/echo/predictions", {"input": {}}, {"Prefer": "wait=x"}, "Prefer"),
    ],
)
async def test_create_validation_is_422_problem_details(
    make: Make, path: str, body: dict[str, Any], headers: dict[str, str], says: str
) -> None:
    fake, client = make()
    response = await client.post(path, json=body, headers=headers)
    assert response.status_code == 422
    problem = response.json()
    assert problem["status"] == 422 and problem["title"] == "Input validation failed"
    assert says in problem["detail"]
    assert (fake.stats.create_attempts, fake.stats.creates) == (1, 0)


async def test_bad_json_and_unknown_routes(make: Make) -> None:
    fake, client = make()
    bad = await client.post("/v1/models/acme/echo/predictions", content=b"{nope")
    assert bad.status_code == 422
    assert (await client.get("/v1/nothing")).status_code == 404
    assert (await client.get("/v1/predictions/abc/cancel")).status_code == 405
    assert (await client.get("/v1/predictions/unknown")).json()["status"] == 404
    assert fake.stats.creates == 0


async def test_auth_is_a_bearer_token(make: Make) -> None:
    fake, client = make()
    url = "/v1/models/acme/echo/predictions"
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        response = await client.post(url, json={"input": {}}, headers=headers)
        assert response.status_code == 401
        assert response.json() == {
            "title": "Unauthenticated",
            "detail": "You did not pass a valid authentication token",
            "status": 401,
        }
    assert (await client.get("/v1/predictions", headers={"Authorization": ""})).status_code == 401
    assert (await client.get("/_fake/stats", headers={"Authorization": ""})).status_code == 200
    await create(client)
    assert fake.stats.creates == 1


# --- statuses, overrides, output ------------------------------------------------------------


async def test_status_follows_the_clock(make: Make) -> None:
    fake, client = make(queue_time=1, duration=2)
    pid = (await create(client, {"n": 1}))["id"]
    seen = []
    for step in (0.5, 0.5, 1.5, 0.5):
        fake.advance(step)
        seen.append((await get(client, pid))["status"])
    assert seen == ["starting", "processing", "processing", "succeeded"]
    final = await get(client, pid)
    assert final["output"] == {"echo": {"n": 1}}
    assert final["metrics"] == {"predict_time": 2.0}
    assert final["started_at"] == "2026-01-01T00:59:51.500000Z"
    assert final["completed_at"] == "2026-01-01T00:59:53.500000Z"
    assert ISO.match(final["created_at"])


@pytest.mark.parametrize(
    ("fake_block", "config", "error"),
    [
        ({"fail": True}, {}, "Prediction failed (fake-replicate)"),
        ({"fail": "CUDA out of memory"}, {}, "CUDA out of memory"),
        ({}, {"fail_rate": 1.0, "fail_message": "always"}, "always"),
    ],
)
async def test_failures(
    make: Make, fake_block: dict[str, Any], config: dict[str, Any], error: str
) -> None:
    fake, client = make(queue_time=0, duration=1, **config)
    pid = (await create(client, {"_fake": fake_block}))["id"]
    assert (await get(client, pid))["error"] is None  # still running
    fake.advance(1)
    final = await get(client, pid)
    assert (final["status"], final["error"], final["output"]) == ("failed", error, None)
    assert final["metrics"]["predict_time"] == 1.0


async def test_logs_and_files_appear_while_it_runs(make: Make) -> None:
    fake, client = make(queue_time=0, duration=4, file_size=500)
    pid = (await create(client, {"_fake": {"logs": 4, "files": 2}}))["id"]
    early = await get(client, pid)
    assert early["logs"] == " 25%|##        | 1/4\n"
    assert early["output"] == [f"{BASE}/_fake/files/{pid}/0.png"]
    fake.advance(2.5)
    middle = await get(client, pid)
    assert middle["logs"].count("\n") == 3 and middle["output"] == [
        f"{BASE}/_fake/files/{pid}/{n}.png" for n in range(2)
    ]
    fake.advance(1.5)
    final = await get(client, pid)
    assert final["status"] == "succeeded"
    assert final["logs"].splitlines()[-1] == "100%|##########| 4/4"
    for n, url in enumerate(final["output"]):
        download = await client.get(url)
        assert download.headers["content-type"] == "image/png"
        assert download.content == expected_file_bytes(pid, n, 500)
    assert (await client.get(f"{BASE}/_fake/files/{pid}/2.png")).status_code == 404
    assert fake.stats.file_downloads == 2


async def test_output_override(make: Make) -> None:
    _, client = make(queue_time=0, duration=0)
    pid = (await create(client, {"_fake": {"output": ["a", {"b": 2}]}}))["id"]
    assert (await get(client, pid))["output"] == ["a", {"b": 2}]


# --- cancel, Cancel-After, Prefer: wait -------------------------------------------------------


async def test_cancel_starting_processing_and_finished(make: Make) -> None:
    fake, client = make(queue_time=1, duration=10)
    queued = (await create(client, {"q": 1}))["id"]
    running = (await create(client, {"r": 1}))["id"]
    fake.advance(3)
    response = await client.post(f"/v1/predictions/{running}/cancel")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["metrics"]["predict_time"]) == ("canceled", 2.0)
    assert body["completed_at"] is not None and body["error"] is None
    fake2, client2 = make(queue_time=5, duration=10)
    waiting = (await create(client2))["id"]
    early = (await client2.post(f"/v1/predictions/{waiting}/cancel")).json()
    assert (early["status"], early["started_at"], early["metrics"]) == (
        "canceled",
        None,
        {"predict_time": 0.0},
    )
    fake.advance(10)
    done = await get(client, queued)
    assert done["status"] == "succeeded"
    late = await client.post(f"/v1/predictions/{queued}/cancel")
    assert (late.status_code, late.json()) == (200, done)  # terminal: unchanged
    assert (await client.post("/v1/predictions/nope/cancel")).status_code == 404
    assert fake.stats.cancels == 3
    counters = fake.stats.counters(queued)
    assert counters is not None and counters.cancels == 1
    assert fake2.stats.cancels == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("1m", 60), ("1h30m", 5400), ("500ms", 0.5), ("1.5s", 1.5)],
)
def test_cancel_after_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "m", "-5s", "0s", "1m 30s"])
def test_cancel_after_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


async def test_cancel_after_aborts_or_cancels(make: Make) -> None:
    fake, client = make(queue_time=120, duration=60)
    response = await client.post(
        "/v1/models/acme/echo/predictions", json={"input": {}}, headers={"Cancel-After": "1m"}
    )
    aborted = response.json()["id"]
    running = await client.post(
        "/v1/models/acme/echo/predictions",
        json={"input": {"_fake": {"queue_time": 10}}},
        headers={"Cancel-After": "0m40s"},
    )
    canceled = running.json()["id"]
    fake.advance(59)
    assert (await get(client, aborted))["status"] == "starting"
    fake.advance(1)
    first = await get(client, aborted)
    assert (first["status"], first["started_at"]) == ("aborted", None)
    assert first["completed_at"] == "2026-01-01T01:00:50.500000Z"
    second = await get(client, canceled)
    assert (second["status"], second["metrics"]["predict_time"]) == ("canceled", 30.0)
    assert second["started_at"] is not None and second["error"] is None


async def test_prefer_wait_returns_the_finished_prediction(make: Make) -> None:
    fake = FakeReplicate(FakeReplicateConfig(queue_time=0.02, duration=0.05))
    transport = httpx.ASGITransport(app=fake)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        response = await client.post(
            "/v1/models/acme/echo/predictions", json={"input": {"w": 1}}, headers={"Prefer": "wait"}
        )
        assert response.status_code == 201
        assert (response.json()["status"], response.json()["output"]) == (
            "succeeded",
            {"echo": {"w": 1}},
        )
        # wait=N that runs out: the prediction comes back as it is, unfinished
        fake.update_config({"max_wait": 0.1})
        slow = await client.post(
            "/v1/models/acme/echo/predictions",
            json={"input": {"_fake": {"duration": 60}}},
            headers={"Prefer": "wait=5"},
        )
        assert slow.json()["status"] == "processing"
    assert fake.stats.gets == 0


# --- retention (spec: data removed an hour after completion) ----------------------------------


async def test_data_removed_after_retention(make: Make) -> None:
    fake, client = make(queue_time=0, duration=1)
    pid = (await create(client, {"secret": "x", "_fake": {"files": 1, "logs": 1}}))["id"]
    fake.advance(1)
    done = await get(client, pid)
    assert done["output"] and done["logs"]
    url = done["output"][0]
    fake.advance(3599)
    assert not (await get(client, pid))["data_removed"]
    assert (await client.get(url)).status_code == 200
    fake.advance(1)
    gone = await get(client, pid)
    assert gone["data_removed"] is True and gone["status"] == "succeeded"
    assert (gone["input"], gone["output"], gone["logs"]) == ({}, None, "")
    assert gone["metrics"] == done["metrics"] and gone["completed_at"] == done["completed_at"]
    assert (await client.get(url)).status_code == 404
    listed = (await client.get("/v1/predictions")).json()["results"]
    assert listed == [gone]


# --- list (spec: newest first, 100 a page, cursors, created_after / created_before) ----------


async def test_list_pages_newest_first(make: Make) -> None:
    fake, client = make(queue_time=60)
    ids = [(await create(client, {"i": i}))["id"] for i in range(205)]
    pages: list[dict[str, Any]] = []
    url: str | None = "/v1/predictions"
    for _ in range(5):
        if url is None:
            break
        pages.append((await client.get(url)).json())
        url = pages[-1]["next"]
    assert [len(p["results"]) for p in pages] == [100, 100, 5]
    listed = [r["id"] for p in pages for r in p["results"]]
    assert listed == ids[::-1]
    assert pages[0]["previous"] is None and pages[-1]["next"] is None
    assert pages[0]["next"].startswith(f"{BASE}/v1/predictions?cursor=")
    back = (await client.get(pages[1]["previous"])).json()
    assert back["results"] == pages[0]["results"] and back["previous"] is None
    back2 = (await client.get(pages[2]["previous"])).json()
    assert [r["id"] for r in back2["results"]] == [r["id"] for r in pages[1]["results"]]
    assert fake.stats.lists == 5
    assert (await client.get("/v1/predictions?cursor=!!")).status_code == 400


async def test_list_time_filters(make: Make) -> None:
    fake, client = make(queue_time=60, page_size=2)
    made = []
    for i in range(5):
        made.append(await create(client, {"i": i}))
        fake.advance(10)
    # strictly after the first and strictly before the fifth: the 2nd, 3rd and 4th
    query = {"created_after": made[0]["created_at"], "created_before": made[4]["created_at"]}
    first = (await client.get("/v1/predictions", params=query)).json()
    assert [r["input"]["i"] for r in first["results"]] == [3, 2]
    assert "created_after=" in first["next"] and "created_before=" in first["next"]
    rest = (await client.get(first["next"])).json()
    assert [r["input"]["i"] for r in rest["results"]] == [1]
    assert rest["next"] is None and rest["previous"] is not None
    bad = await client.get("/v1/predictions", params={"created_after": "yesterday"})
    assert bad.status_code == 400
    naive = datetime.fromtimestamp(WALL0 + 25, UTC).replace(tzinfo=None).isoformat()
    newest = (await client.get("/v1/predictions", params={"created_after": naive})).json()
    assert [r["input"]["i"] for r in newest["results"]] == [4, 3]


# --- faults -----------------------------------------------------------------------------------


async def test_error_500_on_create_is_ambiguous(make: Make) -> None:
    fake, client = make(error_500_rate=1.0)
    response = await client.post("/v1/models/acme/echo/predictions", json={"input": {"k": 1}})
    assert response.status_code == 500 and response.json()["status"] == 500
    fake.update_config({"error_500_rate": 0})
    found = (await client.get("/v1/predictions")).json()["results"]
    assert [p["input"] for p in found] == [{"k": 1}]  # it was created after all
    assert fake.stats.creates == 1 and fake.stats.faults == {"error_500": 1}


@pytest.mark.parametrize(
    ("fault", "header"), [("rate_limit", True), ("rate_limit_no_header", False)]
)
async def test_rate_limit_faults_do_nothing(make: Make, fault: str, header: bool) -> None:
    fake, client = make(retry_after=7, **{f"{fault}_rate": 1.0})
    response = await client.post("/v1/models/acme/echo/predictions", json={"input": {}})
    assert response.status_code == 429
    assert response.json() == {
        "detail": "Request was throttled. Expected available in 7 seconds.",
        "status": 429,
        "retry_after": 7,
    }
    assert response.headers.get("retry-after") == ("7" if header else None)
    assert (await client.get("/v1/predictions/x")).status_code == 429
    stats = fake.stats
    assert (stats.creates, stats.create_attempts, stats.gets, stats.responses_429) == (0, 1, 1, 2)
    assert stats.faults == {fault: 2}


async def test_invalid_json_after_the_action(make: Make) -> None:
    fake, client = make(invalid_json_rate=1.0, queue_time=60)
    response = await client.post("/v1/models/acme/echo/predictions", json={"input": {}})
    assert response.status_code == 201
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert fake.stats.creates == 1
    (prediction,) = fake.table.page(None, None, None, None, 10)[0]
    cancel = await client.post(f"/v1/predictions/{prediction.id}/cancel")
    assert cancel.status_code == 200 and not cancel.text.startswith("{")
    assert prediction.status(fake.now()) == "canceled"


async def test_seed_makes_faults_and_ids_reproducible(make: Make) -> None:
    async def run() -> list[tuple[int, str]]:
        _, client = make(seed=42, error_500_rate=0.3, rate_limit_rate=0.3, queue_time=60)
        out = []
        for _ in range(30):
            r = await client.post("/v1/models/acme/echo/predictions", json={"input": {}})
            out.append((r.status_code, r.json().get("id", "")))
        return out

    first, second = await run(), await run()
    assert first == second and {201, 429, 500} <= {code for code, _ in first}


async def test_create_rate_limit_is_exact(make: Make) -> None:
    fake, client = make(create_limit_per_minute=60, create_limit_burst=2, queue_time=60)
    url = "/v1/models/acme/echo/predictions"
    codes = [(await client.post(url, json={"input": {"i": i}})).status_code for i in range(3)]
    assert codes == [201, 201, 429]
    limited = await client.post(url, json={"input": {}})
    assert limited.headers["retry-after"] == "1" and limited.json()["retry_after"] == 1
    fake.advance(1)
    assert (await client.post(url, json={"input": {"late": 1}})).status_code == 201
    assert (await client.post(url, json={"input": {}})).status_code == 429
    assert (await client.get("/v1/predictions")).status_code == 200  # only creates count
    stats = fake.stats
    assert (stats.creates, stats.create_limited, stats.responses_429) == (3, 3, 3)


def test_drop_and_slow_need_a_socket() -> None:
    config = FakeReplicateConfig(drop_rate=1.0, queue_time=60)
    with FakeReplicateServer(config) as server, httpx.Client(trust_env=False) as http:
        url = f"{server.url}/v1/models/acme/echo/predictions"
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(url, json={"input": {"d": 1}})
        assert server.stats.creates == 1  # created before the connection dropped
        server.fake.update_config({"drop_rate": 0, "slow_rate": 1.0, "slow_seconds": 1.0})
        with pytest.raises(httpx.ReadTimeout):
            http.post(url, json={"input": {"s": 1}}, timeout=0.2)
        assert server.stats.creates == 2  # created before the delay
        assert server.stats.faults == {"drop": 1, "slow": 1}


# --- accounting and control endpoints -----------------------------------------------------------


async def test_stats_prove_what_was_created_and_polled(make: Make) -> None:
    fake, client = make(queue_time=60)
    first = await create(client, {"prompt": "a"})
    await create(client, {"prompt": "b"})
    await create(client, {"prompt": "a"}, path="/v1/deployments/acme/prod/predictions")
    for _ in range(3):
        await get(client, first["id"])
    await client.get("/v1/predictions")
    stats = (await client.get("/_fake/stats")).json()
    assert (stats["creates"], stats["gets"], stats["lists"]) == (3, 3, 1)
    assert stats["creates_by_input"][input_hash({"prompt": "a"})] == 2
    assert stats["predictions"][first["id"]]["gets"] == 3
    assert fake.stats.duplicate_inputs() == {input_hash({"prompt": "a"}): 2}
    assert "predictions" not in (await client.get("/_fake/stats?per_prediction=0")).json()
    debug = (await client.get(f"/_fake/predictions/{first['id']}")).json()
    assert debug["counters"]["gets"] == 3 and debug["input_hash"] == input_hash({"prompt": "a"})
    assert (await client.post("/_fake/reset")).status_code == 200
    assert (await client.get("/_fake/stats")).json()["creates"] == 0


async def test_config_endpoint(make: Make) -> None:
    fake, client = make()
    shown = (await client.get("/_fake/config")).json()
    assert shown["token"] == "***" and shown["webhook_secret"] == "***"
    changed = await client.post("/_fake/config", json={"duration": 2, "fail_rate": 0.5})
    assert changed.status_code == 200 and fake.config.duration == 2.0
    for bad in (
        {"nope": 1},
        {"fail_rate": 2},
        {"webhook_secret": "plain"},
        {"extra_signing_secrets": "whsec_x"},
        {"extra_signing_secrets": ["whsec_AAAA"]},
    ):
        assert (await client.post("/_fake/config", json=bad)).status_code == 400
    assert fake.config.extra_signing_secrets == [] and fake.config.fail_rate == 0.5


async def test_webhook_secret_endpoint(make: Make) -> None:
    fake, client = make()
    key = (await client.get("/v1/webhooks/default/secret")).json()["key"]
    assert key == fake.webhook_secret
    prefix, _, encoded = key.partition("_")
    assert prefix == "whsec" and len(base64.b64decode(encoded)) == 32
    assert fake.stats.secret_gets == 1
    assert FakeReplicateConfig().webhook_secret != key  # a fresh secret per emulator


# --- webhooks ---------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on a free port: records every POST, answers scripted status codes
    (a 3xx redirects to ``/moved``), then 200. Header names are stored lower-cased."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.deliveries: list[tuple[str, dict[str, str], bytes]] = []
        self.codes = list(codes or [])
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.deliveries.append(
                        (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", "/moved")
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

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for _, _, body in self.deliveries]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def build(codes: list[int] | None = None) -> Receiver:
        made.append(Receiver(codes))
        return made[-1]

    yield build
    for r in made:
        r.close()


def _true_when(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return check()

    return probe


async def delivered(receiver: Receiver, count: int, timeout: float = 5.0) -> None:
    async def enough() -> bool:
        return len(receiver.deliveries) >= count

    await async_wait_for(enough, timeout, f"{count} webhook deliveries")


async def test_default_events_send_only_the_completed_webhook(
    make: Make, receiver: Callable[..., Receiver]
) -> None:
    fake, client = make(real_wall=True, queue_time=0, duration=1)
    await fake.start()
    hook = receiver()
    pid = (await create(client, {"_fake": {"logs": 5}}, webhook=f"{hook.url}/hook?job=j1"))["id"]
    fake.advance(0.5)
    fake.advance(0.5)
    await delivered(hook, 1)
    path, headers, body = hook.deliveries[0]
    assert path == "/hook?job=j1" and headers["content-type"] == "application/json"
    assert verify(headers, body, [fake.webhook_secret], time.time())
    assert headers["webhook-id"].startswith("msg_")
    assert json.loads(body) == await get(client, pid)
    assert json.loads(body)["status"] == "succeeded"
    assert fake.stats.webhook_events == {"completed": 1}
    await async_wait_for(_true_when(lambda: fake.stats.webhook_deliveries == 1), 5, "2xx")
    assert len(hook.deliveries) == 1


async def test_every_event_in_order_with_throttled_logs(
    make: Make, receiver: Callable[..., Receiver]
) -> None:
    fake, client = make(real_wall=True, queue_time=0, duration=2, webhook_throttle=0.5)
    await fake.start()
    hook = receiver()
    events = ["start", "output", "logs", "completed"]
    await create(
        client, {"_fake": {"logs": 20, "files": 2}}, webhook=hook.url, webhook_events_filter=events
    )
    for _ in range(40):  # 2.5 s in exact binary steps
        fake.advance(0.0625)
    await delivered(hook, 2)
    await async_wait_for(_true_when(lambda: fake.pending_webhooks == 0), 5, "deliveries")
    bodies = hook.bodies()
    assert bodies[0]["status"] == "processing" and bodies[-1]["status"] == "succeeded"
    assert all(b["status"] == "processing" for b in bodies[:-1])
    lines = [b["logs"].count("\n") for b in bodies]
    assert lines == sorted(lines) and lines[-1] == 20
    counts = fake.stats.webhook_events
    assert counts["start"] == 1 and counts["completed"] == 1
    # 20 log lines and 2 files over 2 s, at most one intermediate message per 0.5 s: four
    # (output when a file appeared, logs otherwise), not twenty-two
    assert (counts["output"], counts["logs"]) == (2, 2)
    assert len({h["webhook-id"] for _, h, _ in hook.deliveries}) == len(hook.deliveries)


async def test_output_only_filter_gets_the_final_output(
    make: Make, receiver: Callable[..., Receiver]
) -> None:
    fake, client = make(real_wall=True, queue_time=0, duration=0)
    await fake.start()
    hook = receiver()
    await create(client, {"o": 1}, webhook=hook.url, webhook_events_filter=["output"])
    only_completed = receiver()
    await create(client, {"c": 1}, webhook_completed=only_completed.url)
    fake.advance(0.01)
    await delivered(hook, 1)
    await delivered(only_completed, 1)
    assert hook.bodies()[0]["output"] == {"echo": {"o": 1}}
    assert fake.stats.webhook_events == {"output": 1, "completed": 1}


async def test_terminal_webhook_retried_with_the_same_id(
    make: Make, receiver: Callable[..., Receiver]
) -> None:
    fake, client = make(real_wall=True, queue_time=0, duration=1, webhook_retry_base=0.01)
    await fake.start()
    hook = receiver(codes=[500, 302, 503])
    start_hook = receiver(codes=[500])
    await create(client, webhook=hook.url + "/h")
    await create(client, {"s": 1}, webhook=start_hook.url, webhook_events_filter=["start"])
    fake.advance(1)
    await delivered(hook, 4)
    await async_wait_for(_true_when(lambda: fake.stats.webhook_deliveries == 1), 5, "retries")
    await async_wait_for(_true_when(lambda: fake.pending_webhooks == 0), 5, "the start message")
    assert [path for path, _, _ in hook.deliveries] == ["/h"] * 4  # the redirect not followed
    assert len({h["webhook-id"] for _, h, _ in hook.deliveries}) == 1
    for _, headers, body in hook.deliveries:
        verify(headers, body, [fake.webhook_secret], time.time())
    assert len(start_hook.deliveries) == 1  # an intermediate message is never retried
    stats = fake.stats
    assert (stats.webhook_attempts, stats.webhook_retries, stats.webhook_failures) == (5, 3, 1)


async def test_terminal_webhook_gives_up(make: Make, receiver: Callable[..., Receiver]) -> None:
    fake, client = make(
        real_wall=True, queue_time=0, duration=0, webhook_retries=2, webhook_retry_base=0.01
    )
    await fake.start()
    hook = receiver(codes=[500] * 10)
    pid = (await create(client, webhook=hook.url))["id"]
    fake.advance(0.01)
    await async_wait_for(_true_when(lambda: fake.stats.webhook_failures == 1), 5, "give up")
    assert len(hook.deliveries) == 3
    counters = fake.stats.counters(pid)
    assert counters is not None and (counters.webhook_attempts, counters.webhook_deliveries) == (
        3,
        0,
    )


async def test_webhook_loss_and_duplicates(make: Make, receiver: Callable[..., Receiver]) -> None:
    fake, client = make(real_wall=True, queue_time=0, duration=0, webhook_loss_rate=1.0)
    await fake.start()
    hook = receiver(codes=[500])
    await create(client, webhook=hook.url)
    fake.advance(0.01)
    await async_wait_for(_true_when(lambda: fake.stats.webhooks_lost == 1), 5, "a lost message")
    fake.update_config({"webhook_loss_rate": 0, "webhook_duplicate_rate": 1.0})
    await create(client, webhook=hook.url)
    fake.advance(0.01)
    await delivered(hook, 3)  # the first copy failed once (500) and was retried
    await async_wait_for(_true_when(lambda: fake.pending_webhooks == 0), 5, "deliveries")
    assert len({h["webhook-id"] for _, h, _ in hook.deliveries}) == 1
    stats = fake.stats
    assert (stats.webhooks_duplicated, stats.webhook_deliveries) == (1, 2)


async def test_rotation_signs_with_every_secret(
    make: Make, receiver: Callable[..., Receiver]
) -> None:
    fake, client = make(real_wall=True, queue_time=0, duration=0)
    old = fake.webhook_secret
    new = FakeReplicateConfig().webhook_secret
    fake.update_config({"webhook_secret": new, "extra_signing_secrets": [old]})
    await fake.start()
    hook = receiver()
    await create(client, webhook=hook.url)
    fake.advance(0.01)
    await delivered(hook, 1)
    _, headers, body = hook.deliveries[0]
    assert len(headers["webhook-signature"].split()) == 2
    now = time.time()
    for secret in (new, old):
        verify(headers, body, [secret], now)
    with pytest.raises(SignatureError):
        verify(headers, body, [FakeReplicateConfig().webhook_secret], now)
