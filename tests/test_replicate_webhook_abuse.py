"""Abuse of ``POST /v1/webhooks/replicate``, in-process (ASGI) on a SQLite file: the twin of
tests/test_reliability_webhooks.py, tests/test_webhooks.py and tests/test_hardening.py for
Replicate's Standard Webhooks.

Property-based (hypothesis): arbitrary headers and bodies, forgeries signed with another
secret, and genuine deliveries changed in one place never get past the signature: the answer
is a 4xx (never a 5xx) and every table holds row for row what it held before. Genuine
deliveries of arbitrary predictions never get a 5xx either, and never move a finished job.

Fixed cases: a stale, a future and a replayed-hours-later delivery; a repeated
``webhook-id`` (Replicate's retry of one message) is a duplicate that touches nothing, even
with another body; our own secret rotation (two secrets configured) and the sender's (two
signatures sent); an oversized body by length and chunked; a delivery for a prediction we
do not know, naming one of our jobs or not; a Replicate token in an error answer is
redacted like ``FAL_KEY``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from jobs.config import Secret, Settings
from jobs.db import metadata
from jobs.errors import ProviderUnavailable
from jobs.logs import RedactFilter, secrets_of
from jobs.manager import AsyncJobManager
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.providers.standard_webhooks import sign, verify
from jobs.states import State
from jobs.store import Job, NewJob, Store
from jobs.testing.replicate_model import new_webhook_secret
from jobs.web import create_app

pytestmark = pytest.mark.timeout(120)

APP = "acme/echo"
PATH = "/v1/webhooks/replicate"
LIMIT = 8192
SECRET = new_webhook_secret()
OTHER = new_webhook_secret()  # another Replicate account's
TOKEN = "r8_abuse-token-do-not-leak-0001"
KNOWN = [f"known{i}abc" for i in range(4)]
STATUSES = ["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
PROPERTY = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Snapshot = dict[str, list[tuple[Any, ...]]]


def prediction(pid: str, status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": pid,
        "model": APP,
        "version": "0" * 64,
        "input": {"prompt": pid},
        "output": {"echo": pid} if status == "succeeded" else None,
        "logs": "",
        "error": "boom" if status == "failed" else None,
        "status": status,
        "created_at": "2026-01-01T00:00:00.000000Z",
        "data_removed": False,
        "source": "api",
        "metrics": {"predict_time": 1.0} if status in STATUSES[2:] else {},
    }
    body.update(fields)
    return body


@dataclass
class Receiver:
    manager: AsyncJobManager
    client: httpx.AsyncClient
    counter: Iterator[int] = field(default_factory=lambda: iter(range(10**9)))
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return self.manager.store

    def queued(self, prediction_id: str | None = None) -> Job:
        """A job Replicate accepted as ``prediction_id`` (a fresh one by default)."""
        prediction_id = prediction_id or f"fresh{next(self.counter)}x"
        new = NewJob(application=APP, arguments={"prompt": prediction_id}, provider="replicate")
        job, _ = self.store.create_job(new)
        assert self.store.begin_submit(job.id, 0)
        ref = RemoteRef(application=APP, request_id=prediction_id)
        submitted = Submitted(ref=ref, observation=Observation(state=State.QUEUED))
        queued: Job = self.store.mark_submitted(job.id, submitted, next_poll_at=time.time() + 3600)
        return queued

    def snapshot(self) -> Snapshot:
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

    def signed(
        self,
        payload: dict[str, Any] | bytes,
        *,
        secret: str = SECRET,
        msg_id: str | None = None,
        timestamp: int | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        msg_id = msg_id or f"msg_{next(self.counter)}"
        stamp = int(time.time()) if timestamp is None else timestamp
        return body, sign(secret, msg_id, stamp, body)

    async def post(
        self,
        body: bytes,
        headers: dict[str, str] | list[tuple[bytes, bytes]],
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self.client.post(PATH, content=body, headers=headers, params=params)


@asynccontextmanager
async def open_receiver(db_url: str, secrets: str = SECRET) -> AsyncIterator[Receiver]:
    # No Replicate API is ever called here: its URL points nowhere on purpose.
    settings = Settings.from_env(
        {"JOBS_REPLICATE_WEBHOOK_SECRET": secrets},
        database_url=db_url,
        replicate_api_url="http://127.0.0.1:9",
        replicate_api_token=Secret(TOKEN),
    )
    manager = AsyncJobManager(settings)
    app = create_app(manager, settings=settings, body_limit=LIMIT)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is a 500
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        try:
            yield Receiver(manager, client)
        finally:
            await manager.aclose()
            manager.store.close()


@pytest.fixture
async def receiver(sqlite_migrated_url: str) -> AsyncIterator[Receiver]:
    async with open_receiver(sqlite_migrated_url) as made:
        yield made


def _with_known_jobs(receiver: Receiver) -> Snapshot:
    """Queued jobs for KNOWN and one sent without a reply yet (adoptable by a genuine
    delivery naming it), made once per test; the snapshot right after."""
    if "before" not in receiver.memo:
        for prediction_id in KNOWN:
            receiver.queued(prediction_id)
        new = NewJob(application=APP, arguments={}, provider="replicate")
        submitting, _ = receiver.store.create_job(new)
        assert receiver.store.begin_submit(submitting.id, 0)
        receiver.memo["before"] = receiver.snapshot()
    before: Snapshot = receiver.memo["before"]
    return before


# --- properties ---------------------------------------------------------------------------

_visible = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
header_text = st.text(_visible, max_size=60)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]], bool]:
    """A body (often a plausible prediction) and headers: arbitrary, or genuine in form but
    signed with another account's secret."""
    if draw(st.booleans()):
        pid = draw(st.sampled_from(KNOWN))
        body = json.dumps(prediction(pid, draw(st.sampled_from(STATUSES)))).encode()
    else:
        body = draw(st.binary(max_size=300))
    forged = draw(st.booleans())
    if forged:
        now = int(time.time()) + draw(st.integers(-200, 200))
        headers = sign(draw(st.sampled_from([OTHER, new_webhook_secret()])), "msg_x", now, body)
    else:
        headers = {
            name: draw(header_text)
            for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
            if draw(st.booleans())
        }
    pairs = [
        (draw(st.sampled_from([str.lower, str.upper, str.title]))(k), v) for k, v in headers.items()
    ]
    pairs += draw(
        st.lists(st.tuples(st.sampled_from(["content-type", "accept"]), header_text), max_size=2)
    )
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    return body, raw, forged


@PROPERTY
@given(delivery=deliveries(), name_a_job=st.integers(-1, 4))
async def test_nothing_unsigned_or_forged_ever_reaches_the_database(
    receiver: Receiver, delivery: tuple[bytes, list[tuple[bytes, bytes]], bool], name_a_job: int
) -> None:
    before = _with_known_jobs(receiver)
    body, headers, forged = delivery
    query = {"job": before["jobs"][name_a_job][0]} if name_a_job >= 0 else None
    response = await receiver.post(body, headers, query)
    assert response.status_code in (400, 401, 413), (response.status_code, response.text)
    if forged:
        assert response.status_code == 401
    assert SECRET not in response.text and OTHER not in response.text
    assert receiver.snapshot() == before


TAMPERS = [
    "body-byte",
    "body-appended",
    "body-reserialised",
    "id-changed",
    "timestamp-moved",
    "timestamp-respelled",
    "signature-char",
    "signature-truncated",
    "signature-as-v1a",
    "other-secret",
]


def _tamper(
    how: str, body: bytes, headers: dict[str, str], data: st.DataObject
) -> tuple[bytes, dict[str, str]]:
    headers = dict(headers)
    signature = headers["webhook-signature"]
    if how == "body-byte":
        at = data.draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ data.draw(st.integers(1, 255))]) + body[at + 1 :]
    elif how == "body-appended":
        body += data.draw(st.sampled_from([b" ", b"\n", b"{}", b"\x00"]))
    elif how == "body-reserialised":  # the same JSON, other bytes: the HMAC covers the bytes
        body = json.dumps(json.loads(body), indent=1, sort_keys=True).encode()
    elif how == "id-changed":  # another message's id: a replay under a fresh id
        headers["webhook-id"] += data.draw(st.text("abcXYZ019", min_size=1, max_size=3))
    elif how == "timestamp-moved":  # still inside the 300 s window
        delta = data.draw(st.integers(1, 250)) * data.draw(st.sampled_from([-1, 1]))
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) + delta)
    elif how == "timestamp-respelled":  # the same number, signed as other text
        headers["webhook-timestamp"] = "0" + headers["webhook-timestamp"]
    elif how == "signature-char":
        version, encoded = signature.split(",", 1)
        at = data.draw(st.integers(0, len(encoded) - 2))  # the last is padding
        other = data.draw(st.sampled_from([c for c in "ABCDwxyz0189+/" if c != encoded[at]]))
        headers["webhook-signature"] = f"{version},{encoded[:at]}{other}{encoded[at + 1 :]}"
    elif how == "signature-truncated":
        headers["webhook-signature"] = signature[: data.draw(st.integers(0, len(signature) - 1))]
    elif how == "signature-as-v1a":  # an asymmetric entry is never checked as an HMAC
        headers["webhook-signature"] = "v1a," + signature.split(",", 1)[1]
    elif how == "other-secret":
        headers = sign(OTHER, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    return body, headers


@PROPERTY
@given(
    pid=st.sampled_from(KNOWN),
    status=st.sampled_from(STATUSES),
    how=st.sampled_from(TAMPERS),
    data=st.data(),
)
async def test_a_genuine_delivery_changed_anywhere_is_refused(
    receiver: Receiver, pid: str, status: str, how: str, data: st.DataObject
) -> None:
    before = _with_known_jobs(receiver)
    body, headers = receiver.signed(prediction(pid, status))
    assert verify(headers, body, [SECRET], time.time())  # untouched, it is valid
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
@given(
    status=st.sampled_from([*STATUSES, "weird", None]),
    output=json_values,
    logs=st.one_of(st.none(), st.text(max_size=40), st.integers()),
    removed=st.booleans(),
    target=st.sampled_from(["new", "old"]),
    data=st.data(),
)
async def test_genuine_deliveries_never_5xx_nor_undo_an_outcome(
    receiver: Receiver,
    status: str | None,
    output: Any,
    logs: Any,
    removed: bool,
    target: str,
    data: st.DataObject,
) -> None:
    finished: dict[str, tuple[Any, ...]] = receiver.memo.setdefault("finished", {})
    jobs: list[Job] = receiver.memo.setdefault("jobs", [])
    jobs.append(receiver.queued())
    pick = data.draw(st.integers(0, 1 << 16))
    job = jobs[-1] if target == "new" else jobs[pick % len(jobs)]
    body_fields = {"output": output, "logs": logs, "data_removed": removed, "status": status}
    body, headers = receiver.signed(prediction(job.request_id or "", **body_fields))
    response = await receiver.post(body, headers)
    assert response.status_code in (200, 400), (response.status_code, response.text)
    rows, stored = _outcomes(receiver)
    for job_id, state, reason, error in rows:
        assert (job_id in stored) == (state == State.SUCCEEDED.value), (job_id, state)
        outcome = (state, reason, error, stored.get(job_id))
        if job_id in finished:
            assert finished[job_id] == outcome, "a finished job changed"
        elif State(state).terminal:
            finished[job_id] = outcome


# --- fixed cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-301, 301, -6 * 3600])
async def test_stale_future_and_replayed_later_deliveries_are_refused(
    receiver: Receiver, offset: int
) -> None:
    job = receiver.queued()
    body, headers = receiver.signed(
        prediction(job.request_id or ""), timestamp=int(time.time()) + offset
    )
    before = receiver.snapshot()
    response = await receiver.post(body, headers)
    assert response.status_code == 401 and "window" in response.json()["error"]["message"]
    assert receiver.snapshot() == before


async def test_a_repeated_webhook_id_is_a_duplicate_that_touches_nothing(
    receiver: Receiver,
) -> None:
    job = receiver.queued()
    pid = job.request_id or ""
    body, headers = receiver.signed(prediction(pid), msg_id="msg_retried")
    first = await receiver.post(body, headers)
    assert first.status_code == 200 and first.json()["outcome"] == "applied"
    after = receiver.snapshot()
    # Replicate's retry of the message: the same id, signed again later.
    again, later = receiver.signed(body, msg_id="msg_retried", timestamp=int(time.time()) + 2)
    retried = await receiver.post(again, later)
    assert retried.status_code == 200 and retried.json()["outcome"] == "duplicate"
    # The same id with another body (a replay dressed up) is the same message: ignored.
    other, headers = receiver.signed(prediction(pid, "failed"), msg_id="msg_retried")
    dressed = await receiver.post(other, headers)
    assert dressed.status_code == 200 and dressed.json()["outcome"] == "duplicate"
    assert receiver.snapshot() == after
    assert (await receiver.manager.status(job.id)).state is State.SUCCEEDED
    # Another message about the same prediction is not a repeat: applied (and changes
    # nothing, the job being finished).
    fresh, headers = receiver.signed(prediction(pid), msg_id="msg_other")
    answered = await receiver.post(fresh, headers)
    assert answered.status_code == 200 and answered.json()["outcome"] == "duplicate"
    found, data = receiver.store.result(job.id)
    assert found and data == {"echo": pid}


async def test_either_of_our_secrets_verifies_while_rotating(sqlite_migrated_url: str) -> None:
    async with open_receiver(sqlite_migrated_url, f"{SECRET} {OTHER}") as receiver:
        for secret in (SECRET, OTHER):
            job = receiver.queued()
            body, headers = receiver.signed(prediction(job.request_id or ""), secret=secret)
            response = await receiver.post(body, headers)
            assert response.status_code == 200 and response.json()["outcome"] == "applied"
        stranger = new_webhook_secret()
        job = receiver.queued()
        body, headers = receiver.signed(prediction(job.request_id or ""), secret=stranger)
        assert (await receiver.post(body, headers)).status_code == 401


async def test_a_sender_rotating_sends_several_signatures_any_may_match(
    receiver: Receiver,
) -> None:
    job = receiver.queued()
    body, ours = receiver.signed(prediction(job.request_id or ""), msg_id="msg_rot")
    theirs = sign(OTHER, "msg_rot", int(ours["webhook-timestamp"]), body)
    headers = {
        **ours,
        "webhook-signature": f"{theirs['webhook-signature']} {ours['webhook-signature']}",
    }
    response = await receiver.post(body, headers)
    assert response.status_code == 200 and response.json()["outcome"] == "applied"


async def test_an_oversized_body_is_413_and_not_read(receiver: Receiver) -> None:
    job = receiver.queued()
    pid = job.request_id or ""
    big = prediction(pid, output={"blob": "x" * (2 * LIMIT)})
    body, headers = receiver.signed(big)
    before = receiver.snapshot()
    assert (await receiver.post(body, headers)).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1024):
            yield body[start : start + 1024]

    chunked = await receiver.client.post(PATH, content=chunks(), headers=headers)
    assert chunked.status_code == 413
    assert receiver.snapshot() == before


async def test_a_genuine_delivery_for_a_prediction_we_do_not_know(receiver: Receiver) -> None:
    ours = receiver.queued()
    new = NewJob(application=APP, arguments={"prompt": "lost reply"}, provider="replicate")
    submitting, _ = receiver.store.create_job(new)
    assert receiver.store.begin_submit(submitting.id, 0)
    before = receiver.snapshot()
    body, headers = receiver.signed(prediction("strangerxyz"))
    unknown = await receiver.post(body, headers)
    assert unknown.status_code == 200 and unknown.json()["outcome"] == "unknown"
    rows_before = {k: v for k, v in before.items() if k != "webhook_deliveries"}
    rows_after = {k: v for k, v in receiver.snapshot().items() if k != "webhook_deliveries"}
    assert rows_after == rows_before
    # Naming a job that has its own prediction: a second remote request, recorded, no more.
    body, headers = receiver.signed(prediction("secondxyz"))
    named = await receiver.post(body, headers, {"job": ours.id})
    assert named.status_code == 200 and named.json()["outcome"] == "duplicate_request"
    kept = await receiver.manager.status(ours.id)
    assert kept.request_id == ours.request_id and kept.state is State.QUEUED
    recorded = [e for e in receiver.store.events(ours.id) if e["kind"] == "duplicate_request"]
    assert [e["detail"]["request_id"] for e in recorded] == ["secondxyz"]
    # Naming the job whose create lost its reply: adopted, and finished.
    body, headers = receiver.signed(prediction("adoptedxyz"))
    adopted = await receiver.post(body, headers, {"job": submitting.id, "attempt": "1"})
    assert adopted.status_code == 200 and adopted.json()["outcome"] == "applied"
    done = await receiver.manager.status(submitting.id)
    assert done.request_id == "adoptedxyz" and done.state is State.SUCCEEDED
    kinds = [(e["kind"], e["reason"]) for e in receiver.store.events(submitting.id)]
    assert ("ambiguous_resolved", "webhook") in kinds


async def test_a_replicate_token_in_an_error_is_redacted(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def leaky(ref: str) -> None:
        raise ProviderUnavailable(f"proxy said: bad token {TOKEN}, secret {SECRET}")

    monkeypatch.setattr(receiver.manager, "status", leaky)
    response = await receiver.client.get("/v1/jobs/x")
    assert response.status_code == 502
    assert TOKEN not in response.text and SECRET not in response.text
    assert "[redacted]" in response.text


def test_each_rotating_webhook_secret_is_hidden_in_logs(sqlite_migrated_url: str) -> None:
    settings = Settings.from_env(
        {"JOBS_REPLICATE_WEBHOOK_SECRET": f"{SECRET}, {OTHER}", "REPLICATE_API_TOKEN": TOKEN},
        database_url=sqlite_migrated_url,
    )
    redact = RedactFilter(secrets_of(settings)).redact
    line = redact(f"token {TOKEN} old {SECRET} new {OTHER}")
    assert TOKEN not in line and SECRET not in line and OTHER not in line, line
