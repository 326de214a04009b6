"""The public Python API: :class:`AsyncJobManager`, and :class:`JobManager` for plain code.

The data path reads top to bottom here: ``submit`` records the job, then sends it;
``refresh`` polls one job and applies what it saw; ``handle_webhook`` applies a callback;
``result`` and ``iter_events`` watch the store, polling a job themselves when nobody else does
(claiming it under a lease, exactly as ``jobs serve`` would). The sync ``JobManager`` runs the
same coroutines on a private event loop, so the logic exists once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import random
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar

from .backoff import Backoff, NextPoll, PollPolicy, next_poll
from .claims import Claims, new_owner
from .config import Settings
from .errors import (
    BatchNotFound,
    CancelTooLate,
    ConfigError,
    JobFailed,
    JobNotFinished,
    JobNotFound,
    JobsError,
    NotRetryable,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    WaitTimeout,
)
from .events import Completed, InProgress, Queued, Status
from .handles import AsyncJobHandle, SyncJobHandle
from .metrics import (
    AMBIGUOUS_DECISIONS,
    DETECTION_LAG,
    DUPLICATE_REQUESTS,
    POLL_SECONDS,
    POLLS,
    POLLS_IN_FLIGHT,
    RATE_LIMIT_WAITS,
    RESULTS,
    SUBMIT_SECONDS,
    SUBMITS,
)
from .providers import create as create_provider
from .providers.base import Observation, Provider, SubmitRequest, Submitted
from .records import J, PollJob, SubmitOptions
from .states import FailureReason, State
from .store import (
    Applied,
    BatchProgress,
    BeginSubmit,
    Callback,
    Change,
    Delivered,
    DuplicateRequest,
    Job,
    JobFile,
    MarkSubmitted,
    NewJob,
    Overview,
    Polled,
    Store,
    column_length,
)
from .writer import GroupWriter

if TYPE_CHECKING:
    from .providers.fal_stream import FalStream
    from .results import FileCache, GcReport
    from .uploads import Uploaded, Uploader

T = TypeVar("T")
P = ParamSpec("P")
AmbiguousDecision = Literal["resubmit", "fail", "wait"]
log = logging.getLogger(__name__)

WATCH_PERIOD = 0.5  # how often a waiter re-reads the store when someone else polls


class AsyncJobManager:
    """Submit, track and fetch remote jobs durably. Settings default to the environment."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: Store | None = None,
        providers: Mapping[str, Provider] | None = None,
        poll_policy: PollPolicy | None = None,
        owner: str | None = None,
        migrate: bool = True,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self._owns_store = store is None  # aclose() closes what this manager opened
        if store is None:
            store = Store.open(
                self.settings.database_url, synchronous=self.settings.sqlite_synchronous
            )
            if migrate:
                from .migrate import upgrade

                upgrade(store.engine)
        self.store = store
        self._providers: dict[str, Provider] = dict(providers or {})
        self.poll_policy = poll_policy or PollPolicy()
        self.owner = owner or new_owner()
        longest = column_length("lease_owner")
        if len(self.owner) > longest:
            raise ConfigError(f"owner {self.owner[:80]!r} is longer than {longest} characters")
        self.writer = GroupWriter(store)
        self.claims = Claims(self)
        self._files: FileCache | None = None
        self._uploader: Uploader | None = None
        self._stream: FalStream | None = None

    # --- providers -----------------------------------------------------------------------

    def provider(self, name: str) -> Provider:
        """The one instance of provider ``name`` (one HTTP client and rate gate for all its
        jobs), built on first use."""
        if name not in self._providers:
            self._providers[name] = create_provider(
                name, self.settings, on_rate_wait=lambda _: RATE_LIMIT_WAITS.labels(name).inc()
            )
        return self._providers[name]

    @property
    def files(self) -> FileCache:
        """The result-file cache (downloads into ``settings.cache_dir``)."""
        if self._files is None:
            from .results import FileCache  # its HTTP stack only when files are wanted

            self._files = FileCache(
                self.store,
                self.settings.cache_dir,
                max_bytes=self.settings.cache_max_file_bytes,
                timeout=self.settings.cache_file_timeout,
                host_slots=self.settings.cache_host_slots,
                allow_hosts=self.settings.cache_allow_hosts,
            )
        return self._files

    @property
    def uploader(self) -> Uploader:
        """Uploads to fal's CDN, recorded in the store (see :mod:`jobs.uploads`)."""
        if self._uploader is None:
            from .providers import create_cdn
            from .uploads import Uploader

            self._uploader = Uploader(
                self.store,
                create_cdn(self.settings),
                ttl=self.settings.upload_ttl,
                max_bytes=self.settings.upload_max_bytes,
            )
        return self._uploader

    async def aclose(self) -> None:
        if self._files is not None:
            await self._files.aclose()
        if self._uploader is not None:
            await self._uploader.close()
            self._uploader = None
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
        for provider in self._providers.values():
            await provider.close()
        self._providers.clear()
        if self._owns_store:
            self.store.close()

    async def __aenter__(self) -> AsyncJobManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- submit --------------------------------------------------------------------------

    async def submit(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        provider: str = "fal",
        path: str | None = None,
        priority: str | None = None,
        hint: str | None = None,
        labels: Mapping[str, str] | None = None,
        batch: str | None = None,
        batch_index: int | None = None,
        idempotency_key: str | None = None,
        webhook: bool = True,
        download: bool | None = None,
        start_timeout: float | None = None,
        cancel_after: float | None = None,
        max_rate_wait: float | None = None,
    ) -> AsyncJobHandle:
        """Record the job, then send it. With an ``idempotency_key`` already used, return that
        job and send nothing (unless it provably never reached the queue: then send it now).
        The job comes back as a handle: its fields, and fal_client's ``status``,
        ``iter_events``, ``get`` and ``cancel`` (see :mod:`jobs.handles`). The keywords are
        :class:`~jobs.records.SubmitOptions`; ``max_rate_wait``: see :meth:`send`."""
        options = SubmitOptions(
            provider=provider,
            path=path,
            priority=priority,
            hint=hint,
            labels=dict(labels or {}),
            batch=batch,
            batch_index=batch_index,
            idempotency_key=idempotency_key,
            webhook=webhook,
            download=download,
            start_timeout=start_timeout,
            cancel_after=cancel_after,
        )
        return await self.submit_with(application, arguments, options, max_rate_wait=max_rate_wait)

    async def submit_with(
        self,
        application: str,
        arguments: Mapping[str, Any],
        options: SubmitOptions,
        *,
        max_rate_wait: float | None = None,
    ) -> AsyncJobHandle:
        """:meth:`submit` with its options as one value (what the API and the CLI build)."""
        new = self.new_job(application, arguments, options)
        job, created = await self.store.aio.run(self.store.create_job, new)
        if not _needs_send(job, created):
            return AsyncJobHandle.of(job, self)
        return AsyncJobHandle.of(await self.send(job, max_rate_wait=max_rate_wait), self)

    def new_job(
        self, application: str, arguments: Mapping[str, Any], options: SubmitOptions
    ) -> NewJob:
        """The row :meth:`submit` records, once the provider has checked the request
        (``ConfigError`` for one that cannot be sent: no credentials, a bad application id)."""
        provider = self.provider(options.provider)
        provider.check(self._request(application, arguments, options))
        return NewJob(
            application=application,
            arguments=dict(arguments),
            provider=provider.name,
            path=options.path,
            priority=options.priority,
            hint=options.hint,
            labels=dict(options.labels),
            batch=options.batch,
            batch_index=options.batch_index,
            idempotency_key=options.idempotency_key,
            webhook=options.webhook and self.settings.public_url is not None,
            download_files=self.settings.cache_files
            if options.download is None
            else options.download,
            start_timeout=options.start_timeout,
            cancel_after=options.cancel_after,
        )

    @staticmethod
    def _request(
        application: str,
        arguments: Mapping[str, Any],
        options: SubmitOptions | Job,
        webhook_url: str | None = None,
    ) -> SubmitRequest:
        return SubmitRequest(
            application=application,
            arguments=arguments,
            path=options.path,
            priority=options.priority,
            hint=options.hint,
            webhook_url=webhook_url,
            start_timeout=options.start_timeout,
            cancel_after=options.cancel_after,
        )

    async def record_many(self, jobs: Sequence[NewJob]) -> list[tuple[Job, bool]]:
        """Record many jobs in one transaction (what makes a large batch fast), each returned
        with whether to :meth:`send` it now: it is new, or was recorded before but provably
        never sent. The others were sent before and must not be sent again."""
        recorded = await self.store.aio.run(self.store.create_jobs, jobs)
        return [(job, _needs_send(job, created)) for job, created in recorded]

    async def send(
        self,
        job: Job,
        *,
        reason: str = "submit",
        max_rate_wait: float | None = None,
        wire: asyncio.Semaphore | None = None,
    ) -> Job:
        """Send a ``submitting`` job to its provider and record the outcome.

        The attempt is counted (compare-and-set on ``attempts``) before the request leaves,
        so two processes never send the same attempt, and a crash leaves an ambiguous job.
        An attempt that may have reached the queue without a request id coming back is
        settled here, before returning (:meth:`_settle`): adopted when the provider names
        the request, else decided by ``JOBS_AMBIGUOUS_POLICY`` within
        ``JOBS_MAX_SUBMIT_ATTEMPTS``, resubmitting after the provider's retry backoff.

        ``max_rate_wait``: when the provider's rate limit would hold the request longer than
        this many seconds, nothing is sent: the job stays recorded (event
        ``submit_deferred``) and the ambiguous-submit resolver of ``jobsctl serve`` sends it.

        ``wire``: held around the provider's submit call only (a batch bounds the submits
        at the provider with it, while its writes run outside it).
        """
        provider = self.provider(job.provider)
        if max_rate_wait is not None and (delay := provider.send_delay()) > max_rate_wait:
            detail = {"seconds": round(delay, 1)}
            await self.store.aio.run(
                self.store.record_event,
                job.id,
                "submit_deferred",
                reason="rate_limited",
                detail=detail,
            )
            return await self.store.aio.run(self.store.get, job.id)
        while True:
            after, unsure = await self._send_once(provider, job, reason, wire)
            if unsure is None:
                return after
            settled = await self._settle(provider, after, unsure)
            if settled is not None:
                return settled
            job, reason = after, "ambiguous resubmit"

    async def _send_once(
        self, provider: Provider, job: Job, reason: str, wire: asyncio.Semaphore | None = None
    ) -> tuple[Job, ProviderError | None]:
        """One attempt; the error is returned when the attempt ended ambiguous.

        The two writes every submit makes (the attempt counted before the request leaves,
        the request id after) go through the group writer: many concurrent submits share
        their commits. The rare outcomes (rejected, never sent, ambiguous) are written
        directly: they are few, and the caller reads the job back at once."""
        if not await self.writer.write(BeginSubmit(job.id, job.attempts, reason)):
            return await self.store.aio.run(self.store.get, job.id), None
        attempt = job.attempts + 1
        webhook_url = self._webhook_url(job, attempt) if job.webhook else None
        request = self._request(job.application, job.arguments, job, webhook_url)
        try:
            async with wire if wire is not None else contextlib.nullcontext():
                with SUBMIT_SECONDS.labels(job.provider).time():
                    submitted = await provider.submit(request)
        except ProviderRejected as exc:
            SUBMITS.labels(job.provider, "rejected").inc()
            error = _error_of(exc)
            applied = await self.store.aio.run(
                self.store.fail, job.id, FailureReason.SUBMIT_REJECTED, error
            )
            return applied.job, None
        except ProviderError as exc:
            if isinstance(exc, ProviderUnavailable) and not exc.reached:
                SUBMITS.labels(job.provider, "not_sent").inc()
                return await self._not_sent(job, exc), None
            SUBMITS.labels(job.provider, "ambiguous").inc()
            await self.store.aio.run(
                self.store.record_event,
                job.id,
                "submit_ambiguous",
                reason=type(exc).__name__,
                detail={**_error_of(exc), "attempt": attempt},
            )
            return await self.store.aio.run(self.store.get, job.id), exc
        SUBMITS.labels(job.provider, "queued").inc()
        return await self._submitted(job, submitted), None

    async def _settle(self, provider: Provider, job: Job, exc: ProviderError) -> Job | None:
        """Settle an attempt that may have reached the queue; None means: send again.

        A reply that named the request (fal's ``x-fal-request-id`` on an error) is checked
        with a status poll: a request the provider knows is adopted, with no second send."""
        if exc.request_id:
            adopted = await self._probe(provider, job, exc.request_id)
            if adopted is not None:
                return adopted
        found = await self.look_up(job)
        if isinstance(found, Job):
            return found
        if found and job.attempts < self.settings.max_submit_attempts:
            return None  # provably not created: sending again is safe
        decision = self.ambiguous_decision(job, self.settings.ambiguous_policy, waited=False)
        if decision == "fail":
            return (await self.fail_ambiguous(job)).job
        if decision == "wait":
            return job  # a webhook may still name the request; the resolver decides later
        AMBIGUOUS_DECISIONS.labels(job.provider, "resubmit").inc()
        await asyncio.sleep(provider.retry_delay(job.attempts))
        fresh = await self.store.aio.run(self.store.get, job.id)
        if (
            fresh.state is not State.SUBMITTING
            or fresh.request_id
            or fresh.attempts != job.attempts
        ):
            return fresh  # adopted by a webhook, cancelled, or taken over meanwhile
        return None

    async def _probe(self, provider: Provider, job: Job, request_id: str) -> Job | None:
        ref = provider.ref_for(job.application, request_id)
        try:
            seen = await provider.status(ref, logs=False)
        except ProviderError:
            return None
        if seen.failure_reason is FailureReason.RESULT_UNAVAILABLE:
            return None  # the provider does not know it: never queued
        AMBIGUOUS_DECISIONS.labels(job.provider, "poll").inc()
        await self.store.aio.run(
            self.store.record_event,
            job.id,
            "ambiguous_resolved",
            reason="poll",
            detail={"request_id": request_id},
        )
        queued = Observation(state=State.QUEUED, source="submit")
        return await self._submitted(job, Submitted(ref=ref, observation=queued))

    async def look_up(self, job: Job) -> Job | bool:
        """Ask the provider whether a submit of ``job`` whose reply was lost made a request
        (Replicate lists the predictions it created; fal cannot say). The job adopted with
        the request found; True when provably none was created; False when nobody can
        tell, and the ambiguous policy decides. Each answer is an event on the job."""
        provider = self.provider(job.provider)
        request = self._request(job.application, job.arguments, job)
        # From the first send, not from the recording: a line of a large batch is sent long
        # after it was recorded, and the listing (a bounded number of pages) would have to
        # read through every prediction made for the lines before it.
        first = await self.store.aio.run(self.store.first_sent_at, job.id)
        since = job.created_at if first is None else first

        async def held(request_ids: Sequence[str]) -> set[str]:
            found: set[str] = await self.store.aio.run(
                self.store.held_request_ids, job.provider, request_ids, besides=job.id
            )
            return found

        lookup = await provider.find_submitted(request, job_id=job.id, since=since, held=held)
        if lookup.submitted is not None:
            AMBIGUOUS_DECISIONS.labels(job.provider, "lookup").inc()
            detail = {"request_id": lookup.submitted.ref.request_id, "how": lookup.detail}
            await self.store.aio.run(
                self.store.record_event,
                job.id,
                "ambiguous_resolved",
                reason="lookup",
                detail=detail,
            )
            return await self._submitted(job, lookup.submitted)
        kind = "ambiguous_resolved" if lookup.certain else "ambiguous_lookup"
        reason = "not created" if lookup.certain else "unknown"
        await self.store.aio.run(
            self.store.record_event, job.id, kind, reason=reason, detail={"how": lookup.detail}
        )
        return lookup.certain

    def ambiguous_decision(self, job: Job, policy: str, *, waited: bool) -> AmbiguousDecision:
        """What to do with a job whose last attempt may have reached the queue: ``fail``
        once ``JOBS_MAX_SUBMIT_ATTEMPTS`` sends were made or under policy ``fail`` (a job
        that asked for a webhook is first given the grace period, ``waited``, for the
        webhook to name its request), else ``resubmit``."""
        if job.attempts >= self.settings.max_submit_attempts:
            return "fail"
        if policy == "resubmit":
            return "resubmit"
        return "wait" if job.webhook and not waited else "fail"

    async def fail_ambiguous(self, job: Job) -> Applied[Job]:
        """End an ambiguous job as ``failed`` (``ambiguous_submit``), if still submitting."""
        if job.attempts >= self.settings.max_submit_attempts:
            why = (
                f"JOBS_MAX_SUBMIT_ATTEMPTS={self.settings.max_submit_attempts} sends were "
                "made and none was confirmed"
            )
        else:
            why = "JOBS_AMBIGUOUS_POLICY=fail ends it rather than risk a second paid request"
        error = {
            "type": FailureReason.AMBIGUOUS_SUBMIT.value,
            "message": f"the submit may have reached {job.provider}, but no request id came "
            f"back; {why}",
            "attempts": job.attempts,
        }
        applied = await self.store.aio.run(
            self.store.fail,
            job.id,
            FailureReason.AMBIGUOUS_SUBMIT,
            error,
            only_from=(State.SUBMITTING,),
        )
        if applied.changed:
            AMBIGUOUS_DECISIONS.labels(job.provider, "fail").inc()
        return applied

    async def _not_sent(self, job: Job, exc: ProviderUnavailable) -> Job:
        error = _error_of(exc)
        if job.idempotency_key is not None:
            # Retrying the same call is safe: keep the job in submitting, attempts back to 0.
            return await self.store.aio.run(self.store.unsend, job.id, error)
        applied = await self.store.aio.run(
            self.store.fail, job.id, FailureReason.SUBMIT_UNREACHABLE, error
        )
        return applied.job

    async def _submitted(self, job: Job, submitted: Submitted) -> Job:
        step = self._next_poll(previous=None, changed=False, webhook=job.webhook)
        write = MarkSubmitted(job.id, submitted, time.time() + step.delay, step.interval)
        after = await self.writer.write(write)
        if after.request_id != submitted.ref.request_id:
            # An earlier attempt's request was adopted first: this one is the surplus.
            await self._surplus(DuplicateRequest(after, submitted.ref.request_id, active=True))
        return after

    async def _surplus(self, duplicate: DuplicateRequest) -> None:
        """A second remote request for one job (already recorded as an event): count it,
        and with ``JOBS_DUPLICATE_POLICY=cancel`` cancel it while it may still run."""
        job = duplicate.job
        action = "kept"
        if self.settings.duplicate_policy == "cancel" and duplicate.active:
            provider = self.provider(job.provider)
            ref = provider.ref_for(job.application, duplicate.request_id)
            try:
                accepted = await provider.cancel(ref)
            except ProviderError as exc:
                log.warning(
                    "cancelling a duplicate remote request failed: %s",
                    exc,
                    extra={"job_id": job.id, "request_id": duplicate.request_id},
                )
            else:
                action = "cancelled" if accepted else "kept"
                await self.store.aio.run(
                    self.store.record_event,
                    job.id,
                    "duplicate_cancelled" if accepted else "duplicate_finished",
                    detail={"request_id": duplicate.request_id},
                )
        DUPLICATE_REQUESTS.labels(job.provider, action).inc()
        log.warning(
            "duplicate remote request for one job (%s); kept %s",
            action,
            job.request_id,
            extra={"job_id": job.id, "request_id": duplicate.request_id},
        )

    def _webhook_url(self, job: Job, attempt: int) -> str:
        """The callback URL of one attempt: the job id lets a webhook settle an ambiguous
        submit, the attempt number tells a late earlier attempt from the current one."""
        return (
            f"{self.settings.public_url}/v1/webhooks/{job.provider}?job={job.id}&attempt={attempt}"
        )

    async def track(self, application: str, request_id: str, *, provider: str = "fal") -> Job:
        """Adopt a request submitted elsewhere (e.g. by fal_client) so it is tracked here.
        The job is never sent by anyone: its input is not known here."""
        remote = self.provider(provider)
        ref = remote.track_ref(application, request_id)  # ConfigError before any row exists
        new = NewJob(application=application, arguments={}, provider=remote.name)
        return await self.store.aio.run(self.store.track_job, new, ref, next_poll_at=time.time())

    async def retry(self, ref: str) -> Job:
        """A new attempt for a failed or cancelled job, linked to it (``retry_of``) and sent
        now. Asking again for the same job returns the same retry and sends nothing."""
        old = await self.status(ref)
        if old.state not in (State.FAILED, State.CANCELLED):
            why = f"it is {old.state.value}; only failed or cancelled jobs are"
            raise NotRetryable(old.id, why)
        if old.tracked:
            raise NotRetryable(old.id, "it was made elsewhere (tracked), so its input is unknown")
        options = SubmitOptions(
            provider=old.provider,
            path=old.path,
            priority=old.priority,
            hint=old.hint,
            labels=dict(old.labels or {}),
            batch=old.batch,
            batch_index=old.batch_index,
            idempotency_key=f"retry:{old.id}",
            download=old.download_files,
            start_timeout=old.start_timeout,
            cancel_after=old.cancel_after,
        )
        new = self.new_job(old.application, old.arguments, options)
        new = dataclasses.replace(new, retry_of=old.id)
        job, created = await self.store.aio.run(self.store.create_retry, old, new)
        if not _needs_send(job, created):
            return job
        return await self.send(job, reason="retry")

    async def retry_batch(self, batch: str, *, reasons: Sequence[str] | None = None) -> list[Job]:
        """:meth:`retry` for every failed or cancelled job of ``batch`` not retried yet;
        ``reasons`` keeps only those that failed for one of them (``"cancelled"`` for a
        cancelled job)."""
        jobs = await self.store.aio.run(self.store.retryable, batch, reasons=reasons)
        return [await self.retry(job.id) for job in jobs]

    # --- uploads ---------------------------------------------------------------------------

    async def upload(
        self, data: str | bytes, content_type: str, file_name: str | None = None
    ) -> Uploaded:
        """Upload bytes to fal's CDN once: the same bytes again return the same URL
        (``str()`` of the result) and send nothing."""
        return await self.uploader.upload(data, content_type, file_name)

    async def upload_file(
        self, path: str | os.PathLike[str], *, content_type: str | None = None
    ) -> Uploaded:
        """Upload a file, or a folder zipped deterministically, once (resumable above
        100 MiB). Raises ``UploadError`` for a missing, unreadable or too large file."""
        return await self.uploader.upload_file(path, content_type=content_type)

    async def upload_image(self, image: Any, format: str = "jpeg") -> Uploaded:
        """Upload a Pillow image as ``image/<format>``, once."""
        return await self.uploader.upload_image(image, format)

    async def upload_inputs(
        self, arguments: Mapping[str, Any], files: Sequence[tuple[str, str | os.PathLike[str]]]
    ) -> tuple[dict[str, Any], list[Uploaded]]:
        """``arguments`` with each ``(dotted key, path)`` of ``files`` set to the path's URL,
        uploading or reusing it (``jobsctl submit|run --file KEY=PATH``). Every path is
        checked before the first upload; nothing is submitted here."""
        return await self.uploader.upload_inputs(arguments, files)

    # --- status, polling and applying ----------------------------------------------------

    async def status(self, ref: str, *, refresh: bool = False) -> Job:
        """The job named by ``ref`` (our id, a unique prefix of it or of its short id, its
        request id or its idempotency key). With ``refresh``, a job that is due for a poll
        and that nobody else holds is polled first, so the answer is not stale when no
        server runs."""
        job = await self.store.aio.run(self.store.get, ref)
        return await self._poll_if_free(job) if refresh else job

    async def _poll_if_free(self, job: Job) -> Job:
        """Poll ``job`` now if it is due and unclaimed (or held by a dead local process),
        under this manager's lease; else return it as it is."""
        if job.terminal or job.request_id is None:
            return job
        claimed = await self.claims.claim_if_free(job)
        if claimed is None:
            return job
        after = await self.claims.poll(claimed, raising=True)
        if (
            after is None
        ):  # cut off at the end of its lease: logged; the job as the store has it now
            return await self.store.aio.run(self.store.get, job.id)
        return after

    async def events(self, ref: str) -> list[dict[str, Any]]:
        """The job's events, oldest first: every submit, decision, change, cancel, retry, gc."""
        job = await self.status(ref)
        return await self.store.aio.run(self.store.events, job.id)

    async def logs(self, ref: str, *, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """The job's stored log lines after sequence number ``after``, with their numbers."""
        job = await self.status(ref)
        return [
            (seq, dict(entry))
            for seq, entry in await self.store.aio.run(self.store.logs, job.id, after=after)
        ]

    async def collect_garbage(self, cutoff: float) -> GcReport:
        """Remove stored results and cached files of jobs finished before ``cutoff`` (UNIX
        seconds); job rows and events stay."""
        from .results import collect_garbage

        return await self.store.aio.run(
            collect_garbage, self.store, self.settings.cache_dir, cutoff
        )

    async def list_jobs(
        self,
        *,
        state: State | None = None,
        states: Sequence[State] | None = None,
        application: str | None = None,
        batch: str | None = None,
        limit: int = 100,
        before: str | None = None,
        label: tuple[str, str] | None = None,
        search: str | None = None,
    ) -> list[Job]:
        """A page of jobs, newest first, in ``state`` or any of ``states`` when given;
        ``before`` is the last id of the previous page. ``label`` is a ``(key, value)`` pair;
        ``search`` an id, id prefix or suffix, request id or idempotency key (see
        :meth:`jobs.store.Store.list_jobs`)."""
        return await self.store.aio.run(
            self.store.list_jobs,
            states=[*(states or ()), *([state] if state else [])],
            application=application,
            batch=batch,
            limit=limit,
            before=before,
            label=label,
            search=search,
        )

    async def count_by_state(self) -> dict[State, int]:
        return await self.store.aio.run(self.store.count_by_state)

    async def ping(self) -> None:
        """Raise when the database does not answer."""
        await self.store.aio.run(self.store.ping)

    async def refresh(self, job: J, *, replied: Callable[[], None] | None = None) -> J:
        """Poll one claimed job, apply what was seen, schedule its next poll; the job after,
        as the same kind of record (a claim's :class:`~jobs.records.PollJob` or a full
        :class:`Job`). ``replied`` is called once the provider has answered (or failed to),
        before the answer is written: a poller may use the slot for another job while this
        one's write waits for its group commit (the lease still holds the job)."""
        provider = self.provider(job.provider)
        started = time.perf_counter()
        try:
            with POLLS_IN_FLIGHT.labels(provider.name).track_inprogress():
                observation = await provider.status(job.ref())
                if observation.needs_result:
                    RESULTS.labels(provider.name).inc()
                    outcome = await provider.result(job.ref(), failed=observation.error is not None)
                    observation = dataclasses.replace(
                        outcome,
                        logs=observation.logs,
                        metrics=observation.metrics if observation.metrics else outcome.metrics,
                    )
        except ProviderError as exc:
            if replied is not None:
                replied()
            POLLS.labels(provider.name, "error").inc()
            retry_after = exc.retry_after if isinstance(exc, ProviderUnavailable) else None
            step = self._next_poll(
                previous=job.poll_interval,
                changed=False,
                webhook=job.safety_net,
                retry_after=retry_after,
                failed=True,
            )
            await self.store.aio.run(
                self.store.poll_failed,
                job.id,
                _error_of(exc),
                next_poll_at=time.time() + step.delay,
                poll_interval=step.interval,
            )
            return job.with_row(await self.store.aio.run(self.store.get, job.id))
        if replied is not None:
            replied()
        POLLS.labels(provider.name, "ok").inc()
        POLL_SECONDS.labels(provider.name).observe(time.perf_counter() - started)
        # The claimed record is what the poll decides from: applied by compare-and-set on
        # it, without reading the row again (jobs.store.transitions, Polled).
        applied = await self.writer.write(Polled(job, observation, Backoff(self.poll_policy)))
        if applied is None:
            raise JobNotFound(job.id)
        return self._after_apply(applied).job

    async def apply(self, job: Job, observation: Observation) -> Applied[Job]:
        """Apply an observation to a job through the store's compare-and-set (batched)."""
        change = Change(observation, job_id=job.id, backoff=Backoff(self.poll_policy))
        applied = await self.writer.write(change)
        if applied is None:
            raise JobNotFound(job.id)
        return self._after_apply(applied)

    def _next_poll(
        self,
        *,
        previous: float | None,
        changed: bool,
        webhook: bool,
        retry_after: float | None = None,
        failed: bool = False,
    ) -> NextPoll:
        """The backoff decision, with a fresh jitter draw so jobs submitted together drift
        apart instead of polling in lock-step."""
        return next_poll(
            self.poll_policy,
            previous=previous,
            changed=changed,
            webhook=webhook,
            retry_after=retry_after,
            failed=failed,
            rand=random.random(),
        )

    def _after_apply(self, applied: Applied[J]) -> Applied[J]:
        done = applied.job
        if applied.finished:
            lag = detection_lag(done)
            if lag is not None:
                DETECTION_LAG.labels(done.provider).observe(lag)
        if applied.finished and done.state is State.SUCCEEDED and done.download_files:
            self.files.schedule(done.id)  # in the background: the poll goes on
        return applied

    async def handle_webhook(
        self,
        provider: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        job_id: str | None = None,
        attempt: int | None = None,
        now: float | None = None,
    ) -> Delivered:
        """Verify a callback from ``provider`` and apply it. Raises ``SignatureError``,
        ``ValueError`` (authentic but unreadable) or ``WebhookUnavailable``.

        ``job_id`` and ``attempt`` come from the callback URL: they let a callback settle
        an ambiguous submit that never learned its request id, or reveal a second remote
        request for the job. Callbacks from another provider account (one other than the
        configured or learned account) are never applied."""
        remote = self.provider(provider)
        delivery = await remote.parse_webhook(
            headers,
            body,
            now=time.time() if now is None else now,
            job_id=job_id,
            attempt=attempt,
        )
        callback = Callback(
            delivery.observation,
            request_id=delivery.request_id,
            user_id=delivery.user_id,
            provider=provider,
            job_id=delivery.job_id,
            attempt=delivery.attempt,
            account=remote.account,
            backoff=Backoff(self.poll_policy),
            delivery_id=delivery.delivery_id,
        )
        delivered = await self.writer.write(callback)
        if delivered.duplicate is not None:
            await self._surplus(delivered.duplicate)
        if delivered.applied is not None:
            self._after_apply(delivered.applied)
        return delivered

    # --- results and watching ------------------------------------------------------------

    async def watch(self, ref: str, *, timeout: float | None = None) -> AsyncIterator[Job]:
        """Yield the job each time it changes, until it is terminal (then stop) or
        ``timeout`` passes (then raise :class:`WaitTimeout`). Polls the provider itself when
        the job is due and nobody else has claimed it."""
        job = await self.status(ref)
        deadline = None if timeout is None else time.monotonic() + timeout
        yield job
        seen = job.updated_at
        while not job.terminal:
            job = await self._poll_if_free(job)
            if job.updated_at == seen:
                job = await self.store.aio.run(self.store.get, job.id)
            if job.updated_at != seen:
                seen = job.updated_at
                yield job
                continue
            now = time.time()
            pause = WATCH_PERIOD
            if job.next_poll_at is not None:
                pause = min(pause, max(0.0, job.next_poll_at - now))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(job.id, timeout or 0.0, job.state.value)
                pause = min(pause, left)
            await asyncio.sleep(max(pause, 0.01))

    async def wait(self, ref: str, *, timeout: float | None = None) -> Job:
        """Wait until the job is terminal; return it (whatever its outcome)."""
        last = None
        async for job in self.watch(ref, timeout=timeout):
            last = job
        assert last is not None
        return last

    async def result(self, ref: str, *, wait: bool = False, timeout: float | None = None) -> Any:
        """The job's result. Raises :class:`JobFailed` for a failed or cancelled job,
        :class:`JobNotFinished` when not finished and ``wait`` is false, and
        :class:`WaitTimeout` when ``timeout`` runs out."""
        job = await (self.wait(ref, timeout=timeout) if wait else self.status(ref))
        if not job.terminal:
            raise JobNotFinished(job.id, job.state.value)
        if job.state is not State.SUCCEEDED:
            raise JobFailed(job.id, job.state.value, job.error)
        found, data = await self.store.aio.run(self.store.result, job.id)
        if not found:
            removed = {
                "type": "result_removed",
                "message": "its result was removed by `jobs gc` (retention); "
                "the job and its events are kept (`jobs status`)",
            }
            raise JobFailed(job.id, job.state.value, removed)
        return data

    async def iter_events(
        self, ref: str, *, with_logs: bool = True, timeout: float | None = None
    ) -> AsyncIterator[Status]:
        """Yield ``Queued`` / ``InProgress`` / ``Completed`` as the job moves, like
        ``fal_client``'s ``iter_events``; ends after ``Completed``. As with fal's ``logs=1``,
        each event's ``logs`` holds every line so far, not only the new ones."""
        last: Status | None = None
        logs_seen = 0
        logs: list[dict[str, Any]] = []
        async for job in self.watch(ref, timeout=timeout):
            new_lines = False
            if with_logs:
                lines = await self.store.aio.run(self.store.logs, job.id, after=logs_seen)
                if lines:
                    logs_seen = lines[-1][0]
                    logs.extend(dict(entry) for _, entry in lines)
                    new_lines = True
            event = _status_of(job, list(logs) if with_logs else None)
            if event is None or (event == last and not new_lines):
                continue
            last = event
            yield event

    async def current_status(self, ref: str, *, with_logs: bool = False) -> Status:
        """The job's status now, as fal_client's ``status(with_logs=)`` gives it (logs: every
        line so far). Polls the provider first when the job is due and nobody else polls."""
        job = await self.status(ref, refresh=True)
        logs = None
        if with_logs:
            logs = [dict(entry) for _, entry in await self.store.aio.run(self.store.logs, job.id)]
        event = _status_of(job, logs)
        return event if event is not None else Queued(position=None)

    async def iter_logs(
        self, ref: str, *, follow: bool = False, timeout: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The job's stored log lines; with ``follow``, then each new one as polls (its own,
        when nobody else polls) bring it, until the job is terminal."""
        job = await self.status(ref)
        seen = 0
        jobs = self.watch(job.id, timeout=timeout) if follow else _once(job)
        async for _ in jobs:
            lines = await self.store.aio.run(self.store.logs, job.id, after=seen)
            if lines:
                seen = lines[-1][0]
            for _seq, entry in lines:
                yield dict(entry)

    async def subscribe(
        self,
        /,
        application: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        job_id: str | None = None,
        with_logs: bool = False,
        on_enqueue: Callable[[str], Any] | None = None,
        on_queue_update: Callable[[Status], Any] | None = None,
        timeout: float | None = None,
        **submit_options: Any,
    ) -> Any:
        """Submit and wait for the result, calling ``on_enqueue(request_id)`` and
        ``on_queue_update(status)`` like ``fal_client.subscribe``. Durable: pass ``job_id``
        (or an ``idempotency_key``) to resume an interrupted call without submitting again."""
        job: Job
        if job_id is None:
            job = await self.submit(application, arguments or {}, **submit_options)
        else:
            job = await self.status(job_id)
        if on_enqueue is not None and job.request_id is not None:
            await _maybe_await(on_enqueue(job.request_id))
        async for event in self.iter_events(job.id, with_logs=with_logs, timeout=timeout):
            if on_queue_update is not None:
                await _maybe_await(on_queue_update(event))
        return await self.result(job.id)

    async def run(
        self,
        /,
        application: str,
        arguments: Mapping[str, Any],
        *,
        timeout: float | None = None,
        **submit_options: Any,
    ) -> Any:
        """Submit through the queue and wait for the result (fal_client's ``run`` calls the
        direct host instead: nothing would be kept). Re-run with the same
        ``idempotency_key`` after an interruption, and the job is resumed, not paid twice."""
        job = await self.submit(application, arguments, **submit_options)
        return await self.result(job.id, wait=True, timeout=timeout)

    async def get_handle(self, application: str, request_id: str) -> AsyncJobHandle:
        """A handle on a request by its id: ours, or one made elsewhere (adopted, as
        :meth:`track` does)."""
        job = await self.track(application, request_id)
        return AsyncJobHandle.of(job, self)

    async def stream(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "/stream",
        timeout: float | None = None,
        labels: Mapping[str, str] | None = None,
        batch: str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield each event of fal's streaming endpoint as fal_client's ``stream`` does, and
        record the call as a job: each event is a job event, the last one its result. A
        stream that breaks (or is abandoned) leaves the job failed; fal keeps nothing of a
        stream, so it cannot be resumed."""
        if self._stream is None:
            from .providers import create_stream

            self._stream = create_stream(self.settings)
        streamer = self._stream
        streamer.check(application, arguments, path)
        new = NewJob(
            application=application,
            arguments=dict(arguments),
            provider="fal",
            path=path,
            labels=dict(labels or {}),
            batch=batch,
            idempotency_key=idempotency_key,
        )
        job, created = await self.store.aio.run(self.store.create_job, new)
        if not created:
            raise JobsError(
                f"idempotency key {idempotency_key!r} already names job {job.id}; "
                "a stream cannot be replayed (`jobsctl show` has its events)"
            )
        started = Observation(state=State.IN_PROGRESS, source="stream")
        await self.store.aio.run(self.store.apply, job.id, started)
        last: dict[str, Any] | None = None
        outcome: Observation | None = None
        try:
            async for event in streamer.events(application, arguments, path=path, timeout=timeout):
                await self.store.aio.run(
                    self.store.record_event, job.id, "stream_event", detail=event
                )
                last = event
                yield event
            outcome = Observation(state=State.SUCCEEDED, result=last, source="stream")
        except ProviderError as exc:
            outcome = Observation(
                state=State.FAILED,
                error=_error_of(exc),
                failure_reason=FailureReason.REMOTE_ERROR,
                source="stream",
            )
            raise
        finally:
            if outcome is None:
                error = {
                    "type": "stream_abandoned",
                    "message": "the stream was not read to its end",
                }
                outcome = Observation(
                    state=State.FAILED,
                    error=error,
                    failure_reason=FailureReason.REMOTE_ERROR,
                    source="stream",
                )
            await asyncio.shield(self.store.aio.run(self.store.apply, job.id, outcome))

    async def cancel(
        self, ref: str, *, wait: float = 10.0, max_rate_wait: float | None = None
    ) -> Job:
        """Ask the provider to cancel; return the job once the outcome is known (or after
        ``wait`` seconds). Raises :class:`CancelTooLate` when the job had already finished,
        and ``ProviderUnavailable`` (nothing asked, nothing recorded) when the provider's
        rate limit would hold the cancel longer than ``max_rate_wait`` seconds."""
        job = await self.status(ref)
        if job.terminal:
            raise CancelTooLate(job.id, job.state.value)
        if job.request_id is None:
            # Never confirmed as queued: cancelling locally stops any resubmission.
            observation = Observation(state=State.CANCELLED, source="cancel")
            applied = await self.store.aio.run(self.store.apply, job.id, observation)
            return applied.job
        provider = self.provider(job.provider)
        if max_rate_wait is not None and (delay := provider.send_delay()) > max_rate_wait:
            raise ProviderUnavailable(
                f"{job.provider} is rate limiting requests for {delay:.0f} s more; "
                "ask for the cancel again then",
                retry_after=delay,
                reached=False,
            )
        accepted = await provider.cancel(job.ref())
        await self.store.aio.run(self.store.mark_cancel_requested, job.id)
        try:
            job = await self.wait(job.id, timeout=wait)
        except WaitTimeout:
            return await self.status(job.id)
        if not accepted or job.state is not State.CANCELLED:
            raise CancelTooLate(job.id, job.state.value)
        return job

    # --- reading for pages and reports ---------------------------------------------------

    async def overview(self) -> Overview:
        """Database-wide figures: counts, failures by reason, backlog, leases."""
        return await self.store.aio.run(self.store.overview)

    async def batches(self, *, active_only: bool = False, limit: int = 100) -> list[BatchProgress]:
        """Batches, newest first (only those with an unfinished job when ``active_only``)."""
        return await self.store.aio.run(self.store.batches, active_only=active_only, limit=limit)

    async def batch(self, name: str) -> BatchProgress:
        """One batch's progress; raises :class:`BatchNotFound` when it has no job."""
        found = await self.store.aio.run(self.store.batches, name=name, limit=1)
        if not found:
            raise BatchNotFound(name)
        return found[0]

    async def stored_result(self, ref: str) -> tuple[bool, Any]:
        """``(True, data)`` when the job's result is stored, else ``(False, None)``; never
        waits and never asks the provider."""
        job = await self.status(ref)
        return await self.store.aio.run(self.store.result, job.id)

    async def failures(self, *, batch: str | None = None) -> dict[str, int]:
        """Failed jobs by failure reason, most frequent first (of one batch when given)."""
        return await self.store.aio.run(self.store.failures, batch=batch)

    async def batch_jobs(self, name: str) -> list[Job]:
        """Every job of a batch, in input order."""
        return await self.store.aio.run(self.store.batch_jobs, name)

    async def stored_results(self, job_ids: Sequence[str]) -> dict[str, Any]:
        """The stored results of these jobs, by id (jobs without one are absent)."""
        return await self.store.aio.run(self.store.results_of, job_ids)

    async def job_files(self, ref: str) -> list[JobFile]:
        """The files of the job's result and whether each is in the cache."""
        job = await self.status(ref)
        return await self.store.aio.run(self.store.files, job.id)


def detection_lag(job: PollJob) -> float | None:
    """Seconds from the remote finish to our record of it, when the provider reported its
    run time (``metrics.inference_time``) and we saw the job running: the finish is then the
    start plus that time. We see the start no earlier than it happened, so the figure errs
    low, never high; a job never seen running has no figure (its queue time would count)."""
    run = job.metrics.get("inference_time") if isinstance(job.metrics, dict) else None
    if job.finished_at is None or job.started_at is None or not isinstance(run, int | float):
        return None
    return max(0.0, job.finished_at - (job.started_at + float(run)))


def _needs_send(job: Job, created: bool) -> bool:
    """New, or recorded earlier but provably never sent (no attempt was counted)."""
    return created or (job.state is State.SUBMITTING and job.attempts == 0)


def _status_of(job: Job, logs: list[dict[str, Any]] | None) -> Status | None:
    if job.state is State.QUEUED:
        return Queued(position=job.queue_position)
    if job.state is State.IN_PROGRESS:
        return InProgress(logs=logs)
    if job.terminal:
        return Completed(
            logs=logs, metrics=dict(job.metrics or {}), state=job.state.value, error=job.error
        )
    return None


def _error_of(exc: ProviderError) -> dict[str, Any]:
    body = exc.body if isinstance(exc.body, Mapping) else None
    return {
        "type": (body or {}).get("type") or type(exc).__name__,
        "message": str(exc),
        "detail": (body or {}).get("detail", exc.body),
        "status_code": exc.status_code,
        "request_id": exc.request_id,
    }


async def _maybe_await(value: Any) -> None:
    if isinstance(value, Awaitable):
        await value


async def _once(job: Job) -> AsyncIterator[Job]:
    yield job


class _Portal:
    """An event loop on a daemon thread, so sync code (and notebooks, which already run a
    loop) can call the async manager."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jobs-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield self.call(step())
                except StopAsyncIteration:
                    return
        finally:
            # a caller that stops early closes the async generator too (its finally runs)
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self.call(aclose())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


def _blocking(
    method: Callable[Concatenate[AsyncJobManager, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[JobManager, P], T]:
    """``method`` of the async manager as a blocking method of :class:`JobManager`."""

    @functools.wraps(method)
    def call(self: JobManager, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._portal.call(method(self._async, *args, **kwargs))

    return call


def _blocking_iter(
    method: Callable[Concatenate[AsyncJobManager, P], AsyncIterator[T]],
) -> Callable[Concatenate[JobManager, P], Iterator[T]]:
    """An async-iterator method as a plain iterator (stopping early closes the async one)."""

    @functools.wraps(method)
    def call(self: JobManager, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._portal.iterate(method(self._async, *args, **kwargs))

    shown = inspect.signature(method)
    returns = str(shown.return_annotation).replace("AsyncIterator", "Iterator")
    call.__signature__ = shown.replace(return_annotation=returns)  # type: ignore[attr-defined]
    return call


def _blocking_handle(
    method: Callable[Concatenate[AsyncJobManager, P], Coroutine[Any, Any, AsyncJobHandle]],
) -> Callable[Concatenate[JobManager, P], SyncJobHandle]:
    """A method returning a job handle, returning the sync handle instead."""

    @functools.wraps(method)
    def call(self: JobManager, /, *args: P.args, **kwargs: P.kwargs) -> SyncJobHandle:
        job = self._portal.call(method(self._async, *args, **kwargs))
        return SyncJobHandle.of(job, self)

    shown = inspect.signature(method).replace(return_annotation="SyncJobHandle")
    call.__signature__ = shown  # type: ignore[attr-defined]
    return call


class JobManager:
    """The synchronous face of :class:`AsyncJobManager`: its user-facing methods with the
    same signatures and behaviour, run on a private event loop (so it works inside
    notebooks, which already run one). tests/test_manager.py keeps the two in step."""

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        self._portal = _Portal()
        self._async = AsyncJobManager(settings, **kwargs)

    @property
    def store(self) -> Store:
        return self._async.store

    @property
    def async_manager(self) -> AsyncJobManager:
        """The :class:`AsyncJobManager` behind this one. It lives on this manager's private
        event loop: from another loop, run its coroutines through :meth:`bridge`."""
        return self._async

    async def bridge(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await, from any event loop, a coroutine of :attr:`async_manager` run on its own
        loop (its HTTP clients belong to that loop, which outlives ``asyncio.run`` calls)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._portal.loop)
        return await asyncio.wrap_future(future)

    async def bridge_iter(self, agen: AsyncIterator[T]) -> AsyncIterator[T]:
        """:meth:`bridge` for an async iterator of :attr:`async_manager`."""

        async def step() -> T:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield await self.bridge(step())
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await self.bridge(aclose())

    def close(self) -> None:
        self._portal.call(self._async.aclose())
        self._portal.close()
        self._async.store.close()

    def __enter__(self) -> JobManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Every user-facing method of AsyncJobManager, with its signature and docstring, run on
    # the private loop: defined once there (tests/test_manager.py checks none is missing).
    submit = _blocking_handle(AsyncJobManager.submit)
    submit_with = _blocking_handle(AsyncJobManager.submit_with)
    get_handle = _blocking_handle(AsyncJobManager.get_handle)
    current_status = _blocking(AsyncJobManager.current_status)
    run = _blocking(AsyncJobManager.run)
    subscribe = _blocking(AsyncJobManager.subscribe)
    stream = _blocking_iter(AsyncJobManager.stream)
    status = _blocking(AsyncJobManager.status)
    retry = _blocking(AsyncJobManager.retry)
    retry_batch = _blocking(AsyncJobManager.retry_batch)
    events = _blocking(AsyncJobManager.events)
    logs = _blocking(AsyncJobManager.logs)
    iter_logs = _blocking_iter(AsyncJobManager.iter_logs)
    iter_events = _blocking_iter(AsyncJobManager.iter_events)
    list_jobs = _blocking(AsyncJobManager.list_jobs)
    count_by_state = _blocking(AsyncJobManager.count_by_state)
    batches = _blocking(AsyncJobManager.batches)
    batch = _blocking(AsyncJobManager.batch)
    collect_garbage = _blocking(AsyncJobManager.collect_garbage)
    result = _blocking(AsyncJobManager.result)
    wait = _blocking(AsyncJobManager.wait)
    cancel = _blocking(AsyncJobManager.cancel)
    track = _blocking(AsyncJobManager.track)
    upload = _blocking(AsyncJobManager.upload)
    upload_file = _blocking(AsyncJobManager.upload_file)
    upload_image = _blocking(AsyncJobManager.upload_image)
    upload_inputs = _blocking(AsyncJobManager.upload_inputs)
