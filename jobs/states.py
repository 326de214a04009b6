"""Job states, their order, and which transitions are allowed. Pure: no I/O.

States only move forward: ``submitting < queued < in_progress < terminal``. A stale
observation (a poll that still says IN_QUEUE after a webhook delivered the result) can
therefore never move a job backwards; the store enforces this with compare-and-set updates
built from :func:`sources_for`.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    SUBMITTING = "submitting"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def rank(self) -> int:
        return _RANK[self]


class FailureReason(enum.StrEnum):
    """Why a job ended in ``failed``."""

    SUBMIT_REJECTED = "submit_rejected"
    # The queue could not be reached and nothing was sent (only for submits without an
    # idempotency key; with one, the job stays in ``submitting`` and is sent again).
    SUBMIT_UNREACHABLE = "submit_unreachable"
    REMOTE_ERROR = "remote_error"
    RESULT_UNAVAILABLE = "result_unavailable"
    AMBIGUOUS_SUBMIT = "ambiguous_submit"
    TIMEOUT = "timeout"


# The reasons that mean the submit itself failed (the job never ran remotely).
SUBMIT_FAILURES: frozenset[str] = frozenset(
    {
        FailureReason.SUBMIT_REJECTED,
        FailureReason.SUBMIT_UNREACHABLE,
        FailureReason.AMBIGUOUS_SUBMIT,
    }
)

TERMINAL: frozenset[State] = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
ACTIVE: frozenset[State] = frozenset(State) - TERMINAL

_RANK: dict[State, int] = {
    State.SUBMITTING: 0,
    State.QUEUED: 1,
    State.IN_PROGRESS: 2,
    State.SUCCEEDED: 3,
    State.FAILED: 3,
    State.CANCELLED: 3,
}


def can_transition(current: State, new: State) -> bool:
    """True when ``current -> new`` moves the job forward.

    Staying in the same non-terminal state is allowed (it refreshes queue position and logs);
    a terminal state is final, whatever the new observation says.
    """
    if current.terminal:
        return False
    return new.rank >= current.rank


def sources_for(new: State) -> tuple[State, ...]:
    """The states a job may be in for ``new`` to be applied: the WHERE list of the CAS."""
    return tuple(s for s in State if can_transition(s, new))
