"""How many status requests does ``jobs serve`` spend per job, with and without webhooks?

Runs the two set-ups side by side, each with its own emulator, SQLite file and ``jobs serve``
(default poller and backoff settings): N jobs of D seconds each (30 by default) are submitted
through the Python API, and once every job is terminal the emulator's own per-request
counters give the numbers. Nothing is estimated from our side of the wire.

    .venv/bin/python bench/poll_cost.py [--jobs 200] [--duration 30]

Also reported: result fetches per job, webhook deliveries, and how long after the remote
finish each job was known finished here (the price of backing off).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from jobs import JobManager, Settings
from jobs.config import Secret
from jobs.store import Store
from jobs.testing import FakeFalConfig, FakeFalServer

APP = "fal-ai/flux/dev"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(jobs: int, duration: float, webhooks: bool, workdir: Path) -> dict[str, Any]:
    db_url = f"sqlite:///{workdir}/jobs.db"
    port = _free_port()
    public_url = f"http://127.0.0.1:{port}" if webhooks else None
    with FakeFalServer(FakeFalConfig(duration=duration, queue_time=0.2)) as fal:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_"))}
        env.update(
            JOBS_DATABASE_URL=db_url,
            JOBS_FAL_QUEUE_URL=fal.url,
            JOBS_FAL_JWKS_URL=f"{fal.url}/.well-known/jwks.json",
            FAL_KEY="bench",
        )
        if public_url:
            env["JOBS_PUBLIC_URL"] = public_url
        with open(workdir / "serve.log", "wb") as log:
            serve = subprocess.Popen(
                [sys.executable, "-m", "jobs", "serve", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            _wait(lambda: _healthy(port), 60)
            settings = Settings.from_env(
                {},
                database_url=db_url,
                fal_queue_url=fal.url,
                fal_key=Secret("bench"),
                public_url=public_url,
            )
            with JobManager(settings) as jm:
                ids = [jm.submit(APP, {"n": i}).id for i in range(jobs)]
            store = Store.open(db_url)
            try:
                _wait(lambda: all(store.get(i).terminal for i in ids), duration + 600)
                done = [store.get(i) for i in ids]
            finally:
                store.close()
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
        finally:
            if serve.poll() is None:
                serve.kill()
                serve.wait(10)
        per_request = fal.fake.stats.requests
        polls = [per_request[j.request_id or ""].status_polls for j in done]
        fetches = [per_request[j.request_id or ""].result_fetches for j in done]
        lags = []
        for job in done:
            request = fal.fake.get_request(job.request_id or "")
            assert request is not None and job.finished_at is not None
            remote_end = request.submitted_wall + (request.finish_at - request.submitted_at)
            lags.append(job.finished_at - remote_end)
        return {
            "mode": "webhooks" if webhooks else "polling",
            "jobs": jobs,
            "job_seconds": duration,
            "succeeded": sum(j.state.value == "succeeded" for j in done),
            "status_requests_mean": round(statistics.mean(polls), 2),
            "status_requests_max": max(polls),
            "result_fetches_mean": round(statistics.mean(fetches), 2),
            "webhooks_delivered": fal.fake.stats.webhook_successes,
            "seconds_known_late_median": round(statistics.median(lags), 2),
            "seconds_known_late_max": round(max(lags), 2),
        }


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds each job runs")
    args = parser.parse_args()
    results: dict[bool, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def run(webhooks: bool) -> None:
            workdir = Path(tmp) / ("webhooks" if webhooks else "polling")
            workdir.mkdir()
            results[webhooks] = measure(args.jobs, args.duration, webhooks, workdir)

        threads = [threading.Thread(target=run, args=(w,)) for w in (False, True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for webhooks in (False, True):
        print(json.dumps(results[webhooks]))


if __name__ == "__main__":
    main()
