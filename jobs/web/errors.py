"""The one place where errors become HTTP answers.

Every error body has the same shape, ``{"error": {"type", "message", ...}}``, so a script
can branch on ``type`` and a person can read ``message``. :data:`STATUS` maps the
``jobs.errors`` tree onto status codes; the handlers registered by :func:`exception_handlers`
are the only code that turns an exception into a response. Anything unexpected becomes a
plain 500 with no traceback and no detail (the traceback goes to the server log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ExceptionHandler

from ..errors import (
    AmbiguousJobRef,
    CancelTooLate,
    ConfigError,
    IdempotencyConflict,
    JobFailed,
    JobNotFinished,
    JobNotFound,
    JobsError,
    NotRetryable,
    ProviderError,
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
)

log = logging.getLogger(__name__)


class InvalidRequest(Exception):
    """The request itself is wrong: 400 when it cannot be read, 422 when a field is bad."""

    def __init__(
        self, message: str, *, status: int = 422, field: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.kind = kind or ("invalid_json" if status == 400 else "invalid_request")


# (status, error type) by exception class; the most specific class wins (MRO order).
STATUS: dict[type[Exception], tuple[int, str]] = {
    JobNotFound: (404, "not_found"),
    AmbiguousJobRef: (409, "ambiguous_ref"),
    NotRetryable: (409, "not_retryable"),
    JobNotFinished: (409, "not_finished"),
    CancelTooLate: (409, "already_finished"),
    IdempotencyConflict: (409, "idempotency_conflict"),
    # The result route answers failed and cancelled jobs itself; what is left is a
    # succeeded job whose cached result was removed (``jobs gc``).
    JobFailed: (410, "result_removed"),
    ConfigError: (422, "invalid_request"),
    ProviderRejected: (422, "provider_rejected"),
    ProviderUnavailable: (502, "provider_unavailable"),
    ProviderProtocolError: (502, "provider_protocol_error"),
    ProviderError: (502, "provider_error"),
    JobsError: (500, "internal"),
}


def error_response(
    status: int,
    kind: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": kind, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _status_of(exc: Exception) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "internal"


async def _jobs_error(request: Request, exc: Exception) -> Response:
    status, kind = _status_of(exc)
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(exc, ProviderError):
        extra["status_code"] = exc.status_code
        detail = exc.body.get("detail") if isinstance(exc.body, Mapping) else None
        extra["detail"] = detail
    if isinstance(exc, IdempotencyConflict):
        extra["job"] = {"id": exc.job_id}
        extra["differs"] = exc.differs
    if isinstance(exc, ProviderUnavailable) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return error_response(status, kind, str(exc), headers=headers, **extra)


async def _invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidRequest)
    return error_response(exc.status, exc.kind, str(exc), field=exc.field)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, kind, exc.detail, headers=exc.headers)


async def _database_error(request: Request, exc: Exception) -> Response:
    # A write the database refused (a full disk, the server gone): the request may have done
    # part of its work (a submit may have reached the provider before its outcome could be
    # recorded), so say so, and how to find out safely. The statement's parameters are never
    # in the text (create_db_engine sets hide_parameters).
    assert isinstance(exc, DBAPIError)
    reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0][:200]
    log.warning("%s %s: the database failed: %s", request.method, request.url.path, reason)
    message = f"the database failed ({reason}); retry later"
    if request.method == "POST":
        message += (
            ": the job may have been recorded and sent, so repeat a submit with the same "
            "idempotency_key to get the same job"
        )
    return error_response(503, "database_unavailable", message, headers={"Retry-After": "5"})


async def _unexpected(request: Request, exc: Exception) -> Response:
    # ServerErrorMiddleware logs the traceback and re-raises to the server after this.
    return error_response(500, "internal", "internal error; the server log has the details")


def exception_handlers() -> dict[Any, ExceptionHandler]:
    return {
        JobsError: _jobs_error,
        InvalidRequest: _invalid_request,
        HTTPException: _http_exception,
        DBAPIError: _database_error,
        Exception: _unexpected,
    }
