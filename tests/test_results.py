"""Results and result files: a result is stored once and read from the store; a failure keeps
its error; files are found, downloaded into the content-addressed cache, checked, refused,
capped, retried, copied out, and collected by gc."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.managers import local_settings, open_manager

from jobs import AsyncJobManager, JobFailed, State
from jobs.backoff import PollPolicy
from jobs.durations import parse_duration
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.results import (
    DownloadError,
    FileCache,
    cache_path,
    check_url,
    collect_garbage,
    find_files,
    safe_name,
    unique_name,
)
from jobs.store import Job, JobFile, NewJob, Store
from jobs.testing import FakeFalConfig, FakeFalServer, expected_file_bytes

APP = "fal-ai/flux/dev"
FAST = PollPolicy(initial=0.05, ceiling=0.2)


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.1, queue_time=0.02, seed=3)) as server:
        yield server


@pytest.fixture
async def jm(tmp_path: Path, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    settings = local_settings(tmp_path, fal.url, cache_dir=str(tmp_path / "cache"))
    async with open_manager(settings, poll_policy=FAST) as manager:
        yield manager


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _succeeded(store: Store, result: Any, *, key: str | None = None) -> Job:
    """A job that finished with ``result`` (without a remote queue)."""
    job, _ = store.create_job(
        NewJob(application=APP, arguments={}, idempotency_key=key, download_files=True)
    )
    store.begin_submit(job.id, 0)
    ref = RemoteRef(application=APP, request_id=f"req-{job.id}")
    store.mark_submitted(
        job.id, Submitted(ref=ref, observation=Observation(State.QUEUED)), next_poll_at=0
    )
    return store.apply(job.id, Observation(State.SUCCEEDED, result=result)).job


def _image(url: str, name: str | None = "out.png") -> dict[str, Any]:
    return {"url": url, "content_type": "image/png", "file_name": name}


# --- pure parts --------------------------------------------------------------------------


def test_find_files_walks_the_whole_result_in_order() -> None:
    result = {
        "images": [_image("https://cdn/a.png"), _image("https://cdn/b.png")],
        "video": {"url": "https://cdn/v.mp4", "file_size": 10},
        "nested": {"odd key": [{"url": "https://cdn/c.bin", "content_type": "x/y"}]},
        "seed": 7,
        "link": {"url": "https://example.com"},  # a url alone is not a fal File
    }
    found = find_files(result, "fal")
    assert [(f.n, f.url, f.json_path) for f in found] == [
        (0, "https://cdn/a.png", "$.images[0]"),
        (1, "https://cdn/b.png", "$.images[1]"),
        (2, "https://cdn/v.mp4", "$.video"),
        (3, "https://cdn/c.bin", '$.nested["odd key"][0]'),
    ]
    assert found[0].file_name == "out.png" and found[0].content_type == "image/png"
    assert find_files(None, "fal") == [] and find_files([1, "x"], "fal") == []


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "/etc/passwd", "data:image/png;base64,AAAA", "ftp://h/x", "http:"]
)
def test_only_http_urls_may_be_fetched(url: str) -> None:
    with pytest.raises(DownloadError, match="refused"):
        check_url(url)


def test_http_urls_pass() -> None:
    assert check_url("https://v3.fal.media/files/x/out.png").host == "v3.fal.media"
    assert check_url("http://127.0.0.1:9/a").port == 9


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("1d12h", 129600),
        ("90s", 90),
        ("90", 90),
        ("2.5", 2.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "1d 2q", "-5", "nan", "inf"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def _row(name: str | None, url: str = "https://cdn/x/y", ctype: str | None = None) -> JobFile:
    return JobFile("j1", 0, url, "$", name, ctype, 1, "ab", "downloaded", None, 0.0)


def test_file_names_stay_inside_the_folder_and_are_unique() -> None:
    assert safe_name(_row("../../etc/passwd")) == "passwd"
    assert safe_name(_row("a\\b\\c.png")) == "c.png"
    assert safe_name(_row(None, "https://cdn/files/z/out.webp")) == "out.webp"
    assert safe_name(_row("..", "https://cdn/", "image/png")) == "j1-0.png"
    taken: set[str] = set()
    assert [unique_name(n, taken) for n in ("a.png", "A.png", "a.png", "b")] == [
        "a.png",
        "A-2.png",
        "a-3.png",
        "b",
    ]


# --- results, once ------------------------------------------------------------------------


async def test_a_result_is_fetched_once_and_then_read_from_the_store(
    jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    job = await jm.submit(APP, {"prompt": "once"})
    first = await jm.result(job.id, wait=True, timeout=20)
    for _ in range(3):
        assert await jm.result(job.id) == first
    assert job.request_id is not None
    assert fal.fake.stats.requests[job.request_id].result_fetches == 1
    # A late duplicate (a webhook after the poll) changes nothing: the result is stored once.
    done = await jm.status(job.id)
    late = await jm.apply(done, Observation(State.SUCCEEDED, result={"other": 1}))
    assert not late.changed and await jm.result(job.id) == first


async def test_a_failed_job_keeps_its_error(jm: AsyncJobManager) -> None:
    job = await jm.submit(APP, {"_fake": {"fail": 504}})
    with pytest.raises(JobFailed) as caught:
        await jm.result(job.id, wait=True, timeout=20)
    failed = await jm.status(job.id)
    assert failed.state is State.FAILED and failed.failure_reason == "remote_error"
    error = failed.error
    assert error["type"] == "request_timeout" and error["message"] == "Request timed out"
    assert error["detail"] == {"detail": "Request timed out", "error_type": "request_timeout"}
    assert error["status_code"] == 504 and error["request_id"] == job.request_id
    assert caught.value.error == error


# --- downloads against the emulator ------------------------------------------------------


async def test_download_files_of_a_finished_job(
    jm: AsyncJobManager, fal: FakeFalServer, tmp_path: Path
) -> None:
    job = await jm.submit(APP, {"prompt": "three", "num_images": 3}, download=True)
    await jm.result(job.id, wait=True, timeout=20)
    await jm.files.drain()  # the poll scheduled the downloads in the background
    files = jm.store.files(job.id)
    assert [f.state for f in files] == ["downloaded"] * 3
    assert job.request_id is not None
    for f in files:
        expected = expected_file_bytes(job.request_id, f.n, fal.config.file_size)
        assert f.sha256 == _sha(expected) and f.size == len(expected)
        assert f.json_path == f"$.images[{f.n}]" and f.content_type == "image/png"
        path = cache_path(tmp_path / "cache", _sha(expected))
        assert path.read_bytes() == expected
    assert fal.fake.stats.file_downloads == 3
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    # Fetching again downloads nothing.
    await jm.files.fetch(job.id)
    assert fal.fake.stats.file_downloads == 3


async def test_jobs_that_did_not_ask_download_nothing(
    jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    job = await jm.submit(APP, {"prompt": "no files"})
    await jm.result(job.id, wait=True, timeout=20)
    await jm.files.drain()
    assert jm.store.files(job.id) == [] and fal.fake.stats.file_downloads == 0


async def test_failures_are_recorded_not_skipped(
    jm: AsyncJobManager, fal: FakeFalServer, tmp_path: Path
) -> None:
    good = f"{fal.url}/_fake/files/some-request/0.png"
    result = {
        "images": [
            _image(good),
            _image(f"{fal.url}/_fake/files/some-request/missing.png"),  # the emulator 404s
            _image("file:///etc/passwd"),
            _image("/etc/passwd"),
        ]
    }
    job = await jm.store.aio.run(_succeeded, jm.store, result)
    files = await jm.files.fetch(job.id)
    assert [f.state for f in files] == ["downloaded", "failed", "failed", "failed"]
    assert files[1].error == "HTTP 404 Not Found"
    assert "refused" in (files[2].error or "") and "file: URL" in (files[2].error or "")
    assert "local path" in (files[3].error or "")
    assert fal.fake.stats.file_downloads == 1  # nothing was requested for the refused ones
    # The 404 is final, not retried, and a later fetch only retries failures when asked.
    await jm.files.fetch(job.id)
    assert [f.state for f in jm.store.files(job.id)][1] == "failed"


async def test_a_file_over_the_cap_fails_and_leaves_nothing(
    jm: AsyncJobManager, fal: FakeFalServer, tmp_path: Path
) -> None:
    cache = FileCache(jm.store, tmp_path / "cache", max_bytes=1000, allow_hosts=["127.0.0.1"])
    try:
        job = await jm.store.aio.run(
            _succeeded, jm.store, {"image": _image(f"{fal.url}/_fake/files/r/0.png")}
        )
        [row] = await cache.fetch(job.id)
    finally:
        await cache.aclose()
    assert row.state == "failed" and row.sha256 is None
    assert "too large: 2048 bytes, the cap is 1000 bytes" in (row.error or "")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# --- downloads against a mock transport ---------------------------------------------------


def _cache(store: Store, root: Path, handler: Any, **options: Any) -> FileCache:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return FileCache(store, root, client=client, **options)


async def _fetch_one(cache: FileCache, url: str) -> JobFile:
    job = _succeeded(cache.store, {"file": _image(url)})
    try:
        [row] = await cache.fetch(job.id)
    finally:
        await cache.aclose()
    return row


@pytest.fixture
def store(sqlite_migrated_url: str) -> Iterator[Store]:
    s = Store.open(sqlite_migrated_url)
    yield s
    s.close()


async def test_a_stream_over_the_cap_is_cut_off(store: Store, tmp_path: Path) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no content-length: found out while reading
        for _ in range(10):
            yield b"x" * 400

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    root = tmp_path / "cache"
    row = await _fetch_one(_cache(store, root, handler, max_bytes=1000), "https://cdn/f")
    assert row.state == "failed" and (row.error or "").startswith("too large: more")
    assert not [p for p in root.rglob("*") if p.is_file()]


async def test_a_redirect_to_a_local_file_is_refused(store: Store, tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path == "/start":
            return httpx.Response(302, headers={"location": "/next"})
        return httpx.Response(302, headers={"location": "file:///etc/passwd"})

    row = await _fetch_one(_cache(store, tmp_path, handler), "https://cdn/start")
    assert row.state == "failed" and "refused" in (row.error or "")
    assert seen == ["https://cdn/start", "https://cdn/next"]


async def test_redirects_and_transient_errors_are_followed(store: Store, tmp_path: Path) -> None:
    body = b"\x89PNG" + bytes(range(200))
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/a":
            return httpx.Response(301, headers={"location": "https://other.cdn/b"})
        if len(calls) == 2:
            return httpx.Response(503, headers={"retry-after": "0"})
        assert "authorization" not in request.headers  # no credentials go to file hosts
        return httpx.Response(200, content=body, headers={"content-type": "image/png"})

    cache = _cache(store, tmp_path, handler, attempts=3)
    row = await _fetch_one(cache, "https://cdn/a")
    assert row.state == "downloaded" and row.sha256 == _sha(body) and row.size == len(body)
    assert calls == ["/a", "/b", "/a", "/b"]  # a 503, a pause, then the whole chain again
    assert cache_path(tmp_path, _sha(body)).read_bytes() == body


async def test_transient_errors_give_up_after_the_attempts(store: Store, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no route", request=request)

    row = await _fetch_one(_cache(store, tmp_path, handler, attempts=2), "https://cdn/x")
    assert row.state == "failed"
    assert row.error == "ConnectError: no route (gave up after 2 attempts)"


async def test_a_download_is_bounded_in_time(store: Store, tmp_path: Path) -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield b"start"
        await asyncio.sleep(5)
        yield b"never"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=slow())

    started = time.monotonic()
    root = tmp_path / "cache"
    row = await _fetch_one(_cache(store, root, handler, timeout=0.2), "https://cdn/slow")
    assert time.monotonic() - started < 3
    assert row.state == "failed" and row.error == "not finished within 0.2 s"
    assert not [p for p in root.rglob("*") if p.is_file()]


async def test_a_file_removed_from_disk_is_fetched_again(store: Store, tmp_path: Path) -> None:
    body = b"same bytes"
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        return httpx.Response(200, content=body)

    job = _succeeded(store, {"f": _image("https://cdn/f")})
    cache = _cache(store, tmp_path, handler)
    try:
        await cache.fetch(job.id)
        cache_path(tmp_path, _sha(body)).unlink()
        [row] = await cache.fetch(job.id)
    finally:
        await cache.aclose()
    assert count == 2 and cache.cached(row) is not None


# --- copying out and gc ---------------------------------------------------------------------


async def test_save_copies_files_under_unique_names(store: Store, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=request.url.path.encode())

    result = {
        "images": [_image("https://cdn/1"), _image("https://cdn/2"), _image("https://cdn/3", None)]
    }
    job = _succeeded(store, result)
    cache = _cache(store, tmp_path / "cache", handler)
    try:
        saved = await cache.save(job.id, tmp_path / "out")
    finally:
        await cache.aclose()
    assert [s.name for s in saved] == ["out.png", "out-2.png", "3.png"]
    assert (tmp_path / "out" / "out-2.png").read_bytes() == b"/2"
    assert saved[0].to_dict("files/")["path"] == "files/out.png"


async def test_gc_removes_results_and_files_keeps_jobs_and_events(
    jm: AsyncJobManager, fal: FakeFalServer, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    one = await jm.submit(APP, {"prompt": "one", "num_images": 1}, download=True)
    two = await jm.submit(APP, {"prompt": "two", "num_images": 2}, download=True)
    failed = await jm.submit(APP, {"_fake": {"fail": 500}})
    for job in (one, two, failed):
        await jm.wait(job.id, timeout=20)
    await jm.files.drain()
    cutoff = time.time()
    newer = await jm.submit(APP, {"prompt": "newer"}, download=True)
    await jm.result(newer.id, wait=True, timeout=20)
    await jm.files.drain()
    # Identical bytes are cached once: make newer's file the same as two's first one.
    shared = jm.store.files(two.id)[0]
    jm.store.set_file(newer.id, 0, state="downloaded", sha256=shared.sha256, size=shared.size)
    assert len([p for p in root.rglob("*") if p.is_file()]) == 4
    events_before = {j.id: len(jm.store.events(j.id)) for j in (one, two)}

    report = await jm.store.aio.run(collect_garbage, jm.store, root, cutoff)

    # The failed job had nothing stored but its error, which is part of the job row.
    assert (report.jobs, report.results, report.file_rows) == (2, 2, 3)
    # one's file and two's second file went; two's first stays, newer's row names it.
    assert report.files == 2 and report.file_bytes == 2 * fal.config.file_size
    assert report.to_dict()["bytes"] == report.result_bytes + report.file_bytes > 0
    left = {p.name for p in root.rglob("*") if p.is_file()}
    assert shared.sha256 in left and len(left) == 2  # plus newer's own, untouched
    for job in (one, two):
        events = jm.store.events(job.id)
        assert len(events) == events_before[job.id] + 1
        assert events[-1]["kind"] == "gc" and events[-1]["detail"]["cutoff"]
        assert jm.store.files(job.id) == []
    assert (await jm.status(failed.id)).error["status_code"] == 500  # the job row stays whole
    with pytest.raises(JobFailed, match="removed by `jobs gc`"):
        await jm.result(two.id)
    assert await jm.result(newer.id)  # finished after the cutoff: untouched
    again = await jm.store.aio.run(collect_garbage, jm.store, root, cutoff)
    assert again.jobs == 0 and again.to_dict()["bytes"] == 0


# --- the store's part, on SQLite and PostgreSQL ---------------------------------------------


@pytest.fixture
def any_store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def test_file_rows_are_recorded_once_and_updated(any_store: Store) -> None:
    job = _succeeded(any_store, {"a": _image("https://cdn/a"), "b": _image("https://cdn/b")})
    found = find_files({"a": _image("https://cdn/a"), "b": _image("https://cdn/b")}, "fal")
    rows = any_store.add_files(job.id, found)
    assert [(f.n, f.state, f.json_path) for f in rows] == [
        (0, "pending", "$.a"),
        (1, "pending", "$.b"),
    ]
    assert any_store.add_files(job.id, found) == rows  # a second call changes nothing
    any_store.set_file(job.id, 0, state="downloaded", sha256="ab" * 32, size=5, content_type="x/y")
    any_store.set_file(job.id, 1, state="failed", error="HTTP 404 Not Found")
    first, second = any_store.files(job.id)
    assert (first.state, first.sha256, first.size) == ("downloaded", "ab" * 32, 5)
    assert first.content_type == "image/png"  # the result's type wins over the response's
    assert (second.state, second.error) == ("failed", "HTTP 404 Not Found")
    assert any_store.files_of([job.id, "unknown"]) == {job.id: [first, second]}
    assert any_store.referenced_sha256(["ab" * 32, "cd" * 32]) == {"ab" * 32}


def test_gc_batch_takes_only_old_finished_jobs_in_slices(any_store: Store) -> None:
    jobs = [_succeeded(any_store, {"n": i}) for i in range(5)]
    any_store.add_files(jobs[0].id, find_files({"f": _image("https://cdn/f")}, "fal"))
    cutoff = time.time() + 1
    later = _succeeded(any_store, {"n": "later"})
    first = any_store.gc_batch(cutoff, limit=3)
    second = any_store.gc_batch(cutoff, limit=3)
    assert len(first.job_ids) == 3 and len(second.job_ids) == 3  # "later" is included too...
    assert any_store.gc_batch(cutoff, limit=3).job_ids == []
    assert first.results + second.results == 6 and len(first.files + second.files) == 1
    young = _succeeded(any_store, {"n": "young"})
    assert any_store.gc_batch(time.time() - 60).job_ids == []  # ...but not a job this young
    assert any_store.results_of([j.id for j in (*jobs, later, young)]) == {young.id: {"n": "young"}}
    assert [e["kind"] for e in any_store.events(jobs[0].id)][-1] == "gc"


# --- over HTTP ------------------------------------------------------------------------------


async def test_files_are_served_over_http(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    from jobs.web import create_app

    good = f"{fal.url}/_fake/files/web/0.png"
    result = {"images": [_image(good, "pic.png"), _image(f"{fal.url}/_fake/files/web/x.png")]}
    job = await jm.store.aio.run(_succeeded, jm.store, result)
    app = create_app(jm, settings=jm.settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        pending = await client.get(f"/v1/jobs/{job.id}/files/0")
        assert pending.status_code == 404  # nothing recorded yet: not asked to download
        await jm.store.aio.run(jm.store.add_files, job.id, find_files(result, "fal"))
        pending = await client.get(f"/v1/jobs/{job.id}/files/0")
        assert pending.status_code == 409 and pending.json()["error"]["type"] == "not_ready"
        await jm.files.fetch(job.id)
        served = await client.get(f"/v1/jobs/{job.request_id}/files/0")
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.content == expected_file_bytes("web", 0, fal.config.file_size)
        assert 'filename="pic.png"' in served.headers["content-disposition"]
        failed = await client.get(f"/v1/jobs/{job.id}/files/1")
        assert failed.status_code == 404 and failed.json()["error"]["type"] == "file_unavailable"
        assert "HTTP 404" in failed.json()["error"]["message"]
        assert (await client.get(f"/v1/jobs/{job.id}/files/7")).status_code == 404
        assert (await client.get(f"/v1/jobs/{job.id}/files/x")).status_code == 404
        assert (await client.get("/v1/jobs/nope/files/0")).status_code == 404


def test_replicate_output_urls_are_its_files() -> None:
    """Replicate gives output files as plain URLs (kept one hour): each is a file to cache;
    other strings are not, and fal's File objects mean nothing there."""
    output = {"images": ["https://replicate.delivery/a.png", "not a url"], "n": 2}
    found = find_files(output, "replicate")
    assert [(f.url, f.json_path) for f in found] == [
        ("https://replicate.delivery/a.png", "$.images[0]")
    ]
    assert [f.url for f in find_files(["http://x/1.webp", "https://x/2.webp"], "replicate")] == [
        "http://x/1.webp",
        "https://x/2.webp",
    ]
    nested = find_files({"url": "https://a/b.png", "content_type": "image/png"}, "replicate")
    assert [(f.json_path, f.content_type) for f in nested] == [("$.url", None)]
    assert find_files("https://a/b.png", "fal") == []
