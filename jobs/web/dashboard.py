"""``GET /``: a small server-rendered page to glance at what the service is doing.

Counts by state and the latest jobs, refreshed every few seconds by the browser; no
JavaScript, no assets. Everything shown comes from users or remote services, so every value
is HTML-escaped, and a Content-Security-Policy forbids scripts should escaping ever be
missed. Arguments appear only as a short preview: inputs can be large or private.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ..manager import AsyncJobManager
from ..states import State
from ..store import Job

LATEST = 50
PREVIEW_CHARS = 60
REFRESH_SECONDS = 5
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}
td,th{padding:.25em .75em;text-align:left;border-bottom:1px solid #ddd}
.counts td{text-align:right}code{font-size:12px}
.succeeded{color:#17702c}.failed{color:#b00020}.cancelled{color:#777}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    """At most ``limit`` characters, marked with an ellipsis when cut (not yet escaped)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def preview(value: Any) -> str:
    return clip(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _row(job: Job, now: float) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted((job.labels or {}).items()))
    cells = [
        f"<code title='{_e(job.id)}'>{_e(job.id[:12])}…</code>",
        f"<span class='{_e(job.state.value)}'>{_e(job.state.value)}</span>",
        _e(job.application),
        _e(age(now - job.created_at)),
        f"<code>{_e(job.request_id or '—')}</code>",
        _e(clip(labels)),
        f"<code>{_e(preview(job.arguments))}</code>",
    ]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def render(counts: dict[State, int], jobs: list[Job], now: float) -> str:
    count_cells = "".join(f"<th>{_e(s.value)}</th>" for s in State)
    count_values = "".join(f"<td>{counts.get(s, 0)}</td>" for s in State)
    header = "".join(
        f"<th>{name}</th>"
        for name in ("id", "state", "application", "age", "request id", "labels", "arguments")
    )
    rows = "".join(_row(job, now) for job in jobs) or "<tr><td colspan=7>no jobs yet</td></tr>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{REFRESH_SECONDS}'>"
        f"<title>jobs</title><style>{STYLE}</style></head><body>"
        "<h1>jobs</h1>"
        f"<table class='counts'><tr>{count_cells}</tr><tr>{count_values}</tr></table>"
        f"<h2>Latest {LATEST} jobs</h2>"
        f"<table><tr>{header}</tr>{rows}</table>"
        "</body></html>"
    )


class Dashboard:
    def __init__(self, manager: AsyncJobManager) -> None:
        self.manager = manager

    def routes(self) -> list[Route]:
        return [Route("/", self.page, methods=["GET"])]

    async def page(self, request: Request) -> Response:
        counts = await self.manager.count_by_state()
        jobs = await self.manager.list_jobs(limit=LATEST)
        return HTMLResponse(render(counts, jobs, time.time()), headers=HEADERS)
