"""Test doubles shipped with the package: a local fal-compatible queue emulator.

Like procrastinate's ``testing`` module and httpx's ``MockTransport``, the double lives in
the package so the project's tests, its benchmarks, the demo and users' own tests all run
against the same emulator. See :mod:`jobs.testing.fal_emulator` for the protocol, the
per-input ``_fake`` overrides and the fault semantics.

    from jobs.testing import FakeFalConfig, FakeFalServer

    with FakeFalServer(FakeFalConfig(duration=0.1, queue_time=0.05)) as server:
        ...  # point the code under test at server.url; read server.fake.stats
"""

from jobs.testing.fal_emulator import FakeFal
from jobs.testing.fal_model import (
    FakeFalConfig,
    FakeFalStats,
    FakeRequest,
    RequestCounters,
    expected_file_bytes,
    input_hash,
)
from jobs.testing.fal_webhooks import webhook_payload
from jobs.testing.server import FakeFalServer, run_fake_fal

__all__ = [
    "FakeFal",
    "FakeFalConfig",
    "FakeFalServer",
    "FakeFalStats",
    "FakeRequest",
    "RequestCounters",
    "expected_file_bytes",
    "input_hash",
    "run_fake_fal",
    "webhook_payload",
]
