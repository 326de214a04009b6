"""Endpoints for whoever operates the service: ``/healthz`` and ``/metrics``.

``/healthz`` answers 503 when the database does not answer, and also when it answers but
its writes fail (the store remembers the last failed write until one succeeds): then no
job can move, whatever a read says. Both stay open when an API token is set: load
balancers and Prometheus rarely carry credentials, and neither answer holds job data.
``jobs_by_state`` is counted in the database at scrape time (off the event loop), so
every replica reports the same truth; the counters come from the process-wide
:data:`jobs.metrics.REGISTRY`.
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..manager import AsyncJobManager
from ..metrics import REGISTRY, StateCollector

log = logging.getLogger(__name__)


class Ops:
    def __init__(self, manager: AsyncJobManager) -> None:
        self.manager = manager

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    async def healthz(self, request: Request) -> Response:
        try:
            await self.manager.ping()
        except Exception as exc:  # any failure means "not healthy"; the reason goes to the log
            log.warning("health check: the database does not answer: %r", exc)
            return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503)
        failure = self.manager.store.write_failure
        if failure is not None:
            # Reads work but writes fail (a full disk, a value a column refuses on every poll
            # tick): nothing can progress, so a load balancer should know.
            body = {"status": "unavailable", "database": "writes_failing", "error": failure}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "database": "up"})

    async def metrics(self, request: Request) -> Response:
        counts = await self.manager.count_by_state()
        by_state = CollectorRegistry(auto_describe=True)
        by_state.register(StateCollector(lambda: {s.value: n for s, n in counts.items()}))
        text = generate_latest(REGISTRY) + generate_latest(by_state)
        return Response(text, media_type=CONTENT_TYPE_LATEST)
