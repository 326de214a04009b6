"""The dashboard: server-rendered pages to watch and operate the service from a browser.

- ``GET /``: counts, active batches, failures by reason, backlog, request economy, leases.
- ``GET /jobs``: search (id, id prefix or short form, request id, idempotency key) and
  filters (state, application, batch, label), a page at a time.
- ``GET /jobs/{ref}``: one job's timings, events, logs, arguments, result, files, and the
  cancel (and retry) buttons.
- ``GET /batches/{name}``: a batch's progress and jobs; ``/batches/{name}/export.jsonl``.
- ``/login`` and ``/logout`` (see :mod:`jobs.web.session`); ``GET /docs``: the HTTP API.

Templates live in ``jobs/web/templates`` (Jinja2, autoescaped: everything shown comes from
users or remote services), styles and the vendored htmx 2.0.11 (0BSD licence, from the
``htmx.org`` npm package: live updates of the ``#live`` region without reloading the page)
in ``jobs/web/static``. The Content-Security-Policy
allows scripts, styles and connections from this origin only, so nothing inline runs even
if escaping were ever missed. Pages read only through the manager's public API.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..batch import export_line
from ..config import Secret
from ..errors import (
    AmbiguousJobRef,
    BatchNotFound,
    CancelTooLate,
    JobNotFound,
    JobsError,
    NotRetryable,
)
from ..manager import AsyncJobManager, detection_lag
from ..records import Job, JobFile, iso, short_id
from ..results import find_files
from ..states import State
from .errors import InvalidRequest
from .files import JobFiles
from .openapi import document
from .params import int_param, label_param, state_param
from .session import (
    CSRF_FIELD,
    SESSION_COOKIE,
    SESSION_SECONDS,
    bearer_ok,
    csrf_ok,
    csrf_value,
    is_https,
    new_session,
    safe_next,
    set_csrf_cookie,
)

log = logging.getLogger(__name__)

PAGE = 50
MAX_PAGE = 200
REFRESH_SECONDS = 5
PREVIEW_CHARS = 80
MAX_FIELD = 1000
MAX_FORM = 8192
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' https: data:; "
    "media-src 'self' https:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
NOTICES = {
    "cancel_requested": "Cancel requested; the state changes once the provider confirms.",
    "already_finished": "The job had already finished; nothing to cancel.",
    "cancel_failed": "The cancel could not be sent to the provider (see the server log).",
    "retried": "This job is the new attempt; it was recorded and sent.",
    "not_retryable": "Only failed or cancelled jobs made here can be retried.",
    "retry_failed": "The retry could not be sent to the provider (see the server log).",
}
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def age(seconds: float | None) -> str:
    """A duration for people: ``0.4s``, ``42s``, ``3m 5s``, ``2h 10m``, ``1d 4h``."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    """At most ``limit`` characters, marked with an ellipsis when cut (not yet escaped)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def preview(value: Any) -> str:
    return clip(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


def web_url(url: str | None) -> str | None:
    """``url`` when it is an http(s) URL a page may link to; anything else (``javascript:``,
    ``data:``) is never put into a link."""
    if url and url.split(":", 1)[0].lower() in ("http", "https"):
        return url
    return None


def media_kind(content_type: str | None, url: str) -> str | None:
    """``image`` or ``video`` when a file can be previewed in the page."""
    kind = (content_type or "").split("/", 1)[0].lower()
    if kind in ("image", "video"):
        return kind
    ending = url.rsplit("?", 1)[0].rsplit(".", 1)[-1].lower()
    if ending in ("png", "jpg", "jpeg", "webp", "gif"):
        return "image"
    if ending in ("mp4", "webm", "mov"):
        return "video"
    return None


def file_views(job: Job, files: list[JobFile], result: Any) -> list[dict[str, Any]]:
    """What the job page shows of each file: the cached copy when downloaded, else the
    provider's URL (files never recorded are found in the stored result)."""
    views = []
    if files:
        for f in files:
            local = f"/jobs/{job.id}/files/{f.n}" if f.state == "downloaded" else None
            views.append(
                {
                    "n": f.n,
                    "name": f.file_name or f.json_path,
                    "state": f.state,
                    "error": f.error,
                    "size": f.size,
                    "src": local or web_url(f.url),
                    "url": web_url(f.url),
                    "kind": media_kind(f.content_type, f.url),
                }
            )
        return views
    for found in find_files(result, job.provider):
        views.append(
            {
                "n": found.n,
                "name": found.file_name or found.json_path,
                "state": "not cached",
                "error": None,
                "size": None,
                "src": web_url(found.url),
                "url": web_url(found.url),
                "kind": media_kind(found.content_type, found.url),
            }
        )
    return views


def timings(job: Job, now: float) -> list[tuple[str, str]]:
    """The job's life in durations: waiting to be sent, queued remotely, running, and how
    long after the remote finish we knew (from the provider's own run time, when given)."""
    rows = [
        ("recorded", iso(job.created_at) or "—"),
        ("sent", iso(job.submitted_at) or "—"),
        ("started", iso(job.started_at) or "—"),
        ("finished", iso(job.finished_at) or "—"),
    ]
    if job.submitted_at is not None:
        rows.append(("time to send", age(job.submitted_at - job.created_at)))
    if job.started_at is not None and job.submitted_at is not None:
        rows.append(("time in queue", age(job.started_at - job.submitted_at)))
    if job.started_at is not None:
        rows.append(("running for", age((job.finished_at or now) - job.started_at)))
    lag = detection_lag(job)
    if lag is not None:
        rows.append(("finish detected after", f"≈{lag:.1f}s"))
    if job.finished_at is None:
        rows.append(("age", age(now - job.created_at)))
    return rows


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("jobs.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(short=short_id, age=age, iso=iso, preview=preview, pretty=pretty, clip=clip)
    env.globals.update(states=list(State), refresh=REFRESH_SECONDS, csrf_field=CSRF_FIELD)
    return env


def _text(raw: str | None, name: str) -> str | None:
    if raw is None or not raw.strip():
        return None
    if len(raw) > MAX_FIELD:
        raise InvalidRequest(f"'{name}' is longer than {MAX_FIELD} characters", field=name)
    return raw.strip()


class Pages:
    """The dashboard's routes around one manager. ``token`` is JOBS_API_TOKEN (None: open)."""

    def __init__(
        self, manager: AsyncJobManager, *, token: Secret | None, public_url: str | None
    ) -> None:
        self.manager = manager
        self.token = token
        self.public_url = public_url
        self.env = _environment()
        self.files = JobFiles(manager)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.overview, methods=["GET"]),
            Route("/jobs", self.jobs, methods=["GET"]),
            Route("/jobs/{id}", self.job, methods=["GET"]),
            Route("/jobs/{id}/cancel", self.cancel, methods=["POST"]),
            Route("/jobs/{id}/retry", self.retry, methods=["POST"]),
            # The cached-file route of the API, under the dashboard's session check.
            Route("/jobs/{id}/files/{n}", self.files.file, methods=["GET"]),
            # {name:path}: a batch name may hold a slash (names default to input file names).
            Route("/batches/{name:path}", self.batch, methods=["GET"]),
            Route("/export.jsonl", self.export, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/docs", self.api_docs, methods=["GET"]),
            Mount("/static", StaticFiles(packages=[("jobs.web", "static")]), name="static"),
        ]

    # --- rendering ---------------------------------------------------------------------

    def render(
        self, request: Request, name: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        csrf = csrf_value(request)
        body = self.env.get_template(name).render(
            request_path=request.url.path,
            request_query=request.url.query,
            csrf=csrf,
            login_enabled=self.token is not None,
            now=time.time(),
            **context,
        )
        response = HTMLResponse(body, status_code=status, headers=HEADERS)
        set_csrf_cookie(response, csrf, secure=is_https(request, self.public_url))
        return response

    def not_found(self, request: Request, message: str) -> HTMLResponse:
        return self.render(request, "error.html", 404, title="not found", message=message)

    # --- pages ---------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        overview = await self.manager.overview()
        batches = await self.manager.batches(active_only=True, limit=20)
        latest = await self.manager.list_jobs(limit=10)
        return self.render(
            request,
            "overview.html",
            title="overview",
            overview=overview,
            batches=batches,
            latest=latest,
        )

    async def jobs(self, request: Request) -> Response:
        query = request.query_params
        try:
            filters = {
                name: _text(query.get(name), name)
                for name in ("q", "state", "application", "batch", "label", "before", "limit")
            }
            state = state_param(filters["state"])
            label = label_param(filters["label"])
            limit = int_param(filters["limit"], "limit", default=PAGE, maximum=MAX_PAGE)
        except InvalidRequest as exc:
            return self.render(request, "error.html", 422, title="bad filter", message=str(exc))
        found = await self.manager.list_jobs(
            state=state,
            application=filters["application"],
            batch=filters["batch"],
            label=label,
            search=filters["q"],
            limit=limit + 1,
            before=filters["before"],
        )
        page, more = found[:limit], len(found) > limit
        kept = {k: v for k, v in filters.items() if v and k not in ("before", "limit")}
        next_url = "/jobs?" + urlencode({**kept, "before": page[-1].id}) if more else None
        return self.render(
            request,
            "jobs.html",
            title="jobs",
            jobs=page,
            filters=filters,
            next_url=next_url,
            first_url="/jobs?" + urlencode(kept) if filters["before"] else None,
        )

    async def job(self, request: Request) -> Response:
        ref: str = request.path_params["id"]
        try:
            job = await self.manager.status(ref)
        except JobNotFound:
            return self.not_found(request, f"no job {clip(ref)}")
        except AmbiguousJobRef:  # a prefix of several jobs: list them
            return RedirectResponse("/jobs?" + urlencode({"q": ref}), status_code=303)
        events = await self.manager.events(job.id)
        logs = [entry for _, entry in await self.manager.logs(job.id)]
        stored, result = await self.manager.stored_result(job.id)
        files = await self.manager.job_files(job.id)
        return self.render(
            request,
            "job.html",
            title=f"job {short_id(job.id)}",
            job=job,
            events=events,
            logs=logs,
            stored=stored,
            result=result,
            files=file_views(job, files, result),
            timings=timings(job, time.time()),
            notice=NOTICES.get(request.query_params.get("notice") or ""),
        )

    async def batch(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        try:
            progress = await self.manager.batch(name)
        except BatchNotFound:
            return self.not_found(request, f"no batch {clip(name)}")
        jobs = await self.manager.list_jobs(batch=name, limit=MAX_PAGE)
        failures = await self.manager.failures(batch=name)
        return self.render(
            request,
            "batch.html",
            title=f"batch {clip(name, 40)}",
            batch=progress,
            jobs=jobs,
            failures=failures,
            shown=MAX_PAGE,
            export_url="/export.jsonl?" + urlencode({"batch": name}),
        )

    async def export(self, request: Request) -> Response:
        """The batch as JSON lines in input order (``jobsctl export`` also copies files)."""
        name = request.query_params.get("batch") or ""
        await self.manager.batch(name)  # 404 for an unknown batch
        jobs = await self.manager.batch_jobs(name)

        async def lines() -> Any:
            for start in range(0, len(jobs), PAGE):
                chunk = jobs[start : start + PAGE]
                results = await self.manager.stored_results([j.id for j in chunk])
                for job in chunk:
                    line = export_line(job, results, [])
                    line.pop("files")
                    yield json.dumps(line, ensure_ascii=False, default=str) + "\n"

        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": "attachment; filename=results.jsonl"},
        )

    # --- actions -------------------------------------------------------------------------

    async def _form(self, request: Request) -> Mapping[str, str] | None:
        """The posted form when its CSRF value is right, else None. The dashboard's forms are
        a few short fields: parsed here, with a size cap, instead of a multipart library."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return None
        try:
            form = dict(parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=10))
        except (UnicodeDecodeError, ValueError):
            return None
        return form if csrf_ok(request, form.get(CSRF_FIELD)) else None

    def _refused(self, request: Request) -> HTMLResponse:
        message = "the form expired or came from another site; reload the page and try again"
        return self.render(request, "error.html", 403, title="refused", message=message)

    async def cancel(self, request: Request) -> Response:
        if await self._form(request) is None:
            return self._refused(request)
        ref: str = request.path_params["id"]
        try:
            await self.manager.cancel(ref, wait=0.0)
            notice = "cancel_requested"
        except JobNotFound:
            return self.not_found(request, f"no job {clip(ref)}")
        except CancelTooLate:
            notice = "already_finished"
        except JobsError as exc:  # the provider could not be reached, or refused
            log.warning("cancel of %s from the dashboard failed: %s", ref, exc)
            notice = "cancel_failed"
        return await self._back_to_job(ref, notice)

    async def retry(self, request: Request) -> Response:
        if await self._form(request) is None:
            return self._refused(request)
        ref: str = request.path_params["id"]
        try:
            job = await self.manager.retry(ref)
        except JobNotFound:
            return self.not_found(request, f"no job {clip(ref)}")
        except NotRetryable:
            return await self._back_to_job(ref, "not_retryable")
        except JobsError as exc:  # the retry is recorded; sending it ran into the provider
            log.warning("retry of %s from the dashboard failed: %s", ref, exc)
            return await self._back_to_job(ref, "retry_failed")
        return await self._back_to_job(job.id, "retried")

    async def _back_to_job(self, ref: str, notice: str) -> Response:
        job = await self.manager.status(ref)
        # A fixed code, not a message: a link must not be able to put words on the page.
        return RedirectResponse(f"/jobs/{job.id}?notice={notice}", status_code=303)

    # --- login ---------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if self.token is None:
            return RedirectResponse("/", status_code=303)
        return self.render(
            request, "login.html", title="log in", next=safe_next(request.query_params.get("next"))
        )

    async def login(self, request: Request) -> Response:
        if self.token is None:
            return RedirectResponse("/", status_code=303)
        form = await self._form(request)
        if form is None:
            return self._refused(request)
        target = safe_next(form.get("next"))
        if not bearer_ok(self.token, "Bearer " + form.get("token", "")):
            return self.render(
                request,
                "login.html",
                401,
                title="log in",
                next=target,
                message="that is not the API token (JOBS_API_TOKEN)",
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            new_session(self.token),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=is_https(request, self.public_url),
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        if await self._form(request) is None:
            return self._refused(request)
        response = RedirectResponse("/login" if self.token else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # --- the HTTP API's reference ----------------------------------------------------------

    async def api_docs(self, request: Request) -> Response:
        doc = document(self.public_url)
        operations = [
            {"path": path, "method": method.upper(), **operation}
            for path, item in doc["paths"].items()
            for method, operation in item.items()
        ]
        tags = {tag["name"]: tag.get("description", "") for tag in doc.get("tags", [])}
        grouped: dict[str, list[dict[str, Any]]] = {name: [] for name in tags}
        for operation in operations:
            for tag in operation.get("tags") or ["other"]:
                grouped.setdefault(tag, []).append(operation)
        return self.render(
            request,
            "api_docs.html",
            title="HTTP API",
            info=doc["info"],
            tags=tags,
            grouped=grouped,
            schemas=doc["components"]["schemas"],
        )
