"""Read-only routes scripts and pages use next to ``/v1/jobs``: a job's events and logs, and
batches with their progress. Each handler calls one manager read method and shapes JSON."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..manager import AsyncJobManager
from .api import job_ref
from .params import flag_param, int_param

DEFAULT_BATCHES = 100
MAX_BATCHES = 1000


class JobReads:
    def __init__(self, manager: AsyncJobManager) -> None:
        self.manager = manager

    def routes(self) -> list[Route]:
        return [
            Route("/v1/jobs/{id}/events", self.events, methods=["GET"]),
            Route("/v1/jobs/{id}/logs", self.logs, methods=["GET"]),
            Route("/v1/batches", self.batches, methods=["GET"]),
            # {name:path}: batch names default to input file names, which may hold a slash.
            Route("/v1/batches/{name:path}", self.batch, methods=["GET"]),
        ]

    async def events(self, request: Request) -> Response:
        job = await self.manager.status(job_ref(request))
        return JSONResponse({"id": job.id, "events": await self.manager.events(job.id)})

    async def logs(self, request: Request) -> Response:
        job = await self.manager.status(job_ref(request))
        lines = await self.manager.logs(job.id)
        return JSONResponse({"id": job.id, "logs": [entry for _, entry in lines]})

    async def batches(self, request: Request) -> Response:
        query = request.query_params
        found = await self.manager.batches(
            active_only=flag_param(query.get("active"), "active"),
            limit=int_param(
                query.get("limit"), "limit", default=DEFAULT_BATCHES, maximum=MAX_BATCHES
            ),
        )
        now = time.time()
        return JSONResponse({"batches": [batch.to_dict(now) for batch in found]})

    async def batch(self, request: Request) -> Response:
        found = await self.manager.batch(request.path_params["name"])
        return JSONResponse(found.to_dict(time.time()))
