"""The emulator's direct host (fal's ``fal.run``): the ``/stream`` endpoint.

fal serves streaming apps on a host of its own; the emulator serves it under the prefix
``/_run`` (so ``JOBS_FAL_RUN_URL`` is ``{server.url}/_run``), because on the queue host a
``POST /{app}/stream`` is an ordinary submit to the sub-path ``stream``::

    POST /_run/{endpoint id}/stream     text/event-stream: one ``data:`` JSON event each

The input's ``_fake`` object may set ``events`` (how many, default 3), ``duration`` (spread
over them) and ``fail`` (an HTTP status answered instead of a stream, with fal's error body).
Every event but the last is ``{"partial": true, "step": i, "of": n}``; the last is the final
output, ``{"partial": false, "step": n, "of": n, "prompt": …}``. Needs the key like the queue.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jobs.testing import _asgi
from jobs.testing._asgi import Receive, Scope, Send, send_json
from jobs.testing.fal_model import FakeFalConfig, FakeFalStats, error_body, error_kind

PREFIX = "/_run/"
DEFAULT_EVENTS = 3


def stream_events(value: Any) -> tuple[list[dict[str, Any]], float, int | None]:
    """The events an input streams, the pause between them, and the failure status."""
    fake = value.get("_fake") if isinstance(value, dict) else None
    fake = fake if isinstance(fake, dict) else {}
    count = int(fake.get("events", DEFAULT_EVENTS))
    if count < 1:
        raise ValueError("_fake.events must be at least 1")
    duration = float(fake.get("duration", 0.0))
    fail = fake.get("fail")
    status = None if fail in (None, False) else (500 if fail is True else int(fail))
    prompt = value.get("prompt") if isinstance(value, dict) else None
    events: list[dict[str, Any]] = [
        {"partial": True, "step": i, "of": count} for i in range(1, count)
    ]
    events.append({"partial": False, "step": count, "of": count, "prompt": prompt})
    return events, duration / count, status


async def handle_run(
    scope: Scope, receive: Receive, send: Send, config: FakeFalConfig, stats: FakeFalStats
) -> None:
    path: str = scope["path"]
    headers = _asgi.header_map(scope)
    raw = await _asgi.read_body(receive)
    if scope["method"] != "POST" or not path.endswith("/stream"):
        await send_json(send, 404, {"detail": "Not Found"})
        return
    if config.key is not None and headers.get("authorization") != f"Key {config.key}":
        await send_json(send, 401, {"detail": "Invalid or missing credentials"})
        return
    try:
        value = json.loads(raw) if raw.strip() else {}
        events, pause, fail = stream_events(value)
    except (ValueError, TypeError) as exc:
        await send_json(send, 422, {"detail": str(exc)})
        return
    stats.stream_runs += 1
    if fail is not None:
        extra = [("x-fal-error-type", error_kind(fail)[0])]
        await send_json(send, fail, error_body(fail), extra)
        return
    start = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": start})
    for event in events:
        if pause > 0:
            await asyncio.sleep(pause)
        chunk = b"data: " + _asgi.dumps(event) + b"\n\n"
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
