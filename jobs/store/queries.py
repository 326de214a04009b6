"""The job queries: create, claim, read, list, count; :class:`Store` is the one object the
rest of ``jobs`` talks SQL through (its file and upload queries come from
:class:`jobs.store.files.FileQueries`, its transactions from
:class:`jobs.store.transactions.Transactions`).

The poll claim uses ``FOR UPDATE SKIP LOCKED`` on PostgreSQL so replicas never claim the
same job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from sqlalchemy import (
    Row,
    and_,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from ..backoff import Backoff
from ..db import (
    job_events,
    job_logs,
    jobs,
    results,
    webhook_deliveries,
)
from ..errors import AmbiguousJobRef, IdempotencyConflict, JobNotFound
from ..providers.base import Observation, RemoteRef, Submitted
from ..records import (
    SHORT_ID_START,
    Applied,
    BatchProgress,
    Claimed,
    Job,
    NewJob,
    Overview,
    PollJob,
    _storable,
    column_length,
    is_id_prefix,
    iso,
    new_job_id,
    short_id,
)
from ..states import ACTIVE, FailureReason, State
from .files import FileQueries
from .transactions import T, _chunks
from .transitions import (
    _POLL_COLUMNS,
    BeginSubmit,
    Change,
    MarkSubmitted,
    Write,
    _account,
    _attempt_over,
    _event,
    _get,
    _Moved,
    run_writes,
)


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


def _ids(conn: Connection, query: Select[Any]) -> list[str]:
    return list(conn.execute(query).scalars())


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
        "cancel_after": new.cancel_after,
        "attempts": 0,
        "polls": 0,
        "created_at": now,
        "updated_at": now,
        "last_change_at": now,
    }


def _results_of(conn: Connection, job_ids: Sequence[str]) -> dict[str, Any]:
    rows = conn.execute(
        select(results.c.job_id, results.c.data).where(results.c.job_id.in_(job_ids))
    ).all()
    return {r.job_id: r.data for r in rows}


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


def _claimed(job: PollJob, previous_owner: str | None, owner: str) -> Claimed:
    return Claimed(
        job=job,
        took_over=previous_owner is not None and previous_owner != owner,
    )


class Store(FileQueries):
    """The only place that talks SQL (with its parts in this package)."""

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
    ) -> Applied[Job]:
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
        backoff: Backoff | None = None,
        now: float | None = None,
    ) -> Applied[Job]:
        """The one place observations change jobs (polls, webhooks, submits, results).

        ``next_poll_at``/``poll_interval``, or ``backoff`` (decided on the current row), say when an
        active job is polled next; ``only_from`` narrows the states the change may start from.
        """
        change = Change(
            obs,
            job_id=job_id,
            next_poll_at=next_poll_at,
            poll_interval=poll_interval,
            only_from=tuple(only_from) if only_from is not None else None,
            backoff=backoff,
        )
        [applied] = self.apply_many([change], now=now)
        if applied is None:
            raise JobNotFound(job_id)
        return applied

    def apply_many(
        self, changes: Sequence[Change], *, now: float | None = None
    ) -> list[Applied[Job] | None]:
        """Apply several changes in one transaction; None for a change whose job is unknown."""
        return self.write_many(changes, now=now)

    def write_many(self, writes: Sequence[Write[T]], *, now: float | None = None) -> list[T]:
        """Run several writes in one transaction (group commit). Raises if any fails: the
        caller may retry them one by one."""
        now = time.time() if now is None else now
        try:
            return self._tx(partial(run_writes, writes=writes, now=now, fast=True))
        except _Moved:
            # A row changed under a group fast path (another process): the full path reads
            # every row it needs and decides again.
            return self._tx(partial(run_writes, writes=writes, now=now, fast=False))

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
        poller dies becomes due again by itself. Each job comes back as a
        :class:`~jobs.records.PollJob`: the columns a poll reads, not the whole row (a
        thousand rows' inputs and labels cost more to decode than the claim itself)."""
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
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(previous))
                .values(**lease)
                .returning(*_POLL_COLUMNS)
            )
            claimed = PollJob.from_rows(result.all(), list(result.keys()))
            return [_claimed(job, previous[job.id], owner) for job in claimed]

        def tx_postgres(conn: Connection) -> list[Claimed]:
            picked = (
                select(jobs.c.id, jobs.c.lease_owner.label("prev_owner"))
                .where(due)
                .order_by(jobs.c.next_poll_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .cte("picked")
            )
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == picked.c.id)
                .values(**lease)
                .returning(*_POLL_COLUMNS, picked.c.prev_owner)
            )
            rows = result.all()
            claimed = PollJob.from_rows(rows, list(result.keys()))
            return [
                _claimed(job, row.prev_owner, owner) for job, row in zip(claimed, rows, strict=True)
            ]

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

    def forget_deliveries(self, older_than: float) -> int:
        """Drop the remembered webhook message ids received before ``older_than`` (long
        after any provider stops retrying them); returns how many."""

        def tx(conn: Connection) -> int:
            stale = webhook_deliveries.c.received_at < older_than
            return conn.execute(delete(webhook_deliveries).where(stale)).rowcount

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

    def held_request_ids(
        self, provider: str, request_ids: Sequence[str], *, besides: str
    ) -> set[str]:
        """Which of ``request_ids`` a job other than ``besides`` holds at ``provider``."""
        wanted = [
            r for r in dict.fromkeys(request_ids) if r and len(r) <= column_length("request_id")
        ]
        if not wanted:
            return set()
        rows = self._tx(
            lambda conn: conn.execute(
                select(jobs.c.request_id).where(
                    jobs.c.provider == provider,
                    jobs.c.request_id.in_(wanted),
                    jobs.c.id != besides,
                )
            ).all(),
            write=False,
        )
        return {r.request_id for r in rows}

    def first_sent_at(self, job_id: str) -> float | None:
        """When the job's first submit attempt began (its first ``submit_sent`` event)."""
        at: float | None = self._tx(
            lambda conn: conn.execute(
                select(func.min(job_events.c.at)).where(
                    job_events.c.job_id == job_id, job_events.c.kind == "submit_sent"
                )
            ).scalar(),
            write=False,
        )
        return at

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
