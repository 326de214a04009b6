"""The webhook-ingest baseline: a bare Starlette endpoint doing one raw ``sqlite3`` insert per
request, committed per request, on one shared connection used from the threadpool (WAL,
``synchronous=NORMAL``): the fastest simple durable receiver measured on this machine
(design.md part 3). It verifies nothing and parses nothing, so it is the ceiling of the
server stack plus one durable write; ``jobs serve`` does strictly more per callback.

Run by :mod:`bench.webhook_ingest` as ``uvicorn bench.ingest_baseline:app`` (the same
server stack as ``jobs serve``: uvicorn with uvloop and httptools, access log off), with the
database file in ``BENCH_BASELINE_DB``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_db = sqlite3.connect(os.environ.get("BENCH_BASELINE_DB", ":memory:"), check_same_thread=False)
_db.execute("PRAGMA journal_mode=WAL")
_db.execute("PRAGMA synchronous=NORMAL")
_db.execute(
    "CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY, request_id TEXT, "
    "body BLOB, at REAL)"
)
_db.commit()
_lock = threading.Lock()  # one writer: the shared connection is one transaction at a time


def _insert(request_id: str | None, body: bytes) -> None:
    with _lock:
        _db.execute(
            "INSERT INTO deliveries (request_id, body, at) VALUES (?, ?, ?)",
            (request_id, body, time.time()),
        )
        _db.commit()


async def receive(request: Request) -> JSONResponse:
    body = await request.body()
    await run_in_threadpool(_insert, request.headers.get("x-fal-webhook-request-id"), body)
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/v1/webhooks/fal", receive, methods=["POST"])])
