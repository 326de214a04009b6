"""The request-economy baseline: the real ``fal_client`` (its default ``subscribe``: a status
poll, then 0.1 s of sleep, until COMPLETED, then one result fetch) against an emulator of
its own, counted by that emulator. Run as a separate process by
:mod:`bench.request_economy`, at the same time as our jobs, with the same job length:

    python -m bench.fal_client_baseline --jobs 20 --duration 30

fal_client only builds ``https://`` URLs from a module constant, so (as in
``tests/test_emulator_fal_client.py``) the emulator serves TLS with a throw-away CA that
``SSL_CERT_FILE`` makes trusted, and the constant is patched to the emulator's address.
Prints one JSON object with per-job request counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

from bench.common import APP, FAL_KEY
from jobs.testing import FakeFalConfig, FakeFalServer


async def _subscribe_all(jobs: int) -> list[Any]:
    import fal_client

    client = fal_client.AsyncClient(key=FAL_KEY)
    try:
        return list(
            await asyncio.gather(
                *(client.subscribe(APP, {"prompt": f"fal_client {i}"}) for i in range(jobs))
            )
        )
    finally:
        await (await client._client).aclose()


def measure(jobs: int, duration: float, queue_time: float, retention: float) -> dict[str, Any]:
    config = FakeFalConfig(
        key=FAL_KEY, duration=duration, queue_time=queue_time, retention=retention
    )
    with FakeFalServer(config, ssl=True) as server:
        assert server.ca_cert_path is not None
        os.environ["SSL_CERT_FILE"] = server.ca_cert_path
        os.environ.pop("SSL_CERT_DIR", None)
        import fal_client.client as fal_client_module

        host = server.url.removeprefix("https://")
        fal_client_module.QUEUE_URL_FORMAT = f"https://{host}/"  # read once at import
        started = time.monotonic()
        results = asyncio.run(_subscribe_all(jobs))
        seconds = time.monotonic() - started
        counters = list(server.stats.requests.values())
        submits = server.stats.submits
    polls = [c.status_polls for c in counters]
    fetches = [c.result_fetches for c in counters]
    return {
        "jobs": jobs,
        "job_seconds": duration,
        "results": sum(1 for r in results if isinstance(r, dict) and "images" in r),
        "submits": submits,
        "status_polls_mean": round(statistics.mean(polls), 2),
        "status_polls_min": min(polls),
        "status_polls_max": max(polls),
        "result_fetches_mean": round(statistics.mean(fetches), 2),
        "requests_per_job": round(1 + statistics.mean(polls) + statistics.mean(fetches), 2),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--queue-time", type=float, default=0.2)
    parser.add_argument("--retention", type=float, default=360.0)
    args = parser.parse_args()
    report = measure(args.jobs, args.duration, args.queue_time, args.retention)
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
