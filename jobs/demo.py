"""``jobs demo``: the whole data path against the bundled emulator, in one command.

Submits a few jobs to a local fal-compatible queue, follows them with ``iter_events``,
prints their results, and reports how many requests it took, next to what a 0.1 s polling
loop (fal_client's default) would have cost.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import click

from .config import Secret, Settings
from .events import Completed, InProgress, Queued
from .manager import AsyncJobManager
from .testing import FakeFalConfig, FakeFalServer

PROMPTS = ["a cat in a spacesuit", "a lighthouse at dawn", "a bowl of ramen", "a red bicycle"]


async def _follow(manager: AsyncJobManager, job_id: str, label: str) -> None:
    async for event in manager.iter_events(job_id, timeout=120):
        if isinstance(event, Queued):
            click.echo(f"  {label}: queued (position {event.position})", err=True)
        elif isinstance(event, InProgress):
            for line in event.logs or []:
                click.echo(f"  {label}: log: {line.get('message')}", err=True)
        elif isinstance(event, Completed):
            click.echo(f"  {label}: {event.state}", err=True)


async def run_demo(workdir: Path, duration: float) -> None:
    config = FakeFalConfig(duration=duration, queue_time=0.5)
    with FakeFalServer(config) as fal:
        settings = Settings.from_env(
            {},
            database_url=f"sqlite:///{workdir / 'demo.db'}",
            fal_queue_url=fal.url,
            fal_key=Secret("demo-key"),
        )
        click.echo(f"emulated fal queue at {fal.url}; database {workdir / 'demo.db'}", err=True)
        started = time.monotonic()
        async with AsyncJobManager(settings) as manager:
            jobs = [
                await manager.submit("fal-ai/flux/dev", {"prompt": p, "_fake": {"logs": 2}})
                for p in PROMPTS
            ]
            for job in jobs:
                click.echo(f"submitted {job.id} (request {job.request_id})", err=True)
            await asyncio.gather(*(_follow(manager, j.id, f"job {i}") for i, j in enumerate(jobs)))
            for job in jobs:
                result = await manager.result(job.id)
                click.echo(json.dumps({"id": job.id, "prompt": result["prompt"], "result": result}))
            manager.store.close()
        elapsed = time.monotonic() - started
        stats = fal.fake.stats
        naive = int(len(jobs) * (duration + 0.5) / 0.1)
        click.echo(
            f"\n{len(jobs)} jobs in {elapsed:.1f}s: {stats.submits} submits, "
            f"{stats.status_polls} status requests, {stats.result_fetches} result fetches "
            f"(a 0.1 s polling loop would have made about {naive} status requests).",
            err=True,
        )


def run_demo_in_tempdir(duration: float) -> None:
    with tempfile.TemporaryDirectory(prefix="jobs-demo-") as workdir:
        asyncio.run(run_demo(Path(workdir), duration))
