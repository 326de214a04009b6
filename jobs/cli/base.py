"""What every command shares: the ``jobsctl`` group, exit codes, JSON and table output, the
one-line error mapping, and the parameter types (inputs, labels, durations, states).

Heavy imports happen inside commands so that ``jobsctl status`` starts fast."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .. import __version__

if TYPE_CHECKING:
    from ..manager import AsyncJobManager
    from ..states import State

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FINISHED = 3
EXIT_UNKNOWN = 4
EXIT_INTERRUPTED = 130

# The variables most commands read; a command's help lists these plus its own.
ENV_DB = "JOBS_DATABASE_URL"
# What reaches the providers; every command that polls or sends may need it.
ENV_PROVIDERS = "FAL_KEY, JOBS_FAL_QUEUE_URL, REPLICATE_API_TOKEN, JOBS_REPLICATE_API_URL"


def help_epilog(examples: Sequence[str], env: str) -> str:
    """The end of a command's ``--help``: examples and the environment variables it reads
    (``\\b`` keeps click from re-wrapping the lines)."""
    lines = ["\b", "Examples:", *(f"  {e}" for e in examples), "", "\b", f"Environment: {env}"]
    return "\n".join(lines)


class Group(click.Group):
    """click's group, with its usage errors said in one line like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `jobsctl` or `jobsctl db`
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
            sys.exit(EXIT_USAGE)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "jobsctl"
            fail(f"{exc.format_message()} (see `{where} --help`)", EXIT_USAGE)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            say("interrupted")
            sys.exit(EXIT_INTERRUPTED)


@click.group(
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="jobsctl")
def main() -> None:
    """jobsctl: a persistent job manager for fal.ai's queue.

    Every request is written to a SQL store before it is sent, tracked to the end by polls
    and webhooks, and its result cached. A job is named by its id, a unique prefix (6+
    characters) of its id or short id, its request id, or its idempotency key.

    Settings come from JOBS_* variables and FAL_KEY. Shell completion:
    eval "$(_JOBSCTL_COMPLETE=bash_source jobsctl)" (zsh_source, fish_source for others).
    """


# --- output --------------------------------------------------------------------------------


def emit(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, default=str))


def say(message: str) -> None:
    click.echo(message, err=True)


def fail(message: str, code: int) -> NoReturn:
    say(f"error: {message}")
    sys.exit(code)


def output_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--output json|table``: JSON when stdout is not a terminal (scripts depend on it),
    a table on a terminal."""
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["json", "table"]),
        help="Output format [default: table on a terminal, else json].",
    )(fn)


def wants_table(output: str | None) -> bool:
    return output == "table" if output else sys.stdout.isatty()


def show(rows: Sequence[dict[str, Any]], output: str | None, columns: Sequence[str]) -> None:
    """Print ``rows`` as JSON lines, or as a table of ``columns`` on a terminal."""
    if not wants_table(output):
        for row in rows:
            emit(row)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    Console(highlight=False).print(table)


def show_one(data: dict[str, Any], output: str | None) -> None:
    """Print one object as JSON, or as a two-column table on a terminal."""
    if not wants_table(output):
        emit(data)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in data.items():
        if value not in (None, {}, []):
            table.add_row(key, _cell(value))
    Console(highlight=False).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


# --- running a command ---------------------------------------------------------------------


@contextmanager
def errors() -> Iterator[None]:
    """Turn every error a user can cause into one line and an exit code."""
    from sqlalchemy.exc import SQLAlchemyError

    from .. import errors as e

    try:
        yield
    except e.JobNotFound as exc:
        fail(str(exc), EXIT_UNKNOWN)
    except (e.JobNotFinished, e.WaitTimeout) as exc:
        fail(str(exc), EXIT_NOT_FINISHED)
    except (e.JobFailed, e.CancelTooLate, e.NotRetryable) as exc:
        fail(str(exc), EXIT_FAILED)
    except (e.ConfigError, e.AmbiguousJobRef, e.IdempotencyConflict) as exc:
        fail(str(exc), EXIT_USAGE)
    except e.ProviderError as exc:
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
        from ..manager import AsyncJobManager

        manager = AsyncJobManager()
        try:
            return await action(manager)
        finally:
            await manager.aclose()
            manager.store.close()

    with errors():
        return asyncio.run(main())
    raise AssertionError("unreachable")


# --- reading what the user typed -----------------------------------------------------------


def read_text(raw: str, option: str) -> tuple[str, str]:
    """``raw`` itself, ``@file``'s text or stdin's (``-``), with where it came from."""
    if raw == "-":
        try:
            return sys.stdin.read(), "stdin"
        except UnicodeDecodeError:
            fail("stdin is not UTF-8 text", EXIT_USAGE)
    if raw.startswith("@"):
        path = raw[1:]
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read(), path
        except UnicodeDecodeError:
            fail(f"{path} is not UTF-8 text (JSON must be)", EXIT_USAGE)
        except OSError as exc:
            fail(f"cannot read {path}: {exc.strerror}", EXIT_USAGE)
    return raw, option


def parse_input(raw: str, option: str = "--input") -> dict[str, Any]:
    """``--input``: JSON text, ``@file`` or ``-`` for stdin; must be a JSON object."""
    text, source = read_text(raw, option)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", 2)
    except RecursionError:
        fail(f"{source} is nested too deeply to be a model input", EXIT_USAGE)
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


class Duration(click.ParamType[float]):
    """Seconds, typed with or without a unit: ``90``, ``90s``, ``10m``, ``2h``, ``7d``."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int | float):
            return float(value)
        from ..durations import parse_duration

        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()

# fal's status names, accepted wherever a state is: COMPLETED is any finished job.
FAL_STATES = {
    "in_queue": ("queued",),
    "in_progress": ("in_progress",),
    "completed": ("succeeded", "failed", "cancelled"),
}


class StateFilter(click.ParamType[tuple["State", ...]]):
    """A job state by our name (``in_progress``) or fal's (``IN_PROGRESS``, ``COMPLETED``)."""

    name = "STATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ..states import State

        if isinstance(value, tuple):
            return value
        key = str(value).strip().lower().replace("-", "_")
        names = FAL_STATES.get(key, (key,))
        try:
            return tuple(State(name) for name in names)
        except ValueError:
            ours = ", ".join(s.value for s in State)
            self.fail(
                f"{value!r} is not a state: one of {ours}, or IN_QUEUE, IN_PROGRESS, COMPLETED",
                param,
                ctx,
            )

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[Any]:
        from click.shell_completion import CompletionItem

        from ..states import State

        return [CompletionItem(s.value) for s in State if s.value.startswith(incomplete)]


def states_of(groups: Sequence[tuple[State, ...]]) -> list[State] | None:
    """The union of repeated ``--state`` options, or None for no filter."""
    return [s for group in groups for s in group] or None
