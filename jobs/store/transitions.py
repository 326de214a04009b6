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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
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
from ..records import Applied, Delivered, DuplicateRequest, Job, column_length
from ..states import State, can_transition
from .transactions import _PENDING, DB_RETRIES, _defer_insert

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

    def _apply(self, conn: Connection, job_id: str, now: float) -> Applied | None:
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
