"""``GET /v1/jobs/{id}/files/{n}``: a file of a job's result, served from the local cache.

The provider's own URL may have expired (fal's media have a lifetime of their own), so the
copy that ``--download`` / ``JOBS_CACHE_FILES=1`` made is what this serves. ``n`` is the
file's place in the result (``job_files.n``; ``jobs result`` and ``jobs export`` list it).
Nothing is downloaded here: a request must not hang on a slow file host, so a file not in
the cache gets an error that says why (still pending, or what the download ran into).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from ..config import decimal
from ..manager import AsyncJobManager
from ..results import FAILED, safe_name
from .api import job_ref
from .errors import error_response


class JobFiles:
    def __init__(self, manager: AsyncJobManager) -> None:
        self.manager = manager

    def routes(self) -> list[Route]:
        return [Route("/v1/jobs/{id}/files/{n}", self.file, methods=["GET"])]

    async def file(self, request: Request) -> Response:
        job = await self.manager.status(job_ref(request))
        raw: str = request.path_params["n"]
        n = decimal(raw)
        cache = self.manager.files
        entry = next((f for f in await cache.entries(job.id) if f.n == n), None)
        if entry is None:
            return error_response(
                404,
                "not_found",
                f"job {job.id} has no file {raw[:40]} in the cache (submit with --download, or set "
                "JOBS_CACHE_FILES=1, to keep a result's files)",
            )
        path = cache.cached(entry)
        if path is not None:
            return FileResponse(
                path,
                media_type=entry.content_type or "application/octet-stream",
                filename=safe_name(entry),
                content_disposition_type="inline",
            )
        if entry.state == FAILED:
            message = f"file {n} of job {job.id} could not be downloaded: {entry.error}"
            return error_response(404, "file_unavailable", message, url=entry.url)
        return error_response(
            409, "not_ready", f"file {n} of job {job.id} is not downloaded yet", url=entry.url
        )
