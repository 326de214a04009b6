"""The fal emulator, plus a log of when each request was polled, fetched or cancelled.

``FakeFalStats`` counts per request; the reliability tests also need *when*: to tell two
replicas polling one job in the same round (two polls milliseconds apart) from the backoff's
spaced polls, and a result fetched twice because a kill struck between the fetch and its
commit from one fetched twice for no reason.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from jobs.testing import FakeFal, FakeFalConfig, FakeFalServer
from jobs.testing._asgi import Receive, Scope, Send
from jobs.testing.fal_model import parse_request_path


class RecordingFakeFal(FakeFal):
    """Records ``(wall time, action, request id)`` as each request arrives; action is one of
    ``status``, ``result``, ``cancel``, ``stream``."""

    def __init__(self, config: FakeFalConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.calls: list[tuple[float, str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            stripped = scope["path"].strip("/")
            route = parse_request_path(stripped.split("/") if stripped else [])
            if route is not None:
                self.calls.append((time.time(), route[2], route[1]))
        await super().__call__(scope, receive, send)

    def times(self, action: str) -> dict[str, list[float]]:
        """Arrival times of ``action`` per request id, in order."""
        found: dict[str, list[float]] = defaultdict(list)
        for at, kind, request_id in list(self.calls):
            if kind == action:
                found[request_id].append(at)
        return dict(found)


def recording_server(config: FakeFalConfig) -> tuple[FakeFalServer, RecordingFakeFal]:
    """A :class:`FakeFalServer` (not started) serving a :class:`RecordingFakeFal`."""
    server = FakeFalServer(config)
    fake = RecordingFakeFal(config)
    server.fake = fake  # start() serves whatever `fake` is
    return server, fake
