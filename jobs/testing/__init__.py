"""Test doubles shipped with the package: local fal-compatible and Replicate-compatible
emulators.

Like procrastinate's ``testing`` module and httpx's ``MockTransport``, the double lives in
the package so the project's tests, its benchmarks, the demo and users' own tests all run
against the same emulator. See :mod:`jobs.testing.fal_emulator` for the protocol, the
per-input ``_fake`` overrides and the fault semantics.

    from jobs.testing import FakeFalConfig, FakeFalServer

    with FakeFalServer(FakeFalConfig(duration=0.1, queue_time=0.05)) as server:
        ...  # point the code under test at server.url; read server.fake.stats

One server stands in for every fal host: the queue (``server.url``), the REST host and CDN
for uploads (``server.url`` too; see :mod:`jobs.testing.fal_cdn`, files in
``server.fake.cdn``) and the direct host's ``/stream`` (``server.run_url``).

The Replicate emulator (:mod:`jobs.testing.replicate_emulator`) is built the same way:

    from jobs.testing import FakeReplicateConfig, FakeReplicateServer

    with FakeReplicateServer(FakeReplicateConfig(token="r8_test")) as server:
        ...  # replicate.Client(api_token="r8_test", base_url=server.url); server.fake.stats
"""

from jobs.testing.fal_cdn import FakeCdn, StoredFile
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
from jobs.testing.replicate_emulator import FakeReplicate
from jobs.testing.replicate_model import (
    FakePrediction,
    FakeReplicateConfig,
    FakeReplicateStats,
    PredictionCounters,
)
from jobs.testing.server import (
    FakeFalServer,
    FakeReplicateServer,
    run_fake_fal,
    run_fake_replicate,
)

__all__ = [
    "FakeCdn",
    "FakeFal",
    "FakeFalConfig",
    "FakeFalServer",
    "FakeFalStats",
    "FakePrediction",
    "FakeReplicate",
    "FakeReplicateConfig",
    "FakeReplicateServer",
    "FakeReplicateStats",
    "FakeRequest",
    "PredictionCounters",
    "RequestCounters",
    "StoredFile",
    "expected_file_bytes",
    "input_hash",
    "run_fake_fal",
    "run_fake_replicate",
    "webhook_payload",
]
