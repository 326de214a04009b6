"""Our app on a real socket, so the emulator can deliver webhooks to it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import uvicorn

from jobs.manager import AsyncJobManager
from jobs.providers.jwks import JwksCache
from jobs.web import create_app

from .jwks import use_keys

START_TIMEOUT = 10.0


@asynccontextmanager
async def live_app(
    make_manager: Callable[[str], AsyncJobManager], fal_url: str
) -> AsyncIterator[tuple[AsyncJobManager, str]]:
    """``make_manager(public_url)`` served on a free port, fetching fal's keys from the
    emulator's JWKS; yields the manager and its URL. The manager is closed at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    manager = make_manager(url)
    try:
        async with httpx.AsyncClient(trust_env=False) as keys_client:
            jwks = JwksCache(f"{fal_url}/.well-known/jwks.json", keys_client)
            app = create_app(use_keys(manager, jwks), settings=manager.settings)
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
            server = uvicorn.Server(config)
            task = asyncio.create_task(server.serve(sockets=[sock]))
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    while not server.started:
                        await asyncio.sleep(0.01)
                yield manager, url
            finally:
                server.should_exit = True
                await task
    finally:
        sock.close()
        await manager.aclose()
        manager.store.close()
