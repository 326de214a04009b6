"""Commands that read jobs: ``status``, ``show``, ``list``, ``logs``, ``result``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .base import (
    DURATION,
    ENV_DB,
    ENV_PROVIDERS,
    EXIT_FAILED,
    StateFilter,
    emit,
    fail,
    help_epilog,
    main,
    output_option,
    parse_labels,
    run,
    say,
    show,
    show_one,
    states_of,
    wants_table,
)
from .submitting import JOB_COLUMNS

if TYPE_CHECKING:
    from ..manager import AsyncJobManager
    from ..records import Job
    from ..states import State

LOG_TAIL = 20  # log lines `show` prints

refresh_option = click.option(
    "--refresh/--no-refresh",
    default=True,
    show_default=True,
    help="Poll fal first when the job is due and no server holds it (--no-refresh: "
    "read the database only).",
)


@main.command(
    epilog=help_epilog(
        ["jobsctl status 3f9c2a01d4", "jobsctl status lora-run-7 --no-refresh"],
        f"{ENV_DB}, {ENV_PROVIDERS}",
    )
)
@click.argument("job")
@refresh_option
@output_option
def status(job: str, refresh: bool, output: str | None) -> None:
    """Current state, queue position, timestamps, request id and remote URLs."""

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.status(job, refresh=refresh)

    show_one(run(action).to_dict(), output)


@main.command("show", epilog=help_epilog(["jobsctl show 3f9c2a01d4"], f"{ENV_DB}, {ENV_PROVIDERS}"))
@click.argument("job")
@refresh_option
@output_option
def show_(job: str, refresh: bool, output: str | None) -> None:
    """The job, its events (every submit and ambiguous-submit decision, change, cancel,
    retry and gc), the tail of its logs and its files."""

    async def action(manager: AsyncJobManager) -> dict[str, Any]:
        found = await manager.status(job, refresh=refresh)
        lines = await manager.logs(found.id)
        files = await manager.files.entries(found.id)
        return {
            "job": found.to_dict(),
            "events": await manager.events(found.id),
            "logs": [entry for _, entry in lines[-LOG_TAIL:]],
            "log_lines": len(lines),
            "files": [f.to_dict() for f in files],
        }

    data = run(action)
    if not wants_table(output):
        emit(data)
        return
    show_one(data["job"], output)
    say("")
    show(data["events"], output, ("at", "kind", "from_state", "to_state", "reason", "detail"))
    if data["logs"]:
        say(f"\nlast {len(data['logs'])} of {data['log_lines']} log lines:")
        for entry in data["logs"]:
            click.echo(f"  {entry.get('timestamp', '')} {entry.get('message', entry)}")
    if data["files"]:
        say("")
        show(data["files"], output, ("n", "state", "json_path", "file_name", "size", "url"))


@main.command(
    "list",
    epilog=help_epilog(
        [
            "jobsctl list --state in_progress",
            "jobsctl list --state COMPLETED --batch night-1 --limit 1000",
            "jobsctl list --label team=vision --search lora",
        ],
        ENV_DB,
    ),
)
@click.option(
    "--state",
    "states",
    type=StateFilter(),
    multiple=True,
    help="Only jobs in this state (ours, or fal's IN_QUEUE/IN_PROGRESS/COMPLETED); repeatable.",
)
@click.option("--app", "application", help="Only jobs of this application.")
@click.option("--batch", help="Only jobs of this batch.")
@click.option("--label", metavar="K=V", help="Only jobs with this label.")
@click.option(
    "--search", metavar="TEXT", help="Jobs this names: an id or prefix, request id or key."
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@output_option
def list_(
    states: tuple[tuple[State, ...], ...],
    application: str | None,
    batch: str | None,
    label: str | None,
    search: str | None,
    limit: int,
    output: str | None,
) -> None:
    """Jobs, newest first (one JSON line each, or a table on a terminal)."""
    pair = None
    if label is not None:
        ((key, value),) = parse_labels((label,)).items()
        pair = (key, value)

    async def action(manager: AsyncJobManager) -> list[Job]:
        return await manager.list_jobs(
            states=states_of(states),
            application=application,
            batch=batch,
            label=pair,
            search=search,
            limit=limit,
        )

    show([j.to_dict() for j in run(action)], output, JOB_COLUMNS)


@main.command(
    epilog=help_epilog(["jobsctl logs 3f9c2a01d4 --follow"], f"{ENV_DB}, {ENV_PROVIDERS}")
)
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@refresh_option
def logs(job: str, follow: bool, refresh: bool) -> None:
    """The job's log lines as they were seen, one JSON object per line."""

    async def action(manager: AsyncJobManager) -> None:
        if refresh and not follow:
            await manager.status(job, refresh=True)
        async for entry in manager.iter_logs(job, follow=follow):
            emit(entry)

    run(action)


@main.command(
    epilog=help_epilog(
        [
            "jobsctl result 3f9c2a01d4",
            "jobsctl result lora-run-7 --wait --timeout 2h",
            "jobsctl result 3f9c2a01d4 --files out/",
        ],
        f"{ENV_DB}, {ENV_PROVIDERS}, JOBS_CACHE_DIR",
    )
)
@click.argument("job")
@click.option("--wait", is_flag=True, help="Wait until the job finishes.")
@click.option("--timeout", type=DURATION, help="Stop waiting after this long (90, 10m, 2h).")
@click.option("--progress/--no-progress", default=None, help="Progress on stderr [terminal].")
@click.option(
    "--files",
    "files_dir",
    type=click.Path(file_okay=False),
    help="Also copy the result's files (downloaded if not cached) into this folder.",
)
def result(
    job: str, wait: bool, timeout: float | None, progress: bool | None, files_dir: str | None
) -> None:
    """The job's result JSON (exit 1 failed, 3 not finished, 4 unknown)."""
    from ..results import SavedFile
    from .progress import wait_for

    async def action(manager: AsyncJobManager) -> tuple[Any, list[SavedFile]]:
        if wait:
            await wait_for(manager, job, timeout=timeout, progress=progress)
        else:
            await manager.status(job, refresh=True)  # finished but not yet fetched: fetch it
        data = await manager.result(job)
        if files_dir is None:
            return data, []
        job_id = (await manager.status(job)).id
        return data, await manager.files.save(job_id, files_dir)

    data, saved = run(action)
    emit(data)
    if files_dir is None:
        return
    copied = [s for s in saved if s.name is not None]
    say(f"{len(copied)} file(s) copied to {files_dir}")
    missing = [s.file for s in saved if s.name is None]
    for file in missing:
        say(f"file {file.n} ({file.json_path}) not copied: {file.error or file.state}")
    if missing:
        fail(f"{len(missing)} of {len(saved)} file(s) could not be downloaded", EXIT_FAILED)
