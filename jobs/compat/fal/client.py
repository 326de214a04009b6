"""fal_client 1.0's classes over :class:`jobs.JobManager` / :class:`jobs.AsyncJobManager`.

Every method is a call on the native API plus the translation fal_client's callers expect:
its status classes (``Queued(position: int)``, ``Completed(…, error: str, error_type)``),
its errors (``FalClientHTTPError`` with ``status_code`` and ``error_type``), URLs as plain
strings. The logic (recording, polling, uploading once) lives in the manager only.

Beyond fal_client, ``run``, ``submit``, ``subscribe`` and ``stream`` accept
``idempotency_key``, ``labels`` and ``batch``: re-running an interrupted script with the same
key resumes the recorded job instead of paying for a second one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ... import events as native
from ...config import Secret, Settings
from ...errors import (
    CancelTooLate,
    JobFailed,
    ProviderError,
    WaitTimeout,
)
from ...handles import AsyncJobHandle, SyncJobHandle
from ...manager import JobManager
from .auth import MissingCredentialsError

DEFAULT_QUEUE_POLL_INTERVAL = 0.1
_PRIORITY_HEADER = "x-fal-queue-priority"
_HINT_HEADER = "x-fal-runner-hint"


# --- fal_client's status and error types ----------------------------------------------------


@dataclass
class Status:
    """Base of ``Queued``, ``InProgress`` and ``Completed``."""


@dataclass
class Queued(Status):
    """Waiting; ``position`` is 0-based."""

    position: int


@dataclass
class InProgress(Status):
    """Running; ``logs`` (with ``with_logs=True``) holds every line so far."""

    logs: list[dict[str, Any]] | None = field()


@dataclass
class Completed(Status):
    """Finished; a failure carries ``error`` (text) and ``error_type``."""

    logs: list[dict[str, Any]] | None = field()
    metrics: dict[str, Any] = field()
    error: str | None = field(default=None)
    error_type: str | None = field(default=None)


class FalClientError(Exception):
    """Base of the errors fal_client names."""


@dataclass
class FalClientHTTPError(FalClientError):
    """fal answered with an error (``status_code``; ``message`` is the body's ``detail``)."""

    message: Any
    status_code: int
    response_headers: dict[str, str]
    response: Any = None
    error_type: str | None = None

    def __str__(self) -> str:
        return f"{self.message}"


@dataclass
class FalClientTimeoutError(FalClientError, TimeoutError):
    """``client_timeout`` ran out (the request was cancelled, best effort)."""

    timeout: float
    request_id: str | None = None

    def __str__(self) -> str:
        if self.request_id is None:
            return f"Request timed out after {self.timeout} seconds"
        return f"Request {self.request_id} timed out after {self.timeout} seconds"


def to_status(event: native.Status) -> Status:
    """A native status as fal_client's class."""
    if isinstance(event, native.Queued):
        return Queued(position=event.position or 0)
    if isinstance(event, native.InProgress):
        return InProgress(logs=event.logs)
    assert isinstance(event, native.Completed)
    error = event.error or {}
    failed = event.state != "succeeded"
    return Completed(
        logs=event.logs,
        metrics=dict(event.metrics),
        error=(error.get("message") or event.state) if failed else None,
        error_type=(error.get("type") or event.state) if failed else None,
    )


def _http_error(error: Mapping[str, Any] | None, state: str) -> FalClientHTTPError:
    error = error or {}
    body = error.get("detail")
    message = body.get("detail", error.get("message")) if isinstance(body, Mapping) else None
    default_code = 499 if state == "cancelled" else 500
    return FalClientHTTPError(
        message=message if message is not None else (error.get("message") or state),
        status_code=int(error.get("status_code") or default_code),
        response_headers={},
        error_type=error.get("type"),
    )


@contextlib.contextmanager
def _translated(timeout: float | None = None, request_id: str | None = None) -> Iterator[None]:
    """Native errors as fal_client's: what a fal_client caller catches still catches."""
    try:
        yield
    except JobFailed as exc:
        raise _http_error(exc.error, exc.state) from exc
    except CancelTooLate as exc:
        raise FalClientHTTPError({"status": "ALREADY_COMPLETED"}, 400, {}, error_type=None) from exc
    except WaitTimeout as exc:
        raise FalClientTimeoutError(timeout=timeout or exc.timeout, request_id=request_id) from exc
    except ProviderError as exc:
        if exc.status_code is None:
            raise FalClientError(str(exc)) from exc
        body = exc.body if isinstance(exc.body, Mapping) else None
        error = body or {"message": str(exc), "status_code": exc.status_code}
        raise _http_error(error, "failed") from exc


def _submit_options(
    *,
    path: str,
    hint: str | None,
    priority: str | None,
    headers: Mapping[str, str],
    webhook_url: str | None,
    start_timeout: float | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """fal_client's submit arguments as the native ``submit``'s; what cannot be honoured is
    refused, never silently dropped."""
    unknown = set(extra) - {"idempotency_key", "labels", "batch"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    lowered = {k.lower(): v for k, v in headers.items()}
    other = set(lowered) - {_PRIORITY_HEADER, _HINT_HEADER}
    if other:
        raise FalClientError(
            f"jobs.compat.fal sends no custom headers ({', '.join(sorted(other))}); "
            "use priority= and hint="
        )
    if webhook_url is not None:
        raise FalClientError(
            "jobs.compat.fal does not forward webhook_url: jobs receives fal's webhooks itself "
            "(set JOBS_PUBLIC_URL and run `jobsctl serve`)"
        )
    return {
        "start_timeout": start_timeout,
        "path": path or None,
        "hint": hint if hint is not None else lowered.get(_HINT_HEADER),
        "priority": priority if priority is not None else lowered.get(_PRIORITY_HEADER),
        **extra,
    }


def _start_timeout(start_timeout: float | None, client_timeout: float | None) -> float | None:
    """fal_client's rule: without a start timeout, the client timeout is also the start
    timeout; a larger start timeout than client timeout only earns a warning."""
    if client_timeout is None:
        return start_timeout
    if start_timeout is None:
        return client_timeout
    if start_timeout > client_timeout:
        warnings.warn(
            f"start_timeout ({start_timeout}s) is larger than client_timeout "
            f"({client_timeout}s). The request may timeout on the client before the "
            "server-side timeout is reached.",
            UserWarning,
            stacklevel=3,
        )
    return start_timeout


def _no_storage_options(repository: Any, fallback_repository: Any, lifecycle: Any) -> None:
    if lifecycle is not None:
        raise FalClientError(
            "jobs.compat.fal sets an upload's lifetime from JOBS_UPLOAD_TTL, not lifecycle="
        )
    if repository not in (None, "fal_v3", "cdn"):
        raise FalClientError(f"jobs.compat.fal uploads to fal's CDN only, not {repository!r}")
    del fallback_repository  # the CDN is the only repository; there is nothing to fall back to


def _open_manager(key: str | None) -> JobManager:
    """A manager from the environment (``key`` wins over ``FAL_KEY``), closed at exit so its
    HTTP clients shut down cleanly; ``MissingCredentialsError`` before anything is opened."""
    settings = Settings.from_env()
    if key is not None:
        settings = settings.replace(fal_key=Secret(key))
    if settings.fal_key is None:
        raise MissingCredentialsError()
    manager = JobManager(settings)
    atexit.register(manager.close)
    return manager


# --- the sync client ------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncRequestHandle:
    """fal_client's ``SyncRequestHandle`` over a recorded job (its fields via ``job``)."""

    request_id: str
    response_url: str = field(repr=False)
    status_url: str = field(repr=False)
    cancel_url: str = field(repr=False)
    job: SyncJobHandle = field(repr=False, compare=False)

    @classmethod
    def of(cls, job: SyncJobHandle) -> SyncRequestHandle:
        return cls(
            request_id=job.request_id or "",
            response_url=job.response_url or "",
            status_url=job.status_url or "",
            cancel_url=job.cancel_url or "",
            job=job,
        )

    @classmethod
    def from_request_id(
        cls, client: SyncClient, application: str, request_id: str
    ) -> SyncRequestHandle:
        return client.get_handle(application, request_id)

    def status(self, *, with_logs: bool = False) -> Status:
        with _translated():
            return to_status(self.job.status(with_logs=with_logs))

    def iter_events(
        self, *, with_logs: bool = False, interval: float = DEFAULT_QUEUE_POLL_INTERVAL
    ) -> Iterator[Status]:
        with _translated():
            for event in self.job.iter_events(with_logs=with_logs, interval=interval):
                yield to_status(event)

    def get(self, *, interval: float = DEFAULT_QUEUE_POLL_INTERVAL) -> Any:
        with _translated():
            return self.job.get(interval=interval)

    def cancel(self) -> None:
        with _translated():
            self.job.cancel()


class SyncClient:
    """fal_client's ``SyncClient``: same methods and signatures, durable underneath (one
    :class:`jobs.JobManager`, made on first use from the environment; ``key`` wins over
    ``FAL_KEY``)."""

    def __init__(self, key: str | None = None, default_timeout: float = 120.0) -> None:
        self.key = key
        self.default_timeout = default_timeout
        self._manager: JobManager | None = None

    @property
    def manager(self) -> JobManager:
        """The manager behind this client (``MissingCredentialsError`` without a key)."""
        if self._manager is None:
            self._manager = _open_manager(self.key)
        return self._manager

    def close(self) -> None:
        """Close the manager (also done at exit)."""
        if self._manager is not None:
            atexit.unregister(self._manager.close)
            self._manager.close()
            self._manager = None

    def run(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        method: str = "POST",
        path: str = "",
        timeout: float | None = None,
        start_timeout: float | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> Any:
        """Run and wait for the result: through the queue, recorded as a job."""
        if method.upper() != "POST":
            raise FalClientError("jobs.compat.fal runs applications with POST only")
        options = _submit_options(
            path=path,
            hint=hint,
            priority=None,
            headers=headers or {},
            webhook_url=None,
            start_timeout=start_timeout,
            extra=extra,
        )
        manager = self.manager
        with _translated(timeout):
            return manager.run(application, arguments, timeout=timeout, **options)

    def submit(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "",
        hint: str | None = None,
        webhook_url: str | None = None,
        priority: str | None = None,
        headers: Mapping[str, str] | None = None,
        start_timeout: float | None = None,
        **extra: Any,
    ) -> SyncRequestHandle:
        options = _submit_options(
            path=path,
            hint=hint,
            priority=priority,
            headers=headers or {},
            webhook_url=webhook_url,
            start_timeout=start_timeout,
            extra=extra,
        )
        manager = self.manager
        with _translated():
            return SyncRequestHandle.of(manager.submit(application, arguments, **options))

    def subscribe(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "",
        hint: str | None = None,
        with_logs: bool = False,
        interval: float = DEFAULT_QUEUE_POLL_INTERVAL,
        on_enqueue: Callable[[str], None] | None = None,
        on_queue_update: Callable[[Status], None] | None = None,
        priority: str | None = None,
        headers: Mapping[str, str] | None = None,
        start_timeout: float | None = None,
        client_timeout: float | None = None,
        **extra: Any,
    ) -> Any:
        """Submit, report progress, wait for the result. ``client_timeout`` bounds the wait:
        then the request is cancelled (best effort) and ``FalClientTimeoutError`` raised;
        it is also the ``start_timeout`` when none is given, as in fal_client."""
        start_timeout = _start_timeout(start_timeout, client_timeout)
        handle = self.submit(
            application,
            arguments,
            path=path,
            hint=hint,
            priority=priority,
            headers=headers,
            start_timeout=start_timeout,
            **extra,
        )
        if on_enqueue is not None:
            on_enqueue(handle.request_id)
        manager = handle.job.manager
        job_id = handle.job.id
        try:
            with _translated(client_timeout, handle.request_id):
                if on_queue_update is not None:
                    events = manager.iter_events(
                        job_id, with_logs=with_logs, timeout=client_timeout
                    )
                    for event in events:
                        on_queue_update(to_status(event))
                return manager.result(job_id, wait=True, timeout=client_timeout)
        except FalClientTimeoutError:
            with contextlib.suppress(Exception):
                manager.cancel(job_id, wait=0)
            raise

    def get_handle(self, application: str, request_id: str) -> SyncRequestHandle:
        manager = self.manager
        with _translated():
            return SyncRequestHandle.of(manager.get_handle(application, request_id))

    def status(self, application: str, request_id: str, *, with_logs: bool = False) -> Status:
        return self.get_handle(application, request_id).status(with_logs=with_logs)

    def result(self, application: str, request_id: str) -> Any:
        return self.get_handle(application, request_id).get()

    def cancel(self, application: str, request_id: str) -> None:
        self.get_handle(application, request_id).cancel()

    def stream(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "/stream",
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> Iterator[dict[str, Any]]:
        """Each event of a streaming endpoint; the call is recorded as a job."""
        _submit_options(
            path=path,
            hint=None,
            priority=None,
            headers=headers or {},
            webhook_url=None,
            start_timeout=None,
            extra=extra,
        )
        manager = self.manager
        with _translated():
            yield from manager.stream(application, arguments, path=path, timeout=timeout, **extra)

    def upload(
        self,
        data: str | bytes,
        content_type: str,
        file_name: str | None = None,
        *,
        repository: Any = None,
        fallback_repository: Any = None,
        lifecycle: Any = None,
    ) -> str:
        """Upload bytes once; the URL (the same bytes again: the same URL, nothing sent)."""
        _no_storage_options(repository, fallback_repository, lifecycle)
        manager = self.manager
        with _translated():
            return manager.upload(data, content_type, file_name).url

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        repository: Any = None,
        fallback_repository: Any = None,
        lifecycle: Any = None,
    ) -> str:
        """Upload a file (a folder: zipped deterministically) once; its URL."""
        _no_storage_options(repository, fallback_repository, lifecycle)
        manager = self.manager
        with _translated():
            return manager.upload_file(path).url

    def upload_image(
        self,
        image: Any,
        format: str = "jpeg",
        *,
        repository: Any = None,
        fallback_repository: Any = None,
        lifecycle: Any = None,
    ) -> str:
        """Upload a Pillow image (``image/<format>``) once; its URL."""
        _no_storage_options(repository, fallback_repository, lifecycle)
        manager = self.manager
        with _translated():
            return manager.upload_image(image, format).url


# --- the async client -----------------------------------------------------------------------
#
# The manager runs on the private event loop of a JobManager; every coroutine is run there
# through ``JobManager.bridge``, so one manager (and its HTTP clients) serves every
# ``asyncio.run`` a script makes, and is closed cleanly at exit.


@dataclass(frozen=True)
class AsyncRequestHandle:
    """fal_client's ``AsyncRequestHandle`` over a recorded job (its fields via ``job``)."""

    request_id: str
    response_url: str = field(repr=False)
    status_url: str = field(repr=False)
    cancel_url: str = field(repr=False)
    job: AsyncJobHandle = field(repr=False, compare=False)
    bridge: JobManager = field(repr=False, compare=False)

    @classmethod
    def of(cls, job: AsyncJobHandle, bridge: JobManager) -> AsyncRequestHandle:
        return cls(
            request_id=job.request_id or "",
            response_url=job.response_url or "",
            status_url=job.status_url or "",
            cancel_url=job.cancel_url or "",
            job=job,
            bridge=bridge,
        )

    @classmethod
    async def from_request_id(
        cls, client: AsyncClient, application: str, request_id: str
    ) -> AsyncRequestHandle:
        """Re-attach by id. Unlike fal_client's, awaited: adopting the request is recorded."""
        return await client.get_handle(application, request_id)

    async def status(self, *, with_logs: bool = False) -> Status:
        with _translated():
            return to_status(await self.bridge.bridge(self.job.status(with_logs=with_logs)))

    async def iter_events(
        self, *, with_logs: bool = False, interval: float = DEFAULT_QUEUE_POLL_INTERVAL
    ) -> AsyncIterator[Status]:
        events = self.job.iter_events(with_logs=with_logs, interval=interval)
        with _translated():
            async for event in self.bridge.bridge_iter(events):
                yield to_status(event)

    async def get(self, *, interval: float = DEFAULT_QUEUE_POLL_INTERVAL) -> Any:
        with _translated():
            return await self.bridge.bridge(self.job.get(interval=interval))

    async def cancel(self) -> None:
        with _translated():
            await self.bridge.bridge(self.job.cancel())


class AsyncClient:
    """fal_client's ``AsyncClient``: same methods and signatures, durable underneath."""

    def __init__(self, key: str | None = None, default_timeout: float = 120.0) -> None:
        self.key = key
        self.default_timeout = default_timeout
        self._manager: JobManager | None = None

    @property
    def manager(self) -> JobManager:
        """The manager behind this client (``MissingCredentialsError`` without a key)."""
        if self._manager is None:
            self._manager = _open_manager(self.key)
        return self._manager

    def close(self) -> None:
        """Close the manager (also done at exit)."""
        if self._manager is not None:
            atexit.unregister(self._manager.close)
            self._manager.close()
            self._manager = None

    async def run(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        method: str = "POST",
        path: str = "",
        timeout: float | None = None,
        start_timeout: float | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> Any:
        """Run and wait for the result: through the queue, recorded as a job."""
        if method.upper() != "POST":
            raise FalClientError("jobs.compat.fal runs applications with POST only")
        options = _submit_options(
            path=path,
            hint=hint,
            priority=None,
            headers=headers or {},
            webhook_url=None,
            start_timeout=start_timeout,
            extra=extra,
        )
        jm = self.manager
        with _translated(timeout):
            return await jm.bridge(
                jm.async_manager.run(application, arguments, timeout=timeout, **options)
            )

    async def submit(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "",
        hint: str | None = None,
        webhook_url: str | None = None,
        priority: str | None = None,
        headers: Mapping[str, str] | None = None,
        start_timeout: float | None = None,
        **extra: Any,
    ) -> AsyncRequestHandle:
        options = _submit_options(
            path=path,
            hint=hint,
            priority=priority,
            headers=headers or {},
            webhook_url=webhook_url,
            start_timeout=start_timeout,
            extra=extra,
        )
        jm = self.manager
        with _translated():
            job = await jm.bridge(jm.async_manager.submit(application, arguments, **options))
            return AsyncRequestHandle.of(job, jm)

    async def subscribe(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "",
        hint: str | None = None,
        with_logs: bool = False,
        interval: float = DEFAULT_QUEUE_POLL_INTERVAL,
        on_enqueue: Callable[[str], None] | None = None,
        on_queue_update: Callable[[Status], None] | None = None,
        priority: str | None = None,
        headers: Mapping[str, str] | None = None,
        start_timeout: float | None = None,
        client_timeout: float | None = None,
        **extra: Any,
    ) -> Any:
        """Submit, report progress, wait for the result (see :meth:`SyncClient.subscribe`)."""
        start_timeout = _start_timeout(start_timeout, client_timeout)
        handle = await self.submit(
            application,
            arguments,
            path=path,
            hint=hint,
            priority=priority,
            headers=headers,
            start_timeout=start_timeout,
            **extra,
        )
        if on_enqueue is not None:
            on_enqueue(handle.request_id)
        jm = handle.bridge
        manager = jm.async_manager
        job_id = handle.job.id
        try:
            with _translated(client_timeout, handle.request_id):
                if on_queue_update is not None:
                    events = manager.iter_events(
                        job_id, with_logs=with_logs, timeout=client_timeout
                    )
                    async for event in jm.bridge_iter(events):
                        on_queue_update(to_status(event))
                return await jm.bridge(manager.result(job_id, wait=True, timeout=client_timeout))
        except FalClientTimeoutError:
            with contextlib.suppress(Exception):
                await jm.bridge(manager.cancel(job_id, wait=0))
            raise

    async def get_handle(self, application: str, request_id: str) -> AsyncRequestHandle:
        jm = self.manager
        with _translated():
            job = await jm.bridge(jm.async_manager.get_handle(application, request_id))
            return AsyncRequestHandle.of(job, jm)

    async def status(self, application: str, request_id: str, *, with_logs: bool = False) -> Status:
        handle = await self.get_handle(application, request_id)
        return await handle.status(with_logs=with_logs)

    async def result(self, application: str, request_id: str) -> Any:
        return await (await self.get_handle(application, request_id)).get()

    async def cancel(self, application: str, request_id: str) -> None:
        await (await self.get_handle(application, request_id)).cancel()

    async def stream(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "/stream",
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Each event of a streaming endpoint; the call is recorded as a job."""
        _submit_options(
            path=path,
            hint=None,
            priority=None,
            headers=headers or {},
            webhook_url=None,
            start_timeout=None,
            extra=extra,
        )
        jm = self.manager
        events = jm.async_manager.stream(
            application, arguments, path=path, timeout=timeout, **extra
        )
        with _translated():
            async for event in jm.bridge_iter(events):
                yield event

    async def upload(
        self,
        data: str | bytes,
        content_type: str,
        file_name: str | None = None,
        *,
        repository: Any = None,
        fallback_repository: Any = None,
        lifecycle: Any = None,
    ) -> str:
        _no_storage_options(repository, fallback_repository, lifecycle)
        jm = self.manager
        with _translated():
            return (await jm.bridge(jm.async_manager.upload(data, content_type, file_name))).url

    async def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        repository: Any = None,
        fallback_repository: Any = None,
        lifecycle: Any = None,
    ) -> str:
        _no_storage_options(repository, fallback_repository, lifecycle)
        jm = self.manager
        with _translated():
            return (await jm.bridge(jm.async_manager.upload_file(path))).url

    async def upload_image(
        self,
        image: Any,
        format: str = "jpeg",
        *,
        repository: Any = None,
        fallback_repository: Any = None,
        lifecycle: Any = None,
    ) -> str:
        _no_storage_options(repository, fallback_repository, lifecycle)
        jm = self.manager
        with _translated():
            return (await jm.bridge(jm.async_manager.upload_image(image, format))).url
