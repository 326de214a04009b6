"""Bare ASGI helpers for the emulator: JSON replies, body reading, dropping a connection.

The emulator is a plain ASGI callable rather than a Starlette app for two reasons: it must
answer thousands of polls a second from one benchmark client (no routing table, middleware
stack or Request objects on the hot path), and it must be able to *drop* a connection
without any response, which needs the server's transport; no framework exposes that.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Iterable[tuple[str, str]]

JSON = b"application/json"


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def header_map(scope: Scope) -> dict[str, str]:
    """Request headers, names lower-cased (ASGI servers already lower-case them)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class Disconnected(Exception):
    """The client went away before its request body ended: there is no request to serve."""


async def read_body(receive: Receive) -> bytes:
    """The whole request body; :class:`Disconnected` when the client left before its end
    (a body cut off mid-way must not be read as a shorter, or empty, request)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise Disconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    headers: Headers = (),
) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, value: Any, headers: Headers = ()) -> None:
    await send_bytes(send, status, dumps(value), JSON, headers)


async def drop_connection(receive: Receive, send: Send) -> None:
    """Close the client's connection without a response.

    uvicorn hands every request a ``receive`` bound to its request cycle, which holds the
    transport; closing it makes the client read EOF before any status line, which httpx
    reports as ``RemoteProtocolError``. We then wait for the server to notice the
    disconnect, so it does not log "returned without starting response". Under another
    server (no transport found) we start a response and abandon it half-way, which a
    client also sees as a protocol error.
    """
    cycle = getattr(receive, "__self__", None)
    transport: Any = getattr(cycle, "transport", None)
    if callable(getattr(transport, "close", None)) and hasattr(transport, "is_closing"):
        transport.close()
        try:
            async with asyncio.timeout(2.0):
                while (await receive())["type"] != "http.disconnect":
                    pass
        except TimeoutError:
            pass
        return
    raw = [(b"content-type", JSON), (b"content-length", b"1000")]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise ConnectionAbortedError("fake-fal dropped the connection")


async def run_lifespan(
    receive: Receive,
    send: Send,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
) -> None:
    """Answer an ASGI lifespan: ``start`` on startup (a failure is reported, not raised),
    ``stop`` on shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await start()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await stop()
            await send({"type": "lifespan.shutdown.complete"})
            return
