"""/metrics: Prometheus naming, no ``_created`` series, the build info, the database metrics
(the same on every replica, so aggregated with ``max``) and the latency histograms."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.managers import local_settings, open_manager
from support.seed import seed

from jobs.backoff import PollPolicy
from jobs.metrics import REGISTRY, DatabaseCollector
from jobs.states import State
from jobs.store import Overview
from jobs.testing import FakeFalConfig, FakeFalServer
from jobs.web import create_app


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.05, queue_time=0.0, seed=11)) as server:
        yield server


async def test_names_build_info_and_database_metrics(tmp_path: Path, fal: FakeFalServer) -> None:
    settings = local_settings(tmp_path, fal.url)
    async with open_manager(settings) as manager:
        seed(manager.store)
        transport = httpx.ASGITransport(app=create_app(manager, settings=settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            text = (await client.get("/metrics")).text
    samples = _samples(text)
    assert not [k for k in samples if "_created" in k]
    assert re.search(r'^jobs_build_info\{python="[\d.]+",version="[^"]+"\} 1\.0$', text, re.M)
    for name in (
        "jobs_submits_total",
        "jobs_poll_duration_seconds",
        "jobs_submit_duration_seconds",
        "jobs_detection_lag_seconds",
        "jobs_polls_in_flight",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert samples['jobs_by_state{state="failed"}'] == 2
    assert samples['jobs_failed_by_reason{reason="remote_error"}'] == 2
    assert samples["jobs_due_polls"] == 0
    assert (samples["jobs_finished"], samples["jobs_finished_remote_requests"]) == (4, 3)
    assert 0 < samples["jobs_oldest_unfinished_age_seconds"] < 3600


async def test_submit_poll_and_detection_lag_are_measured(
    tmp_path: Path, fal: FakeFalServer
) -> None:
    app = "fal-ai/flux/dev"
    submits = _value("jobs_submit_duration_seconds_count", provider="fal")
    polls = _value("jobs_poll_duration_seconds_count", provider="fal")
    lags = _value("jobs_detection_lag_seconds_count", provider="fal")
    # Polled often enough to see the job running (the lag needs its start).
    policy = PollPolicy(initial=0.05, ceiling=0.1)
    async with open_manager(local_settings(tmp_path, fal.url), poll_policy=policy) as manager:
        job = await manager.submit(app, {"prompt": "a cat", "_fake": {"duration": 0.6}})
        done = await manager.wait(job.id, timeout=30)
    assert done.state is State.SUCCEEDED and done.started_at is not None
    assert _value("jobs_submit_duration_seconds_count", provider="fal") == submits + 1
    assert _value("jobs_poll_duration_seconds_count", provider="fal") > polls
    assert _value("jobs_detection_lag_seconds_count", provider="fal") == lags + 1
    assert _value("jobs_polls_in_flight", provider="fal") == 0


def test_the_grafana_dashboard_asks_only_for_metrics_we_export() -> None:
    """docs/grafana/jobs-dashboard.json stays in step with the names /metrics exports, and
    aggregates each database metric with max (every replica reports the same value)."""
    path = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "jobs-dashboard.json"
    dashboard = json.loads(path.read_text())
    empty = Overview(
        counts={},
        failures={},
        oldest_active=None,
        due=0,
        finished=0,
        finished_requests=0,
        leases={},
    )
    database = {family.name for family in DatabaseCollector(lambda: empty).collect()}
    exported = {metric.name for metric in REGISTRY.collect()} | database
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    asked = {
        re.sub(r"_(total|bucket|count|sum|info)$", "", name)
        for expr in expressions
        for name in re.findall(r"\b(jobs_[a-z_]+)", expr)
    }
    assert asked and asked <= exported, asked - exported
    for expr in expressions:
        for match in re.finditer(r"\b(jobs_[a-z_]+)", expr):
            if match.group(1) in database:
                before = expr[: match.start()]
                assert re.search(r"max(\s*by\s*\([^)]*\))?\s*\($", before), expr
