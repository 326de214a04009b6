"""fal's streaming endpoint (docs/protocol.md §13).

``POST {run host}/{endpoint id}{path}`` (``path`` defaults to ``/stream``) with the input as
JSON is answered with server-sent events, each ``data:`` a JSON object; the last is the final
output. Unlike the queue, nothing is kept at fal: a stream that breaks cannot be resumed or
fetched again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from ..config import Secret
from ..errors import ConfigError, ProviderProtocolError, ProviderRejected, ProviderUnavailable
from .fal import AppId, error_from_response, loads


def stream_url(run_url: str, application: str, path: str) -> str:
    AppId.parse(application)  # refuse a malformed id before anything is sent
    url = f"{run_url.rstrip('/')}/{application.strip('/')}"
    return url + ("/" + path.lstrip("/") if path else "")


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines);
    comments (``: ping``) and other fields are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class FalStream:
    """Streams from fal's direct host over an injected ``httpx.AsyncClient``."""

    def __init__(self, *, run_url: str, key: Secret | None, client: httpx.AsyncClient) -> None:
        self.run_url = run_url.rstrip("/")
        self._key = key
        self._client = client

    def check(self, application: str, arguments: Mapping[str, Any], path: str) -> str:
        """The URL to stream from; ``ConfigError`` for what cannot be sent."""
        if self._key is None:
            raise ConfigError("FAL_KEY is not set: export FAL_KEY=<your fal API key> and retry")
        try:
            json.dumps(arguments, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the arguments cannot be sent as JSON: {exc}") from None
        return stream_url(self.run_url, application, path)

    async def events(
        self,
        application: str,
        arguments: Mapping[str, Any],
        *,
        path: str = "/stream",
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Each event as a JSON object. Not retried: a stream may have run (and cost) already."""
        url = self.check(application, arguments, path)
        assert self._key is not None
        headers = {"Authorization": f"Key {self._key.reveal()}", "Accept": "text/event-stream"}
        try:
            async with self._client.stream(
                "POST", url, json=dict(arguments), headers=headers, timeout=timeout
            ) as response:
                if response.status_code >= 300:
                    await response.aread()
                    raise _refused(response)
                async for data in sse_data(response.aiter_lines()):
                    try:
                        event = loads(data)
                    except ValueError:
                        raise ProviderProtocolError(
                            "fal streamed an event that is not JSON"
                        ) from None
                    if not isinstance(event, dict):
                        raise ProviderProtocolError("fal streamed an event that is not an object")
                    yield event
        except httpx.TransportError as exc:
            raise ProviderUnavailable(
                f"the stream from fal broke: {type(exc).__name__}: {exc}"
            ) from None

    async def close(self) -> None:
        await self._client.aclose()


def _refused(response: httpx.Response) -> ProviderRejected | ProviderUnavailable:
    error = error_from_response(response)
    code = response.status_code
    message = f"fal refused the stream (HTTP {code}): {error['message']}"
    if code >= 500 or code in (408, 429):
        return ProviderUnavailable(message, status_code=code, body=error)
    return ProviderRejected(message, status_code=code, body=error)
