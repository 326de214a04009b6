"""The dashboard's pages and the read API over HTTP (no browser: tests/test_browser.py has
those): every page with jobs in every state, search, filters, pagination, escaping, login
with the session cookie, CSRF on the forms, and the figures the overview shows."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.managers import local_settings, open_manager
from support.seed import EVIL, Seeded, seed

from jobs.config import Secret
from jobs.manager import AsyncJobManager
from jobs.states import State
from jobs.store import short_id
from jobs.testing import FakeFalConfig, FakeFalServer
from jobs.web import create_app
from jobs.web.openapi import document
from jobs.web.session import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    SESSION_SECONDS,
    new_session,
    safe_next,
    valid_session,
)

TOKEN = "dashboard-token-do-not-leak-42"
FAL_KEY = "fal-key-dashboard-do-not-leak"
# Nothing here reaches a provider: cancels are of jobs never sent.
UNUSED_QUEUE = "http://127.0.0.1:9"
Site = tuple[httpx.AsyncClient, AsyncJobManager, Seeded]


@pytest.fixture
async def make_site(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await make_site(**settings)`` -> (client, manager, seeded jobs)."""
    opened: list[Any] = []

    async def make(queue_url: str = UNUSED_QUEUE, **extra: Any) -> Site:
        settings = local_settings(tmp_path, queue_url, fal_key=FAL_KEY, **extra)
        context = open_manager(settings)
        manager = await context.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(manager, settings=settings)),
            base_url="http://localhost",
        )
        opened.append((context, client))
        return client, manager, seed(manager.store)

    yield make
    for context, client in opened:
        await client.aclose()
        await context.__aexit__(None, None, None)


@pytest.fixture
async def site(make_site: Callable[..., Any]) -> Site:
    result: Site = await make_site()
    return result


def _csrf(client: httpx.AsyncClient) -> str:
    value = client.cookies.get(CSRF_COOKIE)
    assert value
    return value


async def test_every_page_renders_jobs_in_every_state(site: Site) -> None:
    client, _, seeded = site
    overview = await client.get("/")
    assert overview.status_code == 200
    for state in State:
        assert f'href="/jobs?state={state.value}"' in overview.text
    for state, job in seeded.by_state.items():
        page = await client.get(f"/jobs/{job.id}")
        assert page.status_code == 200, state
        assert state.value in page.text and job.arguments["prompt"] in page.text
        assert ("cancel</button>" in page.text) is (not state.terminal)
    batch = await client.get(f"/batches/{seeded.batch}")
    assert batch.status_code == 200
    assert all(f'href="/jobs/{job.id}"' in batch.text for job in seeded.by_state.values())
    assert 'max="6" value="3"' in batch.text  # the progress bar: 3 of 6 finished
    for path in ("/jobs", "/docs", "/static/dashboard.css", "/static/htmx.min.js"):
        assert (await client.get(path)).status_code == 200, path


async def test_pages_show_the_part_of_the_id_that_differs(site: Site) -> None:
    client, _, seeded = site
    ids = [job.id for job in seeded.by_state.values()]
    shorts = {short_id(i) for i in ids}
    assert len(shorts) == len(ids)  # the shared timestamp prefix is not what is shown
    page = (await client.get(f"/batches/{seeded.batch}")).text
    shown = set(re.findall(r"<code>([0-9a-f]{10})</code></a>", page))
    assert shown == shorts


@pytest.mark.parametrize(
    "how", ["id", "prefix", "short", "short_prefix", "request_id", "idempotency_key"]
)
async def test_search_finds_a_job_every_way_it_is_named(site: Site, how: str) -> None:
    client, _, seeded = site
    job = seeded.by_state[State.QUEUED]
    term = {
        "id": job.id,
        "prefix": job.id[:16],
        "short": short_id(job.id),
        "short_prefix": short_id(job.id)[:7],
        "request_id": job.request_id,
        "idempotency_key": job.idempotency_key,
    }[how]
    page = (await client.get("/jobs", params={"q": term})).text
    found = set(re.findall(r'href="/jobs/([0-9a-f]{32})"', page))
    assert job.id in found
    if how != "prefix":  # a prefix of 16 may still be shared by jobs made in one millisecond
        assert found == {job.id}


async def test_filters_and_pagination(site: Site) -> None:
    client, _, seeded = site

    def ids(page: str) -> set[str]:
        return set(re.findall(r'href="/jobs/([0-9a-f]{32})"', page))

    failed = ids((await client.get("/jobs", params={"state": "failed"})).text)
    assert failed == {seeded.by_state[State.FAILED].id, seeded.evil.id}
    labelled = ids((await client.get("/jobs", params={"label": "state=queued"})).text)
    assert labelled == {seeded.by_state[State.QUEUED].id}
    in_batch = ids((await client.get("/jobs", params={"batch": seeded.batch})).text)
    assert in_batch == {job.id for job in seeded.by_state.values()}
    by_app = ids((await client.get("/jobs", params={"application": f"fal-ai/{EVIL}"})).text)
    assert by_app == {seeded.evil.id}
    seen: set[str] = set()
    url: str | None = "/jobs?limit=3&team=ignored"
    for _ in range(5):  # 7 jobs, 3 a page: three pages
        assert url is not None
        page = (await client.get(url)).text
        seen |= ids(page)
        match = re.search(r'<a rel="next" href="([^"]+)"', page)
        url = match.group(1).replace("&amp;", "&") if match else None
        if url is None:
            break
    assert url is None and len(seen) == 7
    bad_filters = (
        {"state": "done"},
        {"limit": "0"},
        {"limit": "²"},  # a digit to str.isdigit, not to int()
        {"label": 'a"b=c'},
        {"label": "novalue"},
    )
    for bad in bad_filters:
        response = await client.get("/jobs", params=bad)
        assert response.status_code == 422 and "must" in response.text, bad


async def test_everything_shown_is_escaped_and_no_secret_appears(site: Site) -> None:
    client, _, seeded = site
    for path in ("/", "/jobs", f"/jobs/{seeded.evil.id}", "/jobs?state=failed"):
        response = await client.get(path)
        page = response.text
        assert page.count("<script") == 1, path  # only the htmx script tag
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
        assert FAL_KEY not in page and TOKEN not in page
        assert 'href="javascript:' not in page and 'src="javascript:' not in page
        csp = response.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "style-src 'self';" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "z" * 100 not in (await client.get("/jobs")).text  # arguments only as a preview


async def test_job_page_shows_result_files_events_logs_and_timings(site: Site) -> None:
    client, _, seeded = site
    job = seeded.by_state[State.SUCCEEDED]
    page = (await client.get(f"/jobs/{job.id}")).text
    assert '<img src="https://media.invalid/lighthouse.png"' in page  # not cached: its URL
    for text in ("submit_sent", "done", "finish detected after"):
        assert text in page
    assert "time in queue" in page and "&#34;seed&#34;: 3" in page
    missing = await client.get("/jobs/nope")
    assert missing.status_code == 404 and "no job" in missing.text
    # A prefix of several jobs (the batch's jobs share the id's time prefix) lists them.
    first, second = seeded.by_state[State.QUEUED].id, seeded.by_state[State.IN_PROGRESS].id
    common = 0
    while common < 12 and first[common] == second[common]:
        common += 1
    shared = first[: min(common, 8)]
    assert len(shared) >= 6
    ambiguous = await client.get(f"/jobs/{shared}")
    assert ambiguous.status_code == 303 and ambiguous.headers["location"] == f"/jobs?q={shared}"


async def test_cancel_needs_this_browsers_csrf_value(site: Site) -> None:
    client, manager, seeded = site
    job = seeded.by_state[State.SUBMITTING]
    await client.get(f"/jobs/{job.id}")
    csrf = _csrf(client)
    refused = [
        await client.post(f"/jobs/{job.id}/cancel", data={}),
        await client.post(f"/jobs/{job.id}/cancel", data={"csrf": "x" * 43}),
        await client.post(
            f"/jobs/{job.id}/cancel", data={"csrf": csrf}, headers={"sec-fetch-site": "cross-site"}
        ),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert (await manager.status(job.id)).state is State.SUBMITTING
    done = await client.post(f"/jobs/{job.id}/cancel", data={"csrf": csrf})
    assert done.status_code == 303
    assert done.headers["location"] == f"/jobs/{job.id}?notice=cancel_requested"
    assert (await manager.status(job.id)).state is State.CANCELLED
    again = await client.post(f"/jobs/{job.id}/cancel", data={"csrf": csrf})
    assert again.headers["location"].endswith("notice=already_finished")
    page = (await client.get(again.headers["location"])).text
    assert "already finished" in page
    # A notice is a fixed code: a link cannot put its own words on the page.
    assert "pwned" not in (await client.get(f"/jobs/{job.id}?notice=pwned")).text


async def test_login_sets_a_derived_cookie_and_logout_ends_it(
    make_site: Callable[..., Any],
) -> None:
    client, _, seeded = await make_site(api_token=Secret(TOKEN))
    target = f"/jobs/{seeded.by_state[State.QUEUED].id}"
    first = await client.get(target)
    assert first.status_code == 303 and first.headers["location"].startswith("/login?next=")
    form = await client.get(first.headers["location"])
    assert form.status_code == 200 and 'name="token"' in form.text
    csrf = _csrf(client)
    wrong = await client.post("/login", data={"csrf": csrf, "token": "nope", "next": target})
    assert wrong.status_code == 401 and SESSION_COOKIE not in wrong.headers.get("set-cookie", "")
    assert (await client.post("/login", data={"token": TOKEN})).status_code == 403  # no CSRF
    ok = await client.post("/login", data={"csrf": csrf, "token": TOKEN, "next": target})
    assert ok.status_code == 303 and ok.headers["location"] == target
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert (await client.get(target)).status_code == 200
    assert (await client.get("/v1/jobs")).status_code == 401  # the API still wants the header
    out = await client.post("/logout", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert (await client.get(target)).status_code == 303
    client.cookies.set(SESSION_COOKIE, "1.forged")
    assert (await client.get(target)).status_code == 303
    live = await client.get(target, headers={"hx-request": "true"})  # a refresh, logged out
    assert live.status_code == 401 and live.headers["hx-redirect"].startswith("/login?next=")
    bearer = await client.get(target, headers={"authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200


async def test_session_cookie_is_secure_over_https(make_site: Callable[..., Any]) -> None:
    client, _, _ = await make_site(api_token=Secret(TOKEN), public_url="https://jobs.example")
    await client.get("/login")
    ok = await client.post("/login", data={"csrf": _csrf(client), "token": TOKEN})
    assert "Secure" in ok.headers["set-cookie"]


def test_sessions_expire_and_depend_on_the_token() -> None:
    token, now = Secret(TOKEN), time.time()
    value = new_session(token, now=now)
    assert valid_session(token, value, now=now + 60)
    assert not valid_session(token, value, now=now + SESSION_SECONDS + 1)
    assert not valid_session(Secret(TOKEN + "x"), value, now=now)
    assert not valid_session(token, value.replace(".", ".0"), now=now)
    assert not valid_session(token, None) and not valid_session(token, "x.y")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("/jobs/a", "/jobs/a"), ("//evil.example", "/"), ("https://evil", "/"), (None, "/")],
)
def test_login_only_goes_back_to_this_site(given: str | None, expected: str) -> None:
    assert safe_next(given) == expected


async def test_overview_figures(site: Site) -> None:
    client, manager, seeded = site
    overview = await manager.overview()
    assert overview.counts[State.FAILED] == 2
    assert overview.failures == {"remote_error": 2}
    assert overview.oldest_active is not None
    assert overview.oldest_active.id == seeded.by_state[State.SUBMITTING].id
    assert overview.due == 0  # the seeded polls are an hour away
    # Finished: 3 seeded + evil; submit attempts 3 (evil was never sent), polls none.
    assert (overview.finished, overview.finished_requests) == (4, 3)
    page = (await client.get("/")).text
    assert "remote_error" in page and "0.8" in page


async def test_read_api_events_logs_and_batches(site: Site) -> None:
    client, _, seeded = site
    job = seeded.by_state[State.SUCCEEDED]
    events = (await client.get(f"/v1/jobs/{job.id}/events")).json()
    assert events["events"][0]["kind"] == "created"
    logs = (await client.get(f"/v1/jobs/{job.request_id}/logs")).json()
    assert logs["id"] == job.id and logs["logs"][-1]["message"] == "done"
    batches = (await client.get("/v1/batches")).json()["batches"]
    assert {b["name"] for b in batches} == {seeded.batch, f"b{EVIL}"}
    one = (await client.get(f"/v1/batches/{seeded.batch}")).json()
    assert (one["total"], one["done"], one["counts"]["failed"]) == (6, 3, 1)
    active = (await client.get("/v1/batches", params={"active": "true"})).json()["batches"]
    assert [b["name"] for b in active] == [seeded.batch]
    assert (await client.get("/v1/batches/nope")).status_code == 404
    for limit in ("0", "²", "1001"):
        assert (await client.get("/v1/batches", params={"limit": limit})).status_code == 422
    export = await client.get("/export.jsonl", params={"batch": seeded.batch})
    lines = export.text.splitlines()
    assert len(lines) == 6 and '"result": {"images"' in lines[3]


def test_every_operation_has_a_unique_operation_id_and_a_tag() -> None:
    doc = document()
    operations = [op for item in doc["paths"].values() for op in item.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    names = {tag["name"] for tag in doc["tags"]}
    assert all(op["tags"] and set(op["tags"]) <= names for op in operations)


async def test_retry_from_the_page_and_the_api(make_site: Callable[..., Any]) -> None:
    with FakeFalServer(FakeFalConfig(duration=0.05, queue_time=0.0, seed=5)) as fal:
        client, manager, seeded = await make_site(fal.url)
        failed = seeded.by_state[State.FAILED]
        page = (await client.get(f"/jobs/{failed.id}")).text
        assert "retry</button>" in page
        queued_page = (await client.get(f"/jobs/{seeded.by_state[State.QUEUED].id}")).text
        assert "retry</button>" not in queued_page
        assert (await client.post(f"/jobs/{failed.id}/retry", data={})).status_code == 403
        done = await client.post(f"/jobs/{failed.id}/retry", data={"csrf": _csrf(client)})
        assert done.status_code == 303 and done.headers["location"].endswith("notice=retried")
        new_id = done.headers["location"].split("/")[2].split("?")[0]
        assert new_id != failed.id
        retried = await manager.status(new_id)
        assert retried.retry_of == failed.id and retried.request_id is not None
        assert f'href="/jobs/{failed.id}"' in (await client.get(done.headers["location"])).text
        cancelled = seeded.by_state[State.CANCELLED]
        api = await client.post(f"/v1/jobs/{cancelled.id}/retry")
        assert api.status_code == 202 and api.json()["retry_of"] == cancelled.id
        again = await client.post(f"/v1/jobs/{cancelled.id}/retry")
        assert again.json()["id"] == api.json()["id"]  # asking twice makes one retry
        refused = await client.post(f"/v1/jobs/{seeded.by_state[State.QUEUED].id}/retry")
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "not_retryable"


async def test_pages_answer_only_to_this_servers_names_and_origin(site: Site) -> None:
    client, manager, seeded = site
    job = seeded.by_state[State.SUBMITTING]
    for path in ("/", "/jobs", f"/jobs/{job.id}", f"/batches/{seeded.batch}", "/login"):
        rebound = await client.get(path, headers={"host": "attacker.example"})
        assert rebound.status_code == 421, path
    await client.get(f"/jobs/{job.id}")
    foreign = await client.post(
        f"/jobs/{job.id}/cancel",
        data={"csrf": _csrf(client)},
        headers={"origin": "https://attacker.example"},
    )
    assert foreign.status_code == 403
    assert (await manager.status(job.id)).state is State.SUBMITTING
