"""``POST /v1/jobs/{id}/retry``: a new attempt for a failed or cancelled job.

The new job is linked to the old one and sent at once; asking again for the same job returns
the same retry (see :meth:`jobs.manager.AsyncJobManager.retry`), so a client may repeat the
request after a lost answer without paying twice."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..manager import AsyncJobManager
from .api import job_ref


class Retries:
    def __init__(self, manager: AsyncJobManager) -> None:
        self.manager = manager

    def routes(self) -> list[Route]:
        return [Route("/v1/jobs/{id}/retry", self.retry, methods=["POST"])]

    async def retry(self, request: Request) -> Response:
        job = await self.manager.retry(job_ref(request))
        return JSONResponse(job.to_dict(), status_code=202)
