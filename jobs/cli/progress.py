"""Progress of one job on stderr while a command waits for it (``result --wait``, ``run``):
state, queue position, new log lines and elapsed time. Drawn when stderr is a terminal, or
printed as plain lines with ``--progress``; silent otherwise, so pipes stay clean."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..records import short_id

if TYPE_CHECKING:
    from rich.status import Status

    from ..manager import AsyncJobManager
    from ..records import Job

TICK = 1.0  # seconds between redraws of the elapsed time


def where(job: Job) -> str:
    """``3f9c2a01d4 queued (position 2)``."""
    position = f" (position {job.queue_position})" if job.queue_position is not None else ""
    return f"{short_id(job.id)} {job.state.value}{position}"


def describe(job: Job, elapsed: float) -> str:
    """``3f9c2a01d4 queued (position 2) · 12s``."""
    return f"{where(job)} · {elapsed:.0f}s"


async def wait_for(
    manager: AsyncJobManager, ref: str, *, timeout: float | None, progress: bool | None
) -> Job:
    """Wait until the job named ``ref`` is terminal (as :meth:`AsyncJobManager.wait`),
    showing its progress on stderr when asked or when stderr is a terminal."""
    if not (sys.stderr.isatty() if progress is None else progress):
        return await manager.wait(ref, timeout=timeout)
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    started = time.monotonic()
    job = await manager.status(ref)
    job_id, seen = job.id, 0
    shown = ""
    spinner = console.status(describe(job, 0)) if console.is_terminal else None
    ticker = None
    if spinner is not None:

        def render() -> str:
            return describe(job, time.monotonic() - started)

        ticker = asyncio.create_task(_tick(spinner, render))
    try:
        with spinner or contextlib.nullcontext():
            async for job in manager.watch(job_id, timeout=timeout):
                lines = await manager.logs(job_id, after=seen)
                seen = lines[-1][0] if lines else seen
                for _, entry in lines:
                    console.print(f"  log: {entry.get('message', entry)}", markup=False)
                line = describe(job, time.monotonic() - started)
                if spinner is not None:
                    spinner.update(line)
                elif where(job) != shown:  # plain lines: one per change, not per redraw
                    console.print(line, markup=False)
                shown = where(job)
    finally:
        if ticker is not None:
            ticker.cancel()
    console.print(describe(job, time.monotonic() - started), markup=False)
    return job


async def _tick(spinner: Status, render: Callable[[], str]) -> None:
    """Redraw the elapsed time while nothing else changes."""
    while True:
        await asyncio.sleep(TICK)
        spinner.update(render())
