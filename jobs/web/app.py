"""Assembling the Starlette app: routes from each concept's module, middleware, errors,
and a lifespan that runs the hooks it is given (``jobs serve`` passes the poll scheduler)
without starting anything of its own.

The manager is passed in, not created here, so the same app serves a test's manager on a
temporary database and ``jobs serve``'s real one; whoever created the manager closes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware

from ..config import Secret, Settings
from ..manager import AsyncJobManager
from ..metrics import WEBHOOKS
from ..providers.jwks import JwksCache
from .api import SUBMIT_PATH, JobsApi
from .dashboard import Dashboard
from .errors import exception_handlers
from .files import JobFiles
from .middleware import BearerAuth, BodySizeLimit, HostCheck, RedactSecrets, RequestId, ServedHosts
from .openapi import OpenApi
from .ops import Ops
from .webhooks import FAL_PATH, FalWebhooks

DEFAULT_BODY_LIMIT = 2 * 1024 * 1024
JWKS_TIMEOUT = httpx.Timeout(10.0)

LifespanHook = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


def protected(path: str) -> bool:
    """The paths that need the API token when one is set: the job API and the dashboard.
    Webhooks (signed), health, metrics and the OpenAPI document stay open."""
    return path == "/" or path == "/v1/jobs" or path.startswith("/v1/jobs/")


def served_hosts(settings: Settings, bind_host: str | None = None) -> ServedHosts:
    """The host names the job API and dashboard answer to (:class:`ServedHosts`)."""
    names = [*settings.allowed_hosts, *(n for n in (settings.public_url, bind_host) if n)]
    return ServedHosts(names)


def _count_too_large(path: str) -> None:
    if path == FAL_PATH:
        WEBHOOKS.labels("fal", "too_large").inc()


def create_app(
    manager: AsyncJobManager,
    *,
    settings: Settings,
    lifespan_hooks: Sequence[LifespanHook] = (),
    body_limit: int = DEFAULT_BODY_LIMIT,
    jwks: JwksCache | None = None,
    bind_host: str | None = None,
) -> Starlette:
    """The HTTP API, webhook receiver, metrics and dashboard around ``manager``.

    ``lifespan_hooks`` are ``(startup, shutdown)`` pairs: started in order when the app
    starts, the started ones shut down in reverse order when it stops. Without ``jwks`` the
    app fetches fal's keys from ``settings.fal_jwks_url`` with a client of its own, closed
    at shutdown. The job API and dashboard answer to ``localhost``, the loopback and other
    IP addresses, ``bind_host``, ``JOBS_PUBLIC_URL``'s host and ``JOBS_ALLOWED_HOSTS``.
    """
    own_client: httpx.AsyncClient | None = None
    if jwks is None:
        own_client = httpx.AsyncClient(timeout=JWKS_TIMEOUT)
        jwks = JwksCache(settings.fal_jwks_url, own_client)

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
            await jwks.aclose()
            if own_client is not None:
                await own_client.aclose()

    secrets: list[Secret] = [s for s in (settings.fal_key, settings.api_token) if s is not None]
    middleware = [
        Middleware(RequestId),
        Middleware(RedactSecrets, secrets=secrets),
        Middleware(
            BodySizeLimit,
            limit=body_limit,
            paths={FAL_PATH, SUBMIT_PATH},
            on_reject=_count_too_large,
        ),
        Middleware(HostCheck, hosts=served_hosts(settings, bind_host), guarded=protected),
    ]
    if settings.api_token is not None:
        middleware.append(Middleware(BearerAuth, token=settings.api_token, protected=protected))
    routes = [
        *JobsApi(manager, public_url=settings.public_url).routes(),
        *FalWebhooks(manager, jwks).routes(),
        *Ops(manager).routes(),
        *JobFiles(manager).routes(),
        *Dashboard(manager).routes(),
        *OpenApi(settings.public_url).routes(),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
