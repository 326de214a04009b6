"""Commands that create work: ``submit``, ``run``, ``retry``, ``track``, ``cancel``."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from ..providers import NAMES as PROVIDERS
from ..records import SubmitOptions, short_id, submit_outcome
from .base import (
    DURATION,
    ENV_DB,
    ENV_PROVIDERS,
    EXIT_FAILED,
    EXIT_USAGE,
    emit,
    errors,
    fail,
    help_epilog,
    main,
    output_option,
    parse_input,
    parse_labels,
    run,
    say,
    show,
    show_one,
)

if TYPE_CHECKING:
    from ..manager import AsyncJobManager
    from ..records import Job

JOB_COLUMNS = ("short_id", "state", "application", "batch", "request_id", "created_at")


@dataclass(frozen=True)
class OneSubmit:
    """What the shared options of ``submit`` and ``run`` asked for."""

    input: str | None
    idempotency_key: str | None
    options: SubmitOptions  # path, priority, labels, ...; the batch and key are set per call
    files: tuple[tuple[str, str], ...]  # --file KEY=PATH: (dotted key, path)

    def for_job(self, batch: str | None) -> SubmitOptions:
        """The options of one job (``--input``) of ``batch``."""
        return dataclasses.replace(self.options, batch=batch, idempotency_key=self.idempotency_key)

    def arguments(self) -> dict[str, Any]:
        """The parsed ``--input`` (exits 2 when missing or not a JSON object)."""
        if self.input is None:
            fail("give the model input with --input JSON (or @file, or - for stdin)", EXIT_USAGE)
        return parse_input(self.input)


def submit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of one submit, shared by ``submit`` and ``run``: the command receives
    them as one :class:`OneSubmit` named ``one``."""
    options = [
        click.option(
            "--input", "input_", metavar="JSON|@FILE|-", help="The model input, a JSON object."
        ),
        click.option(
            "--provider",
            type=click.Choice(PROVIDERS),
            default="fal",
            show_default=True,
            help="Which remote API runs the application.",
        ),
        click.option("--path", help="Extra path after the application id (e.g. /image)."),
        click.option("--priority", type=click.Choice(["normal", "low"]), help="Queue priority."),
        click.option("--hint", help="Runner hint (X-Fal-Runner-Hint)."),
        click.option("--label", "labels", multiple=True, metavar="K=V", help="Repeatable."),
        click.option("--idempotency-key", help="A second submit with the same key sends nothing."),
        click.option("--no-webhook", is_flag=True, help="Do not ask for a webhook."),
        click.option("--download", is_flag=True, default=None, help="Download result files."),
        click.option(
            "--file",
            "files",
            multiple=True,
            metavar="KEY=PATH",
            help="Upload PATH once (a folder as a zip) and set KEY (dotted: a.b) of the input "
            "to its URL; repeatable.",
        ),
    ]

    @functools.wraps(fn)
    def command(
        *args: Any,
        input_: str | None,
        provider: str,
        path: str | None,
        priority: str | None,
        hint: str | None,
        labels: tuple[str, ...],
        idempotency_key: str | None,
        no_webhook: bool,
        download: bool | None,
        files: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        from ..uploads import parse_file_option

        options = SubmitOptions(
            provider=provider,
            path=path,
            priority=priority,
            hint=hint,
            labels=parse_labels(labels),
            webhook=not no_webhook,
            download=download,
        )
        with errors():
            pairs = tuple(parse_file_option(text) for text in files)
        return fn(*args, one=OneSubmit(input_, idempotency_key, options, pairs), **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def explain_unsent(job: Job) -> None:
    """Exit 1 with what happens next, for a job that was rejected or whose submit may not
    have reached the queue."""
    outcome = submit_outcome(job)
    if outcome == "failed":
        fail(f"submit failed ({job.failure_reason}): {(job.error or {}).get('message')}", 1)
    if outcome == "unsent":
        fail(
            f"job {short_id(job.id)} is recorded but was not sent ({job.provider} could not be "
            "reached); the same command sends it, and so does a running `jobsctl serve`",
            EXIT_FAILED,
        )
    if outcome == "unconfirmed":
        # The sender settles every other ambiguous submit before it returns; what is left
        # asked for a webhook under JOBS_AMBIGUOUS_POLICY=fail, which may still come.
        fail(
            f"job {short_id(job.id)}: the submit may or may not have reached {job.provider}; "
            "it stays recorded: a running `jobsctl serve` adopts it when a webhook names it, "
            "or fails it after the grace period (JOBS_AMBIGUOUS_POLICY=fail); without a "
            f"server nothing settles it. `jobsctl show {short_id(job.id)}` shows each decision",
            EXIT_FAILED,
        )


@main.command(
    epilog=help_epilog(
        [
            'jobsctl submit fal-ai/flux/dev --input \'{"prompt": "a cat"}\'',
            "jobsctl submit fal-ai/flux/dev --input @input.json --idempotency-key cat-1",
            "jobsctl submit fal-ai/flux/dev --inputs prompts.jsonl --batch night-1",
        ],
        f"{ENV_DB}, {ENV_PROVIDERS}, JOBS_PUBLIC_URL (webhooks), JOBS_CACHE_FILES",
    )
)
@click.argument("application")
@submit_options
@click.option("--inputs", metavar="FILE.jsonl|-", help="One job per line (a JSON object each).")
@click.option("--batch", help="Batch name (default with --inputs: the file's name).")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="Submits in flight with --inputs.",
)
@output_option
def submit(
    application: str,
    one: OneSubmit,
    inputs: str | None,
    batch: str | None,
    concurrency: int,
    output: str | None,
) -> None:
    """Record and submit one job (--input), or one per line of a JSONL file (--inputs);
    prints each job. Re-running the same file and batch submits nothing twice."""
    if inputs is not None:
        if one.input is not None or one.idempotency_key is not None:
            fail("--inputs takes neither --input nor --idempotency-key", EXIT_USAGE)
        submit_inputs(application, inputs, batch, concurrency, one)
        return
    arguments = one.arguments()

    async def action(manager: AsyncJobManager) -> Job:
        nonlocal arguments
        if one.files:
            arguments, _ = await manager.upload_inputs(arguments, one.files)
        return await manager.submit_with(application, arguments, one.for_job(batch))

    job = run(action)
    show_one(job.to_dict(), output)
    explain_unsent(job)


def submit_inputs(
    application: str, inputs: str, batch: str | None, concurrency: int, one: OneSubmit
) -> None:
    """``submit --inputs``: progress on stderr, one JSON line per job on stdout; exit 1 when
    any line was not submitted (each named by its line number on stderr). ``--file`` paths
    are uploaded once and set in every line."""
    from ..batch import LineResult, default_batch_name, progress_bar, read_lines

    if inputs == "-":
        if batch is None:
            fail("--inputs - (stdin) needs --batch NAME", EXIT_USAGE)
        try:
            lines = read_lines(sys.stdin)
        except UnicodeDecodeError:
            fail("stdin is not UTF-8 text", EXIT_USAGE)
    else:
        try:
            with open(inputs, encoding="utf-8") as handle:
                lines = read_lines(handle)
        except UnicodeDecodeError:
            fail(f"{inputs} is not UTF-8 text (JSON lines must be)", EXIT_USAGE)
        except OSError as exc:
            fail(f"cannot read {inputs}: {exc.strerror}", EXIT_USAGE)
    if batch is None:
        batch = default_batch_name(inputs)
        say(f"batch {batch!r} (named after the file; --batch NAME to choose)")
    name = batch

    async def action(manager: AsyncJobManager) -> Any:
        from ..batch import submit_batch, with_files

        ready = lines
        if one.files:
            _, uploaded = await manager.upload_inputs({}, one.files)
            urls = [(key, up.url) for (key, _), up in zip(one.files, uploaded, strict=True)]
            ready = with_files(lines, urls)
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
                ready,
                batch=name,
                concurrency=concurrency,
                on_result=on_result,
                options=one.options,
            )

    report = run(action)
    say(report.summary())
    if not report.ok:
        sys.exit(EXIT_FAILED)


@main.command(
    "run",
    epilog=help_epilog(
        [
            'jobsctl run fal-ai/flux/dev --input \'{"prompt": "a cat"}\'',
            "jobsctl run fal-ai/flux/dev --input @in.json --idempotency-key cat-1 --timeout 10m",
        ],
        f"{ENV_DB}, {ENV_PROVIDERS}, JOBS_PUBLIC_URL",
    ),
)
@click.argument("application")
@submit_options
@click.option("--batch", help="Batch name.")
@click.option("--timeout", type=DURATION, help="Stop waiting after this long (exit 3).")
@click.option("--progress/--no-progress", default=None, help="Progress on stderr [terminal].")
def run_(
    application: str,
    one: OneSubmit,
    batch: str | None,
    timeout: float | None,
    progress: bool | None,
) -> None:
    """Submit one job, wait for it and print its result (exit 0 succeeded, 1 failed,
    3 timeout: the job goes on, and the same command with the same --idempotency-key
    resumes it)."""
    from .progress import wait_for

    arguments = one.arguments()

    async def action(manager: AsyncJobManager) -> Any:
        nonlocal arguments
        if one.files:
            arguments, _ = await manager.upload_inputs(arguments, one.files)
        job = await manager.submit_with(application, arguments, one.for_job(batch))
        if submit_outcome(job) != "sent":
            return job
        await wait_for(manager, job.id, timeout=timeout, progress=progress)
        return await manager.result(job.id)

    outcome = run(action)
    from ..records import Job

    if isinstance(outcome, Job):  # never queued: say why, exit 1
        emit(outcome.to_dict())
        explain_unsent(outcome)
        return
    emit(outcome)


@main.command(
    epilog=help_epilog(
        ["jobsctl retry 3f9c2a01d4", "jobsctl retry --batch night-1 --reason remote_error"],
        f"{ENV_DB}, {ENV_PROVIDERS}",
    )
)
@click.argument("job", required=False)
@click.option("--batch", help="Retry every failed or cancelled job of this batch.")
@click.option(
    "--reason",
    "reasons",
    multiple=True,
    metavar="REASON",
    help="With --batch: only jobs that failed for this reason (e.g. remote_error, "
    "cancelled); repeatable.",
)
@output_option
def retry(job: str | None, batch: str | None, reasons: tuple[str, ...], output: str | None) -> None:
    """A new attempt for a failed or cancelled job (or every such job of a batch), linked to
    the old one. Safe to re-run: a job already retried is not sent again."""
    from ..states import FailureReason

    if (job is None) == (batch is None):
        fail("give a JOB or --batch NAME (not both)", EXIT_USAGE)
    known = {r.value for r in FailureReason} | {"cancelled"}
    for reason in reasons:
        if reason not in known:
            fail(f"--reason {reason!r} is not one of {', '.join(sorted(known))}", EXIT_USAGE)
    if reasons and batch is None:
        fail("--reason goes with --batch", EXIT_USAGE)

    async def action(manager: AsyncJobManager) -> list[Job]:
        if job is not None:
            return [await manager.retry(job)]
        assert batch is not None
        return await manager.retry_batch(batch, reasons=list(reasons) or None)

    retries = run(action)
    show([r.to_dict() for r in retries], output, ("retry_of", *JOB_COLUMNS))
    if batch is not None:
        say(f"{len(retries)} job(s) of batch {batch!r} retried")
    unsent = [r for r in retries if r.state.value in ("failed", "submitting")]
    if unsent:
        fail(f"{len(unsent)} retry(ies) not submitted; `jobsctl show` tells why", EXIT_FAILED)


@main.command(
    epilog=help_epilog(
        ["jobsctl track fal-ai/flux/dev 764cabcf-b745-4b3e-ae38-1200304cf45b"],
        f"{ENV_DB}, {ENV_PROVIDERS}",
    )
)
@click.argument("application")
@click.argument("request_id")
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS),
    default="fal",
    show_default=True,
    help="Which remote API the request was made on.",
)
@output_option
def track(application: str, request_id: str, provider: str, output: str | None) -> None:
    """Adopt a request submitted elsewhere (e.g. by fal_client): it is polled to the end
    and its result cached. A tracked job is never sent again by jobs."""

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.track(application, request_id, provider=provider)

    show_one(run(action).to_dict(), output)


@main.command(epilog=help_epilog(["jobsctl cancel 3f9c2a01d4"], f"{ENV_DB}, {ENV_PROVIDERS}"))
@click.argument("job")
@output_option
def cancel(job: str, output: str | None) -> None:
    """Ask fal to cancel the job; prints it once the outcome is known (exit 1 when it had
    already finished)."""

    async def action(manager: AsyncJobManager) -> Job:
        return await manager.cancel(job)

    show_one(run(action).to_dict(), output)


@main.command(
    epilog=help_epilog(
        [
            "jobsctl upload photos/          # a folder goes up as one deterministic zip",
            "jobsctl upload cat.png --content-type image/png",
            "jobsctl run fal-ai/flux-lora-fast-training --input '{}' \\\n"
            "      --file images_data_url=photos/",
        ],
        f"{ENV_DB}, FAL_KEY, JOBS_FAL_REST_URL, JOBS_UPLOAD_TTL, JOBS_UPLOAD_MAX_BYTES",
    )
)
@click.argument("path")
@click.option("--content-type", help="The file's type [default: guessed from its name].")
@output_option
def upload(path: str, content_type: str | None, output: str | None) -> None:
    """Upload a file (a folder is zipped deterministically) to fal's CDN once: the same bytes
    again print the same URL and send nothing; a killed upload resumes. Prints {"url",
    "sha256", "size", "content_type", "reused"} (exit 2 bad input, 1 refused)."""
    from ..uploads import Uploaded

    async def action(manager: AsyncJobManager) -> Uploaded:
        return await manager.upload_file(path, content_type=content_type)

    show_one(run(action).to_dict(), output)
