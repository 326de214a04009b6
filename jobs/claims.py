"""Claiming jobs under a lease and polling them within it: the one claim-and-refresh driver.

Three callers poll: ``jobs serve``'s poller (:class:`jobs.poller.Poller`), a ``wait
--batch`` that drives its batch itself (:func:`jobs.batch.wait_batch`), and a client waiting
on one job (:meth:`jobs.manager.AsyncJobManager.watch`). They all claim through
:class:`Claims`, so one lease policy holds everywhere: a claimed job belongs to its owner for
``lease`` seconds, and a poll is cut off once it has used :data:`POLL_BUDGET` of it, so no
two owners ever poll one job at the same time (the claim happened a moment before the poll
began). A poll that fails or is cut off keeps the lease; the job is due again when it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .config import decimal
from .logs import job_context
from .metrics import LEASE_TAKEOVERS, POLLER_ERRORS

if TYPE_CHECKING:
    from .manager import AsyncJobManager
    from .records import Claimed, Job, PollJob

J = TypeVar("J", bound="PollJob")

log = logging.getLogger(__name__)

LEASE = 60.0  # seconds a claimed job belongs to its owner; a poll is cut off before its end
POLL_BUDGET = 0.9  # share of the lease a poll may take


MAX_HOST_IN_OWNER = 40  # leaves room for ":<pid>:<6 hex>" in jobs.lease_owner, VARCHAR(64)


def owner_host(hostname: str | None = None) -> str:
    """This host as written in lease owners: the host name, or for a long one (Kubernetes
    pod names run to 63 characters and more) its start and a hash, so the owner always fits
    its column and still names the host uniquely."""
    name = socket.gethostname() if hostname is None else hostname
    name = name.replace(":", "_")  # the owner's separator
    if len(name) <= MAX_HOST_IN_OWNER:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_HOST_IN_OWNER - 9]}~{digest}"


def new_owner() -> str:
    """A lease owner naming this process: host, pid and a random tag."""
    return f"{owner_host()}:{os.getpid()}:{secrets.token_hex(3)}"


def dead_local_owner(owner: str | None) -> str | None:
    """``owner`` if it names a process on this host that no longer runs, else None: its
    leases can be taken at once instead of waiting for them to expire."""
    if owner is None:
        return None
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != owner_host() or decimal(pid) is None:
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return owner
    except PermissionError:
        return None
    return None


class Claims:
    """Claims jobs for ``manager.owner`` under one lease policy and polls them within it."""

    def __init__(self, manager: AsyncJobManager, *, lease: float = LEASE) -> None:
        if lease <= 0:
            raise ValueError("the lease must be > 0 seconds")
        self.manager = manager
        self.lease = lease

    @property
    def owner(self) -> str:
        return self.manager.owner

    async def claim_due(self, limit: int, *, batch: str | None = None) -> list[PollJob]:
        """Claim up to ``limit`` due jobs (of ``batch``, if given), oldest due first, as the
        records a poll needs (:class:`~jobs.records.PollJob`)."""
        store = self.manager.store
        claimed = await store.aio.run(
            store.claim_due, self.owner, limit=limit, lease_seconds=self.lease, batch=batch
        )
        _note_takeovers(claimed)
        return [item.job for item in claimed]

    async def claim_if_free(self, job: Job) -> Job | None:
        """Claim ``job`` when it is due and unclaimed, or held by a dead process of this
        machine (a waiter killed mid-poll); None when someone else holds it."""
        store = self.manager.store
        return await store.aio.run(
            store.claim_job,
            job.id,
            self.owner,
            lease_seconds=self.lease,
            dead_owner=dead_local_owner(job.lease_owner),
        )

    async def poll(
        self, job: J, *, raising: bool = False, replied: Callable[[], None] | None = None
    ) -> J | None:
        """Poll a claimed job within its lease and apply what was seen; the job after, or
        None when the poll ran out of lease or failed (logged; with ``raising``, a failure
        is raised instead: a user waiting on the job sees why, say a missing key).

        ``replied`` is called when the provider's answer is in, before it is written (see
        :meth:`~jobs.manager.AsyncJobManager.refresh`). The budget covers the write too: a
        poll and its apply never outlive :data:`POLL_BUDGET` of the lease."""
        with job_context(job.id, job.request_id):
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.lease * POLL_BUDGET):
                    after = await self.manager.refresh(job, replied=replied)
            except TimeoutError:
                POLLER_ERRORS.labels("poll").inc()
                log.warning(
                    "poll outlasted its lease and was abandoned; the job is due again when "
                    "the lease ends",
                    extra={"seconds": round(time.monotonic() - started, 3)},
                )
                return None
            except Exception:
                if raising:
                    raise
                POLLER_ERRORS.labels("poll").inc()
                log.exception("poll failed; the job is due again when its lease ends")
                return None
            if after.terminal and after.state is not job.state:
                log.info("job %s", after.state.value, extra={"polls": after.polls})
            elif log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "polled",
                    extra={
                        "state": after.state.value,
                        "polls": after.polls,
                        "seconds": round(time.monotonic() - started, 3),
                    },
                )
            return after

    async def release(self) -> int:
        """Give back every lease this owner holds (a waiter that stops early)."""
        store = self.manager.store
        return await store.aio.run(store.release_leases, self.owner)


def _note_takeovers(claimed: list[Claimed]) -> None:
    taken = [item.job for item in claimed if item.took_over]
    if not taken:
        return
    LEASE_TAKEOVERS.inc(len(taken))
    for job in taken:
        with job_context(job.id, job.request_id):
            log.info("took over the job from an expired lease")
