"""The dashboard in a real browser: the distribution's headless Chromium driven by
playwright (never a browser playwright downloads). Pages are loaded with jobs in every
state, links followed, a job searched for and cancelled from its page, the live region seen
updating without a reload, and a token-protected dashboard logged into and out of; no page
may trip the Content-Security-Policy. The screenshots in docs/img/ are taken here.

.ci/run installs Chromium when it is missing and names it in JOBS_TEST_CHROMIUM; elsewhere
these tests skip without a ``chromium`` on the PATH.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from support.managers import local_settings
from support.seed import Seeded, seed

from jobs.config import Secret
from jobs.manager import AsyncJobManager
from jobs.providers.base import Observation
from jobs.states import State
from jobs.store import short_id
from jobs.web import create_app

# .ci/run sets JOBS_TEST_CHROMIUM, so there a missing browser fails instead of skipping.
CHROMIUM = os.environ.get("JOBS_TEST_CHROMIUM") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")

# The screenshots in docs/img/ are made here: `JOBS_TEST_SCREENSHOTS=docs/img pytest
# tests/test_browser.py` renews them; an ordinary run writes them to a temporary folder, so
# running the tests never changes tracked files.
SHOTS = Path(
    os.environ.get("JOBS_TEST_SCREENSHOTS")
    or Path(tempfile.gettempdir()) / f"jobs-screenshots-{os.getpid()}"
)
TOKEN = "browser-token-do-not-leak-77"
START_TIMEOUT = 10.0
# Page loads and clicks are local; a generous cap still keeps a broken page from hanging.
ACTION_TIMEOUT_MS = 10_000
# The live region refreshes every 5 s (jobs.web.pages.REFRESH_SECONDS).
LIVE_TIMEOUT_MS = 8_000
WATCH_CSP = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@contextmanager
def served(tmp_path: Path, **extra: Any) -> Iterator[tuple[str, AsyncJobManager, Seeded]]:
    """The app on a free port of 127.0.0.1, in a thread, with seeded jobs."""
    settings = local_settings(
        tmp_path, "http://127.0.0.1:9", cache_dir=str(tmp_path / "cache"), **extra
    )
    manager = AsyncJobManager(settings)
    seeded = seed(manager.store, cache_dir=Path(settings.cache_dir))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(manager, settings=settings), log_config=None, lifespan="on", workers=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert server.started, "the dashboard did not start"
        yield f"http://127.0.0.1:{port}", manager, seeded
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT)
        sock.close()
        # playwright's sync API runs an event loop in this thread: close on a thread of its own.
        closer = threading.Thread(target=lambda: asyncio.run(manager.aclose()))
        closer.start()
        closer.join(START_TIMEOUT)
        manager.store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page whose console errors and CSP violations are collected."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(ACTION_TIMEOUT_MS)
        self.context.add_init_script(WATCH_CSP)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on(
            "console", lambda m: self.console.append(m.text) if m.type == "error" else None
        )

    def goto(self, url: str) -> Any:
        response = self.page.goto(url)
        self.check()
        return response

    def check(self) -> None:
        """No CSP violation so far, and htmx (the page's only script) ran."""
        violations = self.page.evaluate("window.__csp")
        blocked = [m for m in self.console if "Content Security Policy" in m]
        assert violations == [] and blocked == [], (violations, blocked)
        assert self.page.evaluate("typeof window.htmx") == "object"

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


def test_pages_links_search_cancel_and_live_updates(browser: Any, tmp_path: Path) -> None:
    with served(tmp_path) as (base, manager, seeded):
        tab = Watched(browser)
        page = tab.page
        try:
            tab.goto(base + "/")
            assert page.locator("h1").inner_text() == "Overview"
            for state in State:
                assert page.locator(f'th a[href="/jobs?state={state.value}"]').count() == 1
            tab.shot("overview")

            page.click(f'a[href="/batches/{seeded.batch}"]')
            page.wait_for_url(f"**/batches/{seeded.batch}")
            tab.check()
            assert page.locator("progress").get_attribute("value") == "3"
            tab.shot("batch")

            succeeded = seeded.by_state[State.SUCCEEDED]
            page.click(f'a[href="/jobs/{succeeded.id}"]')
            page.wait_for_url(f"**/jobs/{succeeded.id}")
            tab.check()
            assert "succeeded" in page.locator("h1").inner_text()
            image = page.locator(".files img")
            assert image.get_attribute("src") == f"/jobs/{succeeded.id}/files/0"  # the cache
            assert image.evaluate("img => img.naturalWidth") == 96
            tab.shot("job")

            for state, job in seeded.by_state.items():
                tab.goto(f"{base}/jobs/{job.id}")
                assert state.value in page.locator("h1").inner_text()
                assert (page.locator("button.danger").count() == 1) is (not state.terminal)

            target = seeded.by_state[State.SUBMITTING]
            page.fill('header input[name="q"]', short_id(target.id))
            page.press('header input[name="q"]', "Enter")
            page.wait_for_url("**/jobs?q=*")
            tab.check()
            assert page.locator("table.jobs tbody tr").count() == 1
            page.click(f'a[href="/jobs/{target.id}"]')
            page.wait_for_url(f"**/jobs/{target.id}")
            page.click("button.danger")
            page.wait_for_url("**notice=cancel_requested")
            tab.check()
            assert "cancelled" in page.locator("h1").inner_text()
            assert page.locator("button.danger").count() == 0

            page.goto(base + "/jobs?state=failed")
            tab.check()
            tab.shot("jobs")

            # Live: a change in the database shows up without reloading the page.
            queued = seeded.by_state[State.QUEUED]
            tab.goto(f"{base}/jobs/{queued.id}")
            page.evaluate("window.__marker = 1")
            manager.store.apply(queued.id, Observation(state=State.IN_PROGRESS))
            playwright_api.expect(page.locator("h1")).to_contain_text(
                "in_progress", timeout=LIVE_TIMEOUT_MS
            )
            assert page.evaluate("window.__marker") == 1  # the same document: no reload
            tab.check()

            tab.goto(base + "/docs")
            page.click("summary:has-text('/v1/jobs/{id}/retry')")
            assert page.locator("#retryJob").is_visible()
            tab.shot("api")
            assert [m for m in tab.console if "Content Security Policy" in m] == []
        finally:
            tab.close()


def test_a_token_protected_dashboard_is_opened_used_and_left(browser: Any, tmp_path: Path) -> None:
    with served(tmp_path, api_token=Secret(TOKEN)) as (base, _, seeded):
        tab = Watched(browser)
        page = tab.page
        try:
            job = seeded.by_state[State.FAILED]
            tab.goto(f"{base}/jobs/{job.id}")
            assert "/login?next=" in page.url
            tab.shot("login")
            page.fill('input[name="token"]', "not-the-token")
            page.click("form.login button")
            tab.check()
            assert "not the API token" in page.content()
            page.fill('input[name="token"]', TOKEN)
            page.click("form.login button")
            page.wait_for_url(f"**/jobs/{job.id}")
            tab.check()
            assert "failed" in page.locator("h1").inner_text()
            cookies = {c["name"]: c for c in tab.context.cookies()}
            session = cookies["jobs_session"]
            assert session["httpOnly"] and session["sameSite"] == "Strict"
            assert TOKEN not in session["value"]
            assert page.evaluate("document.cookie") == ""  # no script can read either cookie
            page.click("form.logout button")
            page.wait_for_url("**/login")
            tab.goto(base + "/")
            assert "/login" in page.url
            assert TOKEN not in page.content()
        finally:
            tab.close()
