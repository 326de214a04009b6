"""Every SQL statement ``jobs`` runs, each in one named method.

State changes are compare-and-set: an ``UPDATE … WHERE state = <the state we read>`` that
applies only when :func:`jobs.states.can_transition` allows it, so a late or repeated
observation never moves a job backwards and a result is written once.

SQLite: one writer at a time per process (a lock) and ``BEGIN IMMEDIATE`` so concurrent
processes queue on the busy timeout instead of failing to upgrade a read lock. PostgreSQL:
the poll claim uses ``FOR UPDATE SKIP LOCKED`` so replicas never claim the same job.
Transient database errors (a PostgreSQL restart, a lock held past the busy timeout) are
retried a bounded number of times.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    Row,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, PendingRollbackError
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Exists, Select

from .db import (
    create_db_engine,
    hide_password,
    job_events,
    job_files,
    job_logs,
    jobs,
    provider_accounts,
    results,
    upload_parts,
    uploads,
)
from .errors import AmbiguousJobRef, ConfigError, IdempotencyConflict, JobNotFound
from .providers.base import Observation, RemoteRef, Submitted
from .states import ACTIVE, FailureReason, State, can_transition

T = TypeVar("T")

DB_RETRIES = 5
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
class Job:
    """One row of the ``jobs`` table."""

    id: str
    provider: str
    application: str
    path: str | None
    arguments: Any
    request_id: str | None
    gateway_request_id: str | None
    status_url: str | None
    response_url: str | None
    cancel_url: str | None
    state: State
    failure_reason: str | None
    error: Any
    priority: str | None
    hint: str | None
    labels: Any
    batch: str | None
    batch_index: int | None
    idempotency_key: str | None
    webhook: bool
    download_files: bool
    queue_position: int | None
    metrics: Any
    attempts: int
    polls: int
    poll_interval: float | None
    next_poll_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    last_change_at: float | None
    cancel_requested_at: float | None
    retry_of: str | None
    tracked: bool
    start_timeout: float | None

    @classmethod
    def from_row(cls, row: Row[Any] | Mapping[str, Any]) -> Job:
        if isinstance(row, Row):
            # By position: building a mapping per row cost more than the query (a claim
            # reads a thousand rows).
            positions = _job_positions(row._fields)
            values = [row[i] for i in positions]
        else:
            values = [row[name] for name in _JOB_FIELDS]
        values[_STATE_AT] = State(values[_STATE_AT])
        return cls(*values)

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


_JOB_FIELDS = tuple(f for f in Job.__dataclass_fields__)
_STATE_AT = _JOB_FIELDS.index("state")


@functools.cache
def _job_positions(columns: tuple[str, ...]) -> tuple[int, ...]:
    """Where each Job field sits in a result with these columns."""
    return tuple(columns.index(name) for name in _JOB_FIELDS)


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
    length = getattr(table.c[name].type, "length", None)
    assert isinstance(length, int), f"{table.name}.{name} is not a VARCHAR column"
    return length


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


@dataclass(frozen=True)
class Applied:
    """What :meth:`Store.apply` did."""

    job: Job
    previous: State
    changed: bool  # the state moved

    @property
    def finished(self) -> bool:
        return self.changed and self.job.terminal


@dataclass(frozen=True)
class Claimed:
    job: Job
    took_over: bool  # the lease belonged to another (presumably dead) owner


T_co = TypeVar("T_co", covariant=True)


class Write(Protocol[T_co]):
    """One write that can share a transaction with others (:meth:`Store.write_many`)."""

    def run(self, conn: Connection, now: float) -> T_co: ...


@dataclass(frozen=True)
class BeginSubmit:
    """Count a submit attempt before the HTTP call: a compare-and-set on ``attempts``, so two
    processes never send the same attempt and a crash leaves an ambiguous job. True when
    this caller may send."""

    job_id: str
    seen_attempts: int
    reason: str = "submit"

    def run(self, conn: Connection, now: float) -> bool:
        params = {"b_id": self.job_id, "b_attempts": self.seen_attempts}
        done = conn.execute(
            _BEGIN_SUBMIT, {**params, "attempts": self.seen_attempts + 1, "updated_at": now}
        )
        if done.rowcount != 1:
            return False
        detail = {"attempt": self.seen_attempts + 1}
        _event(conn, self.job_id, now, "submit_sent", reason=self.reason, detail=detail)
        return True


@dataclass(frozen=True)
class MarkSubmitted:
    """Record the request id and URLs: ``submitting -> queued`` (or keep a state a webhook
    already advanced, while still storing the request id)."""

    job_id: str
    submitted: Submitted
    next_poll_at: float
    poll_interval: float | None = None

    def run(self, conn: Connection, now: float) -> Job:
        ref = self.submitted.ref
        current = _get(conn, self.job_id)
        if current.request_id is not None and current.request_id != ref.request_id:
            # An earlier attempt's request was adopted meanwhile (its webhook came first):
            # keep it, and record this one as the surplus the caller may cancel.
            _record_duplicate(
                conn, current, ref.request_id, now, source="submit", attempt=current.attempts
            )
            return current
        values: dict[str, Any] = {
            "request_id": ref.request_id,
            "gateway_request_id": self.submitted.gateway_request_id,
            "status_url": ref.status_url,
            "response_url": ref.response_url,
            "cancel_url": ref.cancel_url,
            "submitted_at": now,
            "updated_at": now,
        }
        queued = {
            "state": State.QUEUED.value,
            "queue_position": self.submitted.observation.queue_position,
            "next_poll_at": self.next_poll_at,
            "poll_interval": self.poll_interval,
            "last_change_at": now,
        }
        row = conn.execute(
            _UPDATE_IF_STATE,
            {**values, **queued, "b_id": self.job_id, "b_state": State.SUBMITTING.value},
        ).first()
        previous = State.SUBMITTING
        if row is None:
            # A webhook got there first and moved the job on: keep its state.
            row = conn.execute(_UPDATE_JOB, {**values, "b_id": self.job_id}).first()
            if row is None:
                raise JobNotFound(self.job_id)
            previous = State(row.state)
        job = Job.from_row(row)
        _event(
            conn,
            self.job_id,
            now,
            "submitted",
            from_state=previous,
            to_state=job.state,
            detail={"request_id": ref.request_id},
        )
        return job


Schedule = Callable[[Job, Observation], tuple[float | None, float | None]]


@dataclass(frozen=True)
class Change:
    """One observation to apply, to a job named by our id or by its request id."""

    obs: Observation
    job_id: str | None = None
    request_id: str | None = None
    provider: str = "fal"
    next_poll_at: float | None = None
    poll_interval: float | None = None
    # Computes (next_poll_at, poll_interval) from the job as read inside the transaction.
    schedule: Schedule | None = None
    only_from: tuple[State, ...] | None = None

    def __post_init__(self) -> None:
        _check_ids((("request_id", self.request_id, "request_id"),))

    def run(self, conn: Connection, now: float) -> Applied | None:
        return _apply_one(conn, self, now)


def _check_ids(ids: Sequence[tuple[str, str | None, str]]) -> None:
    """Ids from a webhook (its body, its ?job=) are outside input: one the columns cannot
    hold names no job, and is refused as malformed (ValueError) rather than sent to SQL."""
    for name, value, column in ids:
        if value is not None and ("\x00" in value or len(value) > column_length(column)):
            raise ValueError(
                f"{name} is not an id: NUL, or over {column_length(column)} characters"
            )


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

    applied: Applied | None = None
    refused: str | None = None
    duplicate: DuplicateRequest | None = None


@dataclass(frozen=True)
class Callback:
    """A verified webhook about ``request_id``, sent by provider account ``user_id``
    (``None``: the signature itself proved it comes from our account).

    Applied only when the account matches ``account`` (configured), or the one stored in
    ``provider_accounts``, or, when neither is known, the callback is about a request we
    submitted: then its account is learned (a tracked request's callback is applied
    without teaching anything). ``job_id`` (from the callback URL) names an
    ambiguous submit the request may belong to: it is adopted only when the account is
    known and matches, and never replaces a request id the job already has, nor revives a
    job that ended (either makes it a duplicate remote request, recorded as such)."""

    obs: Observation
    request_id: str
    user_id: str | None
    provider: str
    job_id: str | None = None
    attempt: int | None = None
    account: str | None = None
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        _check_ids((("request_id", self.request_id, "request_id"), ("job id", self.job_id, "id")))
        longest = column_length("user_id", provider_accounts)
        if self.user_id is not None and ("\x00" in self.user_id or len(self.user_id) > longest):
            raise ValueError(f"the webhook user id has NUL or is over {longest} characters")

    def run(self, conn: Connection, now: float) -> Delivered:
        if self.user_id is None:
            return self._from_us(conn, now)
        account = self.account or _account(conn, self.provider)
        params = {"b_request_id": self.request_id, "b_provider": self.provider}
        row = conn.execute(_JOB_BY_REQUEST, params).first()
        if row is not None:
            if account is None:
                if row.tracked:
                    # Submitted elsewhere (``track``), maybe from another account: it may
                    # be applied, but it teaches nothing about ours.
                    return Delivered(applied=self._apply(conn, row.id, now))
                account = _learn_account(conn, self.provider, self.user_id, now)
            if account != self.user_id:
                return Delivered(refused="foreign")
            return Delivered(applied=self._apply(conn, row.id, now))
        if self.job_id is None:
            return Delivered(refused="unknown")
        if account is None:
            return Delivered(refused="unverified")
        if account != self.user_id:
            return Delivered(refused="foreign")
        return self._adopt_or_duplicate(conn, now)

    def _from_us(self, conn: Connection, now: float) -> Delivered:
        params = {"b_request_id": self.request_id, "b_provider": self.provider}
        row = conn.execute(_JOB_BY_REQUEST, params).first()
        if row is not None:
            return Delivered(applied=self._apply(conn, row.id, now))
        if self.job_id is None:
            return Delivered(refused="unknown")
        return self._adopt_or_duplicate(conn, now)

    def _adopt_or_duplicate(self, conn: Connection, now: float) -> Delivered:
        assert self.job_id is not None
        job_row = conn.execute(_JOB_BY_ID, {"b_id": self.job_id}).first()
        if job_row is None:
            return Delivered(refused="unknown")
        if _adopt(conn, self.job_id, self.request_id, now):
            return Delivered(applied=self._apply(conn, self.job_id, now))
        job = Job.from_row(job_row)
        # The job keeps another request, or ended with none (say failed as ambiguous after
        # its last attempt): either way this request is one more than the job can use.
        if not _record_duplicate(
            conn, job, self.request_id, now, source="webhook", attempt=self.attempt
        ):
            return Delivered(refused="duplicate_request")  # seen before: counted once
        active = not (self.obs.state.terminal or self.obs.needs_result)
        duplicate = DuplicateRequest(job=job, request_id=self.request_id, active=active)
        return Delivered(refused="duplicate_request", duplicate=duplicate)

    def _apply(self, conn: Connection, job_id: str, now: float) -> Applied | None:
        return _apply_one(conn, Change(self.obs, job_id=job_id, schedule=self.schedule), now)


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


class Store:
    """The only place that talks SQL."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        # Why the last write failed, while no write has succeeded since (see _tx).
        self.write_failure: str | None = None
        self._write_lock = threading.Lock() if self.sqlite else None

    @classmethod
    def open(cls, url: str, *, synchronous: str = "NORMAL") -> Store:
        try:
            engine = create_db_engine(url, synchronous=synchronous)
        except Exception as exc:  # bad URL, missing driver
            shown = hide_password(url)
            reason = str(exc).replace(url, shown)
            raise ConfigError(f"cannot open database {shown!r}: {reason}") from None
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- transactions --------------------------------------------------------------------

    @contextmanager
    def _connect(self, *, write: bool) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if write and self.sqlite:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def _tx(self, fn: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run ``fn`` in one transaction; retry transient failures a bounded number of times.
        A write that fails for a reason other than a constraint is remembered
        (:attr:`write_failure`, shown by ``/healthz``) until a write succeeds."""
        lock = self._write_lock if write and self._write_lock is not None else nullcontext()
        for attempt in range(1, DB_RETRIES + 1):
            try:
                with lock, self._connect(write=write) as conn:
                    try:
                        outcome = fn(conn)
                        _flush_inserts(conn)
                    finally:
                        conn.info.pop(_PENDING, None)
                if write:
                    self.write_failure = None
                return outcome
            except PendingRollbackError as exc:
                # A connection dropped mid-transaction (a PostgreSQL restart): a new one works.
                if attempt == DB_RETRIES:
                    self._note_write_failure(write, exc)
                    raise
            except (OperationalError, DBAPIError) as exc:
                if isinstance(exc, IntegrityError) or not _transient(exc) or attempt == DB_RETRIES:
                    if not isinstance(exc, IntegrityError):
                        self._note_write_failure(write, exc)
                    raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")

    def _note_write_failure(self, write: bool, exc: Exception) -> None:
        if write:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            self.write_failure = f"{type(exc).__name__}: {reason[0] if reason else ''}"[:300]

    def ping(self) -> None:
        self._tx(lambda c: c.execute(select(1)).scalar_one(), write=False)

    # --- creating and submitting ---------------------------------------------------------

    def create_job(self, new: NewJob, *, now: float | None = None) -> tuple[Job, bool]:
        """Insert a job in ``submitting``; with an idempotency key already used, return the
        existing job and ``False``."""
        return self._create(new, now=now)

    def _create(
        self,
        new: NewJob,
        *,
        now: float | None,
        also: Callable[[Connection, Job, float], None] | None = None,
    ) -> tuple[Job, bool]:
        """:meth:`create_job`; ``also`` runs in the same transaction once the job is new."""
        now = time.time() if now is None else now
        job_id = new_job_id()

        def tx(conn: Connection) -> tuple[Job, bool]:
            if new.idempotency_key is not None:
                existing = conn.execute(
                    select(jobs).where(jobs.c.idempotency_key == new.idempotency_key)
                ).first()
                if existing is not None:
                    job = Job.from_row(existing)
                    _check_same_request(job, new)
                    return job, False
            conn.execute(insert(jobs).values(**_new_job_values(new, job_id, now)))
            _event(conn, job_id, now, "created", to_state=State.SUBMITTING)
            job = _get(conn, job_id)
            if also is not None:
                also(conn, job, now)
            return job, True

        try:
            return self._tx(tx)
        except IntegrityError:
            # Another process inserted the same idempotency key between our read and write.
            if new.idempotency_key is None:
                raise
            return self._tx(tx)

    def track_job(
        self, new: NewJob, ref: RemoteRef, *, next_poll_at: float, now: float | None = None
    ) -> Job:
        """Record a request made elsewhere, in ``queued`` with its request id from the start:
        a tracked job never passes through ``submitting``, so nothing can ever send its
        (unknown) input. A request already known is returned as it is."""
        now = time.time() if now is None else now
        job_id = new_job_id()
        values = {
            **_new_job_values(new, job_id, now),
            "state": State.QUEUED.value,
            "tracked": True,
            "request_id": ref.request_id,
            "status_url": ref.status_url,
            "response_url": ref.response_url,
            "cancel_url": ref.cancel_url,
            "next_poll_at": next_poll_at,
        }

        def tx(conn: Connection) -> Job:
            existing = conn.execute(
                select(jobs).where(
                    jobs.c.request_id == ref.request_id, jobs.c.provider == new.provider
                )
            ).first()
            if existing is not None:
                return Job.from_row(existing)
            conn.execute(insert(jobs).values(**values))
            detail = {"request_id": ref.request_id}
            _event(conn, job_id, now, "tracked", to_state=State.QUEUED, detail=detail)
            return _get(conn, job_id)

        try:
            return self._tx(tx)
        except IntegrityError:
            return self._tx(tx)  # another process tracked the same request meanwhile

    def create_retry(
        self, old: Job, new: NewJob, *, reason: str | None = None, now: float | None = None
    ) -> tuple[Job, bool]:
        """Record ``new`` (keyed ``retry:<old id>``, so asking twice makes one retry) and, in
        the same transaction, a ``retried`` event on ``old``; returns the retry and whether
        it was created now."""

        def retried(conn: Connection, job: Job, at: float) -> None:
            _event(conn, old.id, at, "retried", reason=reason, detail={"job": job.id})

        return self._create(new, now=now, also=retried)

    def create_jobs(
        self, news: Sequence[NewJob], *, now: float | None = None
    ) -> list[tuple[Job, bool]]:
        """:meth:`create_job` for many jobs in one transaction (group commit: a batch of
        thousands pays for one commit, not thousands), answers in the order asked. A key used
        twice in ``news`` creates one job."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> list[tuple[Job, bool]]:
            keys = [n.idempotency_key for n in news if n.idempotency_key is not None]
            key_ids: dict[str, str] = {}
            for chunk in _chunks(keys):
                query = select(jobs.c.idempotency_key, jobs.c.id)
                key_ids.update(conn.execute(query.where(jobs.c.idempotency_key.in_(chunk))).all())
            plan: list[tuple[str, bool]] = []  # (job id, created) per entry of ``news``
            fresh: list[dict[str, Any]] = []
            for new in news:
                key = new.idempotency_key
                if key is not None and key in key_ids:
                    plan.append((key_ids[key], False))
                    continue
                job_id = new_job_id()
                fresh.append(_new_job_values(new, job_id, now))
                plan.append((job_id, True))
                if key is not None:
                    key_ids[key] = job_id
            if fresh:
                conn.execute(insert(jobs), fresh)
                created = {"at": now, "kind": "created", "to_state": State.SUBMITTING.value}
                conn.execute(insert(job_events), [{"job_id": v["id"], **created} for v in fresh])
            found: dict[str, Job] = {}
            for chunk in _chunks(list(dict.fromkeys(job_id for job_id, _ in plan))):
                rows = conn.execute(select(jobs).where(jobs.c.id.in_(chunk)))
                found.update({r.id: Job.from_row(r) for r in rows})
            return [(found[job_id], made) for job_id, made in plan]

        try:
            return self._tx(tx)
        except IntegrityError:
            # Another process inserted one of the keys meanwhile: go one by one.
            return [self.create_job(new, now=now) for new in news]

    def begin_submit(
        self, job_id: str, seen_attempts: int, *, reason: str = "submit", now: float | None = None
    ) -> bool:
        """Count a submit attempt before the HTTP call (see :class:`BeginSubmit`)."""
        result: bool = self.write_many([BeginSubmit(job_id, seen_attempts, reason)], now=now)[0]
        return result

    def unsend(self, job_id: str, error: Mapping[str, Any], *, now: float | None = None) -> Job:
        """The last attempt provably never reached the provider: take it back, so sending the
        job again is known to be safe."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> Job:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == State.SUBMITTING.value)
                .values(attempts=jobs.c.attempts - 1, updated_at=now)
            )
            _event(conn, job_id, now, "submit_not_sent", detail=dict(error))
            return _get(conn, job_id)

        return self._tx(tx)

    def mark_submitted(
        self,
        job_id: str,
        submitted: Submitted,
        *,
        next_poll_at: float,
        poll_interval: float | None = None,
        now: float | None = None,
    ) -> Job:
        """Record the request id and URLs (see :class:`MarkSubmitted`)."""
        write = MarkSubmitted(job_id, submitted, next_poll_at, poll_interval)
        job: Job = self.write_many([write], now=now)[0]
        return job

    def record_event(
        self,
        job_id: str,
        kind: str,
        *,
        reason: str | None = None,
        detail: Any = None,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        self._tx(lambda conn: _event(conn, job_id, now, kind, reason=reason, detail=detail))

    def fail(
        self,
        job_id: str,
        reason: FailureReason,
        error: Mapping[str, Any] | None,
        *,
        only_from: Sequence[State] = tuple(ACTIVE),
        now: float | None = None,
    ) -> Applied:
        """End a job as ``failed`` for a reason of our own (not an observation)."""
        obs = Observation(state=State.FAILED, error=error, failure_reason=reason, source="local")
        return self.apply(job_id, obs, only_from=only_from, now=now)

    # --- applying observations -----------------------------------------------------------

    def apply(
        self,
        job_id: str,
        obs: Observation,
        *,
        next_poll_at: float | None = None,
        poll_interval: float | None = None,
        only_from: Sequence[State] | None = None,
        schedule: Schedule | None = None,
        now: float | None = None,
    ) -> Applied:
        """The one place observations change jobs (polls, webhooks, submits, results).

        ``next_poll_at``/``poll_interval``, or ``schedule(current job, obs)``, say when an
        active job is polled next; ``only_from`` narrows the states the change may start from.
        """
        change = Change(
            obs,
            job_id=job_id,
            next_poll_at=next_poll_at,
            poll_interval=poll_interval,
            only_from=tuple(only_from) if only_from is not None else None,
            schedule=schedule,
        )
        [applied] = self.apply_many([change], now=now)
        if applied is None:
            raise JobNotFound(job_id)
        return applied

    def apply_many(
        self, changes: Sequence[Change], *, now: float | None = None
    ) -> list[Applied | None]:
        """Apply several changes in one transaction; None for a change whose job is unknown."""
        return self.write_many(changes, now=now)

    def write_many(self, writes: Sequence[Write[T]], *, now: float | None = None) -> list[T]:
        """Run several writes in one transaction (group commit). Raises if any fails: the
        caller may retry them one by one."""
        now = time.time() if now is None else now
        return self._tx(lambda conn: [write.run(conn, now) for write in writes])

    # --- polling: claims and leases -------------------------------------------------------

    def claim_due(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        batch: str | None = None,
        now: float | None = None,
    ) -> list[Claimed]:
        """Take up to ``limit`` due jobs for ``owner`` (only of ``batch`` when given: ``jobs
        wait --batch``). The claim pushes ``next_poll_at`` to the lease's end, so a job whose
        poller dies becomes due again by itself."""
        now = time.time() if now is None else now
        until = now + lease_seconds
        lease = {
            "lease_owner": owner,
            "lease_expires_at": until,
            "next_poll_at": until,
            "polls": jobs.c.polls + 1,
        }
        # Only active jobs have a next_poll_at (every terminal write clears it), so this
        # alone selects due work and lets the database walk the next_poll_at index in order;
        # adding a state test made SQLite pick the state index and sort every active job.
        due = jobs.c.next_poll_at <= now
        if batch is not None:
            due = and_(due, jobs.c.batch == batch)

        def tx_sqlite(conn: Connection) -> list[Claimed]:
            picked = conn.execute(
                select(jobs.c.id, jobs.c.lease_owner)
                .where(due)
                .order_by(jobs.c.next_poll_at)
                .limit(limit)
            ).all()
            if not picked:
                return []
            previous = {r.id: r.lease_owner for r in picked}
            rows = conn.execute(
                update(jobs).where(jobs.c.id.in_(previous)).values(**lease).returning(*jobs.c)
            ).all()
            return [_claimed(row, previous[row.id], owner) for row in rows]

        def tx_postgres(conn: Connection) -> list[Claimed]:
            picked = (
                select(jobs.c.id, jobs.c.lease_owner.label("prev_owner"))
                .where(due)
                .order_by(jobs.c.next_poll_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .cte("picked")
            )
            rows = conn.execute(
                update(jobs)
                .where(jobs.c.id == picked.c.id)
                .values(**lease)
                .returning(*jobs.c, picked.c.prev_owner)
            ).all()
            return [_claimed(row, row.prev_owner, owner) for row in rows]

        return self._tx(tx_sqlite if self.sqlite else tx_postgres)

    def claim_job(
        self,
        job_id: str,
        owner: str,
        *,
        lease_seconds: float,
        dead_owner: str | None = None,
        now: float | None = None,
    ) -> Job | None:
        """Claim one job if it is due, or if its lease belongs to ``dead_owner`` (a process
        known to have died), for a waiting client polling for itself."""
        now = time.time() if now is None else now
        until = now + lease_seconds
        due = jobs.c.next_poll_at <= now
        if dead_owner is not None:
            due = or_(due, jobs.c.lease_owner == dead_owner)

        def tx(conn: Connection) -> Job | None:
            done = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.next_poll_at.is_not(None),
                    due,
                    jobs.c.state.in_([s.value for s in ACTIVE]),
                )
                .values(
                    lease_owner=owner,
                    lease_expires_at=until,
                    next_poll_at=until,
                    polls=jobs.c.polls + 1,
                )
            )
            return _get(conn, job_id) if done.rowcount == 1 else None

        return self._tx(tx)

    def poll_failed(
        self,
        job_id: str,
        error: Mapping[str, Any],
        *,
        next_poll_at: float,
        poll_interval: float | None = None,
        now: float | None = None,
    ) -> None:
        """A poll got no usable answer: record why, drop the lease, try again later."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> None:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_([s.value for s in ACTIVE]))
                .values(
                    next_poll_at=next_poll_at,
                    poll_interval=poll_interval,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            _event(
                conn, job_id, now, "poll_failed", reason=str(error.get("type")), detail=dict(error)
            )

        self._tx(tx)

    def release_leases(self, owner: str, *, now: float | None = None) -> int:
        """On shutdown: make the jobs this owner holds due at once for whoever runs next."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> int:
            done = conn.execute(
                update(jobs)
                .where(jobs.c.lease_owner == owner, jobs.c.state.in_([s.value for s in ACTIVE]))
                .values(lease_owner=None, lease_expires_at=None, next_poll_at=now)
            )
            return done.rowcount

        return self._tx(tx)

    def account(self, provider: str) -> str | None:
        """The provider account user id learned from webhooks (None until one came)."""
        return self._tx(lambda conn: _account(conn, provider), write=False)

    def mark_cancel_requested(self, job_id: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now

        def tx(conn: Connection) -> None:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(cancel_requested_at=now, next_poll_at=now, updated_at=now)
            )
            _event(conn, job_id, now, "cancel_requested")

        self._tx(tx)

    # --- reads ---------------------------------------------------------------------------

    def get(self, ref: str) -> Job:
        """A job by any name people give it, tried in this order: our id, its request id, its
        idempotency key, a unique prefix (>= 6 characters) of the id or of its short id. Raises
        :class:`JobNotFound`, or :class:`AmbiguousJobRef` for a prefix of several jobs."""
        if not ref or len(ref) > 255 or "\x00" in ref:
            raise JobNotFound(ref)

        def tx(conn: Connection) -> list[Row[Any]]:
            for where in _exact_names(ref):
                row = conn.execute(select(jobs).where(where).order_by(jobs.c.id).limit(1)).first()
                if row is not None:
                    return [row]
            near = _prefix_names(ref)
            if not near:
                return []
            query = select(jobs).where(or_(*near)).order_by(jobs.c.id).limit(20)
            return list(conn.execute(query))

        rows = self._tx(tx, write=False)
        if not rows:
            raise JobNotFound(ref)
        if len(rows) > 1:
            raise AmbiguousJobRef(ref, [short_id(r.id) for r in rows])
        return Job.from_row(rows[0])

    def find_by_request_id(self, provider: str, request_id: str) -> Job | None:
        if not _storable(request_id, "request_id"):
            return None
        row = self._tx(
            lambda conn: conn.execute(
                select(jobs).where(jobs.c.request_id == request_id, jobs.c.provider == provider)
            ).first(),
            write=False,
        )
        return Job.from_row(row) if row is not None else None

    def list_jobs(
        self,
        *,
        states: Sequence[State] | None = None,
        application: str | None = None,
        batch: str | None = None,
        limit: int = 100,
        before: str | None = None,
        label: tuple[str, str] | None = None,
        search: str | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` is the id of the last job of the previous page.

        ``label`` is a ``(key, value)`` the job's labels must hold; ``search`` takes what
        :meth:`get` takes (an id, request id, idempotency key, a prefix of the id or of its
        short id) and lists every job it names. A filter no stored value can equal (a NUL,
        too long) matches nothing."""
        filters = (
            (application, "application"),
            (batch, "batch"),
            (before, "request_id"),
            (search, "idempotency_key"),
            (label[1] if label else None, "idempotency_key"),
        )
        if any(value is not None and not _storable(value, column) for value, column in filters):
            return []
        query = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if label is not None:
            key, value = label
            query = query.where(jobs.c.labels[key].as_string() == value)
        if search is not None:
            # What get() resolves, listed instead of refused when it names several jobs.
            query = query.where(or_(*_exact_names(search), *_prefix_names(search)))
        if states:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        if application is not None:
            query = query.where(jobs.c.application == application)
        if batch is not None:
            query = query.where(jobs.c.batch == batch)
        if before is not None:
            query = query.where(jobs.c.id < before)
        rows = self._tx(lambda conn: conn.execute(query).all(), write=False)
        return [Job.from_row(r) for r in rows]

    def count_by_state(
        self, *, batch: str | None = None, finished_since: float | None = None
    ) -> dict[State, int]:
        """Jobs per state; with ``finished_since``, only active jobs and those that finished at
        or after it (what ``jobs wait`` without a batch watches)."""
        query = select(jobs.c.state, func.count()).group_by(jobs.c.state)
        if batch is not None:
            query = query.where(jobs.c.batch == batch, _CURRENT)
        if finished_since is not None:
            query = query.where(
                or_(
                    jobs.c.state.in_([s.value for s in ACTIVE]),
                    jobs.c.finished_at >= finished_since,
                )
            )
        rows = self._tx(lambda conn: conn.execute(query).all(), write=False)
        counts = dict.fromkeys(State, 0)
        counts.update({State(state): n for state, n in rows})
        return counts

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._tx(
            lambda conn: conn.execute(
                select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
            ).all(),
            write=False,
        )
        return [
            {
                "at": iso(r.at),
                "kind": r.kind,
                "from_state": r.from_state,
                "to_state": r.to_state,
                "reason": r.reason,
                "detail": r.detail,
            }
            for r in rows
        ]

    def logs(self, job_id: str, *, after: int = 0) -> list[tuple[int, Any]]:
        rows = self._tx(
            lambda conn: conn.execute(
                select(job_logs.c.seq, job_logs.c.entry)
                .where(job_logs.c.job_id == job_id, job_logs.c.seq > after)
                .order_by(job_logs.c.seq)
            ).all(),
            write=False,
        )
        return [(r.seq, r.entry) for r in rows]

    def result(self, job_id: str) -> tuple[bool, Any]:
        """``(True, data)`` when a result is stored, else ``(False, None)``."""
        row = self._tx(
            lambda conn: conn.execute(
                select(results.c.data).where(results.c.job_id == job_id)
            ).first(),
            write=False,
        )
        return (True, row.data) if row is not None else (False, None)

    def ambiguous(self, *, older_than: float, limit: int = 100) -> list[Job]:
        """Jobs in ``submitting`` with no request id whose last change is older than
        ``older_than``, or whose last attempt is known to be over: it ended ambiguous and
        no webhook was asked for (so nothing can adopt it), or the send was deferred by a
        provider's rate limit. (One with a request id is due for a poll, which settles it.)
        """
        over = _attempt_over(
            or_(
                job_events.c.kind == "submit_deferred",
                and_(job_events.c.kind == "submit_ambiguous", jobs.c.webhook.is_(False)),
            )
        )
        rows = self._tx(
            lambda conn: conn.execute(
                select(jobs)
                .where(
                    jobs.c.state == State.SUBMITTING.value,
                    jobs.c.request_id.is_(None),
                    or_(jobs.c.updated_at < older_than, over),
                )
                .order_by(jobs.c.updated_at)
                .limit(limit)
            ).all(),
            write=False,
        )
        return [Job.from_row(r) for r in rows]

    def in_flight(self, job_ids: Sequence[str], *, since: float) -> set[str]:
        """Which of these jobs have a submit attempt under way, begun at or after ``since``
        (by any process): sent, and neither answered nor known to have ended ambiguous."""
        ended = _attempt_over(job_events.c.kind.in_(("submit_ambiguous", "submit_deferred")))
        found: set[str] = set()
        for chunk in _chunks(job_ids):
            query = select(jobs.c.id).where(
                jobs.c.id.in_(chunk),
                jobs.c.state == State.SUBMITTING.value,
                jobs.c.request_id.is_(None),
                jobs.c.attempts > 0,
                jobs.c.updated_at >= since,
                ~ended,
            )
            found.update(self._tx(partial(_ids, query=query), write=False))
        return found

    # --- result files, batches and retention ----------------------------------------------

    def add_files(
        self, job_id: str, files: Sequence[NewFile], *, now: float | None = None
    ) -> list[JobFile]:
        """Record the files of a job's result as ``pending`` (those not recorded yet, so a
        second call changes nothing); return every file row of the job."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> list[JobFile]:
            have = set(
                conn.execute(select(job_files.c.n).where(job_files.c.job_id == job_id)).scalars()
            )
            fresh = [
                {
                    "job_id": job_id,
                    "n": f.n,
                    "url": f.url,
                    "json_path": f.json_path,
                    "file_name": f.file_name,
                    "content_type": f.content_type,
                    "state": "pending",
                    "stored_at": now,
                }
                for f in files
                if f.n not in have
            ]
            if fresh:
                conn.execute(insert(job_files), fresh)
            return _files_of(conn, [job_id]).get(job_id, [])

        try:
            return self._tx(tx)
        except IntegrityError:  # another process recorded them between our read and write
            return self._tx(tx)

    def set_file(
        self,
        job_id: str,
        n: int,
        *,
        state: str,
        sha256: str | None = None,
        size: int | None = None,
        content_type: str | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> None:
        """Record a download's outcome; ``content_type`` only fills a type the result lacked."""
        now = time.time() if now is None else now
        self._tx(
            lambda conn: conn.execute(
                update(job_files)
                .where(job_files.c.job_id == job_id, job_files.c.n == n)
                .values(
                    state=state,
                    sha256=sha256,
                    size=size,
                    error=error,
                    stored_at=now,
                    content_type=func.coalesce(job_files.c.content_type, content_type),
                )
            )
        )

    def files(self, job_id: str) -> list[JobFile]:
        return self.files_of([job_id]).get(job_id, [])

    def files_of(self, job_ids: Sequence[str]) -> dict[str, list[JobFile]]:
        """File rows of many jobs, by job id, each list in ``n`` order."""
        found: dict[str, list[JobFile]] = {}
        for chunk in _chunks(job_ids):
            found.update(self._tx(partial(_files_of, job_ids=chunk), write=False))
        return found

    def results_of(self, job_ids: Sequence[str]) -> dict[str, Any]:
        """Stored results of many jobs, by job id (jobs without one are absent)."""
        found: dict[str, Any] = {}
        for chunk in _chunks(job_ids):
            found.update(self._tx(partial(_results_of, job_ids=chunk), write=False))
        return found

    def batch_jobs(self, batch: str) -> list[Job]:
        """Every job of a batch in input order (``batch_index``, then creation), a retried
        job replaced by its retry."""
        rows = self._tx(
            lambda conn: conn.execute(
                select(jobs)
                .where(jobs.c.batch == batch, _CURRENT)
                .order_by(jobs.c.batch_index.is_(None), jobs.c.batch_index, jobs.c.id)
            ).all(),
            write=False,
        )
        return [Job.from_row(r) for r in rows]

    def retryable(self, batch: str, *, reasons: Sequence[str] | None = None) -> list[Job]:
        """The failed or cancelled jobs of ``batch`` that no retry supersedes, in input
        order; ``reasons`` filters by failure reason (``"cancelled"``: cancelled jobs)."""
        failed = jobs.c.state == State.FAILED.value
        cancelled = jobs.c.state == State.CANCELLED.value
        ended = or_(failed, cancelled)
        if reasons:
            wanted = [r for r in reasons if r != "cancelled"]
            chosen = [and_(failed, jobs.c.failure_reason.in_(wanted))]
            if "cancelled" in reasons:
                chosen.append(cancelled)
            ended = or_(*chosen)
        query = (
            select(jobs)
            .where(jobs.c.batch == batch, ended, _CURRENT)
            .order_by(jobs.c.batch_index, jobs.c.id)
        )
        return [Job.from_row(r) for r in self._tx(lambda c: c.execute(query).all(), write=False)]

    def gc_batch(self, cutoff: float, *, limit: int = 500, now: float | None = None) -> GcBatch:
        """Delete the stored results and file rows of up to ``limit`` terminal jobs that
        finished before ``cutoff``. The jobs and their events stay; each gets a ``gc`` event.
        Returns what went, so the caller can delete cached files nobody names any more."""
        now = time.time() if now is None else now
        terminal = [s.value for s in State if s.terminal]

        def tx(conn: Connection) -> GcBatch:
            has_data = or_(
                exists().where(results.c.job_id == jobs.c.id),
                exists().where(job_files.c.job_id == jobs.c.id),
            )
            ids = list(
                conn.execute(
                    select(jobs.c.id)
                    .where(jobs.c.state.in_(terminal), jobs.c.finished_at < cutoff, has_data)
                    .order_by(jobs.c.finished_at)
                    .limit(limit)
                ).scalars()
            )
            if not ids:
                return GcBatch(job_ids=[], results=0, result_bytes=0, files=[])
            sizes: dict[str, int] = {
                r.job_id: r.size
                for r in conn.execute(
                    select(results.c.job_id, results.c.size).where(results.c.job_id.in_(ids))
                )
            }
            files = _files_of(conn, ids)
            conn.execute(delete(results).where(results.c.job_id.in_(ids)))
            conn.execute(delete(job_files).where(job_files.c.job_id.in_(ids)))
            events = [
                {
                    "job_id": job_id,
                    "at": now,
                    "kind": "gc",
                    "reason": "retention",
                    "detail": {
                        "cutoff": iso(cutoff),
                        "result_bytes": sizes.get(job_id, 0),
                        "files": len(files.get(job_id, [])),
                    },
                }
                for job_id in ids
            ]
            conn.execute(insert(job_events), events)
            return GcBatch(
                job_ids=ids,
                results=len(sizes),
                result_bytes=sum(sizes.values()),
                files=[f for job_id in ids for f in files.get(job_id, [])],
            )

        return self._tx(tx)

    def referenced_sha256(self, digests: Sequence[str]) -> set[str]:
        """Which of these content hashes a ``job_files`` row still names: one cached file
        serves every job whose result has the same bytes."""
        found: set[str] = set()
        for chunk in _chunks(digests):
            found.update(self._tx(partial(_referenced, digests=chunk), write=False))
        return found

    # --- figures for the dashboard, the batch API and the metrics ------------------------

    def overview(self, *, now: float | None = None) -> Overview:
        """Counts, failures, backlog, request economy and leases across the whole database."""
        now = time.time() if now is None else now
        active = [s.value for s in ACTIVE]
        terminal = [s.value for s in State if s.terminal]

        def tx(conn: Connection) -> Overview:
            counts = dict.fromkeys(State, 0)
            counts.update(
                {
                    State(state): n
                    for state, n in conn.execute(
                        select(jobs.c.state, func.count()).group_by(jobs.c.state)
                    )
                }
            )
            oldest = conn.execute(
                select(jobs)
                .where(jobs.c.state.in_(active))
                .order_by(jobs.c.created_at, jobs.c.id)
                .limit(1)
            ).first()
            due = conn.execute(select(func.count()).where(jobs.c.next_poll_at <= now)).scalar_one()
            finished, requests = conn.execute(
                select(
                    func.count(), func.coalesce(func.sum(jobs.c.attempts + jobs.c.polls), 0)
                ).where(jobs.c.state.in_(terminal))
            ).one()
            leases: dict[str, int] = dict(
                conn.execute(
                    select(jobs.c.lease_owner, func.count())
                    .where(jobs.c.lease_owner.is_not(None), jobs.c.lease_expires_at > now)
                    .group_by(jobs.c.lease_owner)
                    .order_by(jobs.c.lease_owner)
                ).all()
            )
            return Overview(
                counts=counts,
                failures=_failures(conn, batch=None),
                oldest_active=Job.from_row(oldest) if oldest is not None else None,
                due=due,
                finished=finished,
                finished_requests=int(requests),
                leases=leases,
            )

        return self._tx(tx, write=False)

    def failures(self, *, batch: str | None = None) -> dict[str, int]:
        """Failed jobs by failure reason, most frequent first (of one batch when given)."""
        return self._tx(partial(_failures, batch=batch), write=False)

    def batches(
        self, *, active_only: bool = False, name: str | None = None, limit: int = 100
    ) -> list[BatchProgress]:
        """Batches, newest first: all, those with an unfinished job, or the one named."""
        query = (
            select(
                jobs.c.batch,
                jobs.c.state,
                func.count(),
                func.min(jobs.c.created_at),
                func.max(jobs.c.finished_at),
            )
            .where(jobs.c.batch.is_not(None))
            .group_by(jobs.c.batch, jobs.c.state)
        )
        if name is not None:
            query = query.where(jobs.c.batch == name)
        if active_only:
            unfinished = select(jobs.c.batch).where(
                jobs.c.state.in_([s.value for s in ACTIVE]), jobs.c.batch.is_not(None)
            )
            query = query.where(jobs.c.batch.in_(unfinished))
        rows = self._tx(lambda conn: conn.execute(query).all(), write=False)
        found: dict[str, dict[str, Any]] = {}
        for batch, state, n, started, finished in rows:
            entry = found.setdefault(
                batch, {"counts": dict.fromkeys(State, 0), "started": started, "finished": None}
            )
            entry["counts"][State(state)] = n
            entry["started"] = min(entry["started"], started)
            if finished is not None:
                entry["finished"] = max(entry["finished"] or finished, finished)
        progress = [
            BatchProgress(
                name=batch,
                counts=entry["counts"],
                started_at=entry["started"],
                last_finished_at=entry["finished"],
            )
            for batch, entry in found.items()
        ]
        progress.sort(key=lambda b: b.started_at, reverse=True)
        return progress[:limit]

    # --- uploads to the CDN (jobs/uploads.py) ---------------------------------------------

    def find_upload(
        self, sha256: str, content_type: str, *, alive_until: float
    ) -> UploadRecord | None:
        """The newest finished upload of these bytes whose URL lives past ``alive_until``."""
        query = (
            select(uploads)
            .where(
                uploads.c.sha256 == sha256,
                uploads.c.content_type == content_type,
                uploads.c.state == "uploaded",
                or_(uploads.c.expires_at.is_(None), uploads.c.expires_at > alive_until),
            )
            .order_by(uploads.c.uploaded_at.desc())
            .limit(1)
        )
        row = self._tx(lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else UploadRecord.from_row(row)

    def find_partial_upload(
        self, sha256: str, content_type: str, part_size: int
    ) -> tuple[UploadRecord, dict[int, str]] | None:
        """A multipart upload of these bytes left unfinished (a killed process), with the
        etags of the parts already sent, so only the missing parts need sending."""

        def tx(conn: Connection) -> tuple[UploadRecord, dict[int, str]] | None:
            row = conn.execute(
                select(uploads)
                .where(
                    uploads.c.sha256 == sha256,
                    uploads.c.content_type == content_type,
                    uploads.c.state == "uploading",
                    uploads.c.part_size == part_size,
                )
                .order_by(uploads.c.created_at.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            parts = conn.execute(
                select(upload_parts.c.part_number, upload_parts.c.etag).where(
                    upload_parts.c.upload_id == row.id
                )
            ).all()
            return UploadRecord.from_row(row), {n: etag for n, etag in parts}

        return self._tx(tx, write=False)

    def begin_upload(self, new: NewUpload, *, now: float | None = None) -> UploadRecord:
        """Record a multipart upload the CDN has opened (``multipart_id``), in ``uploading``."""
        now = time.time() if now is None else now
        values = {**dataclasses.asdict(new), "id": new_job_id(), "state": "uploading"}
        values["created_at"] = now
        row = self._tx(
            lambda conn: conn.execute(insert(uploads).values(values).returning(*uploads.c)).one()
        )
        return UploadRecord.from_row(row)

    def record_part(
        self, upload_id: str, part_number: int, etag: str, size: int, *, now: float | None = None
    ) -> None:
        """One part reached the CDN (a repeat of the same part overwrites nothing)."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> None:
            have = conn.execute(
                select(upload_parts.c.etag).where(
                    upload_parts.c.upload_id == upload_id,
                    upload_parts.c.part_number == part_number,
                )
            ).first()
            if have is None:
                conn.execute(
                    insert(upload_parts).values(
                        upload_id=upload_id, part_number=part_number, etag=etag, size=size, at=now
                    )
                )

        self._tx(tx)

    def finish_upload(
        self,
        new: NewUpload,
        *,
        url: str,
        expires_at: float | None,
        upload_id: str | None = None,
        now: float | None = None,
    ) -> UploadRecord:
        """Record a finished upload: the multipart row ``upload_id`` becomes ``uploaded``,
        or (a single upload) a new row is written in ``uploaded``."""
        now = time.time() if now is None else now
        done = {"state": "uploaded", "url": url, "uploaded_at": now, "expires_at": expires_at}

        def tx(conn: Connection) -> Row[Any]:
            if upload_id is not None:
                return conn.execute(
                    update(uploads)
                    .where(uploads.c.id == upload_id)
                    .values(done)
                    .returning(*uploads.c)
                ).one()
            values = {**dataclasses.asdict(new), **done, "id": new_job_id(), "created_at": now}
            return conn.execute(insert(uploads).values(values).returning(*uploads.c)).one()

        return UploadRecord.from_row(self._tx(tx))

    def abandon_upload(self, upload_id: str) -> None:
        """The CDN no longer knows this multipart upload: never resume it."""
        self._tx(
            lambda conn: conn.execute(
                update(uploads)
                .where(uploads.c.id == upload_id, uploads.c.state == "uploading")
                .values(state="abandoned")
            )
        )

    def list_uploads(self, *, limit: int = 100) -> list[UploadRecord]:
        rows = self._tx(
            lambda conn: conn.execute(
                select(uploads).order_by(uploads.c.created_at.desc()).limit(limit)
            ).all(),
            write=False,
        )
        return [UploadRecord.from_row(r) for r in rows]


# --- statement helpers, used inside transactions ------------------------------------------


# Hot-path statements, built once: SQLAlchemy then only binds parameters. Building and
# hashing a statement per call cost more than SQLite took to run it. UPDATEs take their SET
# columns from the keys of the parameters they are executed with.
_JOB_BY_ID = select(jobs).where(jobs.c.id == bindparam("b_id"))
_JOB_BY_REQUEST = select(jobs).where(
    jobs.c.request_id == bindparam("b_request_id"), jobs.c.provider == bindparam("b_provider")
)
_UPDATE_JOB = update(jobs).where(jobs.c.id == bindparam("b_id")).returning(*jobs.c)
_UPDATE_IF_STATE = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_id"), jobs.c.state == bindparam("b_state"))
    .returning(*jobs.c)
)
_BEGIN_SUBMIT = update(jobs).where(
    jobs.c.id == bindparam("b_id"),
    jobs.c.state == State.SUBMITTING.value,
    jobs.c.attempts == bindparam("b_attempts"),
    jobs.c.request_id.is_(None),
)
_INSERT_EVENT = insert(job_events)
_INSERT_RESULT = insert(results)
# Rows of events and results written in a transaction wait here (on the connection) for
# one executemany per table.
_PENDING = "jobs_pending_inserts"


def _exact_names(ref: str) -> list[ColumnElement[bool]]:
    """The columns that name a job exactly, in the order :meth:`Store.get` tries them."""
    return [jobs.c.id == ref, jobs.c.request_id == ref, jobs.c.idempotency_key == ref]


def _prefix_names(ref: str) -> list[ColumnElement[bool]]:
    """A prefix of the id or of the short id, when ``ref`` can be one. Hex ids sort like
    strings, so the first is an index range; the short id needs a scan."""
    if not is_id_prefix(ref):
        return []
    return [
        and_(jobs.c.id >= ref, jobs.c.id < ref + "g"),
        func.substr(jobs.c.id, SHORT_ID_START + 1, len(ref)) == ref,
    ]


# A job no retry supersedes: batches count and export the newest attempt of each line.
_RETRIES = jobs.alias("retries")
_CURRENT = ~exists(select(_RETRIES.c.id).where(_RETRIES.c.retry_of == jobs.c.id))


def _apply_one(conn: Connection, change: Change, now: float) -> Applied | None:
    current = _find(conn, change, now)
    if current is None:
        return None
    obs = change.obs
    for _ in range(DB_RETRIES):
        allowed = can_transition(current.state, obs.state) and (
            change.only_from is None or current.state in change.only_from
        )
        if not allowed:
            return Applied(job=current, previous=current.state, changed=False)
        if change.schedule is not None:
            next_poll_at, poll_interval = change.schedule(current, obs)
        else:
            next_poll_at, poll_interval = change.next_poll_at, change.poll_interval
        values = _values_for(current, obs, now, next_poll_at, poll_interval)
        params = {**values, "b_id": current.id, "b_state": current.state.value}
        row = conn.execute(_UPDATE_IF_STATE, params).first()
        if row is not None:
            after = Job.from_row(row)
            break
        current = _get(conn, current.id)  # another process moved it: decide again
    else:
        raise RuntimeError(f"job {current.id} kept changing under us; giving up this apply")
    changed = obs.state is not current.state
    if changed:
        _event(
            conn,
            current.id,
            now,
            "state",
            from_state=current.state,
            to_state=obs.state,
            reason=obs.failure_reason.value if obs.failure_reason else obs.source,
            detail={"error": dict(obs.error)} if obs.error else None,
        )
    if obs.state is State.SUCCEEDED:
        _store_result(conn, current.id, obs.result, now)
    if obs.logs:
        _append_logs(conn, current.id, obs.logs, now)
    return Applied(job=after, previous=current.state, changed=changed)


def _find(conn: Connection, change: Change, now: float) -> Job | None:
    if change.job_id is not None:
        row = conn.execute(_JOB_BY_ID, {"b_id": change.job_id}).first()
        return Job.from_row(row) if row is not None else None
    params = {"b_request_id": change.request_id, "b_provider": change.provider}
    row = conn.execute(_JOB_BY_REQUEST, params).first()
    return Job.from_row(row) if row is not None else None


def _adopt(conn: Connection, job_id: str, request_id: str, now: float) -> bool:
    done = conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.state == State.SUBMITTING.value,
            jobs.c.request_id.is_(None),
        )
        # Due at once: should this process die before the webhook is applied, a poller
        # still learns the job's state from the request id.
        .values(request_id=request_id, submitted_at=now, updated_at=now, next_poll_at=now)
    )
    if done.rowcount != 1:
        return False
    _event(
        conn,
        job_id,
        now,
        "ambiguous_resolved",
        reason="webhook",
        detail={"request_id": request_id},
    )
    return True


def _ids(conn: Connection, query: Select[Any]) -> list[str]:
    return list(conn.execute(query).scalars())


def _attempt_over(kind: ColumnElement[bool]) -> Exists:
    """An event of ``kind`` since the job's last change: its last submit attempt is over
    (a begun attempt sets ``updated_at``; the events that end it do not)."""
    return exists().where(
        job_events.c.job_id == jobs.c.id, job_events.c.at >= jobs.c.updated_at, kind
    )


def _record_duplicate(
    conn: Connection,
    job: Job,
    request_id: str,
    now: float,
    *,
    source: str,
    attempt: int | None = None,
) -> bool:
    """Record a second remote request for ``job`` once per request id (fal may deliver a
    webhook twice); True when it is new."""
    earlier = conn.execute(
        select(job_events.c.detail).where(
            job_events.c.job_id == job.id, job_events.c.kind == "duplicate_request"
        )
    ).scalars()
    pending = conn.info.get(_PENDING, {}).get(_INSERT_EVENT, [])
    details = [*earlier, *(row["detail"] for row in pending if row["kind"] == "duplicate_request")]
    if any(isinstance(d, Mapping) and d.get("request_id") == request_id for d in details):
        return False
    detail = {"request_id": request_id, "kept": job.request_id, "attempt": attempt}
    _event(conn, job.id, now, "duplicate_request", reason=source, detail=detail)
    return True


def _account(conn: Connection, provider: str) -> str | None:
    found: str | None = conn.execute(
        select(provider_accounts.c.user_id).where(provider_accounts.c.provider == provider)
    ).scalar()
    return found


def _learn_account(conn: Connection, provider: str, user_id: str, now: float) -> str:
    """Store ``user_id`` as the provider account unless one is known (another replica may
    have learned it a moment ago: the first stays); returns the account."""
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    conn.execute(
        dialect.insert(provider_accounts)
        .values(provider=provider, user_id=user_id, learned_at=now)
        .on_conflict_do_nothing()
    )
    account = _account(conn, provider)
    assert account is not None
    return account


def _check_same_request(job: Job, new: NewJob) -> None:
    """:class:`IdempotencyConflict` unless ``new`` asks for what ``job`` (found by ``new``'s
    idempotency key) asked for: the same application, path and arguments."""
    differs = [
        name
        for name, before, after in (
            ("application", job.application, new.application),
            ("path", job.path, new.path),
            ("arguments", _canonical(job.arguments), _canonical(new.arguments)),
        )
        if before != after
    ]
    if differs:
        raise IdempotencyConflict(new.idempotency_key or "", job.id, differs)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _new_job_values(new: NewJob, job_id: str, now: float) -> dict[str, Any]:
    """The ``jobs`` row of a job just recorded, in ``submitting``."""
    return {
        "id": job_id,
        "provider": new.provider,
        "application": new.application,
        "path": new.path,
        "arguments": new.arguments,
        "state": State.SUBMITTING.value,
        "priority": new.priority,
        "hint": new.hint,
        "labels": dict(new.labels) or None,
        "batch": new.batch,
        "batch_index": new.batch_index,
        "idempotency_key": new.idempotency_key,
        "webhook": new.webhook,
        "download_files": new.download_files,
        "retry_of": new.retry_of,
        "start_timeout": new.start_timeout,
        "attempts": 0,
        "polls": 0,
        "created_at": now,
        "updated_at": now,
        "last_change_at": now,
    }


def _chunks(items: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    """Slices small enough for an ``IN (…)`` list on every backend."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _results_of(conn: Connection, job_ids: Sequence[str]) -> dict[str, Any]:
    rows = conn.execute(
        select(results.c.job_id, results.c.data).where(results.c.job_id.in_(job_ids))
    ).all()
    return {r.job_id: r.data for r in rows}


def _referenced(conn: Connection, digests: Sequence[str]) -> list[str]:
    query = select(job_files.c.sha256).where(job_files.c.sha256.in_(digests)).distinct()
    return [d for d in conn.execute(query).scalars() if d is not None]


def _files_of(conn: Connection, job_ids: Sequence[str]) -> dict[str, list[JobFile]]:
    rows = conn.execute(
        select(job_files)
        .where(job_files.c.job_id.in_(job_ids))
        .order_by(job_files.c.job_id, job_files.c.n)
    ).all()
    found: dict[str, list[JobFile]] = {}
    for row in rows:
        found.setdefault(row.job_id, []).append(JobFile(**row._mapping))
    return found


def _failures(conn: Connection, *, batch: str | None) -> dict[str, int]:
    query = (
        select(jobs.c.failure_reason, func.count())
        .where(jobs.c.state == State.FAILED.value)
        .group_by(jobs.c.failure_reason)
        .order_by(func.count().desc())
    )
    if batch is not None:
        query = query.where(jobs.c.batch == batch)
    return {str(reason or "unknown"): n for reason, n in conn.execute(query)}


def _transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower()
    return any(
        needle in text
        for needle in ("database is locked", "connection", "server closed", "terminating")
    )


def _get(conn: Connection, job_id: str) -> Job:
    row = conn.execute(_JOB_BY_ID, {"b_id": job_id}).first()
    if row is None:
        raise JobNotFound(job_id)
    return Job.from_row(row)


def _claimed(row: Row[Any], previous_owner: str | None, owner: str) -> Claimed:
    return Claimed(
        job=Job.from_row(row),
        took_over=previous_owner is not None and previous_owner != owner,
    )


def _event(
    conn: Connection,
    job_id: str,
    now: float,
    kind: str,
    *,
    from_state: State | None = None,
    to_state: State | None = None,
    reason: str | None = None,
    detail: Any = None,
) -> None:
    """Record an event; the rows are inserted together just before the commit."""
    _defer_insert(
        conn,
        _INSERT_EVENT,
        {
            "job_id": job_id,
            "at": now,
            "kind": kind,
            "from_state": from_state.value if from_state else None,
            "to_state": to_state.value if to_state else None,
            "reason": reason,
            "detail": detail,
        },
    )


def _defer_insert(conn: Connection, statement: Insert, row: dict[str, Any]) -> None:
    """Queue a row for ``statement``; :meth:`Store._tx` inserts each table's rows with one
    executemany just before the commit (nothing reads them back inside the transaction)."""
    pending: dict[Insert, list[dict[str, Any]]] = conn.info.setdefault(_PENDING, {})
    pending.setdefault(statement, []).append(row)


def _flush_inserts(conn: Connection) -> None:
    pending: dict[Insert, list[dict[str, Any]]] = conn.info.pop(_PENDING, {})
    for statement, rows in pending.items():
        conn.execute(statement, rows)


def _values_for(
    current: Job,
    obs: Observation,
    now: float,
    next_poll_at: float | None,
    poll_interval: float | None,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "state": obs.state.value,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if obs.metrics is not None:
        values["metrics"] = dict(obs.metrics)
    changed = obs.state is not current.state or obs.queue_position != current.queue_position
    if changed:
        values["last_change_at"] = now
    if obs.state.terminal:
        values.update(
            finished_at=now,
            next_poll_at=None,
            queue_position=None,
            failure_reason=obs.failure_reason.value if obs.failure_reason else None,
            error=dict(obs.error) if obs.error else None,
        )
        return values
    values["queue_position"] = obs.queue_position if obs.state is State.QUEUED else None
    if obs.state is State.IN_PROGRESS and current.started_at is None:
        values["started_at"] = now
    if next_poll_at is not None:
        values["next_poll_at"] = next_poll_at
    if poll_interval is not None:
        values["poll_interval"] = poll_interval
    return values


def _store_result(conn: Connection, job_id: str, data: Any, now: float) -> None:
    size = len(json.dumps(data, separators=(",", ":")))
    _defer_insert(
        conn, _INSERT_RESULT, {"job_id": job_id, "stored_at": now, "data": data, "size": size}
    )


def _append_logs(
    conn: Connection, job_id: str, entries: Sequence[Mapping[str, Any]], now: float
) -> None:
    """Add lines not seen before: fal may send every line on each poll or only new ones."""
    stored = conn.execute(
        select(job_logs.c.seq, job_logs.c.entry).where(job_logs.c.job_id == job_id)
    ).all()
    seen = {_log_key(r.entry) for r in stored}
    seq = max((r.seq for r in stored), default=0)
    fresh = []
    for entry in entries:
        key = _log_key(entry)
        if key in seen:
            continue
        seen.add(key)
        seq += 1
        fresh.append({"job_id": job_id, "seq": seq, "at": now, "entry": dict(entry)})
    if fresh:
        conn.execute(insert(job_logs), fresh)


def _log_key(entry: Mapping[str, Any]) -> tuple[str, str]:
    return (str(entry.get("timestamp")), str(entry.get("message")))


__all__ = [
    "Applied",
    "BeginSubmit",
    "Callback",
    "Change",
    "Claimed",
    "Delivered",
    "DuplicateRequest",
    "GcBatch",
    "Job",
    "JobFile",
    "MarkSubmitted",
    "NewFile",
    "NewJob",
    "Store",
    "Write",
    "iso",
    "new_job_id",
]
