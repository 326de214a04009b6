"""The write commands, and the compare-and-set apply that moves a job between states.

Each command is a value whose ``run(conn, now)`` does its whole change in the transaction it
is given, so :class:`jobs.writer.GroupWriter` can commit many in one transaction. State
changes follow :mod:`jobs.states`: an ``UPDATE … WHERE state = <the state we read>`` that
applies only when :func:`jobs.states.can_transition` allows it, so a late or repeated
observation never moves a job backwards and a result is written once. When to poll next
is decided by the change's :class:`jobs.backoff.Backoff`, from the row as the transaction
sees it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import (
    Double,
    bindparam,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Exists

from ..backoff import Backoff
from ..db import (
    job_events,
    job_logs,
    jobs,
    provider_accounts,
    results,
    webhook_deliveries,
)
from ..errors import JobNotFound
from ..providers.base import Observation, Submitted
from ..records import Applied, Delivered, DuplicateRequest, J, Job, PollJob, column_length
from ..states import State, can_transition, sources_for
from .transactions import _PENDING, DB_RETRIES, _chunks, _defer_insert

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
    backoff: Backoff | None = None
    only_from: tuple[State, ...] | None = None

    def __post_init__(self) -> None:
        _check_ids((("request_id", self.request_id, "request_id"),))

    def run(self, conn: Connection, now: float) -> Applied[Job] | None:
        return _apply_one(conn, self, now)


@dataclass(frozen=True)
class Polled(Generic[J]):
    """What a poll of a claimed job saw, to apply to it. ``job`` is the record the claim
    returned: in a group (:func:`run_writes`) the change is a compare-and-set on exactly
    the columns its decision read from it (state, queue position, poll interval, start,
    webhook and cancel request), with no read of the row; only a row that moved since the
    claim is read and decided again (:meth:`run`, the full path). Either way the job after
    the change comes back as the same kind of record."""

    job: J
    obs: Observation
    backoff: Backoff

    def run(self, conn: Connection, now: float) -> Applied[J] | None:
        change = Change(self.obs, job_id=self.job.id, backoff=self.backoff)
        applied = _apply_one(conn, change, now)
        if applied is None:
            return None
        return Applied(self.job.with_row(applied.job), applied.previous, applied.changed)


def _check_ids(ids: Sequence[tuple[str, str | None, str]]) -> None:
    """Ids from a webhook (its body, its ?job=) are outside input: one the columns cannot
    hold names no job, and is refused as malformed (ValueError) rather than sent to SQL."""
    for name, value, column in ids:
        if value is not None and ("\x00" in value or len(value) > column_length(column)):
            raise ValueError(
                f"{name} is not an id: NUL, or over {column_length(column)} characters"
            )


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
    job that ended (either makes it a duplicate remote request, recorded as such).

    ``delivery_id`` (the provider's id of the message, the same on its retries) is
    remembered once the callback is settled: a repeat is answered ``duplicate`` without
    touching the job. One that must be delivered again (``unverified``) is not."""

    obs: Observation
    request_id: str
    user_id: str | None
    provider: str
    job_id: str | None = None
    attempt: int | None = None
    account: str | None = None
    backoff: Backoff | None = None
    delivery_id: str | None = None

    def __post_init__(self) -> None:
        _check_ids((("request_id", self.request_id, "request_id"), ("job id", self.job_id, "id")))
        most = column_length("delivery_id", webhook_deliveries)
        if self.delivery_id is not None and (
            "\x00" in self.delivery_id or len(self.delivery_id) > most
        ):
            raise ValueError(f"the webhook message id has NUL or is over {most} characters")
        longest = column_length("user_id", provider_accounts)
        if self.user_id is not None and ("\x00" in self.user_id or len(self.user_id) > longest):
            raise ValueError(f"the webhook user id has NUL or is over {longest} characters")

    def run(self, conn: Connection, now: float) -> Delivered:
        if self.delivery_id is None:
            return self._deliver(conn, now)
        key = (webhook_deliveries.c.provider == self.provider) & (
            webhook_deliveries.c.delivery_id == self.delivery_id
        )
        if conn.execute(select(webhook_deliveries.c.received_at).where(key)).first():
            return Delivered(refused="duplicate")
        delivered = self._deliver(conn, now)
        if delivered.refused != "unverified":
            dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
            row = {"provider": self.provider, "delivery_id": self.delivery_id}
            conn.execute(
                dialect.insert(webhook_deliveries)
                .values(**row, received_at=now)
                .on_conflict_do_nothing()  # another replica settled the same message
            )
        return delivered

    def _deliver(self, conn: Connection, now: float) -> Delivered:
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

    def _apply(self, conn: Connection, job_id: str, now: float) -> Applied[Job] | None:
        return _apply_one(conn, Change(self.obs, job_id=job_id, backoff=self.backoff), now)


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


def _apply_one(conn: Connection, change: Change, now: float) -> Applied[Job] | None:
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
        next_poll_at: float | None
        poll_interval: float | None
        if change.backoff is not None:
            next_poll_at, poll_interval = change.backoff.after(
                previous=current.poll_interval,
                changed=obs.state is not current.state
                or obs.queue_position != current.queue_position,
                webhook=current.safety_net,
                needs_result=obs.needs_result,
                now=now,
            )
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
    _record_change(conn, current.id, current.state, obs, now, changed)
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


def _get(conn: Connection, job_id: str) -> Job:
    row = conn.execute(_JOB_BY_ID, {"b_id": job_id}).first()
    if row is None:
        raise JobNotFound(job_id)
    return Job.from_row(row)


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


def _values_for(
    current: PollJob,
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
    fresh = list(_fresh_logs(job_id, stored, entries, now))
    if fresh:
        conn.execute(insert(job_logs), fresh)


def _log_key(entry: Mapping[str, Any]) -> tuple[str, str]:
    return (str(entry.get("timestamp")), str(entry.get("message")))


# --- group fast paths: many polls or webhooks in a few statements --------------------------
#
# A group commit (jobs.writer) hands the store hundreds of polls and webhooks at once. On the
# full path each one reads its whole row (every column, four of them JSON), updates it
# RETURNING every column and builds two Job records: most of the time a group spent. Here a
# group's polls are one executemany compare-and-set on the claimed rows (no read), its
# webhooks one narrow read of their rows and one executemany compare-and-set; a row that
# moved meanwhile (the count says so) or a case the fast path does not cover takes the full
# path, so every rule of the full path still decides.


class _Moved(Exception):
    """A group compare-and-set changed fewer rows than it was given: some row moved since it
    was claimed or read (another process), and a count cannot say which. The transaction is
    rolled back and the group run again on the full path (:func:`run_writes`)."""


_FULL = object()  # a write's outcome slot before it is known: the full path runs it

# The poll compare-and-set: the claimed row, unchanged in every column the decision read.
_POLL_CAS = update(jobs).where(
    jobs.c.id == bindparam("b_id"),
    jobs.c.state == bindparam("b_state"),
    jobs.c.webhook == bindparam("b_webhook"),
    jobs.c.queue_position.is_not_distinct_from(
        bindparam("b_queue_position", type_=jobs.c.queue_position.type)
    ),
    jobs.c.poll_interval.is_not_distinct_from(bindparam("b_poll_interval", type_=Double())),
    jobs.c.started_at.is_not_distinct_from(bindparam("b_started_at", type_=Double())),
    jobs.c.cancel_requested_at.is_not_distinct_from(
        bindparam("b_cancel_requested_at", type_=Double())
    ),
)
# The webhook compare-and-set: the row as the group's read saw it (its state).
_UPDATE_IF_STATE_PLAIN = update(jobs).where(
    jobs.c.id == bindparam("b_id"), jobs.c.state == bindparam("b_state")
)
_POLL_COLUMNS = [jobs.c[name] for name in PollJob.columns()]


def run_writes(
    conn: Connection, writes: Sequence[Write[Any]], now: float, *, fast: bool
) -> list[Any]:
    """Run a group's writes in ``conn``'s transaction; outcomes in the order given. With
    ``fast``, its polls and webhooks go through the group fast paths first (the others, and
    those the fast paths leave, one by one in order). Raises :class:`_Moved` when a fast
    path finds a row moved; the caller runs the group again with ``fast=False``.

    The writes of one group come from concurrent callers (each caller awaits its write), so
    applying the fast ones first is one valid order of concurrent events; a second write
    about the same job or webhook message in one group always takes the full path, after
    the first."""
    outcomes: list[Any] = [_FULL] * len(writes)
    if fast:
        polls = [(n, w) for n, w in enumerate(writes) if isinstance(w, Polled)]
        if polls:
            done = _apply_polls(conn, [w for _, w in polls], now)
            for (n, _), outcome in zip(polls, done, strict=True):
                outcomes[n] = outcome
        callbacks = [(n, w) for n, w in enumerate(writes) if isinstance(w, Callback)]
        if callbacks:
            done = _deliver_many(conn, [w for _, w in callbacks], now)
            for (n, _), outcome in zip(callbacks, done, strict=True):
                outcomes[n] = outcome
    for n, write in enumerate(writes):
        if outcomes[n] is _FULL:
            outcomes[n] = write.run(conn, now)
    return outcomes


def _execute_cas(
    conn: Connection, statement: Any, batches: Mapping[Any, list[dict[str, Any]]]
) -> None:
    """One executemany per set of columns written; :class:`_Moved` unless every row
    matched (psycopg sends an executemany as one pipeline: one round trip)."""
    for rows in batches.values():
        if conn.execute(statement, rows).rowcount != len(rows):
            raise _Moved


def _apply_polls(conn: Connection, polls: Sequence[Polled[Any]], now: float) -> list[Any]:
    outcomes: list[Any] = [_FULL] * len(polls)
    batches: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    planned: list[tuple[int, dict[str, Any], bool]] = []
    ids: set[str] = set()
    for n, poll in enumerate(polls):
        seen, obs = poll.job, poll.obs
        if seen.id in ids or not can_transition(seen.state, obs.state):
            continue  # the full path reads the row and decides (a stale or refused move)
        ids.add(seen.id)
        changed = obs.state is not seen.state or obs.queue_position != seen.queue_position
        next_poll_at, poll_interval = poll.backoff.after(
            previous=seen.poll_interval,
            changed=changed,
            webhook=seen.safety_net,
            needs_result=obs.needs_result,
            now=now,
        )
        values = _values_for(seen, obs, now, next_poll_at, poll_interval)
        guard = {
            "b_id": seen.id,
            "b_state": seen.state.value,
            "b_webhook": seen.webhook,
            "b_queue_position": seen.queue_position,
            "b_poll_interval": seen.poll_interval,
            "b_started_at": seen.started_at,
            "b_cancel_requested_at": seen.cancel_requested_at,
        }
        batches.setdefault(tuple(values), []).append({**values, **guard})
        planned.append((n, values, obs.state is not seen.state))
    _execute_cas(conn, _POLL_CAS, batches)
    logs: dict[str, Sequence[Mapping[str, Any]]] = {}
    for n, values, moved in planned:
        seen, obs = polls[n].job, polls[n].obs
        _record_change(conn, seen.id, seen.state, obs, now, moved)
        if obs.logs:
            logs[seen.id] = obs.logs
        outcomes[n] = Applied(_after(seen, obs, values), seen.state, moved)
    _append_logs_many(conn, logs, now)
    return outcomes


def _deliver_many(conn: Connection, callbacks: Sequence[Callback], now: float) -> list[Any]:
    """The webhooks of a group that :meth:`Callback.run` would apply straight away: a
    terminal observation, the account known and matching (or proven by the signature), a
    message id not seen before, the request's job found and active. Everything else (an
    unknown account, adoption by job id, a duplicate, a refusal) takes the full path."""
    outcomes: list[Any] = [_FULL] * len(callbacks)
    stored: dict[str, str | None] = {}
    seen: set[tuple[str, str]] = set()
    chosen: list[int] = []
    for n, cb in enumerate(callbacks):
        keys = [("request", cb.provider + "\x00" + cb.request_id)]
        if cb.delivery_id is not None:
            keys.append(("delivery", cb.provider + "\x00" + cb.delivery_id))
        repeat = any(key in seen for key in keys)
        seen.update(keys)
        if repeat or not cb.obs.state.terminal:
            continue
        if cb.user_id is not None:
            if cb.account is None and cb.provider not in stored:
                stored[cb.provider] = _account(conn, cb.provider)
            if (cb.account or stored.get(cb.provider)) != cb.user_id:
                continue  # unknown (to learn) or another account: the full path says which
        chosen.append(n)
    if not chosen:
        return outcomes
    # A message id seen before: the full path answers duplicate.
    known = _known_deliveries(conn, [callbacks[n] for n in chosen])
    chosen = [n for n in chosen if (callbacks[n].provider, callbacks[n].delivery_id) not in known]
    rows = _rows_by_request(conn, [callbacks[n] for n in chosen])
    batches: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    planned: list[tuple[int, PollJob, dict[str, Any]]] = []
    for n in chosen:
        cb = callbacks[n]
        current = rows.get((cb.provider, cb.request_id))
        if current is None or current.state not in sources_for(cb.obs.state):
            continue  # adoption, unknown, or already ended: the full path decides
        values = _values_for(current, cb.obs, now, None, None)
        batches.setdefault(tuple(values), []).append(
            {**values, "b_id": current.id, "b_state": current.state.value}
        )
        planned.append((n, current, values))
    _execute_cas(conn, _UPDATE_IF_STATE_PLAIN, batches)
    logs: dict[str, Sequence[Mapping[str, Any]]] = {}
    deliveries: list[dict[str, Any]] = []
    for n, current, values in planned:
        cb = callbacks[n]
        _record_change(conn, current.id, current.state, cb.obs, now, True)
        if cb.obs.logs:
            logs[current.id] = cb.obs.logs
        if cb.delivery_id is not None:
            deliveries.append(
                {"provider": cb.provider, "delivery_id": cb.delivery_id, "received_at": now}
            )
        after = _after(current, cb.obs, values)
        outcomes[n] = Delivered(applied=Applied(after, current.state, True))
    _append_logs_many(conn, logs, now)
    if deliveries:
        dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
        conn.execute(dialect.insert(webhook_deliveries).on_conflict_do_nothing(), deliveries)
    return outcomes


def _known_deliveries(
    conn: Connection, callbacks: Sequence[Callback]
) -> set[tuple[str, str | None]]:
    """The (provider, message id) pairs among ``callbacks`` already remembered."""
    wanted: dict[str, list[str]] = {}
    for cb in callbacks:
        if cb.delivery_id is not None:
            wanted.setdefault(cb.provider, []).append(cb.delivery_id)
    known: set[tuple[str, str | None]] = set()
    for provider, ids in wanted.items():
        for chunk in _chunks(ids):
            found = conn.execute(
                select(webhook_deliveries.c.delivery_id).where(
                    webhook_deliveries.c.provider == provider,
                    webhook_deliveries.c.delivery_id.in_(chunk),
                )
            ).scalars()
            known.update((provider, delivery_id) for delivery_id in found)
    return known


def _rows_by_request(
    conn: Connection, callbacks: Sequence[Callback]
) -> dict[tuple[str, str], PollJob]:
    """The poll columns of the jobs these callbacks name, by (provider, request id): one
    read for the group, never the large JSON columns."""
    wanted: dict[str, list[str]] = {}
    for cb in callbacks:
        wanted.setdefault(cb.provider, []).append(cb.request_id)
    found: dict[tuple[str, str], PollJob] = {}
    for provider, request_ids in wanted.items():
        for chunk in _chunks(request_ids):
            result = conn.execute(
                select(*_POLL_COLUMNS).where(
                    jobs.c.provider == provider, jobs.c.request_id.in_(chunk)
                )
            )
            for job in PollJob.from_rows(result.all(), list(result.keys())):
                assert job.request_id is not None
                found[(provider, job.request_id)] = job
    return found


def _record_change(
    conn: Connection, job_id: str, previous: State, obs: Observation, now: float, moved: bool
) -> None:
    """What an applied observation leaves besides the row: as :func:`_apply_one` does."""
    if moved:
        _event(
            conn,
            job_id,
            now,
            "state",
            from_state=previous,
            to_state=obs.state,
            reason=obs.failure_reason.value if obs.failure_reason else obs.source,
            detail={"error": dict(obs.error)} if obs.error else None,
        )
    if obs.state is State.SUCCEEDED:
        _store_result(conn, job_id, obs.result, now)


def _after(job: J, obs: Observation, values: Mapping[str, Any]) -> J:
    """``job`` with ``values`` written: the row as the compare-and-set left it."""
    names = type(job).columns()
    changes = {name: value for name, value in values.items() if name in names}
    changes["state"] = obs.state
    return dataclasses.replace(job, **changes)


def _append_logs_many(
    conn: Connection, entries: Mapping[str, Sequence[Mapping[str, Any]]], now: float
) -> None:
    """:func:`_append_logs` for several jobs: one read of their stored lines, one insert."""
    if not entries:
        return
    stored: dict[str, list[Any]] = {job_id: [] for job_id in entries}
    for chunk in _chunks(list(entries)):
        query = select(job_logs.c.job_id, job_logs.c.seq, job_logs.c.entry).where(
            job_logs.c.job_id.in_(chunk)
        )
        for row in conn.execute(query):
            stored[row.job_id].append(row)
    fresh = [
        row
        for job_id, lines in entries.items()
        for row in _fresh_logs(job_id, stored[job_id], lines, now)
    ]
    if fresh:
        conn.execute(insert(job_logs), fresh)


def _fresh_logs(
    job_id: str, stored: Sequence[Any], entries: Sequence[Mapping[str, Any]], now: float
) -> Iterator[dict[str, Any]]:
    seen = {_log_key(r.entry) for r in stored}
    seq = max((r.seq for r in stored), default=0)
    for entry in entries:
        key = _log_key(entry)
        if key in seen:
            continue
        seen.add(key)
        seq += 1
        yield {"job_id": job_id, "seq": seq, "at": now, "entry": dict(entry)}
