"""Submit safety end to end against the Replicate emulator: the twin of
tests/test_reliability_submits.py and tests/test_submit_settling.py.

Replicate documents no idempotency key, so a create whose answer was lost (a 500 after the
prediction was made, a dropped connection) must never simply be sent again: the manager
lists the predictions made since and adopts the one it finds (``look_up``), in the send
itself and in ``jobsctl serve``'s resolver after a crash. Only a listing that proves nothing
was made allows a second send; one that cannot tell leaves it to ``JOBS_AMBIGUOUS_POLICY``.
Every decision is an event on the job (``manager.events``, ``jobsctl show``). The emulator
counts creates per input: that is what "never sent twice" is checked against.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from support import replicate as rp

from jobs import AsyncJobManager, State
from jobs.batch import read_lines, submit_batch
from jobs.poller import Poller
from jobs.providers.http import RetryPolicy
from jobs.records import SubmitOptions
from jobs.store import Job, NewJob
from jobs.testing import FakeReplicateServer, input_hash

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[FakeReplicateServer]:
    with FakeReplicateServer(rp.config(webhook_retries=2, webhook_retry_base=0.2)) as served:
        yield served


def _kinds(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["kind"], e["reason"]) for e in events]


def _creates(server: FakeReplicateServer, arguments: dict[str, Any]) -> int:
    return server.stats.creates_by_input.get(input_hash(arguments), 0)


@asynccontextmanager
async def _manager(
    url: str, server: FakeReplicateServer, webhooks: bool, **extra: Any
) -> AsyncIterator[AsyncJobManager]:
    """A manager on ``url``; with ``webhooks``, behind a live app the emulator calls back."""
    settings = rp.settings(url, server, **extra)
    if not webhooks:
        async with rp.open_manager(settings, poll_policy=rp.FAST_POLLS) as manager:
            yield manager
        return

    def make(public: str) -> AsyncJobManager:
        return rp.manager(settings.replace(public_url=public), poll_policy=rp.FAST_POLLS)

    async with rp.live_app(make) as (manager, _):
        yield manager


async def _succeeds_once(
    manager: AsyncJobManager, server: FakeReplicateServer, job: Job, arguments: dict[str, Any]
) -> None:
    """The job finishes with its own prediction's output, which was created once."""
    done = await manager.wait(job.id, timeout=20)
    assert done.state is State.SUCCEEDED, (done.state, done.error)
    assert await manager.result(job.id) == {"echo": arguments}
    assert _creates(server, arguments) == 1


def _adopted_by_lookup(events: list[dict[str, Any]], request_id: str | None) -> None:
    found = [e for e in events if e["kind"] == "ambiguous_resolved"]
    assert [e["reason"] for e in found] == ["lookup"], _kinds(events)
    assert request_id is not None and found[0]["detail"]["request_id"] == request_id


# --- in the send ------------------------------------------------------------------------------


@pytest.mark.parametrize("webhooks", [False, True], ids=["polling", "webhooks"])
@pytest.mark.parametrize("fault", ["error_500", "drop"])
async def test_a_lost_create_is_adopted_by_listing_never_sent_again(
    sqlite_migrated_url: str, server: FakeReplicateServer, fault: str, webhooks: bool
) -> None:
    # Every create is made, then its answer lost; the listing that follows is answered.
    server.fake.update_config({f"{fault}_rate": 1.0, "fault_kinds": ["create"]})
    async with _manager(sqlite_migrated_url, server, webhooks) as manager:
        arguments = {"prompt": f"lost by {fault}"}
        job = await manager.submit(rp.APP, arguments, provider="replicate")
        assert job.state is State.QUEUED and job.attempts == 1
        assert job.webhook is webhooks
        events = await manager.events(job.id)
        assert _kinds(events)[:3] == [
            ("created", None),
            ("submit_sent", "submit"),
            ("submit_ambiguous", "ProviderUnavailable"),
        ]
        message = events[2]["detail"]["message"]
        assert ("HTTP 500" if fault == "error_500" else "submit to Replicate failed") in message
        _adopted_by_lookup(events, job.request_id)
        await _succeeds_once(manager, server, job, arguments)


async def test_a_429_on_create_is_sent_again_because_nothing_was_made(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    server.fake.update_config({"rate_limit_no_header_rate": 0.5, "fault_kinds": ["create"]})
    settings = rp.settings(sqlite_migrated_url, server)
    retry = RetryPolicy(attempts=10, base=0.05, cap=0.4, max_retry_after=0.05)
    async with rp.open_manager(settings, retry=retry, poll_policy=rp.FAST_POLLS) as manager:
        sent = []
        for i in range(6):
            arguments = {"prompt": f"throttled {i}"}
            job = await manager.submit(rp.APP, arguments, provider="replicate")
            kinds = [kind for kind, _ in _kinds(await manager.events(job.id))]
            assert "submit_ambiguous" not in kinds and job.state is State.QUEUED
            sent.append((job, arguments))
        await asyncio.gather(*(_succeeds_once(manager, server, j, a) for j, a in sent))
    assert server.stats.responses_429 > 0, "no 429 was drawn: nothing was checked"


# --- after a crash: the resolver ------------------------------------------------------------


def _crashed_mid_send(manager: AsyncJobManager, arguments: dict[str, Any], webhook: bool) -> Job:
    """A job as a SIGKILL between the create and its reply leaves it: recorded, its first
    attempt counted, no request id."""
    new = NewJob(application=rp.APP, arguments=arguments, provider="replicate", webhook=webhook)
    job, _ = manager.store.create_job(new)
    assert manager.store.begin_submit(job.id, 0)
    return manager.store.get(job.id)


def _create_behind_our_back(server: FakeReplicateServer, job: Job, webhook_to: str | None) -> str:
    """The create the killed process had sent: it reached Replicate."""
    body: dict[str, Any] = {"input": job.arguments}
    if webhook_to is not None:
        body["webhook"] = f"{webhook_to}/v1/webhooks/replicate?job={job.id}&attempt=1"
        body["webhook_events_filter"] = ["completed"]
    response = httpx.post(
        f"{server.url}/v1/models/{rp.APP}/predictions",
        json=body,
        headers={"Authorization": f"Bearer {rp.TOKEN}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    prediction_id: str = response.json()["id"]
    return prediction_id


@pytest.mark.parametrize("webhooks", [False, True], ids=["polling", "webhooks"])
async def test_the_resolver_adopts_what_a_killed_sender_created(
    sqlite_migrated_url: str, server: FakeReplicateServer, webhooks: bool
) -> None:
    # Long enough that the resolver runs before the completed webhook could name the job.
    arguments = {"prompt": "sent, then the sender died", "_fake": {"duration": 1.0}}
    async with _manager(sqlite_migrated_url, server, webhooks) as manager:
        job = _crashed_mid_send(manager, arguments, webhooks)
        public = manager.settings.public_url
        prediction = _create_behind_our_back(server, job, public if webhooks else None)
        decided = await Poller(manager, ambiguous_grace=0).resolve_ambiguous()
        assert decided == 1
        adopted = await manager.status(job.id)
        assert adopted.request_id == prediction and adopted.attempts == 1
        events = await manager.events(job.id)
        _adopted_by_lookup(events, prediction)
        # Only the killed process's send: the resolver sent nothing.
        assert [e["detail"] for e in events if e["kind"] == "submit_sent"] == [{"attempt": 1}]
        await _succeeds_once(manager, server, adopted, arguments)


async def test_the_resolver_sends_what_provably_never_arrived(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    arguments = {"prompt": "counted, then the sender died before the bytes left"}
    async with _manager(sqlite_migrated_url, server, False) as manager:
        job = _crashed_mid_send(manager, arguments, False)
        assert await Poller(manager, ambiguous_grace=0).resolve_ambiguous() == 1
        events = await manager.events(job.id)
        assert ("ambiguous_resolved", "not created") in _kinds(events)
        assert ("submit_sent", "not created") in _kinds(events)
        await _succeeds_once(manager, server, await manager.status(job.id), arguments)


async def test_when_nobody_can_tell_policy_fail_never_sends_twice(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    arguments = {"prompt": "made, but the listing is down"}
    async with _manager(sqlite_migrated_url, server, False, ambiguous_policy="fail") as manager:
        job = _crashed_mid_send(manager, arguments, False)
        _create_behind_our_back(server, job, None)
        server.fake.update_config({"error_500_rate": 1.0, "fault_kinds": ["list"]})
        assert await Poller(manager, ambiguous_grace=0).resolve_ambiguous() == 1
        failed = await manager.status(job.id)
        assert failed.state is State.FAILED and failed.failure_reason == "ambiguous_submit"
        kinds = _kinds(await manager.events(job.id))
        assert ("ambiguous_lookup", "unknown") in kinds
        assert ("state", "ambiguous_submit") in kinds
        assert _creates(server, arguments) == 1


async def test_a_late_line_of_a_large_batch_is_still_found(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    # A listing reads a bounded number of pages (here one: 100 predictions). A job recorded
    # with a large batch is sent long after it was recorded; its lookup must start from
    # its own send, not from when the batch was recorded, or every prediction made for the
    # earlier lines hides it ("more than 1 pages") and it is sent again.
    settings = rp.settings(sqlite_migrated_url, server)
    lister = rp.provider(settings)
    # One page per listing, and a clock-skew margin of a fraction of a second, so the test
    # needs 101 predictions, not Replicate's real 60 s of them.
    lister.list_pages, lister.list_skew = 1, 0.5
    manager = AsyncJobManager(settings, providers={"replicate": lister})
    try:
        lines = [{"prompt": f"line {i}"} for i in range(120)]
        last = lines.pop()
        # Recorded first (with the batch), sent last.
        job, _ = manager.store.create_job(
            NewJob(application=rp.APP, arguments=last, provider="replicate")
        )
        report = await submit_batch(
            manager,
            rp.APP,
            read_lines(json.dumps(x) for x in lines),
            batch="big",
            concurrency=8,
            options=SubmitOptions(provider="replicate"),
        )
        assert report.ok, report.summary()
        await asyncio.sleep(2 * lister.list_skew)  # the batch is over before the send
        server.fake.update_config({"error_500_rate": 1.0, "fault_kinds": ["create"]})
        sent = await manager.send(manager.store.get(job.id))
        server.fake.update_config({"error_500_rate": 0.0})
        _adopted_by_lookup(await manager.events(sent.id), sent.request_id)
        await _succeeds_once(manager, server, sent, last)
    finally:
        await manager.aclose()
        manager.store.close()


async def test_an_ambiguous_create_at_the_full_create_rate_is_still_found(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    # Replicate allows 600 creates a minute: the 60 s clock-skew margin of a lookup alone
    # then holds 600 predictions, 6 pages of 100. Scaled down tenfold (pages of 10), the
    # default lookup must still read through 65 predictions made a moment before the send.
    server.fake.update_config({"page_size": 10})
    settings = rp.settings(sqlite_migrated_url, server)
    async with rp.open_manager(settings) as manager:
        lines = read_lines(json.dumps({"prompt": f"busy {i}"}) for i in range(65))
        options = SubmitOptions(provider="replicate")
        report = await submit_batch(manager, rp.APP, lines, batch="busy", options=options)
        assert report.ok, report.summary()
        server.fake.update_config({"error_500_rate": 1.0, "fault_kinds": ["create"]})
        arguments = {"prompt": "made while the account was busy"}
        job = await manager.submit(rp.APP, arguments, provider="replicate")
        server.fake.update_config({"error_500_rate": 0.0})
        _adopted_by_lookup(await manager.events(job.id), job.request_id)
        await _succeeds_once(manager, server, job, arguments)


def test_jobsctl_show_lists_every_decision(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    server.fake.update_config({"drop_rate": 1.0, "fault_kinds": ["create"]})
    env = rp.env(sqlite_migrated_url, server)
    submit = [sys.executable, "-m", "jobs", "submit", rp.APP, "--provider", "replicate"]
    done = subprocess.run(
        [*submit, "--input", '{"prompt": "shown"}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["request_id"] and job["state"] == "queued"
    shown = subprocess.run(
        [sys.executable, "-m", "jobs", "show", job["id"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    kinds = [(e["kind"], e["reason"]) for e in json.loads(shown.stdout)["events"]]
    assert kinds[:4] == [
        ("created", None),
        ("submit_sent", "submit"),
        ("submit_ambiguous", "ProviderUnavailable"),
        ("ambiguous_resolved", "lookup"),
    ]
    assert server.stats.creates == 1


def test_the_emulator_refuses_a_fault_kind_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="unknown request kind"):
        rp.config(fault_kinds=["creates"])
    cfg = rp.config()
    with pytest.raises(ValueError, match="unknown request kind"):
        cfg.update({"fault_kinds": ["get", "poll"]})
    assert cfg.fault_kinds == []


async def test_a_twin_input_is_never_adopted_from_another_job(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    # Two jobs with the same input (the same prompt asked twice: two images wanted). The
    # first went in; the second's sender died before its bytes left. The listing shows one
    # prediction with that input, but it is the first job's: the second must be sent, not
    # handed the first one's prediction.
    arguments = {"prompt": "asked twice"}
    async with _manager(sqlite_migrated_url, server, False) as manager:
        first = await manager.submit(rp.APP, arguments, provider="replicate")
        second = _crashed_mid_send(manager, arguments, False)
        assert await Poller(manager, ambiguous_grace=0).resolve_ambiguous() == 1
        after = await manager.status(second.id)
        assert after.request_id is not None and after.request_id != first.request_id
        assert _creates(server, arguments) == 2
        kinds = _kinds(await manager.events(second.id))
        assert ("ambiguous_resolved", "lookup") not in kinds, kinds


@pytest.mark.parametrize("webhooks", [False, True], ids=["polling", "webhooks-lost"])
async def test_a_cancelled_prediction_reads_cancelled_promptly(
    sqlite_migrated_url: str, server: FakeReplicateServer, webhooks: bool
) -> None:
    # The twin of test_submit_settling's cancel: the webhook of the cancel is lost, so only
    # the poll the cancel makes due can confirm it.
    server.fake.update_config({"webhook_loss_rate": 1.0})
    async with _manager(sqlite_migrated_url, server, webhooks) as manager:
        arguments = {"prompt": "stop me", "_fake": {"duration": 60}}
        job = await manager.submit(rp.APP, arguments, provider="replicate")
        assert job.webhook is webhooks
        cancelled = await manager.cancel(job.id, wait=10)
        assert cancelled.state is State.CANCELLED, (cancelled.state, cancelled.error)
        prediction = server.fake.get_prediction(job.request_id or "")
        assert prediction is not None
        assert server.fake.prediction_json(prediction)["status"] == "canceled"
        assert server.stats.cancels == 1


async def test_a_cancel_after_deadline_before_the_start_ends_the_job_not_billed(
    sqlite_migrated_url: str, server: FakeReplicateServer
) -> None:
    async with _manager(sqlite_migrated_url, server, False) as manager:
        arguments = {"prompt": "cold start", "_fake": {"queue_time": 600}}
        job = await manager.submit(rp.APP, arguments, provider="replicate", cancel_after=30)
        rp.advance(server, 31)  # the deadline passes while it is still starting
        done = await manager.wait(job.id, timeout=10)
        assert done.state is State.CANCELLED and done.failure_reason == "timeout"
        assert done.error is not None and "not billed" in done.error["message"]
        assert _creates(server, arguments) == 1
