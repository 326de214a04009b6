"""Prometheus metrics, defined once.

Two kinds, told apart by where they come from:

- Process metrics (counters, histograms, in-flight gauges) count what this replica did;
  ``sum()`` over replicas gives the service's total.
- Database metrics (:class:`DatabaseCollector`: jobs by state, the due backlog, the oldest
  unfinished job, request economy, poll leases) are read from the shared database at scrape
  time, so every replica reports the same numbers. Aggregate them with ``max`` (for example
  ``max by (state) (jobs_by_state)``), never ``sum``, which would multiply them by the number
  of replicas; docs/metrics.md has the queries.

Names follow Prometheus conventions (base units, ``_total`` counters, ``_seconds``), and no
``_created`` series is exported.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .records import Overview

# ``_created`` doubles the series of every counter and histogram for a timestamp no
# dashboard here uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

SUBMITS = Counter(
    "jobs_submits",
    "Submit attempts by outcome (queued, rejected, ambiguous, not_sent).",
    ["provider", "outcome"],
    registry=REGISTRY,
)
POLLS = Counter(
    "jobs_polls", "Status polls by outcome (ok, error).", ["provider", "outcome"], registry=REGISTRY
)
POLL_SECONDS = Histogram(
    "jobs_poll_duration_seconds",
    "Time to poll one job (status, and the result when it finished).",
    ["provider"],
    registry=REGISTRY,
)
POLLS_IN_FLIGHT = Gauge(
    "jobs_polls_in_flight",
    "Polls of this process waiting for the provider's answer.",
    ["provider"],
    registry=REGISTRY,
)
SUBMIT_SECONDS = Histogram(
    "jobs_submit_duration_seconds",
    "Time for the provider to answer a submit (any outcome).",
    ["provider"],
    registry=REGISTRY,
)
# Buckets for seconds to minutes: a webhook lands in well under a second, a slow poll
# backoff in tens of seconds.
DETECTION_LAG = Histogram(
    "jobs_detection_lag_seconds",
    "From the remote finish (start plus the provider's reported run time) to the outcome "
    "being stored here.",
    ["provider"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
BUILD_INFO = Info("jobs_build", "The running version of jobs.", registry=REGISTRY)
RESULTS = Counter(
    "jobs_results_fetched", "Result fetches from the provider.", ["provider"], registry=REGISTRY
)
WEBHOOKS = Counter(
    "jobs_webhooks",
    "Webhook deliveries by outcome (applied, duplicate, unknown, needs_poll, rejected, "
    "malformed, too_large, unavailable, foreign).",
    ["provider", "outcome"],
    registry=REGISTRY,
)
RATE_LIMIT_WAITS = Counter(
    "jobs_rate_limit_waits",
    "Times a request waited for a provider's Retry-After.",
    ["provider"],
    registry=REGISTRY,
)
LEASE_TAKEOVERS = Counter(
    "jobs_lease_takeovers", "Jobs claimed after another owner's lease expired.", registry=REGISTRY
)
POLLER_ERRORS = Counter(
    "jobs_poller_errors",
    "Unexpected exceptions the poller logged and survived, by where (claim, poll, resolve).",
    ["where"],
    registry=REGISTRY,
)
AMBIGUOUS_DECISIONS = Counter(
    "jobs_ambiguous_decisions",
    "Ambiguous submits decided, by the sender or the resolver, by provider and decision "
    "(send, resubmit, fail, poll: adopted after a status poll named it, lookup: found in "
    "the provider's list of requests).",
    ["provider", "decision"],
    registry=REGISTRY,
)

DUPLICATE_REQUESTS = Counter(
    "jobs_duplicate_requests",
    "Second remote requests found for one job (an earlier ambiguous attempt that arrived), "
    "by what was done (kept, cancelled).",
    ["provider", "action"],
    registry=REGISTRY,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jobs")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


BUILD_INFO.info({"version": _version(), "python": platform.python_version()})


class DatabaseCollector(Collector):
    """The database metrics, from one :class:`~jobs.store.Overview` read at scrape time.
    Every replica reports the same values: aggregate with ``max``, not ``sum``."""

    def __init__(self, overview: Callable[[], Overview]) -> None:
        self._overview = overview

    def collect(self) -> Iterator[GaugeMetricFamily]:
        seen = self._overview()
        now = time.time()
        by_state = GaugeMetricFamily(
            "jobs_by_state", "Jobs in the database by state.", labels=["state"]
        )
        for state, n in seen.counts.items():
            by_state.add_metric([state.value], n)
        yield by_state
        failures = GaugeMetricFamily(
            "jobs_failed_by_reason", "Failed jobs in the database by reason.", labels=["reason"]
        )
        for reason, n in seen.failures.items():
            failures.add_metric([reason], n)
        yield failures
        oldest = seen.oldest_active
        yield GaugeMetricFamily(
            "jobs_oldest_unfinished_age_seconds",
            "Age of the oldest job not finished yet (0 when none is).",
            value=max(0.0, now - oldest.created_at) if oldest is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "jobs_due_polls", "Unfinished jobs whose next poll time has passed.", value=seen.due
        )
        yield GaugeMetricFamily(
            "jobs_finished", "Jobs in a terminal state in the database.", value=seen.finished
        )
        yield GaugeMetricFamily(
            "jobs_finished_remote_requests",
            "Submit attempts and status polls spent on the finished jobs (divide by "
            "jobs_finished for requests per job).",
            value=seen.finished_requests,
        )
        leases = GaugeMetricFamily(
            "jobs_poll_leases", "Unexpired poll leases by owner (replica).", labels=["owner"]
        )
        for owner, n in seen.leases.items():
            leases.add_metric([owner], n)
        yield leases
