"""Errors raised by ``jobs``.

The tree keeps "the provider said no" apart from "we could not reach the provider", because
they call for different actions: fix the input, or wait and retry.

    JobsError
    ├── ConfigError                 missing FAL_KEY, an unusable database URL, bad settings
    │   └── UploadError             a file to upload is missing, unreadable or too large
    ├── JobNotFound                 no job with that id, prefix, request_id or idempotency key
    ├── AmbiguousJobRef             a prefix that names more than one job
    ├── NotRetryable                retry asked for a job that cannot be sent again
    ├── JobNotFinished              result asked for a job that has not finished
    ├── WaitTimeout                 wait(timeout=...) ran out; the job goes on
    ├── JobFailed                   the job ended failed or cancelled (carries the error)
    ├── CancelTooLate               the job finished before the cancel reached it
    └── ProviderError               anything the remote queue API did
        ├── ProviderRejected        the provider answered no (4xx): not retried
        ├── ProviderUnavailable     timeouts, connection errors, 5xx, 429 after all retries
        └── ProviderProtocolError   a reply we cannot understand (bad JSON, unknown status)

``ProviderError`` messages never include credentials.
"""

from __future__ import annotations

from typing import Any


class JobsError(Exception):
    """Base class of every error ``jobs`` raises on purpose."""


class ConfigError(JobsError):
    pass


class JobNotFound(JobsError):
    def __init__(self, ref: str) -> None:
        super().__init__(
            f"no job with id, id prefix, request id or idempotency key {ref!r}; "
            "`jobsctl list` shows known jobs"
        )
        self.ref = ref


class AmbiguousJobRef(JobsError):
    """A prefix matching several jobs: the message lists some of them."""

    def __init__(self, ref: str, candidates: list[str]) -> None:
        shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        super().__init__(
            f"{ref!r} names more than one job ({shown}); give more characters of the id"
        )
        self.ref = ref
        self.candidates = candidates


class NotRetryable(JobsError):
    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(f"job {job_id} cannot be retried: {why}")
        self.job_id = job_id


class JobNotFinished(JobsError):
    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}, not finished; use --wait to wait for it")
        self.job_id = job_id
        self.state = state


class WaitTimeout(JobsError):
    def __init__(self, job_id: str, timeout: float, state: str) -> None:
        super().__init__(
            f"job {job_id} still {state} after {timeout:g}s; it keeps running, ask again later"
        )
        self.job_id = job_id
        self.timeout = timeout
        self.state = state


class JobFailed(JobsError):
    def __init__(self, job_id: str, state: str, error: dict[str, Any] | None) -> None:
        message = (error or {}).get("message") or state
        super().__init__(f"job {job_id} {state}: {message}")
        self.job_id = job_id
        self.state = state
        self.error = error


class CancelTooLate(JobsError):
    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is already {state}; too late to cancel")
        self.job_id = job_id
        self.state = state


class UploadError(ConfigError):
    """A file cannot be uploaded as given (nothing was sent or recorded)."""


class IdempotencyConflict(JobsError):
    """An idempotency key already names a job asking for something else: returning that job
    would hand back another request's result, sending a new one would break the key."""

    def __init__(self, key: str, job_id: str, differs: list[str]) -> None:
        super().__init__(
            f"idempotency key {key!r} already names job {job_id}, whose "
            f"{' and '.join(differs)} differ from this request; use a new key for a new job"
        )
        self.key = key
        self.job_id = job_id
        self.differs = differs


class ProviderError(JobsError):
    """The remote queue API failed us. ``status_code`` is None for transport failures."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.request_id = request_id


class ProviderRejected(ProviderError):
    """The provider refused the request (4xx other than 408/409/429)."""


class ProviderUnavailable(ProviderError):
    """The provider could not be reached or kept failing (timeouts, 5xx, 429)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: Any = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        reached: bool = True,
    ) -> None:
        super().__init__(message, status_code=status_code, body=body, request_id=request_id)
        self.retry_after = retry_after
        # False only when the request provably never reached the queue (see providers.fal).
        self.reached = reached


class ProviderProtocolError(ProviderError):
    """The provider answered something we cannot interpret."""
