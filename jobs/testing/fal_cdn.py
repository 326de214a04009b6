"""The emulator's REST token endpoint and CDN: uploads as fal_client 1.0 sends them.

fal keeps these on other hosts (``rest.fal.ai`` for the token, the token's ``base_url`` for
the CDN); the emulator serves them on its own socket under paths the queue API never uses
(``/storage/…`` and ``/files/…``), so one server stands in for every host::

    POST /storage/auth/token?storage_type=fal-cdn-v3   Key auth -> token, base_url, expires_at
    POST /files/upload                                  raw bytes -> {"access_url"}
    POST /files/upload/multipart                        -> {"access_url", "uploadId"}
    PUT  /files/{id}/{name}/multipart/{uploadId}/{n}    one part -> ETag header
    POST /files/{id}/{name}/multipart/{uploadId}/complete  {"parts": [...]} -> {"access_url"}
    GET  /files/{id}/{name}                             the uploaded bytes

CDN calls need ``Authorization: Bearer <token>`` with an unexpired token (401 otherwise).
``X-Fal-File-Name`` names the file, ``X-Fal-Object-Lifecycle-Preference`` (JSON) is kept
with it (see :meth:`FakeCdn.file`). Multipart state outlives the client that started it, so a
killed upload can be finished by another process with the same ``uploadId``. Counters in
:class:`jobs.testing.FakeFalStats` (``cdn_*``, ``cdn_parts`` per upload and part) prove what
was sent. ``config.cdn_refuse_status`` makes every upload answer that status;
``config.cdn_part_delay`` slows each part.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from jobs.testing import _asgi
from jobs.testing._asgi import Message, Receive, Scope, Send, send_bytes, send_json
from jobs.testing.fal_model import FakeFalConfig, FakeFalStats


@dataclass
class StoredFile:
    """One file on the fake CDN."""

    content: bytes
    content_type: str
    lifecycle: dict[str, Any] | None


@dataclass
class _Multipart:
    path: str
    content_type: str
    lifecycle: dict[str, Any] | None
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)


class FakeCdn:
    """Token issuing and file storage; :meth:`handle` serves the HTTP side."""

    def __init__(
        self,
        config: Callable[[], FakeFalConfig],
        stats: FakeFalStats,
        wall_clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._stats = stats
        self._clock = wall_clock
        self._tokens: dict[str, float] = {}
        self._files: dict[str, StoredFile] = {}
        self._multipart: dict[str, _Multipart] = {}

    def file(self, url_or_path: str) -> StoredFile | None:
        """The file an ``access_url`` (or its path) names, once its upload is complete."""
        path = "/files/" + url_or_path.partition("/files/")[2]
        return self._files.get(unquote(path))

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(("/storage/", "/files/"))

    async def handle(self, scope: Scope, receive: Receive, send: Send, base_url: str) -> None:
        await self._route(scope, receive, _closing(send), base_url)

    async def _route(self, scope: Scope, receive: Receive, send: Send, base_url: str) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = _asgi.header_map(scope)
        if path == "/storage/auth/token" and method == "POST":
            await _asgi.read_body(receive)
            await self._token(scope, headers, send, base_url)
            return
        if not path.startswith("/files/"):
            await send_json(send, 404, {"detail": "Not Found"})
            return
        if method == "GET":
            await self._download(path, send)
            return
        body = await _asgi.read_body(receive)
        if not self._authorized(headers):
            await send_json(send, 401, {"detail": "Invalid or expired token"})
            return
        refuse = self._config().cdn_refuse_status
        if refuse:
            await send_json(send, refuse, {"detail": "Upload refused by the fake CDN"})
            return
        segments = path.strip("/").split("/")
        if path == "/files/upload" and method == "POST":
            await self._single(headers, body, send, base_url)
        elif path == "/files/upload/multipart" and method == "POST":
            await self._initiate(headers, send, base_url)
        elif len(segments) >= 5 and segments[-3] == "multipart" and method == "PUT":
            await self._part(segments, body, send)
        elif len(segments) >= 5 and segments[-1] == "complete" and method == "POST":
            await self._complete(segments, body, send, base_url)
        else:
            await send_json(send, 404, {"detail": "Not Found"})

    async def _token(
        self, scope: Scope, headers: dict[str, str], send: Send, base_url: str
    ) -> None:
        key = self._config().key
        if key is not None and headers.get("authorization") != f"Key {key}":
            await send_json(send, 401, {"detail": "Invalid or missing credentials"})
            return
        query = parse_qs(scope["query_string"].decode("latin-1"))
        if query.get("storage_type") != ["fal-cdn-v3"]:
            await send_json(send, 400, {"detail": "storage_type must be fal-cdn-v3"})
            return
        self._stats.cdn_tokens += 1
        token = secrets.token_urlsafe(16)
        expires = self._clock() + self._config().cdn_token_ttl
        self._tokens[token] = expires
        reply = {
            "token": token,
            "token_type": "Bearer",
            "base_url": base_url,
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
        }
        await send_json(send, 200, reply)

    def _authorized(self, headers: dict[str, str]) -> bool:
        kind, _, token = headers.get("authorization", "").partition(" ")
        expires = self._tokens.get(token)
        return kind == "Bearer" and expires is not None and expires > self._clock()

    def _new_path(self, headers: dict[str, str]) -> str:
        name = headers.get("x-fal-file-name") or "upload.bin"
        return f"/files/{secrets.token_hex(8)}/{name}"

    async def _single(
        self, headers: dict[str, str], body: bytes, send: Send, base_url: str
    ) -> None:
        self._stats.cdn_uploads += 1
        self._stats.cdn_bytes_received += len(body)
        path = self._new_path(headers)
        content_type = headers.get("content-type", "application/octet-stream")
        self._files[path] = StoredFile(body, content_type, _lifecycle(headers))
        await send_json(send, 200, {"access_url": base_url + quote(path)})

    async def _initiate(self, headers: dict[str, str], send: Send, base_url: str) -> None:
        self._stats.cdn_multipart_initiated += 1
        path = self._new_path(headers)
        upload_id = secrets.token_hex(12)
        content_type = headers.get("content-type", "application/octet-stream")
        self._multipart[upload_id] = _Multipart(path, content_type, _lifecycle(headers))
        self._stats.cdn_parts[upload_id] = {}
        await send_json(send, 200, {"access_url": base_url + quote(path), "uploadId": upload_id})

    def _upload_for(self, segments: list[str], upload_at: int) -> _Multipart | None:
        upload = self._multipart.get(segments[upload_at])
        prefix = "/" + "/".join(segments[: upload_at - 1])
        if upload is None or unquote(prefix) != upload.path:
            return None
        return upload

    async def _part(self, segments: list[str], body: bytes, send: Send) -> None:
        upload = self._upload_for(segments, len(segments) - 2)
        number = segments[-1]
        if upload is None or not number.isdigit() or int(number) < 1:
            await send_json(send, 404, {"detail": "Upload not found"})
            return
        n = int(number)
        self._stats.cdn_part_puts += 1
        self._stats.cdn_bytes_received += len(body)
        counts = self._stats.cdn_parts.setdefault(segments[-2], {})
        counts[n] = counts.get(n, 0) + 1
        delay = self._config().cdn_part_delay
        if delay > 0:
            await asyncio.sleep(delay)
        etag = '"' + hashlib.md5(body, usedforsecurity=False).hexdigest() + '"'
        upload.parts[n] = (body, etag)
        await send_bytes(send, 200, b"", b"text/plain", [("etag", etag)])

    async def _complete(self, segments: list[str], body: bytes, send: Send, base_url: str) -> None:
        upload_id = segments[-2]
        upload = self._upload_for(segments, len(segments) - 2)
        if upload is None:
            await send_json(send, 404, {"detail": "Upload not found"})
            return
        try:
            listed = json.loads(body)["parts"]
            etags = {int(p["partNumber"]): str(p["etag"]) for p in listed}
        except (ValueError, KeyError, TypeError):
            await send_json(send, 400, {"detail": "body must be {'parts': [...]}"})
            return
        expected = {n: etag for n, (_, etag) in upload.parts.items()}
        if etags != expected or sorted(etags) != list(range(1, len(etags) + 1)):
            await send_json(send, 400, {"detail": "parts missing or etags do not match"})
            return
        self._stats.cdn_completes += 1
        content = b"".join(upload.parts[n][0] for n in sorted(upload.parts))
        self._files[upload.path] = StoredFile(content, upload.content_type, upload.lifecycle)
        del self._multipart[upload_id]
        await send_json(send, 200, {"access_url": base_url + quote(upload.path)})

    async def _download(self, path: str, send: Send) -> None:
        stored = self._files.get(unquote(path))
        if stored is None:
            await send_json(send, 404, {"detail": "File not found"})
            return
        self._stats.cdn_downloads += 1
        await send_bytes(send, 200, stored.content, stored.content_type.encode("latin-1"))


def _closing(send: Send) -> Send:
    """``send`` with ``Connection: close`` on every reply: fal_client opens a new HTTP client
    per upload and never closes it, and a kept-alive connection would hold up the server's
    shutdown."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], (b"connection", b"close")]
        await send(message)

    return wrapped


def _lifecycle(headers: dict[str, str]) -> dict[str, Any] | None:
    raw = headers.get("x-fal-object-lifecycle-preference") or headers.get("x-fal-object-lifecycle")
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"invalid": raw}
    return value if isinstance(value, dict) else {"invalid": raw}
