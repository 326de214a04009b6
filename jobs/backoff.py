"""When to poll a job next: a pure function of what happened, tested as a table.

Quick while a job is fresh or changing, slower while nothing changes, reset on a change.
With a webhook requested, polling is only a safety net, so it starts late and stays slow.
Either way the delay never exceeds ``retention_cap``: fal keeps some results only 6 minutes
after completion, so a job that may have finished is polled again before they expire.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

INITIAL = 1.0
FACTOR = 1.5
CEILING = 15.0
WEBHOOK_INITIAL = 330.0
RETENTION_CAP = 330.0  # fal's shortest retention (360 s) less a margin for tick lateness
JITTER = 0.1


@dataclass(frozen=True)
class PollPolicy:
    initial: float = INITIAL
    factor: float = FACTOR
    ceiling: float = CEILING
    webhook_initial: float = WEBHOOK_INITIAL
    retention_cap: float = RETENTION_CAP
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.ceiling <= self.retention_cap:
            raise ValueError("need 0 < initial <= ceiling <= retention_cap")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")


@dataclass(frozen=True)
class NextPoll:
    delay: float  # seconds from now, jitter applied
    interval: float  # the un-jittered interval to remember for the next decision
    reason: str


def next_poll(
    policy: PollPolicy,
    *,
    previous: float | None,
    changed: bool,
    webhook: bool,
    retry_after: float | None = None,
    failed: bool = False,
    rand: float = 0.5,
) -> NextPoll:
    """The next poll of an active job.

    ``previous``: the last interval (None right after submit); ``changed``: the last poll saw
    a new state or queue position; ``failed``: the last poll got no answer; ``rand`` in
    [0, 1) is the jitter draw (passed in so tests need no randomness).
    """
    if webhook:
        interval, reason = policy.webhook_initial, "webhook safety net"
    elif previous is None or changed:
        interval, reason = policy.initial, "changed" if changed else "new"
    else:
        interval, reason = min(policy.ceiling, previous * policy.factor), "unchanged"
    if failed:
        interval = min(policy.ceiling, max(interval, (previous or policy.initial) * 2))
        reason = "poll failed"
    if retry_after is not None and retry_after > interval:
        interval, reason = retry_after, "retry-after"
    if webhook and not failed and retry_after is None:
        # The safety net sits just under the retention cap: jitter only downwards, and by at
        # most half as much, so two safety polls still outlast a 10-minute job.
        spread = 1 - policy.jitter * rand / 2
    else:
        spread = 1 + policy.jitter * (2 * rand - 1)
    delay = min(interval * spread, policy.retention_cap)
    return NextPoll(delay=delay, interval=interval, reason=reason)


@dataclass(frozen=True)
class Backoff:
    """The backoff decision handed to a state change: the policy and one jitter draw.

    The store applies a change in a transaction, with the job as it is there; it asks
    :meth:`after` when to poll next. Being a value (no callback into the caller), it
    decides from what the row says and nothing else."""

    policy: PollPolicy
    rand: float = field(default_factory=random.random)

    def after(
        self,
        *,
        previous: float | None,
        changed: bool,
        webhook: bool,
        needs_result: bool,
        now: float,
    ) -> tuple[float, float]:
        """``(next poll at, interval)`` after an observation; at once when the outcome must
        still be fetched (``needs_result``)."""
        step = next_poll(
            self.policy, previous=previous, changed=changed, webhook=webhook, rand=self.rand
        )
        return now + (0.0 if needs_result else step.delay), step.interval
