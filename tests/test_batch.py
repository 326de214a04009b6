"""Batches in-process against the emulator: reading JSONL, stable idempotency keys, submitting
(bad lines, re-runs, partial runs, never-sent jobs), waiting with progress, exporting."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.managers import local_settings, open_manager

from jobs import AsyncJobManager, State
from jobs.backoff import PollPolicy
from jobs.batch import (
    Line,
    LineResult,
    default_batch_name,
    export_batch,
    idempotency_key,
    read_lines,
    submit_batch,
    wait_batch,
)
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.records import SubmitOptions
from jobs.store import NewJob, Store
from jobs.testing import FakeFalConfig, FakeFalServer, expected_file_bytes, input_hash

APP = "fal-ai/flux/dev"


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.1, queue_time=0.02, seed=5)) as server:
        yield server


@pytest.fixture
async def jm(tmp_path: Path, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    settings = local_settings(tmp_path, fal.url, cache_dir=str(tmp_path / "cache"))
    async with open_manager(settings, poll_policy=PollPolicy(initial=0.05, ceiling=0.2)) as m:
        yield m


def _lines(n: int, **extra: Any) -> list[Line]:
    return read_lines(json.dumps({"prompt": f"p{i}", **extra}) for i in range(n))


# --- reading and keys ---------------------------------------------------------------------


def test_read_lines_numbers_lines_and_names_bad_ones() -> None:
    text = ['{"prompt": "a"}', "", "  ", "{not json", "[1, 2]", '{"prompt": "b"}', "7"]
    lines = read_lines(text)
    assert [(x.number, x.error is None) for x in lines] == [
        (1, True),
        (4, False),
        (5, False),
        (6, True),
        (7, False),
    ]
    assert lines[1].error is not None and lines[1].error.startswith("invalid JSON")
    assert lines[2].error == "must be a JSON object (the input), not list"
    assert lines[4].error == "must be a JSON object (the input), not int"
    assert lines[3].arguments == {"prompt": "b"}


def test_keys_are_stable_and_follow_batch_line_and_content() -> None:
    key = idempotency_key("b", 3, {"x": 1, "y": [1, 2]})
    assert key == idempotency_key("b", 3, {"y": [1, 2], "x": 1})  # key order is no change
    assert key.startswith("batch:b:3:")
    assert key != idempotency_key("b", 4, {"x": 1, "y": [1, 2]})
    assert key != idempotency_key("c", 3, {"x": 1, "y": [1, 2]})
    assert key != idempotency_key("b", 3, {"x": 2, "y": [1, 2]})
    long = idempotency_key("n" * 300, 1, {})
    assert len(long) <= 255 and long == idempotency_key("n" * 300, 1, {})


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("in/prompts.jsonl", "prompts"),
        ("x.ndjson", "x"),
        ("data.v2.JSONL", "data.v2"),
        ("raw", "raw"),
    ],
)
def test_default_batch_name(path: str, name: str) -> None:
    assert default_batch_name(path) == name


# --- submitting ---------------------------------------------------------------------------


async def test_bad_lines_are_reported_and_the_rest_submitted(
    jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    lines = read_lines(['{"prompt": "a"}', "oops", '{"prompt": "b"}', '"text"', '{"prompt": "c"}'])
    seen: list[LineResult] = []
    report = await submit_batch(jm, APP, lines, batch="b1", on_result=seen.append)
    assert not report.ok and sorted(report.failed_lines) == [2, 4]
    assert report.counts == {"invalid": 2, "submitted": 3}
    errors = sorted(r.error or "" for r in seen if r.outcome == "invalid")
    assert errors[0].startswith("line 2: invalid JSON") and errors[1].startswith("line 4: must")
    assert fal.fake.stats.submits == 3
    jobs = jm.store.batch_jobs("b1")
    assert [(j.batch_index, j.arguments["prompt"]) for j in jobs] == [(1, "a"), (3, "b"), (5, "c")]
    assert "not submitted: line(s) 2, 4" in report.summary()


async def test_a_rerun_submits_nothing(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    lines = _lines(20)
    first = await submit_batch(jm, APP, lines, batch="again", concurrency=8)
    assert first.ok and first.counts == {"submitted": 20}
    second = await submit_batch(jm, APP, lines, batch="again", concurrency=8)
    assert second.ok and second.counts == {"existing": 20}
    assert fal.fake.stats.submits == 20 and not fal.fake.stats.duplicate_inputs()
    assert len(jm.store.batch_jobs("again")) == 20


async def test_a_batch_has_at_most_concurrency_submits_at_the_provider(
    jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    """``--concurrency`` bounds the submits on the wire; the senders (more of them, so
    their writes overlap other submits) never exceed it."""
    fal.config.latency = 0.05
    provider = jm.provider("fal")
    sending = most = 0
    submit = provider.submit

    async def counted(request: Any) -> Any:
        nonlocal sending, most
        sending += 1
        most = max(most, sending)
        try:
            return await submit(request)
        finally:
            sending -= 1

    provider.submit = counted  # type: ignore[method-assign]
    report = await submit_batch(jm, APP, _lines(40), batch="wire", concurrency=4)
    assert report.ok and report.counts == {"submitted": 40}
    assert 1 <= most <= 4
    assert fal.fake.stats.submits == 40


async def test_a_rerun_after_a_partial_run_sends_only_the_rest(
    jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    lines = _lines(30)
    # The first run got through half of the file, then died: one job was even recorded but
    # never sent (the process stopped between the insert and the send).
    await submit_batch(jm, APP, lines[:15], batch="half")
    never_sent = lines[15]
    assert never_sent.arguments is not None
    key = idempotency_key("half", never_sent.number, never_sent.arguments)
    new = NewJob(application=APP, arguments=never_sent.arguments, idempotency_key=key)
    recorded, _ = jm.store.create_job(new)
    assert recorded.state is State.SUBMITTING and recorded.attempts == 0

    report = await submit_batch(jm, APP, lines, batch="half")
    assert report.ok and report.counts == {"existing": 15, "submitted": 15}
    assert fal.fake.stats.submits == 30
    assert sorted(fal.fake.stats.submits_by_input.values()) == [1] * 30
    assert (await jm.status(recorded.id)).state is State.QUEUED
    for line in lines:
        assert fal.fake.stats.submits_by_input[input_hash(line.arguments)] == 1


async def test_rejected_lines_fail_the_run(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    lines = read_lines(['{"prompt": "fine"}', '{"_fake": "not an object"}'])  # the queue says 422
    report = await submit_batch(jm, APP, lines, batch="rej")
    assert report.counts == {"submitted": 1, "failed": 1} and report.failed_lines == [2]


# --- waiting ------------------------------------------------------------------------------


async def test_wait_drives_the_batch_to_the_end(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    await submit_batch(jm, APP, _lines(12), batch="w")
    progress: list[dict[State, int]] = []
    outcome = await wait_batch(jm, batch="w", timeout=30, on_progress=progress.append)
    assert outcome.all_succeeded and not outcome.timed_out and outcome.total == 12
    assert progress[0][State.QUEUED] > 0 and progress[-1][State.SUCCEEDED] == 12
    assert fal.fake.stats.result_fetches == 12


async def test_wait_reports_failures_and_timeouts(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    lines = read_lines(['{"p": 1}', '{"p": 2, "_fake": {"fail": 500}}'])
    await submit_batch(jm, APP, lines, batch="mixed")
    outcome = await wait_batch(jm, batch="mixed", timeout=30)
    assert not outcome.all_succeeded and outcome.counts[State.FAILED] == 1

    await submit_batch(jm, APP, read_lines(['{"_fake": {"duration": 60}}']), batch="slow")
    slow = await wait_batch(jm, batch="slow", timeout=0.5)
    assert slow.timed_out and slow.active == 1
    [job] = jm.store.batch_jobs("slow")
    assert job.lease_owner is None  # the waiter let go of what it held


async def test_wait_without_a_batch_watches_what_is_unfinished(
    jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    await submit_batch(jm, APP, read_lines(['{"_fake": {"fail": 500}}']), batch="old")
    assert (await wait_batch(jm, batch=None, timeout=30)).counts[State.FAILED] == 1
    # The old failure is no longer "matching": only what is unfinished when waiting starts.
    await submit_batch(jm, APP, _lines(3), batch="new")
    outcome = await wait_batch(jm, batch=None, timeout=30)
    assert outcome.all_succeeded and outcome.total == 3


# --- exporting ----------------------------------------------------------------------------


async def test_export_writes_one_folder_in_input_order(
    jm: AsyncJobManager, fal: FakeFalServer, tmp_path: Path
) -> None:
    text = [
        '{"prompt": "first", "num_images": 2}',
        "",
        '{"prompt": "second", "_fake": {"fail": 422}}',
        '{"prompt": "third"}',
    ]
    await submit_batch(jm, APP, read_lines(text), batch="ex", options=SubmitOptions(download=True))
    await wait_batch(jm, batch="ex", timeout=30)
    out = tmp_path / "out"
    report = await export_batch(jm, "ex", str(out))
    assert report.jobs == 3 and report.files == 3 and report.missing_files == 0
    assert report.states == {"succeeded": 2, "failed": 1}
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["batch_index"] for r in rows] == [1, 3, 4]
    first, second, third = rows
    assert first["state"] == "succeeded" and first["input"]["prompt"] == "first"
    assert first["result"]["prompt"] == "first" and len(first["files"]) == 2
    assert second["state"] == "failed" and second["error"]["status_code"] == 422
    assert "result" not in second and second["files"] == []
    assert third["result"]["prompt"] == "third"
    for row in (first, third):
        for f in row["files"]:
            data = (out / f["path"]).read_bytes()
            assert data == expected_file_bytes(row["request_id"], f["n"], fal.config.file_size)
            assert f["path"] == f"files/{row['request_id']}-{f['n']}.png"
    assert sorted(p.name for p in (out / "files").iterdir()) == sorted(
        f["path"].removeprefix("files/") for r in rows for f in r["files"]
    )
    # Exporting again gives the same folder.
    again = await export_batch(jm, "ex", str(out))
    assert again.to_dict() == report.to_dict()
    assert [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()] == rows


async def test_export_of_an_unknown_batch_writes_nothing(
    jm: AsyncJobManager, tmp_path: Path
) -> None:
    report = await export_batch(jm, "nope", str(tmp_path / "out"))
    assert report.jobs == 0 and not (tmp_path / "out").exists()


# --- the store's part, on SQLite and PostgreSQL ---------------------------------------------


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def test_create_jobs_records_many_in_one_go(store: Store) -> None:
    old, _ = store.create_job(NewJob(application=APP, arguments={"i": 0}, idempotency_key="k0"))
    news = [
        NewJob(
            application=APP, arguments={"i": i}, idempotency_key=f"k{i}", batch="b", batch_index=i
        )
        for i in range(4)
    ]
    news.append(NewJob(application=APP, arguments={"i": 3}, idempotency_key="k3"))  # a repeat
    news.append(NewJob(application=APP, arguments={"i": 9}))  # no key
    made = store.create_jobs(news)
    assert [created for _, created in made] == [False, True, True, True, False, True]
    assert made[0][0].id == old.id and made[4][0].id == made[3][0].id
    assert all(job.state is State.SUBMITTING and job.attempts == 0 for job, _ in made)
    assert [j.batch_index for j in store.batch_jobs("b")] == [1, 2, 3]
    assert [e["kind"] for e in store.events(made[1][0].id)] == ["created"]
    assert store.create_jobs(news[:4]) == [(job, False) for job, _ in made[:4]]


def test_claims_and_counts_for_one_batch(store: Store) -> None:
    made = store.create_jobs(
        [NewJob(application=APP, arguments={}, batch=b, batch_index=i) for i, b in enumerate("aab")]
    )
    for n, (job, _) in enumerate(made):
        store.begin_submit(job.id, 0)
        ref = RemoteRef(application=APP, request_id=f"r{n}")
        store.mark_submitted(
            job.id, Submitted(ref=ref, observation=Observation(State.QUEUED)), next_poll_at=0
        )
    claimed = store.claim_due("me", limit=10, lease_seconds=30, batch="a")
    assert sorted(c.job.batch_index or 0 for c in claimed) == [0, 1]
    assert store.count_by_state(batch="a")[State.QUEUED] == 2
    since = time.time()
    store.apply(made[2][0].id, Observation(State.FAILED, error={"message": "x"}))
    assert store.count_by_state(finished_since=since)[State.FAILED] == 1
    assert store.count_by_state(finished_since=time.time() + 1)[State.FAILED] == 0
