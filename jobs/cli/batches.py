"""Commands over many jobs: ``wait``, ``export``, ``gc``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from .base import (
    DURATION,
    ENV_DB,
    ENV_PROVIDERS,
    EXIT_FAILED,
    EXIT_NOT_FINISHED,
    EXIT_UNKNOWN,
    fail,
    help_epilog,
    main,
    output_option,
    run,
    say,
    show_one,
)

if TYPE_CHECKING:
    from ..batch import ExportReport, WaitResult
    from ..manager import AsyncJobManager
    from ..results import GcReport


@main.command(
    "wait",
    epilog=help_epilog(
        ["jobsctl wait --batch night-1", "jobsctl wait --timeout 2h"], f"{ENV_DB}, {ENV_PROVIDERS}"
    ),
)
@click.option("--batch", help="Only this batch (default: every job not finished now).")
@click.option("--timeout", type=DURATION, help="Give up after this long (exit 3).")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Polls in flight when no `jobsctl serve` polls these jobs.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [terminal].")
@output_option
def wait_(
    batch: str | None,
    timeout: float | None,
    concurrency: int,
    progress: bool | None,
    output: str | None,
) -> None:
    """Wait for all matching jobs, with a progress bar; prints the counts per state
    (exit 0 all succeeded, 1 some failed or cancelled, 3 timeout, 4 unknown batch)."""
    from ..batch import describe_counts, progress_bar, wait_batch
    from ..states import State

    async def action(manager: AsyncJobManager) -> WaitResult:
        with progress_bar(f"wait {batch or 'all'}", total=None, show=progress) as bar:

            def on_progress(counts: dict[State, int]) -> None:
                done = sum(n for s, n in counts.items() if s.terminal)
                bar.update(
                    completed=done, total=sum(counts.values()), detail=describe_counts(counts)
                )

            return await wait_batch(
                manager,
                batch=batch,
                timeout=timeout,
                concurrency=concurrency,
                on_progress=on_progress,
            )

    outcome = run(action)
    if outcome.total == 0 and batch is not None:
        fail(f"no jobs in batch {batch!r}; `jobsctl list` shows known jobs", EXIT_UNKNOWN)
    counts = {s.value: n for s, n in outcome.counts.items()}
    show_one(
        {"batch": batch, "jobs": outcome.total, "timed_out": outcome.timed_out, **counts}, output
    )
    if outcome.counts[State.SUBMITTING]:
        say(
            f"{outcome.counts[State.SUBMITTING]} job(s) still submitting: a running `jobsctl "
            "serve` settles them; a job never sent goes out when the same `jobsctl submit` "
            "runs again"
        )
    if outcome.timed_out:
        fail(f"timed out after {timeout:g}s: {describe_counts(outcome.counts)}", EXIT_NOT_FINISHED)
    if not outcome.all_succeeded:
        fail(describe_counts(outcome.counts), EXIT_FAILED)


@main.command(
    epilog=help_epilog(
        [
            "jobsctl export --batch night-1 --out out/",
            "jobsctl export --batch b --out o --download",
        ],
        f"{ENV_DB}, JOBS_CACHE_DIR",
    )
)
@click.option("--batch", required=True, help="The batch to export.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--download", is_flag=True, help="Download every result file not cached yet.")
@output_option
def export(batch: str, out: str, download: bool, output: str | None) -> None:
    """Write OUT/results.jsonl (one line per job, in input order) and copy the batch's
    cached files into OUT/files/ (exit 3 while jobs are unfinished, 4 unknown batch)."""
    from ..batch import export_batch

    async def action(manager: AsyncJobManager) -> ExportReport:
        return await export_batch(manager, batch, out, download=download)

    report = run(action)
    if report.jobs == 0:
        fail(f"no jobs in batch {batch!r}; `jobsctl list` shows known jobs", EXIT_UNKNOWN)
    show_one(report.to_dict(), output)
    if report.missing_lines:
        shown = ", ".join(map(str, report.missing_lines[:20]))
        more = " ..." if len(report.missing_lines) > 20 else ""
        say(f"input lines with no job (invalid or blank when submitted): {shown}{more}")
    if report.not_downloaded:
        say(
            f"warning: {report.not_downloaded} result file(s) were not downloaded and their "
            "fal URLs expire; `jobsctl export --download` fetches them now"
        )
    if report.unfinished:
        fail(
            f"{report.unfinished} job(s) of {batch!r} not finished yet (exported as they are); "
            "`jobsctl wait --batch` waits for them",
            EXIT_NOT_FINISHED,
        )


@main.command(epilog=help_epilog(["jobsctl gc --older-than 7d"], f"{ENV_DB}, JOBS_CACHE_DIR"))
@click.option("--older-than", required=True, type=DURATION, help="e.g. 30m, 12h, 7d.")
@output_option
def gc(older_than: float, output: str | None) -> None:
    """Remove stored results and cached files of jobs finished before the cutoff (job rows
    and events stay); prints what was freed."""
    cutoff = time.time() - older_than

    async def action(manager: AsyncJobManager) -> GcReport:
        return await manager.collect_garbage(cutoff)

    show_one(run(action).to_dict(), output)
