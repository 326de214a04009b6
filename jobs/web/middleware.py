"""Cross-cutting HTTP concerns as tiny ASGI classes, in the manner of Starlette's own.

- :class:`RequestId` echoes a sane ``X-Request-Id`` or makes one, so a log line and a
  client's report can be matched.
- :class:`RedactSecrets` is a last line of defence: no response body may carry the fal key
  or the API token, whatever bug put it there.
- :class:`BodySizeLimit` stops oversized bodies on the routes it guards (the webhook
  receivers, which anyone on the internet can reach) before they fill memory: from
  ``Content-Length`` before reading, and while reading a chunked body.
- :class:`BearerAuth` checks ``Authorization: Bearer <token>`` in constant time.
- :class:`HostCheck` answers only to the names this server is known by, so a web page on
  another site cannot reach it through DNS rebinding (its name made to point at
  ``127.0.0.1``) and read or change jobs, and refuses a state-changing request that a
  browser sent from another origin (cross-site request forgery).

Each is a plain ``(scope, receive, send)`` callable; none buffers what it does not need to.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Secret, decimal

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REDACTED = b"[redacted]"
# Shorter secrets are not redacted: they would match ordinary text and corrupt responses.
MIN_REDACTED_LENGTH = 8


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


async def _send_error(
    send: Send, status: int, kind: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """The same ``{"error": {"type", "message"}}`` body as :mod:`jobs.web.errors`."""
    raw = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class RequestId:
    """Echo the caller's ``X-Request-Id`` when it looks sane; otherwise make a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class RedactSecrets:
    """Replace any secret found in a response body with ``[redacted]``.

    The common case (a body sent in one message) costs one substring search per secret;
    only a multi-part body is gathered before it is checked, so a secret split across two
    parts is still found."""

    def __init__(self, app: ASGIApp, *, secrets: Sequence[Secret]) -> None:
        self.app = app
        revealed = (secret.reveal().encode() for secret in secrets)
        self.secrets = [raw for raw in revealed if len(raw) >= MIN_REDACTED_LENGTH]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.secrets:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        parts: list[bytes] = []

        async def redacting_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(parts)
            for secret in self.secrets:
                body = body.replace(secret, REDACTED)
            headers = MutableHeaders(scope=start)
            if "content-length" in headers:
                headers["content-length"] = str(len(body))
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, redacting_send)


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 for a body over ``limit`` bytes on ``paths``; ``on_reject(path)`` is told."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        paths: Collection[str],
        on_reject: Callable[[str], None] = lambda path: None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.paths = frozenset(paths)
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            size = decimal(declared.decode("latin-1"))
            if size is None:
                await _send_error(send, 400, "bad_request", "Content-Length is not a number")
                return
            if size > self.limit:
                await self._reject(scope, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            # Handlers here read the whole body before answering, so nothing was sent yet.
            await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        self.on_reject(scope["path"])
        message = f"the body is larger than the limit of {self.limit} bytes"
        await _send_error(send, 413, "too_large", message)


class BearerAuth:
    """Require ``Authorization: Bearer <token>`` on the paths ``protected`` selects."""

    def __init__(self, app: ASGIApp, *, token: Secret, protected: Callable[[str], bool]) -> None:
        self.app = app
        self._token = token
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protected(scope["path"]) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await _send_error(
            send,
            401,
            "unauthorized",
            "send the API token as 'Authorization: Bearer <JOBS_API_TOKEN>'",
            [(b"www-authenticate", b'Bearer realm="jobs"')],
        )

    def _allowed(self, scope: Scope) -> bool:
        scheme, _, credentials = (_header(scope, b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            credentials.strip(), self._token.reveal().encode()
        )


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _hostname(authority: str) -> str | None:
    """The host of a ``Host`` header or an origin's authority (``name:port``, ``[::1]:8000``),
    lower-cased; None when it cannot be read."""
    try:
        parsed = urllib.parse.urlsplit("//" + authority.strip())
        host = parsed.hostname
        parsed.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return None
    return host.rstrip(".") if host else None


class ServedHosts:
    """The names this server answers to: ``names`` (``JOBS_PUBLIC_URL``'s host, the bind
    address, ``JOBS_ALLOWED_HOSTS``), ``localhost`` and the loopback addresses, and any IP
    address (DNS rebinding needs a name, and a client that dials an address names it)."""

    def __init__(self, names: Iterable[str]) -> None:
        cleaned = (urllib.parse.urlsplit(n).hostname if "://" in n else _hostname(n) for n in names)
        self.names = frozenset(n.lower() for n in (*cleaned, *LOCAL_NAMES) if n)

    def allows(self, authority: str) -> bool:
        host = _hostname(authority)
        if host is None:
            return False
        if host in self.names:
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True


class HostCheck:
    """On paths ``guarded`` selects: answer 421 to a ``Host`` not in ``hosts``, and 403 to a
    state-changing request whose ``Origin`` (sent by browsers) is another site. Clients
    that are not browsers send no ``Origin`` and are not affected."""

    def __init__(self, app: ASGIApp, *, hosts: ServedHosts, guarded: Callable[[str], bool]) -> None:
        self.app = app
        self.hosts = hosts
        self.guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        host = (_header(scope, b"host") or b"").decode("latin-1")
        if not self.hosts.allows(host):
            message = (
                f"this server does not answer to the host name {host[:100]!r}; "
                "add it to JOBS_ALLOWED_HOSTS (or set JOBS_PUBLIC_URL) to serve it"
            )
            await _send_error(send, 421, "misdirected_request", message)
            return
        origin = _header(scope, b"origin")
        unsafe = scope["method"] in UNSAFE_METHODS
        if unsafe and origin is not None and not self._same_site(origin, host):
            message = "a request from another web site's page is refused (cross-origin)"
            await _send_error(send, 403, "cross_origin", message)
            return
        await self.app(scope, receive, send)

    def _same_site(self, origin: bytes, host: str) -> bool:
        """The page's origin is this server (the host asked for, or one of its names). An
        address is not enough here: a page can be served from any address."""
        scheme, sep, authority = origin.decode("latin-1").strip().partition("://")
        name = _hostname(authority) if sep and scheme in ("http", "https") else None
        return name is not None and (name == _hostname(host) or name in self.hosts.names)
