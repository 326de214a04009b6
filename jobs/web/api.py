"""The ``/v1/jobs`` routes: submit, status, result, cancel, list.

Handlers only read the request, call one :class:`~jobs.manager.AsyncJobManager` method and
shape the answer; errors raised by the manager become responses in :mod:`jobs.web.errors`.
Input is checked here, field by field, so a bad request gets a message naming the field
instead of a 500 from deep inside. Unknown fields are refused rather than ignored: a typo
such as ``idempotency-key`` silently dropped would submit paid work twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ConfigError, JobFailed
from ..manager import AsyncJobManager
from ..providers import NAMES as PROVIDERS
from ..records import Job, SubmitOptions, check_column_text, column_length, submit_outcome
from ..states import FailureReason, State
from .errors import InvalidRequest, error_response
from .params import int_param, state_param

# Fields of POST /v1/jobs and whether each is required; openapi.py documents the same set.
SUBMIT_FIELDS = {
    "application": True,
    "arguments": True,
    "provider": False,
    "path": False,
    "priority": False,
    "hint": False,
    "labels": False,
    "batch": False,
    "idempotency_key": False,
}
SUBMIT_PATH = "/v1/jobs"
DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_CURSOR = 64
MAX_REF = 255  # the longest job reference the store looks up (an idempotency key)
# How long a cancel request waits for the provider's answer to show up before replying 202.
CANCEL_WAIT = 0.0
# Longest a request waits for the provider's rate limit to pass. Beyond it a submit is
# answered recorded (``submitting``; the server's resolver sends it later), and a cancel
# is refused with 502 and Retry-After (nothing was asked).
RATE_WAIT = 5.0
# A submit that ended failed at once: the provider said no, or could not be reached.
_FAILED_SUBMIT = {
    FailureReason.SUBMIT_REJECTED.value: (422, "provider_rejected"),
    FailureReason.SUBMIT_UNREACHABLE.value: (502, "provider_unavailable"),
    # Every send (JOBS_MAX_SUBMIT_ATTEMPTS) may have reached the queue, none was confirmed.
    FailureReason.AMBIGUOUS_SUBMIT.value: (502, "provider_unavailable"),
}


def _text(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required", field=name)
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{name}' must be a non-empty string", field=name)
    try:
        check_column_text(name, value)
    except ConfigError as exc:
        raise InvalidRequest(str(exc), field=name) from None
    return value


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON. A web page on another site can send a form or
    ``text/plain`` body without the browser asking first (CORS preflight), but not this."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise InvalidRequest(
            "send the body as JSON with 'Content-Type: application/json'",
            status=415,
            kind="unsupported_media_type",
        )


def job_ref(request: Request) -> str:
    """The ``{id}`` of a job route (our id or a request id): 400 for one no job can have."""
    ref: str = request.path_params["id"]
    if "\x00" in ref or len(ref) > MAX_REF:
        raise InvalidRequest(
            "not a job id or request id", status=400, field="id", kind="bad_request"
        )
    return ref


def query_text(request: Request, name: str, limit: int) -> str | None:
    """A text query parameter (empty counts as absent): 422, like every bad parameter, when
    it holds a NUL character or is longer than ``limit`` (no stored value could match)."""
    value = request.query_params.get(name) or None
    if value is not None and ("\x00" in value or len(value) > limit):
        raise InvalidRequest(
            f"'{name}' must be at most {limit} characters, with no NUL", field=name
        )
    return value


def parse_submit(raw: bytes) -> tuple[str, dict[str, Any], SubmitOptions]:
    """The application, arguments and options of a POST /v1/jobs body."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise InvalidRequest("the body is not valid JSON", status=400) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", status=400)
    unknown = sorted(set(body) - set(SUBMIT_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(SUBMIT_FIELDS)}",
            field=unknown[0],
        )
    arguments = body.get("arguments")
    if not isinstance(arguments, dict):
        raise InvalidRequest(
            "'arguments' is required and must be a JSON object (the model's input)",
            field="arguments",
        )
    labels = body.get("labels")
    if labels is not None and not (
        isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
    ):
        raise InvalidRequest("'labels' must be an object of string values", field="labels")
    provider = body.get("provider", "fal")
    if provider not in PROVIDERS:
        raise InvalidRequest(f"'provider' must be one of {', '.join(PROVIDERS)}", field="provider")
    application = _text(body, "application", required=True)
    assert application is not None
    options = SubmitOptions(
        provider=provider,
        path=_text(body, "path"),
        priority=_text(body, "priority"),
        hint=_text(body, "hint"),
        labels=labels or {},
        batch=_text(body, "batch"),
        idempotency_key=_text(body, "idempotency_key"),
    )
    return application, arguments, options


def _cursor(raw: str | None) -> str | None:
    if raw is not None and (not raw or len(raw) > MAX_CURSOR or "\x00" in raw):
        raise InvalidRequest("'cursor' is not a cursor this server returned", field="cursor")
    return raw


class JobsApi:
    """The routes, bound to one manager. ``public_url`` (JOBS_PUBLIC_URL) makes the URLs
    handed back absolute for clients behind a proxy; without it the request's base URL is
    used."""

    def __init__(self, manager: AsyncJobManager, *, public_url: str | None) -> None:
        self.manager = manager
        self.public_url = public_url

    def routes(self) -> list[Route]:
        return [
            Route(SUBMIT_PATH, self.submit, methods=["POST"]),
            Route(SUBMIT_PATH, self.list_jobs, methods=["GET"]),
            Route("/v1/jobs/{id}", self.status, methods=["GET"]),
            Route("/v1/jobs/{id}/result", self.result, methods=["GET"]),
            Route("/v1/jobs/{id}/cancel", self.cancel, methods=["POST"]),
        ]

    def _url(self, request: Request, path: str) -> str:
        base = self.public_url or str(request.base_url).rstrip("/")
        return base + path

    async def submit(self, request: Request) -> Response:
        require_json(request)
        application, arguments, options = parse_submit(await request.body())
        job = await self.manager.submit_with(
            application, arguments, options, max_rate_wait=RATE_WAIT
        )
        if submit_outcome(job) == "failed":
            status, kind = _FAILED_SUBMIT[job.failure_reason or ""]
            error = job.error or {}
            return error_response(
                status,
                kind,
                str(error.get("message") or "the provider did not accept the job"),
                detail=error.get("detail"),
                job={"id": job.id, "state": job.state.value, "failure_reason": job.failure_reason},
            )
        status_url = self._url(request, f"/v1/jobs/{job.id}")
        body = {
            "id": job.id,
            "request_id": job.request_id,
            "state": job.state.value,
            "status_url": status_url,
            "result_url": status_url + "/result",
        }
        return JSONResponse(body, status_code=202, headers={"Location": status_url})

    async def status(self, request: Request) -> Response:
        job = await self.manager.status(job_ref(request))
        return JSONResponse(job.to_dict())

    async def result(self, request: Request) -> Response:
        try:
            data = await self.manager.result(job_ref(request))
        except JobFailed as exc:
            if exc.state not in (State.FAILED, State.CANCELLED):
                raise
            return JSONResponse({"id": exc.job_id, "state": exc.state, "error": exc.error})
        return JSONResponse(data)

    async def cancel(self, request: Request) -> Response:
        job = await self.manager.cancel(job_ref(request), wait=CANCEL_WAIT, max_rate_wait=RATE_WAIT)
        return JSONResponse(job.to_dict(), status_code=202)

    async def list_jobs(self, request: Request) -> Response:
        query = request.query_params
        limit = int_param(query.get("limit"), "limit", default=DEFAULT_PAGE, maximum=MAX_PAGE)
        jobs = await self.manager.list_jobs(
            state=state_param(query.get("state")),
            application=query_text(request, "application", column_length("application")),
            batch=query_text(request, "batch", column_length("batch")),
            limit=limit + 1,
            before=_cursor(query.get("cursor")),
        )
        page: list[Job] = jobs[:limit]
        more = len(jobs) > limit
        return JSONResponse(
            {"jobs": [job.to_dict() for job in page], "next_cursor": page[-1].id if more else None}
        )
