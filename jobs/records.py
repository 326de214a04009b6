"""The records ``jobs`` reads and writes: a job, what creating one needs, what applying a
change did, files, batches, uploads. Plain values with no SQL, so the web layer, the CLI
and the result cache import them without the store; :mod:`jobs.store` reads and writes
them.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Self, TypeVar

from sqlalchemy import (
    Row,
    Table,
)

from .db import (
    jobs,
)
from .errors import ConfigError
from .providers.base import RemoteRef
from .states import SUBMIT_FAILURES, State

# Labels are stored as JSON: these bound what one job can make the database hold.
MAX_LABELS = 64
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 255


def new_job_id() -> str:
    """32 hex chars: milliseconds since the epoch, then randomness, so ids sort by creation."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


# Jobs made in the same second share the id's leading timestamp digits; what tells them apart
# for a person is the random part, of which the short id is the first 10 characters (40 bits:
# one collision in about 2,000 among a million jobs, and a collision only asks for more).
SHORT_ID_START = 12
SHORT_ID_LENGTH = 10
MIN_PREFIX = 6


def short_id(job_id: str) -> str:
    """The part of a job id shown to people (tables, the dashboard); it names the job too."""
    return job_id[SHORT_ID_START : SHORT_ID_START + SHORT_ID_LENGTH]


def is_id_prefix(ref: str) -> bool:
    """Could ``ref`` be a prefix of an id or of a short id (lower-case hex, long enough)?"""
    return MIN_PREFIX <= len(ref) < 32 and all(c in "0123456789abcdef" for c in ref)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class PollJob:
    """A job as a poll needs it: what :meth:`Store.claim_due` returns (the columns a status
    poll, its compare-and-set apply and the backoff decision read, and none of the large
    JSON ones such as the input), and what a poll or webhook reports back when it applied
    without reading the row again. A :class:`Job` is a ``PollJob`` with every column."""

    id: str
    provider: str
    application: str
    request_id: str | None
    status_url: str | None
    response_url: str | None
    cancel_url: str | None
    state: State
    queue_position: int | None
    metrics: Any
    polls: int
    poll_interval: float | None
    next_poll_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    webhook: bool
    download_files: bool
    batch_index: int | None
    updated_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested_at: float | None

    @classmethod
    def from_row(cls, row: Row[Any] | Mapping[str, Any]) -> Self:
        """The record from a result row holding (at least) this record's columns."""
        if isinstance(row, Row):
            return cls.from_rows([row], row._fields)[0]
        values = [row[name] for name in _fields(cls)]
        at = _fields(cls).index("state")
        values[at] = State(values[at])
        return cls(*values)

    @classmethod
    def from_rows(cls, rows: Sequence[Row[Any]], columns: Sequence[str]) -> list[Self]:
        """Records from result rows with these ``columns`` (``result.keys()``): by position,
        looked up once for all of them (a claim reads a thousand rows; a mapping, or the
        column names, per row cost more than the query)."""
        positions = _positions(cls, tuple(columns))
        at = _fields(cls).index("state")
        made = []
        for row in rows:
            values = [row[i] for i in positions]
            values[at] = _STATES[values[at]]
            made.append(cls(*values))
        return made

    def with_row(self, row: Job) -> Self:
        """This record holding ``row``'s values (the same job, read again): the same kind
        of record, so a claim's ``PollJob`` stays one and a full :class:`Job` stays full."""
        names = _fields(Job) if isinstance(self, Job) else _fields(PollJob)
        return dataclasses.replace(self, **{name: getattr(row, name) for name in names})

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The ``jobs`` columns this record holds, in field order."""
        return _fields(cls)

    @property
    def safety_net(self) -> bool:
        """Whether polls are only the webhook's safety net (slow). Not after a cancel
        request: fal sends no webhook for a cancelled request, so it is polled like a fresh
        job until it ends."""
        return self.webhook and self.cancel_requested_at is None

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def ref(self) -> RemoteRef:
        if self.request_id is None:
            raise ValueError(f"job {self.id} has no request_id yet")
        return RemoteRef(
            application=self.application,
            request_id=self.request_id,
            status_url=self.status_url,
            response_url=self.response_url,
            cancel_url=self.cancel_url,
        )


@dataclass(frozen=True)
class Job(PollJob):
    """One row of the ``jobs`` table."""

    path: str | None
    arguments: Any
    gateway_request_id: str | None
    failure_reason: str | None
    error: Any
    priority: str | None
    hint: str | None
    labels: Any
    batch: str | None
    idempotency_key: str | None
    attempts: int
    created_at: float
    submitted_at: float | None
    last_change_at: float | None
    retry_of: str | None
    tracked: bool
    start_timeout: float | None
    cancel_after: float | None

    def to_dict(self) -> dict[str, Any]:
        """The public JSON shape (``jobs status``, ``GET /v1/jobs/{id}``)."""
        return {
            "id": self.id,
            "short_id": short_id(self.id),
            "provider": self.provider,
            "application": self.application,
            "path": self.path,
            "request_id": self.request_id,
            "state": self.state.value,
            "failure_reason": self.failure_reason,
            "error": self.error,
            "queue_position": self.queue_position,
            "priority": self.priority,
            "hint": self.hint,
            "labels": self.labels or {},
            "batch": self.batch,
            "batch_index": self.batch_index,
            "idempotency_key": self.idempotency_key,
            "webhook": self.webhook,
            "status_url": self.status_url,
            "response_url": self.response_url,
            "cancel_url": self.cancel_url,
            "metrics": self.metrics,
            "polls": self.polls,
            "attempts": self.attempts,
            "retry_of": self.retry_of,
            "tracked": self.tracked,
            "created_at": iso(self.created_at),
            "submitted_at": iso(self.submitted_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "updated_at": iso(self.updated_at),
        }


_STATES = {state.value: state for state in State}
# Per record class: its fields in order, where ``state`` is among them, and where each field
# sits in a result row of given columns (looked up once per shape of result).
_FIELDS: dict[type[PollJob], tuple[str, ...]] = {}
_POSITIONS: dict[tuple[type[PollJob], tuple[str, ...]], tuple[int, ...]] = {}


def _fields(cls: type[PollJob]) -> tuple[str, ...]:
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return found


def _positions(cls: type[PollJob], columns: tuple[str, ...]) -> tuple[int, ...]:
    key = (cls, columns)
    found = _POSITIONS.get(key)
    if found is None:
        found = _POSITIONS[key] = tuple(columns.index(name) for name in _fields(cls))
    return found


@dataclass(frozen=True)
class SubmitOptions:
    """What a submit may ask for besides the application and its input, defined once: the
    keywords of :meth:`jobs.manager.AsyncJobManager.submit`, the optional fields of
    ``POST /v1/jobs``, the options of ``jobsctl submit``/``run`` and of a batch all become
    one of these, and :meth:`~jobs.manager.AsyncJobManager.new_job` checks it with the
    provider."""

    provider: str = "fal"
    path: str | None = None
    priority: str | None = None
    hint: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    batch: str | None = None
    batch_index: int | None = None
    idempotency_key: str | None = None
    webhook: bool = True  # asked for when JOBS_PUBLIC_URL says where to send it
    download: bool | None = None  # None: JOBS_CACHE_FILES decides
    start_timeout: float | None = None
    cancel_after: float | None = None


# What the submit of a job came to, as every caller reports it (:func:`submit_outcome`).
SubmitOutcome = Literal["sent", "failed", "unconfirmed", "unsent"]


def submit_outcome(job: Job) -> SubmitOutcome:
    """``failed``: the submit itself failed (rejected, unreachable, or every attempt
    unconfirmed); ``unconfirmed``: it may have reached the provider, nobody knows yet;
    ``unsent``: recorded, provably never sent (sending again is safe); ``sent``."""
    if job.state is State.FAILED and job.failure_reason in SUBMIT_FAILURES:
        return "failed"
    if job.state is State.SUBMITTING:
        return "unsent" if job.attempts == 0 else "unconfirmed"
    return "sent"


@dataclass(frozen=True)
class NewJob:
    """What a caller asks to submit."""

    application: str
    arguments: Any
    provider: str = "fal"
    path: str | None = None
    priority: str | None = None
    hint: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    batch: str | None = None
    batch_index: int | None = None
    idempotency_key: str | None = None
    webhook: bool = False
    download_files: bool = False
    retry_of: str | None = None
    start_timeout: float | None = None
    cancel_after: float | None = None

    def __post_init__(self) -> None:
        """Refuse (``ConfigError`` naming the field) a value its column cannot hold, before
        anything is recorded: PostgreSQL refuses an over-long ``VARCHAR`` and any NUL."""
        for name in ("application", "path", "priority", "hint", "batch", "idempotency_key"):
            check_column_text(name, getattr(self, name))
        if len(self.labels) > MAX_LABELS:
            raise ConfigError(f"labels: {len(self.labels)} labels, the most is {MAX_LABELS}")
        for key, value in self.labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError("labels: keys and values must be strings")
            _check_text(f"label {key[:40]!r}", key, MAX_LABEL_KEY)
            _check_text(f"label {key[:40]!r}", value, MAX_LABEL_VALUE)


def column_length(name: str, table: Table = jobs) -> int:
    """The ``VARCHAR`` length of ``<table>.<name>`` (jobs/db.py; ``jobs`` by default)."""
    # Looked up once per column: every webhook checks four ids against their columns.
    found = _LENGTHS.get((table.name, name))
    if found is None:
        length = getattr(table.c[name].type, "length", None)
        assert isinstance(length, int), f"{table.name}.{name} is not a VARCHAR column"
        found = _LENGTHS[(table.name, name)] = length
    return found


_LENGTHS: dict[tuple[str, str], int] = {}


def check_column_text(name: str, value: str | None) -> None:
    """``ConfigError`` unless ``value`` fits the ``jobs.<name>`` column (or is None)."""
    if value is not None:
        _check_text(name, value, column_length(name))


def _storable(value: str, column: str) -> bool:
    """Whether a ``jobs.<column>`` value could equal ``value`` (PostgreSQL refuses NUL)."""
    return "\x00" not in value and len(value) <= column_length(column)


def _check_text(name: str, value: str, limit: int) -> None:
    if "\x00" in value:
        raise ConfigError(f"{name} holds a NUL character")
    if len(value) > limit:
        raise ConfigError(f"{name} is {len(value)} characters long; the most is {limit}")


J = TypeVar("J", bound=PollJob)
J_co = TypeVar("J_co", bound=PollJob, covariant=True)


@dataclass(frozen=True)
class Applied(Generic[J_co]):
    """What applying an observation did: the job after it (a :class:`Job` when the apply
    read the row, the record it was given updated with the values written when it did not
    need to: a poll or webhook fast path), the state before, whether the state moved."""

    job: J_co
    previous: State
    changed: bool  # the state moved

    @property
    def finished(self) -> bool:
        return self.changed and self.job.terminal


@dataclass(frozen=True)
class Claimed:
    job: PollJob
    took_over: bool  # the lease belonged to another (presumably dead) owner


@dataclass(frozen=True)
class NewFile:
    """A file found in a job's result, to be downloaded (see :mod:`jobs.results`)."""

    n: int
    url: str
    json_path: str | None = None
    file_name: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class JobFile:
    """One row of ``job_files``: state ``pending``, ``downloaded`` or ``failed``."""

    job_id: str
    n: int
    url: str
    json_path: str | None
    file_name: str | None
    content_type: str | None
    size: int | None
    sha256: str | None
    state: str
    error: str | None
    stored_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "url": self.url,
            "json_path": self.json_path,
            "file_name": self.file_name,
            "content_type": self.content_type,
            "size": self.size,
            "sha256": self.sha256,
            "state": self.state,
            "error": self.error,
            "stored_at": iso(self.stored_at),
        }


@dataclass(frozen=True)
class GcBatch:
    """What :meth:`Store.gc_batch` removed from the database."""

    job_ids: list[str]
    results: int
    result_bytes: int
    files: list[JobFile]


@dataclass(frozen=True)
class BatchProgress:
    """How far a batch has come: jobs per state, when it started and when a job last finished."""

    name: str
    counts: dict[State, int]
    started_at: float
    last_finished_at: float | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(n for state, n in self.counts.items() if state.terminal)

    @property
    def active(self) -> bool:
        return self.done < self.total

    def rate(self, now: float) -> float | None:
        """Jobs finished per second since the batch's first job was recorded."""
        end = now if self.active else (self.last_finished_at or now)
        elapsed = end - self.started_at
        return self.done / elapsed if self.done and elapsed > 0 else None

    def eta(self, now: float) -> float | None:
        """Seconds until every job is finished at the rate so far (None: no rate yet)."""
        rate = self.rate(now)
        if not self.active:
            return 0.0
        return (self.total - self.done) / rate if rate else None

    def to_dict(self, now: float) -> dict[str, Any]:
        """The public JSON shape (``GET /v1/batches``)."""
        return {
            "name": self.name,
            "total": self.total,
            "done": self.done,
            "counts": {state.value: self.counts.get(state, 0) for state in State},
            "started_at": iso(self.started_at),
            "last_finished_at": iso(self.last_finished_at),
            "rate_per_second": self.rate(now),
            "eta_seconds": self.eta(now),
        }


@dataclass(frozen=True)
class Overview:
    """Database-wide figures for the dashboard and the metrics, read in one transaction."""

    counts: dict[State, int]
    failures: dict[str, int]  # failed jobs by failure reason
    oldest_active: Job | None  # the unfinished job recorded first
    due: int  # active jobs whose next poll time has passed
    finished: int
    # Remote requests (submit attempts and status polls) spent on the finished jobs.
    finished_requests: int
    leases: dict[str, int]  # unexpired poll leases by owner (replica)

    @property
    def requests_per_finished(self) -> float | None:
        return self.finished_requests / self.finished if self.finished else None


@dataclass(frozen=True)
class NewUpload:
    """What :meth:`Store.begin_upload` / :meth:`Store.finish_upload` record of an upload."""

    sha256: str
    size: int
    content_type: str
    file_name: str | None
    lifecycle_seconds: int | None
    part_size: int | None = None
    multipart_id: str | None = None
    access_url: str | None = None


@dataclass(frozen=True)
class UploadRecord:
    """One row of the ``uploads`` table."""

    id: str
    sha256: str
    size: int
    content_type: str
    file_name: str | None
    state: str
    url: str | None
    multipart_id: str | None
    access_url: str | None
    part_size: int | None
    lifecycle_seconds: int | None
    created_at: float
    uploaded_at: float | None
    expires_at: float | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> UploadRecord:
        return cls(**{f.name: row._mapping[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class DuplicateRequest:
    """A second remote request found for one job: ``job`` keeps its request id (None
    when it ended without one), ``request_id`` is the surplus one; ``active`` when it may
    still run remotely."""

    job: Job
    request_id: str
    active: bool


@dataclass(frozen=True)
class Delivered:
    """What a webhook did: ``applied`` when it reached a job; otherwise ``refused`` says why
    not (``unknown``, ``foreign``, ``unverified``, ``duplicate_request``)."""

    applied: Applied[PollJob] | None = None
    refused: str | None = None
    duplicate: DuplicateRequest | None = None
