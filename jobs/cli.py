"""The ``jobs`` command. Thin: parse, call the manager, print JSON on stdout and messages on
stderr, map errors to the contract's exit codes. Heavy imports happen inside commands so
``jobs status`` starts fast."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from . import poller as poller_defaults  # light: the knobs' defaults for `serve --help`

if TYPE_CHECKING:
    from .manager import AsyncJobManager
    from .store import Job

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FINISHED = 3
EXIT_UNKNOWN = 4
EXIT_INTERRUPTED = 130


def emit(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, default=str))


def say(message: str) -> None:
    click.echo(message, err=True)


def fail(message: str, code: int) -> NoReturn:
    say(f"error: {message}")
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn every error a user can cause into one line and an exit code."""
    from sqlalchemy.exc import SQLAlchemyError

    from . import errors

    try:
        yield
    except errors.JobNotFound as exc:
        fail(str(exc), EXIT_UNKNOWN)
    except (errors.JobNotFinished, errors.WaitTimeout) as exc:
        fail(str(exc), EXIT_NOT_FINISHED)
    except (errors.JobFailed, errors.CancelTooLate) as exc:
        fail(str(exc), EXIT_FAILED)
    except errors.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except errors.ProviderError as exc:
        fail(str(exc), EXIT_FAILED)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        fail(f"database problem: {reason} (check JOBS_DATABASE_URL)", EXIT_USAGE)
    except KeyboardInterrupt:
        say("interrupted; nothing is lost: the job goes on and the same command resumes it")
        sys.exit(EXIT_INTERRUPTED)


def run(action: Callable[[AsyncJobManager], Awaitable[T]]) -> T:
    """Run ``action`` with a manager configured from the environment."""

    async def main() -> T:
        from .manager import AsyncJobManager

        manager = AsyncJobManager()
        try:
            return await action(manager)
        finally:
            await manager.aclose()
            manager.store.close()

    with _errors():
        return asyncio.run(main())
    raise AssertionError("unreachable")


def parse_input(raw: str) -> Any:
    """``--input``: JSON text, ``@file`` or ``-`` for stdin; must be a JSON object."""
    source = "--input"
    if raw == "-":
        raw, source = sys.stdin.read(), "stdin"
    elif raw.startswith("@"):
        path = raw[1:]
        try:
            with open(path, encoding="utf-8") as handle:
                raw, source = handle.read(), path
        except OSError as exc:
            fail(f"cannot read {path}: {exc.strerror}", EXIT_USAGE)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", 2)
    if not isinstance(value, dict):
        fail(f"{source} must be a JSON object (the model's input), not {type(value).__name__}", 2)
    return value


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--label takes key=value, not {pair!r}", EXIT_USAGE)
        labels[key] = value
    return labels


def job_line(job: Job) -> dict[str, Any]:
    return job.to_dict()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jobs")
def main() -> None:
    """jobs: a persistent job manager for remote queue APIs (fal.ai, Replicate).

    Every request is written to a SQL store before it is sent, tracked to the end, and its
    result cached. Settings come from JOBS_* variables and FAL_KEY (see the README).
    """


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema."""
    from .config import Settings
    from .migrate import current, upgrade

    with _errors():
        settings = Settings.from_env()
        upgrade(settings.database_url)
        say(f"database at revision {current(settings.database_url)}")


@main.command()
@click.argument("application")
@click.option("--input", "input_", metavar="JSON|@FILE|-", help="The model input, a JSON object.")
@click.option("--path", help="Extra path after the application id (for submit only).")
@click.option("--priority", type=click.Choice(["normal", "low"]), help="fal queue priority.")
@click.option("--hint", help="Runner hint (X-Fal-Runner-Hint).")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A label; repeatable.")
@click.option("--idempotency-key", help="A second submit with the same key sends nothing.")
@click.option("--no-webhook", is_flag=True, help="Do not ask for a webhook even if possible.")
@click.option("--download", is_flag=True, default=None, help="Download the result's files.")
@click.option("--inputs", metavar="FILE.jsonl|-", help="One job per line (a JSON object each).")
@click.option("--batch", help="Batch name (default with --inputs: the file's name).")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="Submits in flight with --inputs.",
)
def submit(
    application: str,
    input_: str | None,
    path: str | None,
    priority: str | None,
    hint: str | None,
    labels: tuple[str, ...],
    idempotency_key: str | None,
    no_webhook: bool,
    download: bool | None,
    inputs: str | None,
    batch: str | None,
    concurrency: int,
) -> None:
    """Record and submit one job (--input), or one per line of a JSONL file (--inputs);
    prints each job as JSON. Re-running the same file and batch submits nothing twice."""
    options: dict[str, Any] = {
        "path": path,
        "priority": priority,
        "hint": hint,
        "labels": parse_labels(labels),
        "webhook": not no_webhook,
        "download": download,
    }
    if inputs is not None:
        if input_ is not None or idempotency_key is not None:
            fail("--inputs takes neither --input nor --idempotency-key", EXIT_USAGE)
        submit_inputs(application, inputs, batch, concurrency, options)
        return
    if input_ is None:
        fail("give the model input with --input JSON (or @file, or - for stdin)", EXIT_USAGE)
    arguments = parse_input(input_)

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.submit(
            application, arguments, batch=batch, idempotency_key=idempotency_key, **options
        )

    job = run(action)
    emit(job_line(job))
    if job.state.value == "failed":
        fail(f"submit failed ({job.failure_reason}): {(job.error or {}).get('message')}", 1)
    if job.state.value == "submitting":
        fail(
            "the submit may or may not have reached the queue; the job is recorded and "
            "`jobs serve` resolves it (see `jobs status " + job.id + "`)",
            EXIT_FAILED,
        )


def submit_inputs(
    application: str, inputs: str, batch: str | None, concurrency: int, options: dict[str, Any]
) -> None:
    """``submit --inputs``: progress on stderr, one JSON line per job on stdout; exit 1 when
    any line was not submitted (each named by its line number on stderr)."""
    from .batch import LineResult, default_batch_name, progress_bar, read_lines, submit_batch

    if inputs == "-":
        if batch is None:
            fail("--inputs - (stdin) needs --batch NAME", EXIT_USAGE)
        lines = read_lines(sys.stdin)
    else:
        try:
            with open(inputs, encoding="utf-8") as handle:
                lines = read_lines(handle)
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {inputs}: {getattr(exc, 'strerror', None) or exc}", EXIT_USAGE)
    if batch is None:
        batch = default_batch_name(inputs)
        say(f"batch {batch!r} (named after the file; --batch NAME to choose)")
    name = batch

    async def action(manager: AsyncJobManager) -> Any:
        with progress_bar(f"submit {name}", total=len(lines)) as bar:

            def on_result(line: LineResult) -> None:
                if line.job is not None:
                    emit(line.to_dict())
                if line.error is not None:
                    bar.note(f"error: {line.error}")
                bar.advance()

            return await submit_batch(
                manager,
                application,
                lines,
                batch=name,
                concurrency=concurrency,
                on_result=on_result,
                **options,
            )

    report = run(action)
    say(report.summary())
    if not report.ok:
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("job")
def status(job: str) -> None:
    """Current state, queue position, timestamps, request id and remote URLs."""

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.status(job)

    emit(job_line(run(action)))


@main.command()
@click.argument("job")
@click.option("--wait", is_flag=True, help="Wait until the job finishes.")
@click.option("--timeout", type=float, help="Give up waiting after this many seconds.")
@click.option(
    "--files",
    "files_dir",
    type=click.Path(file_okay=False),
    help="Also copy the result's files (downloaded if not cached) into this folder.",
)
def result(job: str, wait: bool, timeout: float | None, files_dir: str | None) -> None:
    """The job's result JSON (exit 1 failed, 3 not finished, 4 unknown)."""
    from .results import SavedFile

    async def action(manager: AsyncJobManager) -> tuple[Any, list[SavedFile]]:
        data = await manager.result(job, wait=wait, timeout=timeout)
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


@main.command("list")
@click.option(
    "--state",
    type=click.Choice(["submitting", "queued", "in_progress", "succeeded", "failed", "cancelled"]),
)
@click.option("--app", "application", help="Only jobs of this application.")
@click.option("--batch", help="Only jobs of this batch.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
def list_(state: str | None, application: str | None, batch: str | None, limit: int) -> None:
    """One JSON line per job, newest first."""
    from .states import State

    async def action(manager: AsyncJobManager) -> list[Job]:
        return await manager.list_jobs(
            state=State(state) if state else None,
            application=application,
            batch=batch,
            limit=limit,
        )

    for item in run(action):
        emit(job_line(item))


@main.command()
@click.argument("job")
def cancel(job: str) -> None:
    """Ask the provider to cancel (exit 1 when it is too late)."""

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.cancel(job)

    emit(job_line(run(action)))


@main.command()
@click.argument("application")
@click.argument("request_id")
def track(application: str, request_id: str) -> None:
    """Adopt a request submitted elsewhere (e.g. by fal_client)."""

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.track(application, request_id)

    emit(job_line(run(action)))


_POSITIVE = click.FloatRange(min=0, min_open=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--public-url", help="This server's reachable base URL (JOBS_PUBLIC_URL): webhooks.")
@click.option(
    "--tick",
    type=_POSITIVE,
    default=poller_defaults.TICK,
    show_default=True,
    help="Seconds between claims of due jobs.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=poller_defaults.BATCH,
    show_default=True,
    help="Most jobs claimed by one statement.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=poller_defaults.CONCURRENCY,
    show_default=True,
    help="Most polls in flight.",
)
@click.option(
    "--lease",
    type=_POSITIVE,
    default=poller_defaults.LEASE,
    show_default=True,
    help="Seconds a claimed job belongs to this server.",
)
@click.option(
    "--ambiguous-grace",
    type=click.FloatRange(min=0),
    default=poller_defaults.AMBIGUOUS_GRACE,
    show_default=True,
    help="Seconds in submitting before an unconfirmed submit is decided.",
)
@click.option(
    "--ambiguous-period",
    type=_POSITIVE,
    default=poller_defaults.AMBIGUOUS_PERIOD,
    show_default=True,
    help="Seconds between runs of the ambiguous-submit resolver.",
)
@click.option(
    "--ambiguous-policy",
    type=click.Choice(["resubmit", "fail"]),
    help="JOBS_AMBIGUOUS_POLICY: send again (at least once; the default) or fail.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0),
    default=poller_defaults.STOP_TIMEOUT,
    show_default=True,
    help="Seconds open requests, then in-flight polls, get on shutdown.",
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log every HTTP request (costs about 30 % of throughput).",
)
def serve(
    host: str,
    port: int,
    public_url: str | None,
    tick: float,
    batch: int,
    concurrency: int,
    lease: float,
    ambiguous_grace: float,
    ambiguous_period: float,
    ambiguous_policy: str | None,
    stop_timeout: float,
    log_format: str,
    log_level: str,
    access_log: bool,
) -> None:
    """API + webhook receiver + poll scheduler in one process; stops cleanly on SIGTERM/SIGINT.

    Runs the database migrations first. Flags are documented in docs/serve.md.
    """
    from .config import Settings
    from .serve import serve as run_server

    with _errors():
        settings = Settings.from_env(
            public_url=public_url.rstrip("/") if public_url else None,
            ambiguous_policy=ambiguous_policy,
        )
        run_server(
            settings,
            host=host,
            port=port,
            poller_options={
                "tick": tick,
                "batch": batch,
                "concurrency": concurrency,
                "lease": lease,
                "ambiguous_grace": ambiguous_grace,
                "ambiguous_period": ambiguous_period,
                "stop_timeout": stop_timeout,
            },
            log_format="json" if log_format == "json" else "text",
            log_level=log_level,
            access_log=access_log,
        )


@main.command("wait")
@click.option("--batch", help="Only this batch (default: every job not finished now).")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 3).")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Polls in flight when no `jobs serve` polls these jobs.",
)
def wait_(batch: str | None, timeout: float | None, concurrency: int) -> None:
    """Wait for all matching jobs, with a progress bar; prints the counts per state
    (exit 0 all succeeded, 1 some failed or cancelled, 3 timeout, 4 unknown batch)."""
    from .batch import WaitResult, describe_counts, progress_bar, wait_batch
    from .states import State

    async def action(manager: AsyncJobManager) -> WaitResult:
        with progress_bar(f"wait {batch or 'all'}", total=None) as bar:

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
        fail(f"no jobs in batch {batch!r}; `jobs list` shows known jobs", EXIT_UNKNOWN)
    counts = {s.value: n for s, n in outcome.counts.items()}
    emit({"batch": batch, "jobs": outcome.total, "timed_out": outcome.timed_out, **counts})
    if outcome.counts[State.SUBMITTING]:
        say(
            f"{outcome.counts[State.SUBMITTING]} job(s) still submitting: `jobs serve` resolves "
            "them; a job never sent goes out when the same `jobs submit` runs again"
        )
    if outcome.timed_out:
        fail(f"timed out after {timeout:g}s: {describe_counts(outcome.counts)}", EXIT_NOT_FINISHED)
    if not outcome.all_succeeded:
        fail(describe_counts(outcome.counts), EXIT_FAILED)


@main.command()
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job: str, follow: bool) -> None:
    """The job's log lines as they were seen, one JSON object per line."""

    async def action(manager: AsyncJobManager) -> None:
        async for entry in manager.iter_logs(job, follow=follow):
            emit(entry)

    run(action)


@main.command()
@click.option("--batch", required=True, help="The batch to export.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
def export(batch: str, out: str) -> None:
    """Write OUT/results.jsonl (one line per job, in input order) and copy the batch's
    cached files into OUT/files/ (exit 4 unknown batch)."""
    from .batch import ExportReport, export_batch

    async def action(manager: AsyncJobManager) -> ExportReport:
        return await export_batch(manager, batch, out)

    report = run(action)
    if report.jobs == 0:
        fail(f"no jobs in batch {batch!r}; `jobs list` shows known jobs", EXIT_UNKNOWN)
    emit(report.to_dict())


@main.command()
@click.option("--older-than", required=True, metavar="DURATION", help="e.g. 30m, 12h, 7d.")
def gc(older_than: str) -> None:
    """Remove stored results and cached files of jobs finished before the cutoff (job rows
    and events stay); prints what was freed."""
    import time

    from .results import GcReport, parse_duration

    try:
        cutoff = time.time() - parse_duration(older_than)
    except ValueError as exc:
        fail(f"--older-than: {exc}", EXIT_USAGE)

    async def action(manager: AsyncJobManager) -> GcReport:
        return await manager.collect_garbage(cutoff)

    emit(run(action).to_dict())


@main.command("fake-fal")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--latency", type=float, default=0.0, show_default=True, help="Seconds per reply.")
@click.option("--duration", type=float, default=5.0, show_default=True, help="Seconds a job runs.")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
def fake_fal(host: str, port: int, latency: float, duration: float, fail_rate: float) -> None:
    """Run the local fal-compatible queue emulator."""
    from .testing import FakeFalConfig, run_fake_fal

    say(f"fake fal queue on http://{host}:{port} (JOBS_FAL_QUEUE_URL=http://{host}:{port})")
    run_fake_fal(host, port, FakeFalConfig(latency=latency, duration=duration, fail_rate=fail_rate))


@main.command("demo")
@click.option("--duration", type=float, default=4.0, show_default=True, help="Seconds per job.")
def demo(duration: float) -> None:
    """Run a few jobs against the bundled fal emulator and show what it cost."""
    from .demo import run_demo_in_tempdir

    run_demo_in_tempdir(duration)


if __name__ == "__main__":
    main()
