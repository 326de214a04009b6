"""Batch submit rate: N jobs through ``jobs.batch.submit_batch`` at a given concurrency,
against the emulator answering every request after a fixed latency.

The ideal rate is ``concurrency / latency`` (32 in flight, 200 ms each: 160 jobs/s); the
figure that matters is the fraction of it we reach, since everything else a submit does
(three small SQLite transactions, a thread hop for each, JSON, the HTTP client) is overhead
on top of the wait. The emulator runs in its own process (``jobs fake-fal``) so it does not
share this process's CPU and GIL.

    .venv/bin/python bench/batch_submit.py [--jobs 1000] [--concurrency 32] [--latency 0.2]

Prints one JSON object: jobs, seconds, jobs_per_s, ideal_per_s, fraction_of_ideal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from jobs import AsyncJobManager, Settings
from jobs.batch import read_lines, submit_batch
from jobs.config import Secret


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_emulator(latency: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [sys.executable, "-m", "jobs", "fake-fal", "--port", str(port)]
    command += ["--latency", str(latency), "--duration", "3600"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/_fake/stats", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("jobs fake-fal did not start within 20 s")


async def measure(url: str, database: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    settings = Settings.from_env(
        {}, database_url=f"sqlite:///{database}", fal_queue_url=url, fal_key=Secret("bench")
    )
    manager = AsyncJobManager(settings)
    lines = read_lines(json.dumps({"prompt": f"bench {i}"}) for i in range(jobs))
    try:
        started = time.perf_counter()
        report = await submit_batch(
            manager, "fal-ai/flux/dev", lines, batch="bench", concurrency=concurrency
        )
        seconds = time.perf_counter() - started
    finally:
        await manager.aclose()
        manager.store.close()
    if not report.ok:
        raise RuntimeError(f"not every job was submitted: {report.summary()}")
    submits = httpx.get(f"{url}/_fake/stats?per_request=0").json()["submits"]
    return {"jobs": jobs, "submits_seen_by_emulator": submits, "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    proc, url = _start_emulator(args.latency)
    try:
        with tempfile.TemporaryDirectory(prefix="jobs-bench-") as tmp:
            figures = asyncio.run(measure(url, Path(tmp) / "jobs.db", args.jobs, args.concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    rate = figures["jobs"] / figures["seconds"]
    ideal = args.concurrency / args.latency
    figures.update(
        concurrency=args.concurrency,
        latency=args.latency,
        jobs_per_s=round(rate, 1),
        ideal_per_s=round(ideal, 1),
        fraction_of_ideal=round(rate / ideal, 3),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
