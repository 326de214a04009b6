"""The fal webhook receiver: signatures, timestamps, size limits, malformed bodies,
duplicates, races with a poll, ambiguous submits, error payloads, key rotation and an
unreachable JWKS. Most deliveries are signed here with keys generated per test; one test
lets the emulator deliver to a live server end to end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.types import Message
from support.jwks import Clock, JwksServer, use_keys
from support.live import live_app

from jobs.config import Secret, Settings
from jobs.manager import AsyncJobManager
from jobs.metrics import REGISTRY
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.providers.jwks import JwksCache
from jobs.providers.signatures import sign_fal
from jobs.states import State
from jobs.store import Job, NewJob, Store
from jobs.testing import FakeFalConfig, FakeFalServer
from jobs.web import create_app

APP = "fal-ai/flux/dev"
LIMIT = 4096


def _count(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "jobs_webhooks_total", {"provider": "fal", "outcome": outcome}
    )
    return value or 0.0


class Harness:
    """A manager on a SQLite file, the app around it, and a client that signs deliveries."""

    def __init__(self, manager: AsyncJobManager, app: Starlette, client: httpx.AsyncClient) -> None:
        self.manager = manager
        self.app = app
        self.client = client

    @property
    def store(self) -> Store:
        return self.manager.store

    def queued(self, request_id: str) -> Job:
        """A job the provider accepted as ``request_id``."""
        job, _ = self.store.create_job(NewJob(application=APP, arguments={"p": 1}))
        assert self.store.begin_submit(job.id, 0)
        ref = RemoteRef(application=APP, request_id=request_id)
        submitted = Submitted(ref=ref, observation=Observation(state=State.QUEUED))
        result: Job = self.store.mark_submitted(job.id, submitted, next_poll_at=time.time() + 3600)
        return result

    def ambiguous(self) -> Job:
        """A job sent once with no reply recorded (its request id unknown)."""
        job, _ = self.store.create_job(NewJob(application=APP, arguments={}))
        assert self.store.begin_submit(job.id, 0)
        return self.store.get(job.id)

    async def deliver(
        self,
        payload: dict[str, Any] | bytes,
        *,
        key: Ed25519PrivateKey,
        request_id: str | None = None,
        timestamp: int | None = None,
        job: str | None = None,
        attempt: int | None = None,
        user: str = "user-1",
        drop: tuple[str, ...] = (),
    ) -> httpx.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        if request_id is None:
            assert isinstance(payload, dict)
            request_id = payload["request_id"]
        stamp = int(time.time()) if timestamp is None else timestamp
        headers = sign_fal(key, request_id, user, stamp, body)
        for name in drop:
            del headers[name]
        params = {"job": job} if job else {}
        if attempt is not None:
            params["attempt"] = str(attempt)
        return await self.client.post(
            "/v1/webhooks/fal",
            content=body,
            headers={**headers, "content-type": "application/json"},
            params=params,
        )


def _ok(request_id: str, payload: Any = None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK",
        "payload": {"images": [{"url": "https://x/out.png"}], "seed": 7}
        if payload is None
        else payload,
    }


@pytest.fixture
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def jwks_server(signer: Ed25519PrivateKey) -> JwksServer:
    return JwksServer(signer, refuse=True)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def jwks(jwks_server: JwksServer, clock: Clock) -> AsyncIterator[JwksCache]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(jwks_server)) as client:
        yield JwksCache("https://keys.example/jwks.json", client, clock=clock)


@pytest.fixture
def fal(signer: Ed25519PrivateKey) -> Iterator[FakeFalServer]:
    """The emulator, signing its deliveries with ``signer`` (the key our JWKS serves)."""
    config = FakeFalConfig(duration=0.1, queue_time=0.05, seed=5, webhook_retries=0)
    with FakeFalServer(config, private_key=signer) as server:
        yield server


def _settings(tmp_path: Path, queue_url: str, **extra: Any) -> Settings:
    return Settings.from_env(
        {},
        database_url=f"sqlite:///{tmp_path}/jobs.db",
        fal_queue_url=queue_url,
        fal_key=Secret("fal-test-key-0001"),
        **extra,
    )


@asynccontextmanager
async def _harness(settings: Settings, jwks: JwksCache) -> AsyncIterator[Harness]:
    manager = AsyncJobManager(settings)
    app = create_app(use_keys(manager, jwks), settings=settings, body_limit=LIMIT)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield Harness(manager, app, client)
    finally:
        await manager.aclose()
        manager.store.close()


@pytest.fixture
async def harness(tmp_path: Path, fal: FakeFalServer, jwks: JwksCache) -> AsyncIterator[Harness]:
    async with _harness(_settings(tmp_path, fal.url), jwks) as made:
        yield made


# --- accepted deliveries --------------------------------------------------------------------


async def test_valid_delivery_applies_the_result(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.queued("req-1")
    before = _count("applied")
    response = await harness.deliver(_ok("req-1"), key=signer)
    assert response.status_code == 200
    assert response.json() == {"ok": True, "outcome": "applied", "id": job.id, "state": "succeeded"}
    done = await harness.manager.status(job.id)
    assert done.state is State.SUCCEEDED
    assert await harness.manager.result(job.id) == _ok("req-1")["payload"]
    assert _count("applied") == before + 1


async def test_duplicate_delivery_is_200_and_stores_one_result(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.queued("req-dup")
    first = await harness.deliver(_ok("req-dup"), key=signer)
    duplicates = _count("duplicate")
    second = await harness.deliver(_ok("req-dup", payload={"other": True}), key=signer)
    assert first.status_code == second.status_code == 200
    assert second.json()["outcome"] == "duplicate"
    assert _count("duplicate") == duplicates + 1
    assert await harness.manager.result(job.id) == _ok("req-dup")["payload"]
    finished = [e for e in harness.store.events(job.id) if e["to_state"] == "succeeded"]
    assert len(finished) == 1


async def test_unknown_request_is_200_and_stores_nothing(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.queued("req-known")
    before = _count("unknown")
    response = await harness.deliver(_ok("req-stranger"), key=signer)
    assert response.status_code == 200 and response.json() == {"ok": True, "outcome": "unknown"}
    assert _count("unknown") == before + 1
    assert [j.id for j in await harness.manager.list_jobs()] == [job.id]
    assert (await harness.manager.status(job.id)).state is State.QUEUED


async def test_webhook_resolves_an_ambiguous_submit(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    harness.queued("req-ours")
    await harness.deliver(_ok("req-ours"), key=signer)  # teaches our account: user-1
    job = harness.ambiguous()
    response = await harness.deliver(_ok("req-lost"), key=signer, job=job.id)
    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    resolved = await harness.manager.status(job.id)
    assert resolved.state is State.SUCCEEDED and resolved.request_id == "req-lost"
    assert "ambiguous_resolved" in [e["kind"] for e in harness.store.events(job.id)]


# --- accounts and duplicate remote requests -------------------------------------------------


async def test_a_callback_from_another_account_adopts_nothing(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    """fal signs every customer's callbacks with the same keys: a genuine signature from
    another account must not adopt our ambiguous job and set its result."""
    harness.queued("req-ours")
    await harness.deliver(_ok("req-ours"), key=signer)
    assert harness.store.account("fal") == "user-1"
    job = harness.ambiguous()
    before = _count("foreign")
    reply = await harness.deliver(_ok("req-theirs"), key=signer, job=job.id, user="attacker")
    assert reply.status_code == 200 and reply.json() == {"ok": True, "outcome": "foreign"}
    after = await harness.manager.status(job.id)
    assert after.state is State.SUBMITTING and after.request_id is None
    assert _count("foreign") == before + 1
    # Nor is a callback from another account applied to a request we know.
    known = harness.queued("req-known")
    reply = await harness.deliver(_ok("req-known"), key=signer, user="attacker")
    assert reply.json()["outcome"] == "foreign"
    assert (await harness.manager.status(known.id)).state is State.QUEUED


async def test_adoption_waits_until_the_account_is_known(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.ambiguous()
    reply = await harness.deliver(_ok("req-lost"), key=signer, job=job.id)
    assert reply.status_code == 503 and reply.json()["error"]["type"] == "account_unknown"
    assert (await harness.manager.status(job.id)).request_id is None
    assert harness.store.account("fal") is None  # an adoption never teaches the account


async def test_the_configured_account_is_used_and_the_learned_one_persists(
    tmp_path: Path, fal: FakeFalServer, jwks: JwksCache, signer: Ed25519PrivateKey
) -> None:
    settings = _settings(tmp_path, fal.url, fal_user_id="user-1")
    async with _harness(settings, jwks) as configured:
        job = configured.ambiguous()
        reply = await configured.deliver(_ok("req-lost"), key=signer, job=job.id)
        assert reply.json()["outcome"] == "applied"
        ours = configured.queued("req-ours")
        reply = await configured.deliver(_ok("req-ours"), key=signer, user="user-2")
        assert reply.json()["outcome"] == "foreign"  # the configured account wins
        assert (await configured.manager.status(ours.id)).state is State.QUEUED
    async with _harness(_settings(tmp_path, fal.url), jwks) as learner:
        learner.queued("req-first")
        await learner.deliver(_ok("req-first"), key=signer, user="user-9")
    # A restart (a new store on the same database) knows the account it learned.
    async with _harness(_settings(tmp_path, fal.url), jwks) as restarted:
        assert restarted.store.account("fal") == "user-9"
        job = restarted.ambiguous()
        reply = await restarted.deliver(_ok("req-late"), key=signer, job=job.id, user="user-9")
        assert reply.json()["outcome"] == "applied"


async def test_a_second_remote_request_never_replaces_the_known_one(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.queued("req-second")  # attempt 2 was confirmed
    await harness.deliver(_ok("req-second"), key=signer)
    before = REGISTRY.get_sample_value(
        "jobs_duplicate_requests_total", {"provider": "fal", "action": "kept"}
    )
    # Attempt 1 did reach fal after all: its callback names another request for the job.
    for _ in range(2):  # fal may deliver it twice: recorded once
        reply = await harness.deliver(
            _ok("req-first", payload={"seed": 1}), key=signer, job=job.id, attempt=1
        )
        assert reply.json()["outcome"] == "duplicate_request"
    after = await harness.manager.status(job.id)
    assert after.request_id == "req-second"
    assert await harness.manager.result(job.id) == _ok("req-second")["payload"]
    duplicates = [e for e in harness.store.events(job.id) if e["kind"] == "duplicate_request"]
    assert [e["detail"] for e in duplicates] == [
        {"request_id": "req-first", "kept": "req-second", "attempt": 1}
    ]
    counted = REGISTRY.get_sample_value(
        "jobs_duplicate_requests_total", {"provider": "fal", "action": "kept"}
    )
    assert (counted or 0) - (before or 0) == 1


async def test_error_payloads_fail_or_cancel_the_job(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    failed = harness.queued("req-422")
    detail = [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]
    await harness.deliver(
        {
            "request_id": "req-422",
            "gateway_request_id": "gw-1",
            "status": "ERROR",
            "error": "Invalid status code: 422",
            "payload": {"detail": detail},
        },
        key=signer,
    )
    job = await harness.manager.status(failed.id)
    assert job.state is State.FAILED and job.failure_reason == "remote_error"
    assert job.error["status_code"] == 422 and job.error["detail"] == {"detail": detail}
    cancelled = harness.queued("req-499")
    await harness.deliver(
        {
            "request_id": "req-499",
            "status": "ERROR",
            "error": "Invalid status code: 499",
            "payload": {"detail": "Request cancelled by the client"},
        },
        key=signer,
    )
    assert (await harness.manager.status(cancelled.id)).state is State.CANCELLED


async def test_payload_error_makes_the_job_due_for_a_poll(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.queued("req-big")
    assert job.next_poll_at is not None and job.next_poll_at > time.time() + 60
    response = await harness.deliver(
        {"request_id": "req-big", "status": "OK", "payload": None, "payload_error": "too big"},
        key=signer,
    )
    assert response.status_code == 200 and response.json()["outcome"] == "needs_poll"
    due = await harness.manager.status(job.id)
    assert due.state is State.IN_PROGRESS
    assert due.next_poll_at is not None and due.next_poll_at <= time.time()
    claimed = harness.store.claim_due("poller", limit=10, lease_seconds=30)
    assert [c.job.id for c in claimed] == [job.id]
    found, _ = harness.store.result(job.id)
    assert not found


async def test_several_keys_any_may_sign(
    tmp_path: Path, fal: FakeFalServer, clock: Clock, signer: Ed25519PrivateKey
) -> None:
    decoy = Ed25519PrivateKey.generate()
    server = JwksServer(decoy, signer, refuse=True)
    settings = _settings(tmp_path, fal.url)
    manager = AsyncJobManager(settings)
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as jwks_client:
        app = create_app(
            use_keys(manager, JwksCache("https://k/jwks", jwks_client, clock=clock)),
            settings=settings,
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as client:
            h = Harness(manager, app, client)
            h.queued("req-a")
            h.queued("req-b")
            assert (await h.deliver(_ok("req-a"), key=signer)).status_code == 200
            assert (await h.deliver(_ok("req-b"), key=decoy)).status_code == 200
    await manager.aclose()
    manager.store.close()


# --- refused deliveries ---------------------------------------------------------------------


async def test_bad_signature_is_401_and_stores_nothing(
    harness: Harness, jwks_server: JwksServer
) -> None:
    job = harness.queued("req-forged")
    before = _count("rejected")
    response = await harness.deliver(_ok("req-forged"), key=Ed25519PrivateKey.generate())
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_signature"
    assert _count("rejected") == before + 1
    assert (await harness.manager.status(job.id)).state is State.QUEUED
    assert harness.store.result(job.id) == (False, None)


async def test_tampered_body_is_401(harness: Harness, signer: Ed25519PrivateKey) -> None:
    job = harness.queued("req-t")
    body = json.dumps(_ok("req-t")).encode()
    headers = sign_fal(signer, "req-t", "user-1", int(time.time()), body)
    tampered = body.replace(b'"seed": 7', b'"seed": 8')
    response = await harness.client.post("/v1/webhooks/fal", content=tampered, headers=headers)
    assert response.status_code == 401
    assert (await harness.manager.status(job.id)).state is State.QUEUED


@pytest.mark.parametrize("offset", [-301, 301], ids=["stale", "future"])
async def test_timestamp_out_of_window_is_401(
    harness: Harness, signer: Ed25519PrivateKey, offset: int
) -> None:
    job = harness.queued("req-time")
    response = await harness.deliver(
        _ok("req-time"), key=signer, timestamp=int(time.time()) + offset
    )
    assert response.status_code == 401 and "window" in response.json()["error"]["message"]
    assert (await harness.manager.status(job.id)).state is State.QUEUED


@pytest.mark.parametrize(
    "header",
    [
        "X-Fal-Webhook-Request-Id",
        "X-Fal-Webhook-User-Id",
        "X-Fal-Webhook-Timestamp",
        "X-Fal-Webhook-Signature",
    ],
)
async def test_missing_signature_header_is_401(
    harness: Harness, signer: Ed25519PrivateKey, header: str
) -> None:
    job = harness.queued("req-h")
    response = await harness.deliver(_ok("req-h"), key=signer, drop=(header,))
    assert response.status_code == 401
    assert header.lower() in response.json()["error"]["message"]
    assert (await harness.manager.status(job.id)).state is State.QUEUED


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'["a list"]',
        json.dumps({"status": "OK", "payload": {}}).encode(),
        json.dumps({"request_id": "req-m", "status": "MAYBE"}).encode(),
        json.dumps({"request_id": "someone-else", "status": "OK", "payload": {}}).encode(),
        b"\xff\xfe not utf-8",
    ],
    ids=["not-json", "not-object", "no-request-id", "unknown-status", "other-request", "bytes"],
)
async def test_authentic_but_malformed_is_400(
    harness: Harness, signer: Ed25519PrivateKey, body: bytes
) -> None:
    job = harness.queued("req-m")
    before = _count("malformed")
    response = await harness.deliver(body, key=signer, request_id="req-m")
    assert response.status_code == 400 and response.json()["error"]["type"] == "malformed"
    assert _count("malformed") == before + 1
    assert (await harness.manager.status(job.id)).state is State.QUEUED


async def test_oversized_body_is_413_by_content_length(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.queued("req-big")
    before = _count("too_large")
    big = _ok("req-big", payload={"blob": "x" * LIMIT})
    response = await harness.deliver(big, key=signer)
    assert response.status_code == 413 and response.json()["error"]["type"] == "too_large"
    assert _count("too_large") == before + 1
    assert (await harness.manager.status(job.id)).state is State.QUEUED
    small = _ok("req-big", payload={"blob": "x" * (LIMIT - 200)})
    assert (await harness.deliver(small, key=signer)).status_code == 200


async def test_oversized_chunked_body_is_413_and_not_read_to_the_end(
    harness: Harness, signer: Ed25519PrivateKey
) -> None:
    job = harness.queued("req-chunked")
    body = json.dumps(_ok("req-chunked", payload={"blob": "x" * (LIMIT * 4)})).encode()
    headers = sign_fal(signer, "req-chunked", "user-1", int(time.time()), body)
    chunk = 1024
    sent: list[int] = []

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), chunk):
            sent.append(start)
            yield body[start : start + chunk]

    response = await harness.client.post("/v1/webhooks/fal", content=stream(), headers=headers)
    assert response.status_code == 413
    assert len(sent) < len(body) / chunk  # stopped reading past the limit
    assert (await harness.manager.status(job.id)).state is State.QUEUED


async def test_unreadable_content_length_is_400(harness: Harness) -> None:
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/webhooks/fal",
        "raw_path": b"/v1/webhooks/fal",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-length", b"lots")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    await harness.app(scope, receive, send)
    assert messages[0]["status"] == 400


# --- keys -------------------------------------------------------------------------------------


async def test_key_rotation_refetches_once_then_accepts(
    harness: Harness, signer: Ed25519PrivateKey, jwks_server: JwksServer, clock: Clock
) -> None:
    harness.queued("req-old")
    assert (await harness.deliver(_ok("req-old"), key=signer)).status_code == 200
    assert jwks_server.requests == 1
    rotated = Ed25519PrivateKey.generate()
    jwks_server.keys = [rotated]
    clock.now += 61  # the cache is older than refresh_interval
    job = harness.queued("req-new")
    response = await harness.deliver(_ok("req-new"), key=rotated)
    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    assert jwks_server.requests == 2
    harness.queued("req-newer")
    assert (await harness.deliver(_ok("req-newer"), key=rotated)).status_code == 200
    assert jwks_server.requests == 2
    assert (await harness.manager.status(job.id)).state is State.SUCCEEDED


async def test_forgeries_cannot_make_us_hammer_the_jwks_url(
    harness: Harness, signer: Ed25519PrivateKey, jwks_server: JwksServer, clock: Clock
) -> None:
    harness.queued("req-f")
    for minute in range(1, 3):
        for _ in range(20):
            response = await harness.deliver(_ok("req-f"), key=Ed25519PrivateKey.generate())
            assert response.status_code == 401
        # The first fetch, then at most one refetch per refresh_interval.
        assert jwks_server.requests == minute
        clock.now += 60


async def test_jwks_down_with_keys_cached_still_accepts(
    harness: Harness, signer: Ed25519PrivateKey, jwks_server: JwksServer, clock: Clock
) -> None:
    harness.queued("req-1")
    assert (await harness.deliver(_ok("req-1"), key=signer)).status_code == 200
    jwks_server.down = True
    clock.now += 2 * 3600  # past max_age: the refetch fails, the cached keys stay in use
    job = harness.queued("req-2")
    assert (await harness.deliver(_ok("req-2"), key=signer)).status_code == 200
    assert (await harness.manager.status(job.id)).state is State.SUCCEEDED


async def test_jwks_down_with_no_keys_is_503_and_stores_nothing(
    harness: Harness, signer: Ed25519PrivateKey, jwks_server: JwksServer, clock: Clock
) -> None:
    jwks_server.down = True
    job = harness.queued("req-wait")
    before = _count("unavailable")
    response = await harness.deliver(_ok("req-wait"), key=signer)
    assert response.status_code == 503 and response.headers["retry-after"] == "60"
    assert _count("unavailable") == before + 1
    assert (await harness.manager.status(job.id)).state is State.QUEUED
    # fal retries later; by then the keys can be fetched.
    jwks_server.down = False
    clock.now += 60
    assert (await harness.deliver(_ok("req-wait"), key=signer)).status_code == 200


# --- with the emulator ----------------------------------------------------------------------


async def test_webhook_and_poll_racing_store_one_result(
    harness: Harness, fal: FakeFalServer, signer: Ed25519PrivateKey
) -> None:
    """Both see the finished request at the same moment; the compare-and-set lets one in."""
    manager = harness.manager
    jobs = [await manager.submit(APP, {"prompt": f"p{i}"}, webhook=False) for i in range(5)]
    await asyncio.sleep(0.4)  # the emulator finishes them (queue 0.05 s + run 0.1 s)

    async def poll(job: Job) -> None:
        claimed = manager.store.claim_job(job.id, "racer", lease_seconds=30, now=time.time() + 60)
        assert claimed is not None
        await manager.refresh(claimed)

    async def push(job: Job) -> None:
        assert job.request_id is not None
        request = fal.fake.get_request(job.request_id)
        assert request is not None
        response = await harness.deliver(_ok(job.request_id, request.output()), key=signer)
        assert response.status_code == 200

    await asyncio.gather(*(f(job) for job in jobs for f in (poll, push)))
    for job in jobs:
        done = await manager.status(job.id)
        assert done.state is State.SUCCEEDED
        assert (await manager.result(job.id))["prompt"] == job.arguments["prompt"]
        finished = [e for e in manager.store.events(job.id) if e["to_state"] == "succeeded"]
        assert len(finished) == 1


@pytest.fixture
async def live(tmp_path: Path, fal: FakeFalServer) -> AsyncIterator[tuple[AsyncJobManager, str]]:
    """Our app on a real socket, named by ``JOBS_PUBLIC_URL`` in the submits, fetching
    fal's keys from the emulator's JWKS."""

    def make(url: str) -> AsyncJobManager:
        return AsyncJobManager(_settings(tmp_path, fal.url, public_url=url))

    async with live_app(make, fal.url) as served:
        yield served


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_emulator_delivery_end_to_end_without_a_result_fetch(
    live: tuple[AsyncJobManager, str], fal: FakeFalServer
) -> None:
    _, url = live
    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        body = {"application": APP, "arguments": {"prompt": "e2e"}}
        accepted = (await client.post("/v1/jobs", json=body)).json()
        assert accepted["status_url"] == f"{url}/v1/jobs/{accepted['id']}"

        async def finished() -> bool:
            job = (await client.get(accepted["status_url"])).json()
            return bool(job["state"] == "succeeded")

        await _until(finished)
        result = (await client.get(accepted["result_url"])).json()
    assert result["prompt"] == "e2e"
    assert fal.fake.stats.webhook_successes == 1
    assert fal.fake.stats.result_fetches == 0 and fal.fake.stats.status_polls == 0


@pytest.mark.parametrize(
    ("request_id", "job"), [("r" * 200, None), ("req-x", "j\x00"), ("req-y", "j" * 40)]
)
async def test_ids_no_column_can_hold_are_malformed(
    harness: Harness, signer: Ed25519PrivateKey, request_id: str, job: str | None
) -> None:
    response = await harness.deliver(_ok(request_id), key=signer, job=job)
    assert response.status_code == 400 and response.json()["error"]["type"] == "malformed"
