"""Batches: submit a JSONL file as one job per line, follow the batch to the end, export it.

Why it is built this way:

- Re-running must never pay twice. Each line's idempotency key is derived from the batch
  name, the line number and a hash of the line's JSON, so a second run (after Ctrl-C, a
  crash, or just by mistake) finds every job already recorded and sends only those that
  never reached the queue (``manager.submit`` re-sends a job left in ``submitting`` with no
  attempt counted). Editing a line changes its key: the edited input is a new job.
- A bad line (not JSON, not an object) is reported with its line number and skipped; the
  rest of the file still goes in, and the run exits 1 so scripts notice.
- Submissions go out concurrently, a bounded number at a time; the provider's rate gate
  (one per provider) still pauses everything on a 429.
- ``jobs wait`` must work without ``jobs serve``: it claims the batch's due jobs under a
  lease (the same claim the server's poller uses, so both can run at once without polling
  a job twice) and refreshes them itself.
- ``jobs export`` writes one folder the next pipeline stage can read: ``results.jsonl`` in
  input order, and the cached files under ``files/``.

Rendering (rich progress bars on stderr) lives here too, so the CLI stays parse-call-print.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .manager import AsyncJobManager
from .records import Job, NewJob, PollJob, SubmitOptions, submit_outcome
from .results import SavedFile, find_files
from .states import ACTIVE, State

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16  # submits in flight
WAIT_CONCURRENCY = 32  # polls in flight while ``jobs wait`` drives the batch itself
WAIT_PERIOD = 0.25  # seconds between looks at the store while waiting
EXPORT_CHUNK = 200  # jobs read, downloaded and written per step of an export
RECORD_CHUNK = 64  # lines recorded per transaction while submitting (at least --concurrency)
MAX_KEY = 255  # the idempotency_key column's width
# Longest a run waits for lines another process is sending right now (several processes on
# one file): longer than a send with its in-process settling takes; after it the server's
# ambiguous-submit resolver owns them.
SETTLE_WAIT = 120.0
SETTLE_PERIOD = 0.25  # seconds between looks at those lines

Outcome = Literal["submitted", "existing", "failed", "ambiguous", "invalid"]


# --- reading the file ----------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One non-blank line of the input file: its number (1-based) and either the parsed
    arguments or why they could not be parsed."""

    number: int
    arguments: dict[str, Any] | None
    error: str | None = None


def read_lines(source: Iterable[str]) -> list[Line]:
    """Parse JSONL: one JSON object per line; blank lines are skipped (but counted)."""
    lines = []
    for number, text in enumerate(source, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            lines.append(Line(number, None, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(value, dict):
            kind = type(value).__name__
            lines.append(Line(number, None, f"must be a JSON object (the input), not {kind}"))
            continue
        lines.append(Line(number, value))
    return lines


def with_files(lines: Sequence[Line], urls: Sequence[tuple[str, str]]) -> list[Line]:
    """Each good line with every dotted key of ``urls`` set to its URL (``--file`` with
    ``--inputs``); a line where a key cannot be set becomes a bad line saying why."""
    from .errors import UploadError
    from .uploads import set_key

    out = []
    for line in lines:
        arguments = line.arguments
        try:
            for key, url in urls:
                arguments = None if arguments is None else set_key(arguments, key, url)
        except UploadError as exc:
            line = Line(line.number, None, str(exc))
        else:
            line = Line(line.number, arguments, line.error)
        out.append(line)
    return out


def default_batch_name(path: str) -> str:
    """The batch name used when none is given: the file name without its extension."""
    name = Path(path).name
    for suffix in (".jsonl", ".ndjson", ".json", ".txt"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def idempotency_key(batch: str, number: int, arguments: Mapping[str, Any]) -> str:
    """Stable for (batch, line number, line content): a re-run finds the same jobs. The
    content hash ignores key order and whitespace; a long batch name is hashed to fit."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    key = f"batch:{batch}:{number}:{digest}"
    if len(key) > MAX_KEY:
        key = f"batch#{hashlib.sha256(batch.encode()).hexdigest()[:32]}:{number}:{digest}"
    return key


# --- submitting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LineResult:
    """What became of one line."""

    line: int
    outcome: Outcome
    job: Job | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("submitted", "existing")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"line": self.line, "outcome": self.outcome}
        if self.job is not None:
            data.update(self.job.to_dict())
        if self.error is not None:
            data["message"] = self.error
        return data


@dataclass
class BatchReport:
    batch: str
    lines: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failed_lines: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, result: LineResult) -> None:
        self.counts[result.outcome] = self.counts.get(result.outcome, 0) + 1
        if not result.ok:
            self.failed_lines.append(result.line)

    @property
    def ok(self) -> bool:
        return not self.failed_lines

    def summary(self) -> str:
        parts = [f"{n} {outcome}" for outcome, n in sorted(self.counts.items())]
        text = (
            f"batch {self.batch!r}: {self.lines} lines in {self.seconds:.1f} s: "
            f"{', '.join(parts) or 'nothing'}"
        )
        if self.failed_lines:
            shown = ", ".join(str(n) for n in sorted(self.failed_lines)[:20])
            more = "…" if len(self.failed_lines) > 20 else ""
            text += f"; not submitted: line(s) {shown}{more}"
        return text


async def submit_batch(
    manager: AsyncJobManager,
    application: str,
    lines: Sequence[Line],
    *,
    batch: str,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_result: Callable[[LineResult], None] = lambda _: None,
    options: SubmitOptions | None = None,
) -> BatchReport:
    """Submit every good line as a job of ``batch`` (``batch_index`` = line number), at most
    ``concurrency`` at a time, each with ``options`` (its batch, index and idempotency key
    set per line). ``on_result`` hears about each line as it is done.

    Lines are recorded a chunk at a time in one transaction each (``manager.record_many``)
    just ahead of the senders; then each new job is sent on its own, exactly as
    ``manager.submit`` would. A run that stops leaves at most a chunk recorded but unsent:
    the next run (or ``jobs serve``) sends those. A ``ConfigError`` (no FAL_KEY, a bad
    application id) stops the batch: it would fail every line the same way.

    Each send settles its own ambiguous submits before it returns (``manager.send``), so a
    line ends submitted or failed. A line another process is sending at the same moment
    (several runs of one file) is reported once that send is over (at most
    ``SETTLE_WAIT`` seconds), as the job it became."""
    report = BatchReport(batch=batch, lines=len(lines))
    given = options or SubmitOptions()
    started = time.time()
    # Bound the wire, not the worker: at most ``concurrency`` submits at the provider, and
    # twice as many senders, so each one's two group-commit writes (the attempt counted
    # before the POST, the request id after it) overlap other submits' POSTs instead of
    # holding one of the ``concurrency`` places while they wait.
    wire = asyncio.Semaphore(max(1, concurrency))
    workers = 2 * max(1, concurrency)
    chunk = max(RECORD_CHUNK, workers)
    to_send: asyncio.Queue[tuple[int, Job] | None] = asyncio.Queue(maxsize=workers)

    # Lines another process is sending at this moment: reported once that send is over.
    elsewhere: dict[int, Job] = {}

    def report_line(result: LineResult) -> None:
        report.add(result)
        on_result(result)

    def done(result: LineResult) -> None:
        job = result.job
        if job is not None and job.state is State.SUBMITTING and job.attempts > 0:
            elsewhere[result.line] = job
        else:
            report_line(result)

    for line in lines:
        if line.error is not None:
            error = f"line {line.number}: {line.error}"
            report_line(LineResult(line.number, "invalid", error=error))
    good = [line for line in lines if line.arguments is not None]

    async def record() -> None:
        for start in range(0, len(good), chunk):
            part = good[start : start + chunk]
            news = [_new_job(manager, application, batch, line, given) for line in part]
            for line, (job, send) in zip(part, await manager.record_many(news), strict=True):
                if send:
                    await to_send.put((line.number, job))
                else:
                    done(_line_result(line.number, job, started))
        for _ in range(workers):
            await to_send.put(None)

    async def send() -> None:
        while (item := await to_send.get()) is not None:
            number, job = item
            done(_line_result(number, await manager.send(job, wire=wire), started))

    tasks = [asyncio.create_task(record())]
    tasks += [asyncio.create_task(send()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)  # the first error (say a ConfigError) ends them all
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for number, job in await _settle(manager, elsewhere):
        report_line(_line_result(number, job, started))
    report.seconds = time.time() - started
    return report


async def _settle(
    manager: AsyncJobManager, lines: dict[int, Job], *, timeout: float = SETTLE_WAIT
) -> list[tuple[int, Job]]:
    """Wait (bounded) until no line of ``lines`` is being sent by another process, then
    read them again: a line another run sent is that run's to report, not ambiguous here."""
    if not lines:
        return []
    ids = [job.id for job in lines.values()]
    since = time.time() - timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await manager.store.aio.run(manager.store.in_flight, ids, since=since):
            break
        await asyncio.sleep(SETTLE_PERIOD)
    return [(number, await manager.status(job.id)) for number, job in lines.items()]


def _new_job(
    manager: AsyncJobManager, application: str, batch: str, line: Line, options: SubmitOptions
) -> NewJob:
    assert line.arguments is not None
    key = idempotency_key(batch, line.number, line.arguments)
    each = dataclasses.replace(options, batch=batch, batch_index=line.number, idempotency_key=key)
    return manager.new_job(application, line.arguments, each)


def _line_result(number: int, job: Job, started: float) -> LineResult:
    outcome = submit_outcome(job)
    if outcome == "failed":
        message = (job.error or {}).get("message") or job.failure_reason
        return LineResult(number, "failed", job, f"line {number}: submit failed: {message}")
    if outcome != "sent":
        # Either the submit may have reached the queue and a webhook may still name it
        # (policy ``fail``: ``jobsctl serve`` resolves it) or it provably did not (the next
        # run of the same command sends it).
        reason = "never sent; run the same command again" if outcome == "unsent" else "ambiguous"
        return LineResult(number, "ambiguous", job, f"line {number}: not confirmed ({reason})")
    sent_before = job.created_at < started and (job.submitted_at or 0.0) < started
    return LineResult(number, "existing" if sent_before else "submitted", job)


# --- waiting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitResult:
    counts: dict[State, int]
    timed_out: bool

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def active(self) -> int:
        return sum(self.counts[s] for s in ACTIVE)

    @property
    def all_succeeded(self) -> bool:
        return self.active == 0 and self.counts[State.SUCCEEDED] == self.total


async def wait_batch(
    manager: AsyncJobManager,
    *,
    batch: str | None,
    timeout: float | None = None,
    concurrency: int = WAIT_CONCURRENCY,
    on_progress: Callable[[dict[State, int]], None] = lambda _: None,
) -> WaitResult:
    """Wait until every job of ``batch`` (without one: every job active now, plus any that
    start meanwhile) is terminal, polling due jobs itself under a lease, at most
    ``concurrency`` at a time. Then wait for file downloads this process started."""
    store = manager.store
    claims = manager.claims
    since = None if batch is not None else time.time()
    deadline = None if timeout is None else time.monotonic() + timeout
    polls: set[asyncio.Task[PollJob | None]] = set()
    try:
        while True:
            counts = await store.aio.run(store.count_by_state, batch=batch, finished_since=since)
            on_progress(counts)
            if not any(counts[s] for s in ACTIVE):
                break
            if deadline is not None and time.monotonic() >= deadline:
                return WaitResult(counts, timed_out=True)
            room = concurrency - len(polls)
            if room > 0:
                for job in await claims.claim_due(room, batch=batch):
                    task = asyncio.create_task(claims.poll(job))
                    polls.add(task)
                    task.add_done_callback(polls.discard)
            pause = WAIT_PERIOD
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            if polls:
                await asyncio.wait(set(polls), timeout=pause)
            else:
                await asyncio.sleep(pause)
    finally:
        for task in list(polls):
            task.cancel()
        if polls:
            await asyncio.wait(set(polls))
            await claims.release()
    await manager.files.drain()
    return WaitResult(counts, timed_out=False)


def describe_counts(counts: Mapping[State, int]) -> str:
    shown = [f"{s.value} {n}" for s, n in counts.items() if n]
    return " · ".join(shown) or "no jobs"


# --- exporting -----------------------------------------------------------------------------


@dataclass
class ExportReport:
    batch: str
    out: str
    jobs: int = 0
    states: dict[str, int] = field(default_factory=dict)
    files: int = 0
    missing_files: int = 0
    not_downloaded: int = 0  # files in results that were never downloaded: their URLs expire
    missing_lines: list[int] = field(default_factory=list)  # input lines with no job

    @property
    def unfinished(self) -> int:
        return sum(self.states.get(s.value, 0) for s in ACTIVE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "out": self.out,
            "results": os.path.join(self.out, "results.jsonl"),
            "jobs": self.jobs,
            "states": self.states,
            "unfinished": self.unfinished,
            "files": self.files,
            "missing_files": self.missing_files,
            "not_downloaded": self.not_downloaded,
            "missing_lines": self.missing_lines,
        }


async def export_batch(
    manager: AsyncJobManager, batch: str, out: str, *, download: bool = False
) -> ExportReport:
    """Write ``out/results.jsonl`` (one line per job, in input order; a retried job as its
    newest attempt) and copy the batch's cached files into ``out/files/``. Jobs that asked
    for their files (or all, with ``download``) have missing ones downloaded first.
    ``results.jsonl`` appears complete or not at all (temp file, rename)."""
    target = Path(out)
    report = ExportReport(batch=batch, out=str(target))
    jobs = await manager.store.aio.run(manager.store.batch_jobs, batch)
    if not jobs:
        return report
    numbers = {j.batch_index for j in jobs if j.batch_index is not None}
    report.missing_lines = sorted(set(range(1, max(numbers, default=0) + 1)) - numbers)
    target.mkdir(parents=True, exist_ok=True)
    temp = target / f".results.jsonl.{os.getpid()}.tmp"
    taken: set[str] = set()
    try:
        with temp.open("w", encoding="utf-8") as handle:
            for start in range(0, len(jobs), EXPORT_CHUNK):
                chunk = jobs[start : start + EXPORT_CHUNK]
                exported = await _export_chunk(manager, chunk, target / "files", taken, download)
                for line in exported:
                    handle.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                    report.jobs += 1
                    report.states[line["state"]] = report.states.get(line["state"], 0) + 1
                    report.files += sum(1 for f in line["files"] if f["path"])
                    report.missing_files += sum(1 for f in line["files"] if not f["path"])
                    if not line["files"] and line.get("result"):
                        found = find_files(line["result"], line["provider"])
                        report.not_downloaded += len(found)
        os.replace(temp, target / "results.jsonl")
    finally:
        temp.unlink(missing_ok=True)
    return report


async def _export_chunk(
    manager: AsyncJobManager,
    jobs: Sequence[Job],
    files_dir: Path,
    taken: set[str],
    download: bool,
) -> list[dict[str, Any]]:
    store, cache = manager.store, manager.files
    ids = [job.id for job in jobs]
    wanted = [j for j in jobs if (download or j.download_files) and j.state is State.SUCCEEDED]
    if wanted:
        await asyncio.gather(*(cache.fetch(j.id) for j in wanted))
    results = await store.aio.run(store.results_of, ids)
    files = await store.aio.run(store.files_of, ids)
    lines = []
    for job in jobs:
        saved: list[SavedFile] = await asyncio.to_thread(
            cache.copy_out, files.get(job.id, []), files_dir, taken
        )
        lines.append(export_line(job, results, saved))
    return lines


def export_line(job: Job, results: Mapping[str, Any], saved: Sequence[SavedFile]) -> dict[str, Any]:
    """One line of ``results.jsonl``."""
    line: dict[str, Any] = {
        "batch_index": job.batch_index,
        "id": job.id,
        "provider": job.provider,
        "request_id": job.request_id,
        "state": job.state.value,
        "input": job.arguments,
    }
    if job.state is State.SUCCEEDED:
        if job.id in results:
            line["result"] = results[job.id]
        else:
            line["result"] = None
            line["result_removed"] = True
    elif job.terminal:
        line["failure_reason"] = job.failure_reason
        line["error"] = job.error
    line["files"] = [item.to_dict(prefix="files/") for item in saved]
    return line


# --- rendering -----------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    """Jobs per second, as rich measures it."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f}/s" if speed else "-/s", style="progress.data.speed")


class Bar:
    """A rich progress bar on stderr (count, rate, elapsed time, ETA) and a way to print
    messages above it. JSON on stdout stays on stdout, even while the bar is drawn."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def advance(self) -> None:
        self._progress.advance(self._task)

    def update(self, *, completed: int, total: int, detail: str) -> None:
        self._progress.update(self._task, completed=completed, total=total, detail=detail)

    def note(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int | None, *, show: bool | None = None) -> Iterator[Bar]:
    """A :class:`Bar`, drawn when ``show`` is true, or by default when stderr is a terminal:
    piped, stderr stays quiet."""
    # Redirecting stdout through the bar keeps a shared terminal tidy; when stdout is a pipe
    # or a file it must not be touched, or the JSON lines would end up on stderr.
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=Console(stderr=True),
        disable=not (sys.stderr.isatty() if show is None else show),
        redirect_stdout=sys.stdout.isatty(),
        redirect_stderr=False,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, detail=""))


__all__ = [
    "DEFAULT_CONCURRENCY",
    "Bar",
    "BatchReport",
    "ExportReport",
    "Line",
    "LineResult",
    "WaitResult",
    "default_batch_name",
    "describe_counts",
    "export_batch",
    "export_line",
    "idempotency_key",
    "progress_bar",
    "read_lines",
    "submit_batch",
    "wait_batch",
    "with_files",
]
