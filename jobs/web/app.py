"""Assembling the Starlette app: routes from each concept's module, middleware, errors,
and a lifespan that runs the hooks it is given (``jobs serve`` passes the poll scheduler)
without starting anything of its own.

The manager is passed in, not created here, so the same app serves a test's manager on a
temporary database and ``jobs serve``'s real one; whoever created the manager closes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from ..config import Settings
from ..manager import AsyncJobManager
from ..metrics import WEBHOOKS
from .api import SUBMIT_PATH, JobsApi
from .errors import exception_handlers
from .files import JobFiles
from .middleware import BearerAuth, BodySizeLimit, HostCheck, RedactSecrets, RequestId, ServedHosts
from .openapi import OpenApi
from .ops import Ops
from .pages import Pages
from .reads import JobReads
from .retries import Retries
from .session import SessionAuth
from .webhooks import WEBHOOK_PATHS, Webhooks

DEFAULT_BODY_LIMIT = 2 * 1024 * 1024

LifespanHook = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


def protected(path: str) -> bool:
    """The API paths that need the bearer token when one is set. Webhooks (signed), health,
    metrics and the OpenAPI document stay open; the dashboard has :func:`dashboard_page`."""
    return path in ("/v1/jobs", "/v1/batches") or path.startswith(("/v1/jobs/", "/v1/batches/"))


def dashboard_page(path: str) -> bool:
    """The dashboard paths that need a login (a session cookie) when a token is set; the
    login form, its styles and scripts, and the API reference (like /openapi.json) stay open."""
    return path in ("/", "/jobs", "/export.jsonl") or path.startswith(("/jobs/", "/batches/"))


def host_checked(path: str) -> bool:
    """The paths whose Host (and, for a change, Origin) :class:`HostCheck` checks: the job
    API and every dashboard page and form."""
    return protected(path) or dashboard_page(path) or path in ("/login", "/logout")


def served_hosts(settings: Settings, bind_host: str | None = None) -> ServedHosts:
    """The host names the job API and dashboard answer to (:class:`ServedHosts`)."""
    names = [*settings.allowed_hosts, *(n for n in (settings.public_url, bind_host) if n)]
    return ServedHosts(names)


def _count_too_large(path: str) -> None:
    if path in WEBHOOK_PATHS:
        WEBHOOKS.labels(WEBHOOK_PATHS[path], "too_large").inc()


def create_app(
    manager: AsyncJobManager,
    *,
    settings: Settings,
    lifespan_hooks: Sequence[LifespanHook] = (),
    body_limit: int = DEFAULT_BODY_LIMIT,
    bind_host: str | None = None,
) -> Starlette:
    """The HTTP API, webhook receiver, metrics and dashboard around ``manager``.

    ``lifespan_hooks`` are ``(startup, shutdown)`` pairs: started in order when the app
    starts, the started ones shut down in reverse order when it stops. The job API and
    dashboard answer to ``localhost``, the loopback and other IP addresses, ``bind_host``,
    ``JOBS_PUBLIC_URL``'s host and ``JOBS_ALLOWED_HOSTS``.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        shutdowns: list[Callable[[], Awaitable[None]]] = []
        try:
            for startup, shutdown in lifespan_hooks:
                await startup()
                shutdowns.append(shutdown)
            yield
        finally:
            for shutdown in reversed(shutdowns):
                await shutdown()

    middleware = [
        Middleware(RequestId),
        Middleware(RedactSecrets, secrets=settings.secrets),
        Middleware(
            BodySizeLimit,
            limit=body_limit,
            paths={*WEBHOOK_PATHS, SUBMIT_PATH},
            on_reject=_count_too_large,
        ),
        Middleware(HostCheck, hosts=served_hosts(settings, bind_host), guarded=host_checked),
    ]
    if settings.api_token is not None:
        middleware.append(Middleware(BearerAuth, token=settings.api_token, protected=protected))
        middleware.append(Middleware(SessionAuth, token=settings.api_token, pages=dashboard_page))
    routes = [
        *JobsApi(manager, public_url=settings.public_url).routes(),
        *JobReads(manager).routes(),
        *Retries(manager).routes(),
        *Webhooks(manager).routes(),
        *Ops(manager).routes(),
        *JobFiles(manager).routes(),
        *Pages(manager, token=settings.api_token, public_url=settings.public_url).routes(),
        *OpenApi(settings.public_url).routes(),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
