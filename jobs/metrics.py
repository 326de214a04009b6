"""Prometheus metrics, defined once. Counters are process-wide; ``jobs_by_state`` is read
from the store at scrape time, so every replica reports the same, true numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
    "jobs_poll_seconds",
    "Time to poll one job (status, and the result when it finished).",
    ["provider"],
    registry=REGISTRY,
)
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
    "Ambiguous submits decided, by the sender or the resolver, by decision (send, "
    "resubmit, fail, poll: adopted after a status poll named it).",
    ["decision"],
    registry=REGISTRY,
)

DUPLICATE_REQUESTS = Counter(
    "jobs_duplicate_requests",
    "Second remote requests found for one job (an earlier ambiguous attempt that arrived), "
    "by what was done (kept, cancelled).",
    ["provider", "action"],
    registry=REGISTRY,
)


class StateCollector(Collector):
    """``jobs_by_state{state=…}``, counted in the database when scraped."""

    def __init__(self, count: Callable[[], Mapping[str, int]]) -> None:
        self._count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("jobs_by_state", "Jobs in the store by state.", labels=["state"])
        for state, n in self._count().items():
            family.add_metric([state], n)
        yield family
