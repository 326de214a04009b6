"""What every provider offers, and the value every remote reply is turned into.

A provider knows one remote API. It never touches the database: it turns HTTP replies into
:class:`Observation` values and the manager applies them through one compare-and-set path,
whether they came from a poll, a webhook, a submit reply or a result fetch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    # Replicate: a deadline in seconds (``Cancel-After``); aborted if not started by then
    cancel_after: float | None = None


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
    that sent it, and our job id and attempt number if the callback URL carried them.

    ``user_id`` is the signed account id when the provider names one in a delivery (fal);
    ``None`` when the signature itself proves the delivery is ours (Replicate signs with a
    secret of our own account). ``delivery_id`` is the provider's id of the message, the
    same across its retries (Replicate's ``webhook-id``), when it has one."""

    request_id: str
    observation: Observation
    user_id: str | None
    job_id: str | None = None
    attempt: int | None = None
    delivery_id: str | None = None


@dataclass(frozen=True)
class Lookup:
    """What the provider could find out about a submit whose reply was lost.

    ``submitted`` is the request the submit made, when found; with ``certain`` and nothing
    found, the submit provably never arrived (safe to send again); without ``certain``
    nobody can tell (no way to list requests, or the listing failed) and the ambiguous
    policy decides."""

    submitted: Submitted | None
    certain: bool
    detail: str = ""


# Which of these request ids other jobs already hold (so a lost submit cannot be theirs).
Held = Callable[[Sequence[str]], Awaitable[set[str]]]


class WebhookUnavailable(Exception):
    """A callback cannot be verified now (say the signing keys are unreachable): the
    receiver fails closed with a retryable answer and the provider delivers again."""


class Provider(Protocol):
    """The operations ``jobs`` needs from a remote queue API (async; one class per API).

    Adding a provider is a class here and a line in :func:`jobs.providers.create`: the
    manager, the store and the web layer only speak this protocol."""

    name: str
    # The account its webhooks must come from when configured (``JOBS_FAL_USER_ID``), else
    # None: learned from the first callback for a request we submitted.
    account: str | None

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

    async def find_submitted(
        self, request: SubmitRequest, *, job_id: str, since: float, held: Held | None = None
    ) -> Lookup:
        """Look for the request a lost submit of ``request`` (for our job ``job_id``, sent
        no earlier than ``since``, Unix seconds) may have made; ``held`` tells which
        requests other jobs already hold (one with the same input is theirs, not ours)."""
        ...

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

    async def parse_webhook(
        self,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float,
        job_id: str | None = None,
        attempt: int | None = None,
    ) -> WebhookDelivery:
        """Verify a callback and read it. ``job_id`` and ``attempt`` come from the callback
        URL. Raises ``SignatureError`` (not authentic), ``ValueError`` (authentic but
        unreadable) or :class:`WebhookUnavailable` (cannot verify now)."""
        ...

    async def close(self) -> None: ...
