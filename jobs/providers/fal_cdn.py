"""fal's CDN upload protocol, as fal_client 1.0 speaks it (docs/protocol.md §12).

1. A token: ``POST {rest}/storage/auth/token?storage_type=fal-cdn-v3`` with the fal key
   answers ``token``, ``token_type``, ``base_url`` (the CDN) and ``expires_at``. One token
   serves every upload until it expires.
2. A single upload: ``POST {base_url}/files/upload`` with the bytes → ``access_url``.
3. A multipart upload: ``POST {base_url}/files/upload/multipart`` → ``access_url`` and
   ``uploadId``; ``PUT {access_url}/multipart/{uploadId}/{n}`` per part (its ``ETag`` is
   kept); ``POST {access_url}/multipart/{uploadId}/complete`` with every part's etag.

CDN requests carry ``Authorization: {token_type} {token}``, the content type, the file name
(``X-Fal-File-Name``) and, when a lifetime is asked, ``X-Fal-Object-Lifecycle-Preference``
(and ``X-Fal-Object-Lifecycle``, as fal_client sends both). Every call here is safe to
repeat (a repeated part replaces itself; a repeated single upload only leaves an unused
object), so 408/409/429/5xx and transport errors are retried; any other 4xx is the CDN
saying no (:class:`ProviderRejected`). A 401 from the CDN means the token died early: it is
refreshed once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from ..config import Secret
from ..errors import ConfigError, ProviderProtocolError, ProviderRejected, ProviderUnavailable
from .fal import error_from_response, loads
from .http import RETRY_STATUSES, RetryPolicy, parse_retry_after

TOKEN_MARGIN = 60.0  # seconds before its expiry a token is treated as expired
USER_AGENT = "jobs (fal-cdn)"


@dataclass(frozen=True)
class CdnToken:
    token: str
    token_type: str
    base_url: str
    expires_at: float

    @property
    def header(self) -> str:
        return f"{self.token_type} {self.token}"


@dataclass(frozen=True)
class MultipartRef:
    """An open multipart upload on the CDN."""

    access_url: str
    upload_id: str


def lifecycle_headers(lifetime_seconds: int | None) -> dict[str, str]:
    """The lifetime preference headers (none for 'never': the CDN's default applies)."""
    if lifetime_seconds is None:
        return {}
    value = json.dumps({"expiration_duration_seconds": lifetime_seconds})
    return {"X-Fal-Object-Lifecycle-Preference": value, "X-Fal-Object-Lifecycle": value}


def parse_token(body: Any) -> CdnToken:
    """The token reply, or ``ProviderProtocolError`` for one missing a field."""
    try:
        expires = datetime.fromisoformat(str(body["expires_at"]))
        if expires.tzinfo is None:
            raise ValueError("expires_at has no time zone")
        return CdnToken(
            token=str(body["token"]),
            token_type=str(body["token_type"]),
            base_url=str(body["base_url"]).rstrip("/"),
            expires_at=expires.timestamp(),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProviderProtocolError(f"fal's CDN token reply is not usable: {exc}") from None


Sleep = Callable[[float], Awaitable[None]]


class FalCdn:
    """fal's CDN over an injected ``httpx.AsyncClient``; the token is cached per instance."""

    def __init__(
        self,
        *,
        rest_url: str,
        key: Secret | None,
        client: httpx.AsyncClient,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.rest_url = rest_url.rstrip("/")
        self._key = key
        self._client = client
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._sleep = sleep
        self._token: CdnToken | None = None
        self._lock = asyncio.Lock()
        self.token_requests = 0

    def check(self) -> None:
        """``ConfigError`` when there is no key to ask for a token with."""
        if self._key is None:
            raise ConfigError("FAL_KEY is not set: export FAL_KEY=<your fal API key> and retry")

    async def token(self, *, refresh: bool = False) -> CdnToken:
        """The cached token, or a new one when it is (about to be) expired."""
        self.check()
        assert self._key is not None
        async with self._lock:
            token = self._token
            if refresh or token is None or token.expires_at - TOKEN_MARGIN <= self._clock():
                url = f"{self.rest_url}/storage/auth/token?storage_type=fal-cdn-v3"
                headers = {
                    "Authorization": f"Key {self._key.reveal()}",
                    "Accept": "application/json",
                }
                self.token_requests += 1
                response = await self._request("POST", url, headers=headers, json={})
                token = parse_token(_json(response, "token"))
                self._token = token
            return token

    async def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        what: str = "token",
        **kwargs: Any,
    ) -> httpx.Response:
        for attempt in range(1, self._retry.attempts + 1):
            last = attempt == self._retry.attempts
            try:
                response = await self._client.request(method, url, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise ProviderUnavailable(
                        f"fal's CDN could not be reached ({what}): {type(exc).__name__}: {exc}"
                    ) from None
                await self._sleep(self._retry.delay(attempt))
                continue
            code = response.status_code
            if 200 <= code < 300:
                return response
            if code not in RETRY_STATUSES:
                error = error_from_response(response)
                raise ProviderRejected(
                    f"fal's CDN refused the {what} (HTTP {code}): {error['message']}",
                    status_code=code,
                    body=error,
                )
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if last:
                raise ProviderUnavailable(
                    f"fal's CDN kept answering HTTP {code} to the {what} ({attempt} attempts)",
                    status_code=code,
                    retry_after=retry_after,
                )
            await self._sleep(self._retry.delay(attempt, retry_after))
        raise AssertionError("unreachable: the loop returns or raises")

    async def _cdn(
        self, method: str, url: str, what: str, headers: Mapping[str, str], **kwargs: Any
    ) -> httpx.Response:
        """A CDN call with the token; a 401 (a token that died early) refreshes it once."""
        token = await self.token()
        for refreshed in (False, True):
            sent = {"Authorization": token.header, "User-Agent": USER_AGENT, **headers}
            try:
                return await self._request(method, url, headers=sent, what=what, **kwargs)
            except ProviderRejected as exc:
                if exc.status_code != 401 or refreshed:
                    raise
                token = await self.token(refresh=True)
        raise AssertionError("unreachable: the loop returns or raises")

    @staticmethod
    def _file_headers(
        content_type: str, file_name: str | None, lifetime_seconds: int | None
    ) -> dict[str, str]:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if file_name:
            headers["X-Fal-File-Name"] = file_name
        headers.update(lifecycle_headers(lifetime_seconds))
        return headers

    async def upload(
        self,
        data: bytes,
        *,
        content_type: str,
        file_name: str | None,
        lifetime_seconds: int | None,
    ) -> str:
        """One request with the whole file; returns its URL."""
        token = await self.token()
        headers = self._file_headers(content_type, file_name, lifetime_seconds)
        response = await self._cdn(
            "POST", f"{token.base_url}/files/upload", "upload", headers, content=data
        )
        return _field(_json(response, "upload"), "access_url", "upload")

    async def initiate(
        self, *, content_type: str, file_name: str | None, lifetime_seconds: int | None
    ) -> MultipartRef:
        token = await self.token()
        headers = self._file_headers(content_type, file_name, lifetime_seconds)
        url = f"{token.base_url}/files/upload/multipart"
        body = _json(await self._cdn("POST", url, "multipart upload", headers), "multipart")
        return MultipartRef(
            access_url=_field(body, "access_url", "multipart upload"),
            upload_id=_field(body, "uploadId", "multipart upload"),
        )

    async def upload_part(
        self, ref: MultipartRef, number: int, data: bytes, *, content_type: str
    ) -> str:
        """Send part ``number`` (1-based); returns its etag."""
        url = f"{ref.access_url}/multipart/{ref.upload_id}/{number}"
        # identity: a compressed reply may come without the ETag header
        headers = {"Content-Type": content_type, "Accept-Encoding": "identity"}
        response = await self._cdn("PUT", url, f"part {number}", headers, content=data)
        etag = response.headers.get("etag")
        if not etag:
            raise ProviderProtocolError(f"fal's CDN answered part {number} without an ETag")
        return str(etag)

    async def complete(self, ref: MultipartRef, etags: Mapping[int, str]) -> str:
        url = f"{ref.access_url}/multipart/{ref.upload_id}/complete"
        parts: Sequence[dict[str, Any]] = [
            {"partNumber": n, "etag": etags[n]} for n in sorted(etags)
        ]
        await self._cdn("POST", url, "multipart completion", {}, json={"parts": parts})
        return ref.access_url

    async def close(self) -> None:
        await self._client.aclose()


def _json(response: httpx.Response, what: str) -> Any:
    try:
        return loads(response.content)
    except ValueError:
        raise ProviderProtocolError(
            f"fal's CDN answered the {what} with a body that is not JSON",
            status_code=response.status_code,
        ) from None


def _field(body: Any, name: str, what: str) -> str:
    value = body.get(name) if isinstance(body, Mapping) else None
    if not isinstance(value, str) or not value:
        raise ProviderProtocolError(f"fal's CDN reply to the {what} has no {name}")
    return str(value)
