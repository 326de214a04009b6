"""Abuse of ``POST /v1/webhooks/fal``, in-process (ASGI), on a SQLite file.

Property-based (hypothesis): arbitrary headers and bodies, forgeries signed with a key
nobody published, and genuine deliveries tampered with in one place never get past the
signature: the answer is a 4xx (never a 5xx) and every table holds row for row what it held
before, checked after every example. Genuine deliveries with arbitrary payloads never get a
5xx either, never move a finished job, and leave a stored result exactly on the jobs that
succeeded.

Fixed cases that tests/test_webhooks.py does not already cover: a delivery replayed hours
later, a JWKS full of entries that are not Ed25519 keys, a retired key refused once the
cache has refreshed, a broken (not just unreachable) JWKS with and without cached keys, and
a valid signature for a request nobody here knows, whatever job the URL names (one of our
jobs that has another request records it as a duplicate remote request, nothing more).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from support.jwks import Clock, use_keys

from jobs.config import Secret, Settings
from jobs.db import metadata
from jobs.manager import AsyncJobManager
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.providers.jwks import MAX_AGE, JwksCache
from jobs.providers.signatures import fal_public_keys, public_jwk, sign_fal, verify_fal
from jobs.states import State
from jobs.store import Job, NewJob, Store
from jobs.web import create_app

pytestmark = pytest.mark.timeout(90)

APP = "fal-ai/flux/dev"
PATH = "/v1/webhooks/fal"
LIMIT = 8192
KNOWN = [f"req-known-{i}" for i in range(4)]
# hypothesis: sized so each property test stays well under 30 s on a slow machine.
EXAMPLES = 150
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Snapshot = dict[str, list[tuple[Any, ...]]]


class Keys:
    """The JWKS URL as an ``httpx.MockTransport`` handler; ``answer`` decides what it says."""

    def __init__(self, *keys: Ed25519PrivateKey) -> None:
        self.keys = list(keys)
        self.answer: Callable[[httpx.Request], httpx.Response] | None = None
        self.requests = 0

    def document(self) -> dict[str, Any]:
        return {"keys": [public_jwk(k, f"k{i}") for i, k in enumerate(self.keys)]}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.answer is not None:
            return self.answer(request)
        return httpx.Response(200, json=self.document())


@dataclass
class Receiver:
    """A manager on a SQLite file, the app around it, an ASGI client, fal's signing key."""

    manager: AsyncJobManager
    client: httpx.AsyncClient
    signer: Ed25519PrivateKey
    keys: Keys
    clock: Clock
    counter: itertools.count[int] = field(default_factory=itertools.count)
    # What a property test sets up once and checks every example against (the fixture is
    # set up once per test, not per example).
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return self.manager.store

    def queued(self, request_id: str | None = None) -> Job:
        """A job the provider accepted as ``request_id`` (a fresh one by default)."""
        request_id = request_id or f"req-{next(self.counter)}"
        job, _ = self.store.create_job(NewJob(application=APP, arguments={"p": request_id}))
        assert self.store.begin_submit(job.id, 0)
        ref = RemoteRef(application=APP, request_id=request_id)
        submitted = Submitted(ref=ref, observation=Observation(state=State.QUEUED))
        queued: Job = self.store.mark_submitted(job.id, submitted, next_poll_at=time.time() + 3600)
        return queued

    def snapshot(self) -> Snapshot:
        """Every row of every table, in a stable order."""
        with self.store.engine.connect() as conn:
            return {
                table.name: [
                    tuple(row)
                    for row in conn.execute(
                        select(table).order_by(*table.primary_key.columns)
                    ).all()
                ]
                for table in metadata.sorted_tables
            }

    async def post(
        self,
        body: bytes,
        headers: dict[str, str] | list[tuple[bytes, bytes]],
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self.client.post(PATH, content=body, headers=headers, params=params)

    def signed(
        self,
        payload: dict[str, Any] | bytes,
        *,
        key: Ed25519PrivateKey | None = None,
        request_id: str | None = None,
        timestamp: int | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        if request_id is None:
            assert isinstance(payload, dict)
            request_id = payload["request_id"]
        stamp = int(time.time()) if timestamp is None else timestamp
        headers = sign_fal(key or self.signer, request_id, "user-1", stamp, body)
        return body, headers


@pytest.fixture
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def keys(signer: Ed25519PrivateKey) -> Keys:
    return Keys(signer)


@asynccontextmanager
async def open_receiver(
    db_url: str, signer: Ed25519PrivateKey, keys: Keys
) -> AsyncIterator[Receiver]:
    # No provider is ever called here: the queue URL points nowhere on purpose.
    settings = Settings.from_env(
        {},
        database_url=db_url,
        fal_queue_url="http://127.0.0.1:9",
        fal_key=Secret("fal-key-webhook-abuse-0001"),
    )
    manager = AsyncJobManager(settings)
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.MockTransport(keys)) as keys_client:
        jwks = JwksCache("https://keys.example/jwks.json", keys_client, clock=clock)
        app = create_app(use_keys(manager, jwks), settings=settings, body_limit=LIMIT)
        # A crash is answered 500, as a server would, so assertions show what fal would see.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            try:
                yield Receiver(manager, client, signer, keys, clock)
            finally:
                await manager.aclose()
                manager.store.close()


@pytest.fixture
async def receiver(
    sqlite_migrated_url: str, signer: Ed25519PrivateKey, keys: Keys
) -> AsyncIterator[Receiver]:
    async with open_receiver(sqlite_migrated_url, signer, keys) as opened:
        yield opened


@pytest.fixture
async def receiver_on_each_db(
    db_url: str, signer: Ed25519PrivateKey, keys: Keys
) -> AsyncIterator[Receiver]:
    """The same on SQLite and on PostgreSQL."""
    async with open_receiver(db_url, signer, keys) as opened:
        yield opened


def _ok(request_id: str, payload: Any = None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK",
        "payload": {"images": [{"url": "https://x/out.png"}], "seed": 7}
        if payload is None
        else payload,
    }


def _error(request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "ERROR",
        "error": "Invalid status code: 500",
        "payload": {"detail": "Runner internal error"},
    }


# --- strategies ---------------------------------------------------------------------------

_visible = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
header_text = st.text(_visible, max_size=48) | st.text(_latin1, max_size=16)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
request_ids = st.sampled_from([*KNOWN, "req-unknown"]) | st.text(_visible, max_size=20)
payloads = st.fixed_dictionaries(
    {"request_id": request_ids, "status": st.sampled_from(["OK", "ERROR"]) | st.text(max_size=8)},
    optional={
        "gateway_request_id": request_ids,
        "payload": json_values,
        "error": json_values,
        "payload_error": st.text(max_size=20),
    },
)
bodies = (
    st.binary(max_size=256)
    | json_values.map(lambda v: json.dumps(v).encode())
    | payloads.map(lambda v: json.dumps(v).encode())
)
cases = st.sampled_from([str.lower, str.upper, str.title, lambda s: s])


@st.composite
def fal_header_values(draw: st.DrawFn) -> dict[str, str]:
    """Values for the four signature headers: plausible or arbitrary, some left out."""
    plausible = {
        "X-Fal-Webhook-Request-Id": st.sampled_from([*KNOWN, "req-unknown"]),
        "X-Fal-Webhook-User-Id": st.sampled_from(["user-1", "fal-user"]),
        # Seconds from now (drawn as an offset, so a replayed example draws the same).
        "X-Fal-Webhook-Timestamp": st.integers(-1000, 1000).map(
            lambda offset: str(int(time.time()) + offset)
        ),
        "X-Fal-Webhook-Signature": st.binary(min_size=64, max_size=64).map(bytes.hex)
        | st.text("0123456789abcdefABCDEF", max_size=130),
    }
    values = {}
    for name, likely in plausible.items():
        choice = draw(st.sampled_from(["plausible", "plausible", "arbitrary", "absent"]))
        if choice != "absent":
            values[name] = draw(likely if choice == "plausible" else header_text)
    return values


@st.composite
def deliveries(
    draw: st.DrawFn,
) -> tuple[bytes, list[tuple[bytes, bytes]], dict[str, str] | None, bool]:
    """(body, headers, query, forged): anything an attacker could send. ``forged`` marks a
    delivery correctly signed with a key that is not fal's."""
    body = draw(bodies)
    forged = draw(st.booleans())
    if forged:
        attacker = Ed25519PrivateKey.generate()
        now = int(time.time())
        request_id = draw(st.sampled_from(KNOWN))
        fal = sign_fal(attacker, request_id, "user-1", now + draw(st.integers(-200, 200)), body)
    else:
        fal = draw(fal_header_values())
    headers = [(draw(cases)(name), value) for name, value in fal.items()]
    extra = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["content-type", "x-request-id", "x-fal-webhook-foo", "accept"])
                | st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
                header_text,
            ),
            max_size=3,
        )
    )
    headers += [(name, value) for name, value in extra if name.lower() != "content-length"]
    # On the wire a header value is bytes; latin-1 keeps every drawn character as one byte.
    raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    query = draw(st.none() | st.fixed_dictionaries({"job": st.text(_visible, max_size=40)}))
    return body, raw, query, forged


# --- properties ---------------------------------------------------------------------------


def _with_known_jobs(receiver: Receiver) -> Snapshot:
    """Queued jobs for KNOWN, one job sent without a reply yet (adoptable by a genuine
    delivery naming it), made once per test; the snapshot right after."""
    if "before" not in receiver.memo:
        for request_id in KNOWN:
            receiver.queued(request_id)
        submitting, _ = receiver.store.create_job(NewJob(application=APP, arguments={}))
        assert receiver.store.begin_submit(submitting.id, 0)
        receiver.memo["before"] = receiver.snapshot()
    before: Snapshot = receiver.memo["before"]
    return before


@PROPERTY
@given(delivery=deliveries(), name_a_job=st.integers(-1, 4))
async def test_nothing_unsigned_or_forged_ever_reaches_the_database(
    receiver: Receiver,
    delivery: tuple[bytes, list[tuple[bytes, bytes]], dict[str, str] | None, bool],
    name_a_job: int,
) -> None:
    before = _with_known_jobs(receiver)
    body, headers, query, forged = delivery
    if name_a_job >= 0:  # the URL names one of our jobs, as in the URLs we give fal
        query = {"job": before["jobs"][name_a_job][0]}
    response = await receiver.post(body, headers, query)
    assert response.status_code in (400, 401, 413), (response.status_code, response.text)
    assert response.json()["error"]["type"]
    if forged:
        assert response.status_code in (401, 413)
    assert receiver.snapshot() == before


TAMPERS = [
    "body-byte",
    "body-appended",
    "body-reserialised",
    "request-id",
    "user-id",
    "timestamp-moved",
    "timestamp-respelled",
    "signature-nibble",
    "signature-truncated",
    "other-key",
]


def _tamper(
    how: str, body: bytes, headers: dict[str, str], data: st.DataObject
) -> tuple[bytes, dict[str, str]]:
    headers = dict(headers)
    if how == "body-byte":
        at = data.draw(st.integers(0, len(body) - 1))
        flip = data.draw(st.integers(1, 255))
        body = body[:at] + bytes([body[at] ^ flip]) + body[at + 1 :]
    elif how == "body-appended":
        body += data.draw(st.sampled_from([b" ", b"\n", b"{}", b"\x00"]))
    elif how == "body-reserialised":  # the same JSON, other bytes: the hash covers the bytes
        body = json.dumps(json.loads(body), indent=1, sort_keys=True).encode()
    elif how == "request-id":
        current = headers["X-Fal-Webhook-Request-Id"]
        headers["X-Fal-Webhook-Request-Id"] = next(k for k in KNOWN if k != current)
    elif how == "user-id":
        headers["X-Fal-Webhook-User-Id"] += data.draw(st.text(_visible, min_size=1, max_size=3))
    elif how == "timestamp-moved":  # still inside the 300 s window
        delta = data.draw(st.integers(1, 250)) * data.draw(st.sampled_from([-1, 1]))
        headers["X-Fal-Webhook-Timestamp"] = str(int(headers["X-Fal-Webhook-Timestamp"]) + delta)
    elif how == "timestamp-respelled":  # the same number, signed as other text
        headers["X-Fal-Webhook-Timestamp"] = "0" + headers["X-Fal-Webhook-Timestamp"]
    elif how == "signature-nibble":
        signature = headers["X-Fal-Webhook-Signature"]
        at = data.draw(st.integers(0, len(signature) - 1))
        other = data.draw(st.sampled_from([c for c in "0123456789abcdef" if c != signature[at]]))
        headers["X-Fal-Webhook-Signature"] = signature[:at] + other + signature[at + 1 :]
    elif how == "signature-truncated":
        signature = headers["X-Fal-Webhook-Signature"]
        headers["X-Fal-Webhook-Signature"] = signature[: data.draw(st.integers(0, 127))]
    elif how == "other-key":
        stranger = Ed25519PrivateKey.generate()
        headers = sign_fal(
            stranger,
            headers["X-Fal-Webhook-Request-Id"],
            headers["X-Fal-Webhook-User-Id"],
            int(headers["X-Fal-Webhook-Timestamp"]),
            body,
        )
    return body, headers


@PROPERTY
@given(
    request_id=st.sampled_from(KNOWN),
    outcome=st.sampled_from(["ok", "error"]),
    payload=json_values,
    how=st.sampled_from(TAMPERS),
    data=st.data(),
)
async def test_a_genuine_delivery_changed_anywhere_is_refused(
    receiver: Receiver,
    request_id: str,
    outcome: str,
    payload: Any,
    how: str,
    data: st.DataObject,
) -> None:
    before = _with_known_jobs(receiver)
    genuine = _ok(request_id, payload) if outcome == "ok" else _error(request_id)
    body, headers = receiver.signed(genuine)
    keys = fal_public_keys(receiver.keys.document())
    assert verify_fal(headers, body, keys, time.time()) == request_id  # untouched: valid
    body, headers = _tamper(how, body, headers, data)
    response = await receiver.post(body, headers)
    assert response.status_code == 401, (how, response.status_code, response.text)
    assert receiver.snapshot() == before


def _outcomes(receiver: Receiver) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    jobs, results = metadata.tables["jobs"], metadata.tables["results"]
    with receiver.store.engine.connect() as conn:
        rows = conn.execute(
            select(jobs.c.id, jobs.c.state, jobs.c.failure_reason, jobs.c.error)
        ).all()
        stored = dict(conn.execute(select(results.c.job_id, results.c.data)).all())
    return [tuple(row) for row in rows], stored


@PROPERTY
@given(payload=payloads, target=st.sampled_from(["new", "old", "as drawn"]), data=st.data())
async def test_genuine_deliveries_never_5xx_nor_undo_an_outcome(
    receiver: Receiver, payload: dict[str, Any], target: str, data: st.DataObject
) -> None:
    # job id -> (state, failure_reason, error, result) once finished: must never change.
    finished: dict[str, tuple[Any, ...]] = receiver.memo.setdefault("finished", {})
    jobs: list[Job] = receiver.memo.setdefault("jobs", [])
    jobs.append(receiver.queued())
    if target == "new":
        payload = {**payload, "request_id": jobs[-1].request_id}
    elif target == "old":
        # An index with fixed bounds: the list grows, a replayed example must draw the same.
        pick = data.draw(st.integers(0, 1 << 16))
        payload = {**payload, "request_id": jobs[pick % len(jobs)].request_id}
    signed_id = payload["request_id"]
    if not (isinstance(signed_id, str) and signed_id and signed_id.isascii()):
        signed_id = "req-not-a-header-value"
    body, headers = receiver.signed(payload, request_id=signed_id.strip() or "req-blank")
    response = await receiver.post(body, headers)
    assert response.status_code in (200, 400), (response.status_code, response.text)

    rows, stored = _outcomes(receiver)
    for job_id, state, reason, error in rows:
        # A result is stored exactly for the jobs that succeeded.
        assert (job_id in stored) == (state == State.SUCCEEDED.value), (job_id, state)
        outcome = (state, reason, error, stored.get(job_id))
        if job_id in finished:
            assert finished[job_id] == outcome, "a finished job changed"
        elif State(state).terminal:
            finished[job_id] = outcome


# --- fixed cases ----------------------------------------------------------------------------


async def test_a_delivery_replayed_hours_later_is_refused(receiver: Receiver) -> None:
    job = receiver.queued()
    assert job.request_id is not None
    before = receiver.snapshot()
    three_hours = 3 * 3600
    # Captured three hours ago (or dated three hours ahead): genuine, but out of its window.
    for offset in (-three_hours, three_hours):
        body, headers = receiver.signed(_error(job.request_id), timestamp=int(time.time()) + offset)
        response = await receiver.post(body, headers)
        assert response.status_code == 401
        assert "window" in response.json()["error"]["message"]
        assert receiver.snapshot() == before
    # The same bytes signed now are accepted: only the time made the difference.
    body, headers = receiver.signed(_error(job.request_id))
    assert (await receiver.post(body, headers)).status_code == 200
    assert (await receiver.manager.status(job.id)).state is State.FAILED


async def test_a_jwks_full_of_other_entries_still_finds_the_signer(
    receiver: Receiver, signer: Ed25519PrivateKey
) -> None:
    decoy = Ed25519PrivateKey.generate()
    x = public_jwk(signer, "s")["x"]
    receiver.keys.answer = lambda request: httpx.Response(
        200,
        json={
            "keys": [
                {"kty": "RSA", "n": "sXch", "e": "AQAB", "kid": "rsa"},
                {"kty": "EC", "crv": "P-256", "x": x, "y": x, "kid": "ec"},
                {"kty": "OKP", "crv": "X25519", "x": x, "kid": "same bytes, other curve"},
                {"kty": "OKP", "crv": "Ed25519", "x": x[:-2], "kid": "31 bytes"},
                {"kty": "OKP", "crv": "Ed25519", "x": "not base64url!", "kid": "garbage"},
                {"kty": "OKP", "crv": "Ed25519", "kid": "no x"},
                "not an object",
                public_jwk(decoy, "decoy"),
                public_jwk(signer, "signer"),
            ]
        },
    )
    job = receiver.queued()
    body, headers = receiver.signed(_ok(job.request_id or ""))
    response = await receiver.post(body, headers)
    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    assert (await receiver.manager.status(job.id)).state is State.SUCCEEDED


async def test_a_key_published_only_as_another_curve_is_not_trusted(
    receiver: Receiver, signer: Ed25519PrivateKey
) -> None:
    decoy = Ed25519PrivateKey.generate()
    x = public_jwk(signer, "s")["x"]
    receiver.keys.answer = lambda request: httpx.Response(
        200,
        json={
            "keys": [
                {"kty": "OKP", "crv": "X25519", "x": x},
                {"kty": "EC", "crv": "Ed25519", "x": x},
                public_jwk(decoy, "decoy"),
            ]
        },
    )
    job = receiver.queued()
    before = receiver.snapshot()
    body, headers = receiver.signed(_ok(job.request_id or ""))
    assert (await receiver.post(body, headers)).status_code == 401
    assert receiver.snapshot() == before


async def test_a_retired_key_is_refused_once_the_cache_refreshes(
    receiver: Receiver, signer: Ed25519PrivateKey
) -> None:
    new = Ed25519PrivateKey.generate()

    async def deliver(key: Ed25519PrivateKey) -> int:
        job = receiver.queued()
        body, headers = receiver.signed(_ok(job.request_id or ""), key=key)
        return (await receiver.post(body, headers)).status_code

    assert await deliver(signer) == 200
    # Rotation, first step: both keys published; once the cache is stale, both verify.
    receiver.keys.keys = [signer, new]
    receiver.clock.now += MAX_AGE + 1
    assert await deliver(new) == 200
    assert await deliver(signer) == 200
    # Second step: the old key is withdrawn. Once the cache has refreshed, it is refused.
    receiver.keys.keys = [new]
    receiver.clock.now += MAX_AGE + 1
    assert await deliver(new) == 200
    job = receiver.queued()
    before = receiver.snapshot()
    body, headers = receiver.signed(_ok(job.request_id or ""), key=signer)
    assert (await receiver.post(body, headers)).status_code == 401
    assert receiver.snapshot() == before


BROKEN = {
    "500": lambda request: httpx.Response(500, text="internal error"),
    "html": lambda request: httpx.Response(200, text="<html>maintenance</html>"),
    "no-keys": lambda request: httpx.Response(200, json={"keys": []}),
    "rsa-only": lambda request: httpx.Response(200, json={"keys": [{"kty": "RSA", "e": "AQAB"}]}),
    "not-a-document": lambda request: httpx.Response(200, json=["keys"]),
}


@pytest.mark.parametrize("broken", BROKEN)
async def test_a_broken_jwks_with_keys_cached_keeps_accepting(
    receiver: Receiver, broken: str
) -> None:
    first = receiver.queued()
    body, headers = receiver.signed(_ok(first.request_id or ""))
    assert (await receiver.post(body, headers)).status_code == 200
    receiver.keys.answer = BROKEN[broken]
    receiver.clock.now += MAX_AGE + 1  # stale: the next delivery tries (and fails) to refetch
    fetched = receiver.keys.requests
    job = receiver.queued()
    body, headers = receiver.signed(_ok(job.request_id or ""))
    response = await receiver.post(body, headers)
    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    assert receiver.keys.requests == fetched + 1
    assert (await receiver.manager.status(job.id)).state is State.SUCCEEDED


@pytest.mark.parametrize("broken", BROKEN)
async def test_a_broken_jwks_without_keys_fails_closed(receiver: Receiver, broken: str) -> None:
    receiver.keys.answer = BROKEN[broken]
    job = receiver.queued()
    before = receiver.snapshot()
    genuine = receiver.signed(_ok(job.request_id or ""))
    forged = receiver.signed(_ok(job.request_id or ""), key=Ed25519PrivateKey.generate())
    for body, headers in (genuine, forged):
        response = await receiver.post(body, headers)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "60"
        assert response.json()["error"]["type"] == "keys_unavailable"
        assert receiver.snapshot() == before


@pytest.mark.parametrize("named", ["none", "queued", "finished", "missing", "garbage"])
async def test_a_valid_signature_for_an_unknown_request_changes_nothing(
    receiver: Receiver, named: str
) -> None:
    queued = receiver.queued()
    done = receiver.queued()
    body, headers = receiver.signed(_ok(done.request_id or ""))
    assert (await receiver.post(body, headers)).status_code == 200
    job_param = {
        "none": None,
        "queued": queued.id,
        "finished": done.id,
        "missing": "0" * 32,
        "garbage": "'; DROP TABLE jobs; --",
    }[named]
    before = receiver.snapshot()
    # From our account and naming one of our jobs that has another request: a second
    # remote request for that job, recorded as one event (once, however often it comes),
    # and nothing else changes.
    second = named in ("queued", "finished")
    for payload in (_ok("req-nobody-knows"), _error("req-nobody-knows")):
        body, headers = receiver.signed(payload)
        params = {"job": job_param} if job_param else None
        response = await receiver.post(body, headers, params)
        assert response.status_code == 200
        outcome = "duplicate_request" if second else "unknown"
        assert response.json() == {"ok": True, "outcome": outcome}
        after = receiver.snapshot()
        added = after.pop("job_events")[len(before["job_events"]) :]
        assert after == {k: v for k, v in before.items() if k != "job_events"}
        assert [row[3] for row in added] == (["duplicate_request"] if second else [])


async def test_a_genuine_body_nested_too_deep_is_400_not_500(receiver: Receiver) -> None:
    """Authentic but unreadable: a body nested deeper than the JSON parser goes."""
    job = receiver.queued()
    before = receiver.snapshot()
    depth = 3000  # past the parser's recursion limit, under the body limit
    body = b'{"request_id": "%s", "status": "OK", "payload": %s%s}' % (
        (job.request_id or "").encode(),
        b"[" * depth,
        b"]" * depth,
    )
    body, headers = receiver.signed(body, request_id=job.request_id)
    response = await receiver.post(body, headers)
    assert response.status_code == 400 and response.json()["error"]["type"] == "malformed"
    assert receiver.snapshot() == before


@pytest.mark.parametrize(
    "value",
    [b"NaN", b"-Infinity", b'"\\u0000"', b'"\\ud800"', b"1e400"],
    ids=["NaN", "-Infinity", "NUL", "lone-surrogate", "overflowing-float"],
)
async def test_a_genuine_result_the_database_may_refuse_is_not_a_500(
    receiver_on_each_db: Receiver, value: bytes
) -> None:
    """JSON Python reads but a database may not store (PostgreSQL's json type refuses NaN and
    Infinity): answered and recorded, or refused as malformed, never a 500 that fal would
    retry for two hours while the job waits."""
    receiver = receiver_on_each_db
    job = receiver.queued()
    before = receiver.snapshot()
    body = b'{"request_id": "%s", "status": "OK", "payload": {"x": %s}}' % (
        (job.request_id or "").encode(),
        value,
    )
    body, headers = receiver.signed(body, request_id=job.request_id)
    response = await receiver.post(body, headers)
    assert response.status_code in (200, 400), (response.status_code, response.text)
    if response.status_code == 400:
        assert receiver.snapshot() == before
    else:
        assert (await receiver.manager.status(job.id)).state is State.SUCCEEDED
        assert receiver.store.result(job.id)[0]
