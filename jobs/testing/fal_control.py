"""The emulator's own endpoints: JWKS, stats, config, debug views and output files.

These sit beside the fal protocol so that a test or benchmark in *another process* (the
CLI, ``jobs serve``, a load generator) can read exactly what reached the "remote" side and
change its behaviour mid-run without restarting it. None of them needs the fal key, and
none is subject to fault injection or added latency.

    GET  /.well-known/jwks.json        {"keys": [<the Ed25519 signing key>]}
    GET  /_fake/stats[?per_request=0]  FakeFalStats as JSON (per-request counters optional)
    POST /_fake/reset                  zero the stats (requests in flight are kept)
    GET  /_fake/config                 current FakeFalConfig (the key shown as "***")
    POST /_fake/config                 JSON object of fields to change; 400 on a bad one
    GET  /_fake/requests/{id}          debug view of one request (priority, hint, headers…)
    GET  /_fake/files/{id}/{n}.png     ``expected_file_bytes(id, n, size)`` as image/png
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from jobs.testing import _asgi
from jobs.testing._asgi import Receive, Scope, Send, send_bytes, send_json
from jobs.testing.fal_model import expected_file_bytes

if TYPE_CHECKING:
    from jobs.testing.fal_emulator import FakeFal


async def handle_control(fake: FakeFal, scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    method: str = scope["method"]
    if path == "/.well-known/jwks.json" and method == "GET":
        await send_json(send, 200, fake.jwks(), [("cache-control", "max-age=300")])
    elif path == "/_fake/stats" and method == "GET":
        query = parse_qs(scope["query_string"].decode("latin-1"))
        per_request = query.get("per_request", ["1"])[-1].lower() not in ("0", "false", "no")
        await send_json(send, 200, fake.stats.to_json(per_request))
    elif path == "/_fake/reset" and method == "POST":
        await _asgi.read_body(receive)
        fake.stats.reset()
        await send_json(send, 200, {"ok": True})
    elif path == "/_fake/config" and method == "GET":
        await send_json(send, 200, fake.config.to_json())
    elif path == "/_fake/config" and method == "POST":
        await _update_config(fake, receive, send)
    elif path.startswith("/_fake/requests/") and method == "GET":
        request = fake.get_request(path.removeprefix("/_fake/requests/"))
        if request is None:
            await send_json(send, 404, {"detail": "Request not found"})
        else:
            await send_json(send, 200, fake.describe(request))
    elif path.startswith("/_fake/files/") and method == "GET":
        await _file(fake, path, send)
    else:
        await send_json(send, 404, {"detail": "Not Found"})


async def _update_config(fake: FakeFal, receive: Receive, send: Send) -> None:
    raw = await _asgi.read_body(receive)
    try:
        changes = json.loads(raw or b"{}")
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object of config fields")
        fake.update_config(changes)
    except ValueError as exc:
        await send_json(send, 400, {"detail": str(exc)})
        return
    await send_json(send, 200, fake.config.to_json())


async def _file(fake: FakeFal, path: str, send: Send) -> None:
    """Serve an output image: any request id works (media outlive the queue's retention)."""
    parts = path.removeprefix("/_fake/files/").split("/")
    index_text = parts[1].removesuffix(".png") if len(parts) == 2 else ""
    if not parts[0] or not index_text.isdigit() or not parts[1].endswith(".png"):
        await send_json(send, 404, {"detail": "Not Found"})
        return
    rid, index = parts[0], int(index_text)
    request = fake.get_request(rid)
    if request is not None and index >= request.image_count():
        await send_json(send, 404, {"detail": "Not Found"})
        return
    size = request.file_size if request is not None else fake.config.file_size
    fake.stats.file_downloads += 1
    await send_bytes(send, 200, expected_file_bytes(rid, index, size), b"image/png")
