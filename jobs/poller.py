"""The poll scheduler of ``jobs serve``: a few periodic tasks that read due work from the store.

The ``jobs`` table is the only state (docs/internals.md §1), so APScheduler holds exactly two
interval jobs, never one per remote request:

- :meth:`Poller.tick` claims due jobs under a lease and polls each, through
  :class:`jobs.claims.Claims` (``store.claim_due``: ``BEGIN IMMEDIATE`` on SQLite, ``FOR
  UPDATE SKIP LOCKED`` on PostgreSQL; ``manager.refresh`` applies what a poll saw through
  the store's compare-and-set and schedules the next poll by backoff).
- :meth:`Poller.resolve_ambiguous` decides what happens to jobs left in ``submitting``.

Concurrency is bounded by claiming only as many jobs as there are free poll slots: a claimed
job is polled at once, so its lease is never spent waiting in a local queue while another
replica could have polled it. A slot is a request at the provider: it is free again as soon
as the reply is in, while the reply's write waits for its group commit (the lease, not the
slot, protects the job until it is applied; at most ``concurrency`` more polls may be
waiting on their writes). Polls outlive the tick that started them (a slow reply holds
one slot, not the tick); every request still goes through the provider's one ``RateGate``
(the manager holds one provider instance), so a 429 pauses the whole provider, and while it
is paused the slots stay full and nothing more is claimed. A poll is cancelled once it has
used up its lease, so no two owners ever poll one job at the same time.

Nothing here may stop the service: every periodic run logs and survives any exception. A
job whose poll crashed keeps its lease and becomes due again when the lease ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from .claims import LEASE, Claims
from .logs import job_context
from .metrics import AMBIGUOUS_DECISIONS, POLLER_ERRORS
from .states import State

if TYPE_CHECKING:  # kept out of the import, so `jobs --help` can show the defaults cheaply
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from .manager import AsyncJobManager
    from .records import Job, PollJob

log = logging.getLogger(__name__)

AmbiguousPolicy = Literal["resubmit", "fail"]

TICK = 0.25  # seconds between claims of due jobs
BATCH = 100  # most jobs claimed by one statement
CONCURRENCY = 64  # most polls in flight (claims never exceed the free slots)
AMBIGUOUS_GRACE = 120.0  # seconds a job may sit in submitting before the resolver decides
# (longer than a submit can take: a 30 s reply timeout, retries only while nothing was sent)
AMBIGUOUS_PERIOD = 10.0  # seconds between runs of the ambiguous resolver
# Seconds a webhook message id is remembered: providers retry for minutes (Replicate) to
# about two hours (fal); a repeat after a day is answered by the compare-and-set anyway.
DELIVERY_MEMORY = 24 * 3600.0
STOP_TIMEOUT = 10.0  # seconds stop() lets in-flight polls finish before cancelling them


class Poller:
    """Claims due jobs and polls them; resolves ambiguous submits. One per ``jobs serve``."""

    def __init__(
        self,
        manager: AsyncJobManager,
        *,
        tick: float = TICK,
        batch: int = BATCH,
        concurrency: int = CONCURRENCY,
        lease: float = LEASE,
        ambiguous_grace: float = AMBIGUOUS_GRACE,
        ambiguous_period: float = AMBIGUOUS_PERIOD,
        ambiguous_policy: AmbiguousPolicy | None = None,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        """``ambiguous_policy`` None takes the manager's settings (``JOBS_AMBIGUOUS_POLICY``)."""
        if min(tick, lease, ambiguous_period) <= 0 or min(batch, concurrency) < 1:
            raise ValueError(
                "tick, lease and ambiguous_period must be > 0; batch, concurrency >= 1"
            )
        policy = ambiguous_policy or manager.settings.ambiguous_policy
        if policy not in ("resubmit", "fail"):
            raise ValueError(f"ambiguous_policy must be 'resubmit' or 'fail', not {policy!r}")
        self.manager = manager
        self.tick_period = tick
        self.batch = batch
        self.concurrency = concurrency
        self.claims = Claims(manager, lease=lease)
        self.ambiguous_grace = ambiguous_grace
        self.ambiguous_period = ambiguous_period
        self.ambiguous_policy: AmbiguousPolicy = "fail" if policy == "fail" else "resubmit"
        self.stop_timeout = stop_timeout
        self._polls: set[asyncio.Task[PollJob | None]] = set()
        # Polls still waiting for the provider's reply: the slots in use. The others in
        # _polls only wait for their write.
        self._waiting = 0
        self._runs: set[asyncio.Task[object]] = set()  # ticks and resolver runs in progress
        self._tick_lock = asyncio.Lock()
        # The last claim filled every free slot, so more jobs are probably due: freed slots
        # are refilled at once instead of waiting for the next tick (which would cap the
        # rate at concurrency / tick).
        self._backlog = False
        self._refill: asyncio.Task[None] | None = None
        self._refill_at = max(1, min(batch, concurrency) // 4)  # free slots worth a claim
        self._stopping = False
        self._scheduler: AsyncIOScheduler | None = None

    @property
    def owner(self) -> str:
        return self.manager.owner

    @property
    def in_flight(self) -> int:
        return len(self._polls)

    # --- the tick ------------------------------------------------------------------------

    async def tick(self) -> int:
        """Claim due jobs into the free poll slots, in batches while full batches come back,
        and start polling them. Returns how many were claimed; the polls go on after it
        returns (:meth:`idle` waits for them)."""
        claimed_total = 0
        async with self._tick_lock:
            while not self._stopping:
                room = min(
                    self.batch,
                    self.concurrency - self._waiting,
                    2 * self.concurrency - len(self._polls),
                )
                if room <= 0:
                    break
                try:
                    claimed = await self.claims.claim_due(room)
                except Exception:
                    POLLER_ERRORS.labels("claim").inc()
                    log.exception("claiming due jobs failed; the next tick tries again")
                    break
                for job in claimed:
                    self._start_poll(job)
                claimed_total += len(claimed)
                self._backlog = len(claimed) == room
                if not self._backlog:
                    break
        return claimed_total

    def _start_poll(self, job: PollJob) -> None:
        released = False

        def release() -> None:  # once: when the reply is in, or the poll ends without one
            nonlocal released
            if not released:
                released = True
                self._waiting -= 1
                self._slot_freed()

        self._waiting += 1
        task = asyncio.create_task(self.claims.poll(job, replied=release), name=f"poll {job.id}")
        self._polls.add(task)

        def done(task: asyncio.Task[PollJob | None]) -> None:
            self._polls.discard(task)
            if released:
                self._slot_freed()  # a write ended: the task bound may have held a claim back
            else:
                release()

        task.add_done_callback(done)

    def _slot_freed(self) -> None:
        free = min(self.concurrency - self._waiting, 2 * self.concurrency - len(self._polls))
        if (
            self._backlog
            and not self._stopping
            and self._refill is None
            and free >= self._refill_at
        ):
            self._refill = asyncio.create_task(self._refill_slots(), name="refill poll slots")

    async def _refill_slots(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._runs.add(task)
        try:
            await self.tick()
        except Exception:
            POLLER_ERRORS.labels("tick").inc()
            log.exception("refilling poll slots failed; the next tick tries again")
        finally:
            self._runs.discard(task)
            self._refill = None

    async def idle(self) -> None:
        """Wait until no poll started by :meth:`tick` is in flight."""
        while self._polls:
            await asyncio.wait(set(self._polls))

    # --- ambiguous submits ---------------------------------------------------------------

    async def resolve_ambiguous(self) -> int:
        """Decide every job that has sat in ``submitting`` longer than the grace period;
        returns how many decisions were made here. Each decision is an event on the job:

        - ``attempts == 0``: nothing ever left, so sending is safe (``submit_sent``,
          reason ``never sent``);
        - ``attempts > 0``, no request id: the submit may have reached the queue. The
          provider is asked first (:meth:`AsyncJobManager.look_up`): a request it names is
          adopted, one it proves was never created is sent again; otherwise policy
          ``resubmit`` sends again (``submit_sent``, reason ``ambiguous resubmit``: at least
          once), policy ``fail`` ends the job (``failed``, reason ``ambiguous_submit``), and
          so does ``JOBS_MAX_SUBMIT_ATTEMPTS`` sends made.

        A job whose last attempt is known to be over is decided without the grace period:
        one that asked for no webhook (nothing can adopt it) and ended ambiguous, and one
        whose send was deferred by a rate limit (``store.ambiguous``).

        A job that learned its request id from a webhook is not ambiguous: the adoption made
        it due, and the tick polls it.
        """
        decided = 0
        seen: set[str] = set()
        sem = asyncio.Semaphore(self.concurrency)
        store = self.manager.store
        try:
            await store.aio.run(store.forget_deliveries, time.time() - DELIVERY_MEMORY)
        except Exception:
            POLLER_ERRORS.labels("resolve").inc()
            log.exception("forgetting old webhook message ids failed; the next run tries again")

        async def decide(job: Job) -> bool:
            async with sem:
                with job_context(job.id, job.request_id):
                    try:
                        return await self._decide(job)
                    except Exception:
                        POLLER_ERRORS.labels("resolve").inc()
                        log.exception("resolving an ambiguous submit failed; retried next run")
                        return False

        while not self._stopping:
            older_than = time.time() - self.ambiguous_grace
            try:
                found = await store.aio.run(
                    store.ambiguous, older_than=older_than, limit=self.batch
                )
            except Exception:
                POLLER_ERRORS.labels("resolve").inc()
                log.exception("listing ambiguous submits failed; the next run tries again")
                break
            fresh = [job for job in found if job.id not in seen]
            if not fresh:
                break
            seen.update(job.id for job in fresh)
            results = await asyncio.gather(*(decide(job) for job in fresh))
            decided += sum(results)
            if len(found) < self.batch:
                break
        return decided

    async def _decide(self, job: Job) -> bool:
        if job.attempts == 0:
            return await self._send(job, "never sent", decision="send")
        found = await self.manager.look_up(job)
        if not isinstance(found, bool):
            return True  # the provider named the request: adopted
        max_attempts = self.manager.settings.max_submit_attempts
        if found and job.attempts < max_attempts:
            return await self._send(job, "not created", decision="resubmit")
        decision = self.manager.ambiguous_decision(job, self.ambiguous_policy, waited=True)
        if decision == "resubmit":
            return await self._send(job, "ambiguous resubmit", decision="resubmit")
        applied = await self.manager.fail_ambiguous(job)
        if applied.changed:
            log.warning("ambiguous submit failed by policy", extra={"attempts": job.attempts})
        return applied.changed

    async def _send(self, job: Job, reason: str, *, decision: str) -> bool:
        after = await self.manager.send(job, reason=reason)
        sent = after.attempts > job.attempts or after.state is not State.SUBMITTING
        if sent:
            AMBIGUOUS_DECISIONS.labels(job.provider, decision).inc()
            log.info(
                "ambiguous submit resolved: %s",
                reason,
                extra={"state": after.state.value, "attempts": after.attempts},
            )
        return sent

    # --- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`tick` every ``tick`` seconds and :meth:`resolve_ambiguous` every
        ``ambiguous_period`` seconds on the running event loop (APScheduler 3)."""
        from apscheduler.schedulers.asyncio import AsyncIOScheduler  # only `serve` needs it

        if self._scheduler is not None:
            raise RuntimeError("the poller is already running")
        self._stopping = False
        scheduler = AsyncIOScheduler(
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        )
        now = datetime.now(UTC)
        scheduler.add_job(
            self._guarded(self.tick),
            "interval",
            seconds=self.tick_period,
            id="tick",
            next_run_time=now,
        )
        scheduler.add_job(
            self._guarded(self.resolve_ambiguous),
            "interval",
            seconds=self.ambiguous_period,
            id="resolve_ambiguous",
            next_run_time=now,
        )
        scheduler.start()
        self._scheduler = scheduler
        log.info(
            "poller started",
            extra={
                "owner": self.owner,
                "tick": self.tick_period,
                "batch": self.batch,
                "concurrency": self.concurrency,
                "lease": self.claims.lease,
                "ambiguous_policy": self.ambiguous_policy,
            },
        )

    def _guarded(self, run: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[None]]:
        """What APScheduler runs: tracked (so stop can wait for it) and never raising."""

        async def guarded() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._runs.add(task)
            try:
                await run()
            except Exception:
                POLLER_ERRORS.labels(run.__name__).inc()
                log.exception("periodic %s failed; it runs again next period", run.__name__)
            finally:
                self._runs.discard(task)

        guarded.__name__ = guarded.__qualname__ = f"Poller.{run.__name__}"
        return guarded

    async def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let in-flight polls (and a running tick or resolver) finish for up
        to ``timeout`` seconds (``stop_timeout``), cancel what is left, then release this
        owner's leases so the next poller may take the jobs at once."""
        timeout = self.stop_timeout if timeout is None else timeout
        self._stopping = True
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.pause()  # no new runs; shutdown would cancel the running ones
        if self._polls:
            log.info("poller stopping: waiting for %d poll(s) in flight", len(self._polls))
        deadline = time.monotonic() + timeout
        # A tick still running may start a few more polls before it sees the flag: loop.
        while (pending := self._runs | self._polls) and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(pending, timeout=left)
        left_over = self._runs | self._polls
        for task in left_over:
            task.cancel()
        if left_over:
            await asyncio.wait(left_over)
            log.warning("poller stop: cancelled %d unfinished task(s)", len(left_over))
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        try:
            released = await self.claims.release()
        except Exception:
            POLLER_ERRORS.labels("stop").inc()
            log.exception("releasing leases failed; they expire by themselves")
            return
        log.info("poller stopped", extra={"released_leases": released})


__all__ = [
    "AMBIGUOUS_GRACE",
    "AMBIGUOUS_PERIOD",
    "BATCH",
    "CONCURRENCY",
    "LEASE",
    "STOP_TIMEOUT",
    "TICK",
    "AmbiguousPolicy",
    "Poller",
]
