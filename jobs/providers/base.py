"""What every provider offers, and the value every remote reply is turned into.

A provider knows one remote API. It never touches the database: it turns HTTP replies into
:class:`Observation` values and the manager applies them through one compare-and-set path,
whether they came from a poll, a webhook, a submit reply or a result fetch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..states import FailureReason, State


@dataclass(frozen=True)
class RemoteRef:
    """Where a submitted request lives at the provider."""

    application: str
    request_id: str
    status_url: str | None = None
    response_url: str | None = None
    cancel_url: str | None = None


@dataclass(frozen=True)
class SubmitRequest:
    application: str
    arguments: Mapping[str, Any]
    path: str | None = None
    priority: str | None = None
    hint: str | None = None
    webhook_url: str | None = None
    # fal: how long the request may wait to start (queue, runner, retries), in seconds
    start_timeout: float | None = None


@dataclass(frozen=True)
class Observation:
    """What the provider told us about a request at one moment.

    ``state`` is already mapped to our states. ``needs_result`` marks "the remote says it
    finished, but the outcome must be fetched" (fal's COMPLETED status; a webhook whose payload
    was not included): the caller fetches the result and applies that instead.
    """

    state: State
    queue_position: int | None = None
    logs: tuple[Mapping[str, Any], ...] = ()
    metrics: Mapping[str, Any] | None = None
    result: Any = None
    error: Mapping[str, Any] | None = None
    failure_reason: FailureReason | None = None
    needs_result: bool = False
    source: str = "poll"


@dataclass(frozen=True)
class Submitted:
    ref: RemoteRef
    observation: Observation
    gateway_request_id: str | None = None


@dataclass(frozen=True)
class WebhookDelivery:
    """A verified webhook: which request it is about, what it says, the provider account
    that sent it (signed), and our job id and attempt number if the callback URL carried
    them."""

    request_id: str
    observation: Observation
    user_id: str
    job_id: str | None = None
    attempt: int | None = None


class Provider(Protocol):
    """The operations ``jobs`` needs from a remote queue API (async; one implementation)."""

    name: str

    def check(self, request: SubmitRequest) -> None:
        """Raise ``ConfigError`` for a request that cannot be sent (bad id, no credentials),
        before anything is recorded."""
        ...

    def send_delay(self) -> float:
        """Seconds a request would wait now for the provider's rate limit to pass."""
        ...

    def retry_delay(self, attempt: int) -> float:
        """The backoff before retry number ``attempt`` (1 = first), as its own retries use."""
        ...

    async def submit(self, request: SubmitRequest) -> Submitted: ...

    async def status(self, ref: RemoteRef, *, logs: bool = True) -> Observation: ...

    async def result(self, ref: RemoteRef, *, failed: bool | None = None) -> Observation:
        """The outcome of a finished request; ``failed`` is what its status said, if known."""
        ...

    async def cancel(self, ref: RemoteRef) -> bool:
        """True when the provider accepted the cancel; False when the request had finished."""
        ...

    def ref_for(self, application: str, request_id: str) -> RemoteRef:
        """Rebuild the URLs of a request submitted elsewhere (``track``)."""
        ...

    def track_ref(self, application: str, request_id: str) -> RemoteRef:
        """:meth:`ref_for` for a request named by a user (``jobsctl track``): raises
        ``ConfigError`` for an application or request id that cannot name one."""
        ...

    async def close(self) -> None: ...
