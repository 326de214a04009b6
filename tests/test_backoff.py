"""The poll schedule, as a table: no clock, no I/O."""

from __future__ import annotations

import pytest

from jobs.backoff import NextPoll, PollPolicy, next_poll

P = PollPolicy(initial=1.0, factor=2.0, ceiling=30.0, webhook_initial=300.0, retention_cap=330.0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"previous": None, "changed": False, "webhook": False}, NextPoll(1.0, 1.0, "new")),
        ({"previous": 4.0, "changed": False, "webhook": False}, NextPoll(8.0, 8.0, "unchanged")),
        ({"previous": 20.0, "changed": False, "webhook": False}, NextPoll(30, 30, "unchanged")),
        ({"previous": 20.0, "changed": True, "webhook": False}, NextPoll(1.0, 1.0, "changed")),
        (
            {"previous": 2.0, "changed": True, "webhook": True},
            NextPoll(292.5, 300.0, "webhook safety net"),
        ),
        (
            {"previous": 2.0, "changed": False, "webhook": False, "retry_after": 12.0},
            NextPoll(12.0, 12.0, "retry-after"),
        ),
        (
            {"previous": 4.0, "changed": False, "webhook": False, "failed": True},
            NextPoll(8.0, 8.0, "poll failed"),
        ),
        (
            {"previous": 1000.0, "changed": False, "webhook": True, "retry_after": 900.0},
            NextPoll(330.0, 900.0, "retry-after"),
        ),
    ],
)
def test_schedule(kwargs: dict[str, object], expected: NextPoll) -> None:
    assert next_poll(P, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("rand", [0.0, 0.999])
def test_jitter_stays_in_band_and_under_the_retention_cap(rand: float) -> None:
    step = next_poll(P, previous=10.0, changed=False, webhook=False, rand=rand)
    assert 20.0 * 0.9 <= step.delay <= 20.0 * 1.1
    capped = next_poll(P, previous=None, changed=False, webhook=True, rand=rand)
    assert P.webhook_initial * 0.95 <= capped.delay <= P.retention_cap


def test_a_thirty_second_job_needs_few_polls() -> None:
    """Without webhooks, the default policy polls a 30 s job about a dozen times, not the 300
    times of a 0.1 s loop."""
    policy = PollPolicy()
    t, interval, polls = 0.0, None, 0
    while t < 30.0:
        step = next_poll(policy, previous=interval, changed=False, webhook=False)
        t += step.delay
        interval = step.interval
        polls += 1
    assert polls <= 15


def test_invalid_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        PollPolicy(initial=10.0, ceiling=5.0)
    with pytest.raises(ValueError):
        PollPolicy(factor=0.5)
