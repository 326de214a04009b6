"""fal_client 1.0's module API, durable: ``import jobs.compat.fal as fal_client``.

The same names, signatures and status classes as fal_client; underneath, every call is a
job recorded by ``jobs`` (``jobsctl list`` shows it), so an interrupted script loses nothing:
re-run it with the same ``idempotency_key`` and the job resumes instead of being paid twice.
Uploads go to fal's CDN once per content. See docs/from-fal-client.md for what differs.

Like fal_client's own ``__init__``, the module functions are the bound methods of one
:class:`SyncClient` and one :class:`AsyncClient`, made at import and connected on first use
(from the environment: ``FAL_KEY``, ``JOBS_DATABASE_URL``…).
"""

from __future__ import annotations

from ...uploads import encode, encode_file, encode_image
from . import auth
from .auth import MissingCredentialsError
from .client import (
    AsyncClient,
    AsyncRequestHandle,
    Completed,
    FalClientError,
    FalClientHTTPError,
    FalClientTimeoutError,
    InProgress,
    Queued,
    Status,
    SyncClient,
    SyncRequestHandle,
)

__all__ = [
    "AsyncClient",
    "AsyncRequestHandle",
    "Completed",
    "FalClientError",
    "FalClientHTTPError",
    "FalClientTimeoutError",
    "InProgress",
    "MissingCredentialsError",
    "Queued",
    "Status",
    "SyncClient",
    "SyncRequestHandle",
    "auth",
    "cancel",
    "cancel_async",
    "encode",
    "encode_file",
    "encode_image",
    "get_handle",
    "get_handle_async",
    "result",
    "result_async",
    "run",
    "run_async",
    "status",
    "status_async",
    "stream",
    "stream_async",
    "submit",
    "submit_async",
    "subscribe",
    "subscribe_async",
    "upload",
    "upload_async",
    "upload_file",
    "upload_file_async",
    "upload_image",
    "upload_image_async",
]

sync_client = SyncClient()
run = sync_client.run
subscribe = sync_client.subscribe
submit = sync_client.submit
status = sync_client.status
result = sync_client.result
cancel = sync_client.cancel
stream = sync_client.stream
get_handle = sync_client.get_handle
upload = sync_client.upload
upload_file = sync_client.upload_file
upload_image = sync_client.upload_image

async_client = AsyncClient()
run_async = async_client.run
subscribe_async = async_client.subscribe
submit_async = async_client.submit
status_async = async_client.status
result_async = async_client.result
cancel_async = async_client.cancel
stream_async = async_client.stream
get_handle_async = async_client.get_handle
upload_async = async_client.upload
upload_file_async = async_client.upload_file
upload_image_async = async_client.upload_image
