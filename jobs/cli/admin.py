"""Commands that run something: ``db upgrade``, ``serve``, ``fake-fal``, ``fake-replicate``,
``demo``."""

from __future__ import annotations

import click

from .. import poller as poller_defaults  # light: the knobs' defaults for `serve --help`
from .base import ENV_DB, ENV_PROVIDERS, errors, help_epilog, main, say


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade", epilog=help_epilog(["jobsctl db upgrade"], ENV_DB))
def db_upgrade() -> None:
    """Migrate the database to the newest schema (every command also does it on start)."""
    from ..config import Settings
    from ..migrate import current, upgrade

    with errors():
        settings = Settings.from_env()
        upgrade(settings.database_url)
        say(f"database at revision {current(settings.database_url)}")


_POSITIVE = click.FloatRange(min=0, min_open=True)


@main.command(
    epilog=help_epilog(
        [
            "jobsctl serve",
            "JOBS_PUBLIC_URL=https://jobs.example.com jobsctl serve --host 0.0.0.0",
        ],
        f"{ENV_DB}, {ENV_PROVIDERS}, JOBS_PUBLIC_URL, JOBS_API_TOKEN, JOBS_FAL_JWKS_URL, "
        "JOBS_AMBIGUOUS_POLICY, JOBS_CACHE_DIR, JOBS_CACHE_FILES",
    )
)
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
    from ..config import Settings
    from ..serve import serve as run_server

    with errors():
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


FAKE_HELP = """Run the local fal-compatible queue emulator (no account, no network).

It prints the URL it listens on (with --port 0, a free port). Point jobs at it with
JOBS_FAL_QUEUE_URL=URL and any FAL_KEY.

\b
A submitted input may carry "_fake": {...} to shape its own request:
  duration     seconds it runs (default --duration)
  queue_time   seconds it waits in the queue first
  fail         an HTTP status (e.g. 422, 500, 504), or true for 500: it runs,
               then completes with that error (422 with a validation-error body)
  logs         number of log lines emitted over its running time
Control routes: GET /_fake/stats, POST /_fake/reset, GET|POST /_fake/config.
"""


@main.command(
    "fake-fal",
    help=FAKE_HELP,
    epilog=help_epilog(
        [
            "jobsctl fake-fal --port 0 --duration 2",
            'jobsctl submit fal-ai/flux/dev --input \'{"_fake": {"logs": 3}}\'',
        ],
        "none",
    ),
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--latency", type=float, default=0.0, show_default=True, help="Seconds per reply.")
@click.option("--duration", type=float, default=5.0, show_default=True, help="Seconds a job runs.")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
def fake_fal(host: str, port: int, latency: float, duration: float, fail_rate: float) -> None:
    from ..testing import FakeFalConfig, run_fake_fal

    def listening(url: str) -> None:
        say(f"fake fal queue on {url} (JOBS_FAL_QUEUE_URL={url})")

    with errors():
        config = FakeFalConfig(latency=latency, duration=duration, fail_rate=fail_rate)
        run_fake_fal(host, port, config, on_listening=listening)


FAKE_REPLICATE_HELP = """Run the local Replicate-compatible predictions API emulator.

It prints the URL it listens on (with --port 0, a free port). Point jobs at it with
JOBS_REPLICATE_API_URL=URL (the replicate package: REPLICATE_BASE_URL=URL) and any
REPLICATE_API_TOKEN; its webhook secret is served at GET /v1/webhooks/default/secret.

\b
A prediction's input may carry "_fake": {...} to shape it:
  duration     seconds it runs (default --duration)
  queue_time   seconds it stays "starting" first
  fail         true, or an error message: it runs, then fails
  logs         number of progress lines appended to its logs while it runs
  files        number of output files (PNG URLs served by the emulator)
  output       the output value on success (default {"echo": input})
Control routes: GET /_fake/stats, POST /_fake/reset, GET|POST /_fake/config.
"""


@main.command(
    "fake-replicate",
    help=FAKE_REPLICATE_HELP,
    epilog=help_epilog(
        [
            "jobsctl fake-replicate --port 0 --duration 2",
            "jobsctl fake-replicate --port 8766 --fail-rate 0.1",
        ],
        "none",
    ),
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8766, show_default=True)
@click.option("--latency", type=float, default=0.0, show_default=True, help="Seconds per reply.")
@click.option(
    "--duration", type=float, default=5.0, show_default=True, help="Seconds a prediction runs."
)
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
def fake_replicate(host: str, port: int, latency: float, duration: float, fail_rate: float) -> None:
    from ..testing import FakeReplicateConfig, run_fake_replicate

    def listening(url: str) -> None:
        say(f"fake replicate API on {url} (JOBS_REPLICATE_API_URL={url})")

    with errors():
        config = FakeReplicateConfig(latency=latency, duration=duration, fail_rate=fail_rate)
        run_fake_replicate(host, port, config, on_listening=listening)


@main.command(epilog=help_epilog(["jobsctl demo", "jobsctl demo --duration 2"], "none"))
@click.option("--duration", type=float, default=4.0, show_default=True, help="Seconds per job.")
def demo(duration: float) -> None:
    """Run a few jobs against the bundled fal emulator and show what it cost."""
    from ..demo import run_demo_in_tempdir

    run_demo_in_tempdir(duration)
