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
) -> None:
    """Record and submit one job; prints it as JSON."""
    if input_ is None:
        fail("give the model input with --input JSON (or @file, or - for stdin)", EXIT_USAGE)
    arguments = parse_input(input_)
    label_map = parse_labels(labels)

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.submit(
            application,
            arguments,
            path=path,
            priority=priority,
            hint=hint,
            labels=label_map,
            idempotency_key=idempotency_key,
            webhook=not no_webhook,
            download=download,
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
def result(job: str, wait: bool, timeout: float | None) -> None:
    """The job's result JSON (exit 1 failed, 3 not finished, 4 unknown)."""

    async def action(manager: AsyncJobManager) -> Any:
        return await manager.result(job, wait=wait, timeout=timeout)

    emit(run(action))


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
        return await manager._db(
            manager.store.list_jobs,
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
