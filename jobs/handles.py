"""What ``submit`` returns: the job's fields, and fal_client's request-handle methods.

A handle *is* a :class:`jobs.Job` (the row as it was when the handle was made: ``id``,
``state``, ``request_id``…), so code reading a job keeps working, and it answers the calls
fal_client's ``SyncRequestHandle`` / ``AsyncRequestHandle`` answer, each going through the
manager (so through the store: durable, and polling only when the job is due):

    handle.request_id
    handle.status(with_logs=False)                  Queued / InProgress / Completed
    handle.iter_events(with_logs=False, interval=)  until Completed, logs cumulative
    handle.get()                                     wait for the result
    handle.cancel()

``interval`` is accepted for fal_client's sake; polls follow ``jobs``' own backoff.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .events import Status
from .records import Job

if TYPE_CHECKING:
    from .manager import AsyncJobManager, JobManager


def _fields(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in Job.__dataclass_fields__}


@dataclass(frozen=True)
class AsyncJobHandle(Job):
    """A job of an :class:`~jobs.AsyncJobManager`, with fal_client's async handle methods."""

    manager: AsyncJobManager = field(kw_only=True, repr=False, compare=False)

    @classmethod
    def of(cls, job: Job, manager: AsyncJobManager) -> AsyncJobHandle:
        return cls(**_fields(job), manager=manager)

    async def status(self, *, with_logs: bool = False) -> Status:
        return await self.manager.current_status(self.id, with_logs=with_logs)

    async def iter_events(
        self, *, with_logs: bool = False, interval: float | None = None
    ) -> AsyncIterator[Status]:
        async for event in self.manager.iter_events(self.id, with_logs=with_logs):
            yield event

    async def get(self, *, interval: float | None = None) -> Any:
        return await self.manager.result(self.id, wait=True)

    async def cancel(self) -> None:
        await self.manager.cancel(self.id)

    async def reload(self) -> AsyncJobHandle:
        """The same handle with the job's fields as stored now."""
        return AsyncJobHandle.of(await self.manager.status(self.id), self.manager)


@dataclass(frozen=True)
class SyncJobHandle(Job):
    """A job of a :class:`~jobs.JobManager`, with fal_client's sync handle methods."""

    manager: JobManager = field(kw_only=True, repr=False, compare=False)

    @classmethod
    def of(cls, job: Job, manager: JobManager) -> SyncJobHandle:
        return cls(**_fields(job), manager=manager)

    @classmethod
    def from_request_id(cls, client: Any, application: str, request_id: str) -> SyncJobHandle:
        """Re-attach to a request by id (adopting it, as ``track`` does); ``client`` is a
        :class:`~jobs.JobManager` or anything with its ``get_handle``."""
        handle: SyncJobHandle = client.get_handle(application, request_id)
        return handle

    def status(self, *, with_logs: bool = False) -> Status:
        return self.manager.current_status(self.id, with_logs=with_logs)

    def iter_events(
        self, *, with_logs: bool = False, interval: float | None = None
    ) -> Iterator[Status]:
        return self.manager.iter_events(self.id, with_logs=with_logs)

    def get(self, *, interval: float | None = None) -> Any:
        return self.manager.result(self.id, wait=True)

    def cancel(self) -> None:
        self.manager.cancel(self.id)

    def reload(self) -> SyncJobHandle:
        """The same handle with the job's fields as stored now."""
        return SyncJobHandle.of(self.manager.status(self.id), self.manager)
