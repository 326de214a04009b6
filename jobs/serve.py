"""``jobs serve``: the HTTP API, the webhook receiver and the poll scheduler in one process.

Why it is put together this way:

- Migrations run first, so a fresh database (or a replica started beside older ones) is at
  the schema this code expects before anything reads it; concurrent upgrades are safe
  (:mod:`jobs.migrate` takes a lock).
- One :class:`AsyncJobManager` serves both the web app and the poller: one provider instance,
  hence one HTTP pool and one ``RateGate`` for every request to fal, whoever makes it.
- The poller starts and stops inside the web app's lifespan, and uvicorn owns SIGTERM and
  SIGINT: on a signal it stops accepting connections, lets open requests finish (bounded by
  ``stop_timeout``), then the lifespan stops the poller (in-flight polls finish, bounded by
  ``stop_timeout`` again), releases its leases and closes the HTTP clients. The process then
  exits 0.
- Uvicorn's own logging set-up is disabled (``log_config=None``) so that its lines go through
  :mod:`jobs.logs` like ours (same format, same redaction). The access log is off by default:
  it was measured at about 30 % of the server's throughput (docs/internals.md §6).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import signal
from types import FrameType
from typing import TypedDict

import uvicorn

from .config import Settings
from .errors import ConfigError
from .logs import LogFormat, configure
from .manager import AsyncJobManager
from .migrate import current, upgrade
from .poller import AmbiguousPolicy, Poller
from .providers import configured
from .store import Store
from .web import create_app

log = logging.getLogger(__name__)


class PollerOptions(TypedDict, total=False):
    """The :class:`~jobs.poller.Poller` knobs ``jobs serve`` exposes as flags, one to one."""

    tick: float
    batch: int
    concurrency: int
    lease: float
    ambiguous_grace: float
    ambiguous_period: float
    ambiguous_policy: AmbiguousPolicy
    stop_timeout: float


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    poller_options: PollerOptions | None = None,
    log_format: LogFormat = "text",
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Migrate, then serve until SIGTERM/SIGINT; returns once everything is shut down.
    Refuses to start (``ConfigError``) without credentials for any provider: every poll
    and submit needs them."""
    if not configured(settings):
        raise ConfigError(
            "no provider credentials are set: jobsctl serve polls and submits and needs "
            "FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET) for fal, REPLICATE_API_TOKEN for "
            "Replicate, or both"
        )
    configure(settings, log_format=log_format, level=log_level)
    if settings.api_token is None and not is_loopback(host):
        log.warning(
            "serving on %s without JOBS_API_TOKEN: anyone who can reach this address can "
            "submit, read and cancel jobs; set JOBS_API_TOKEN (docs/security.md)",
            host,
        )
    store = Store.open(settings.database_url, synchronous=settings.sqlite_synchronous)
    try:
        upgrade(store.engine)
        log.info("database at revision %s", current(store.engine))
        manager = AsyncJobManager(settings, store=store)
        poller = Poller(manager, **(poller_options or {}))

        async def start() -> None:
            poller.start()

        async def stop() -> None:
            try:
                await poller.stop()
            finally:
                await manager.aclose()

        app = create_app(manager, settings=settings, lifespan_hooks=[(start, stop)], bind_host=host)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="on",
            log_config=None,
            log_level=log_level.lower(),
            access_log=access_log,
            timeout_graceful_shutdown=math.ceil(poller.stop_timeout),
            server_header=False,
        )
        server = uvicorn.Server(config)
        _exit_quietly_on_signals(server)
        log.info(
            "serving on http://%s:%d (webhooks %s)",
            host,
            port,
            f"to {settings.public_url}" if settings.public_url else "off: JOBS_PUBLIC_URL unset",
        )
        server.run()
    finally:
        store.close()


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def _exit_quietly_on_signals(server: uvicorn.Server) -> None:
    """The handlers in place outside uvicorn's own: a signal that arrives just before
    uvicorn installs its handlers still stops it, and the signal uvicorn re-raises after its
    graceful shutdown ends the process with exit code 0 instead of killing it."""

    def handle(sig: int, frame: FrameType | None) -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


__all__ = ["PollerOptions", "serve"]
