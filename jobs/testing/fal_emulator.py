"""A fal-compatible queue emulator: the remote side for tests, benchmarks and the demo.

``FakeFal`` is an ASGI app speaking fal's queue protocol (``docs/protocol.md``) closely
enough that the real ``fal_client`` works against it, plus
knobs to make it misbehave in every way the job manager must survive. Serve it with
:class:`jobs.testing.FakeFalServer` (background thread, optional TLS) or
:func:`jobs.testing.run_fake_fal` (blocking, for ``jobs fake-fal``).

Why it is built this way: a benchmark keeps 10,000+ requests in flight and polls
thousands of times a second, so a request is a record of times, its state is computed
from the clock (see :mod:`jobs.testing.fal_model`), and one background loop (every
``config.tick`` seconds) finds finished requests in a heap to send their webhooks and
forget expired ones (:mod:`jobs.testing.fal_queue`). Nobody has to poll for a webhook to
fire. Each fault rate is exact: the rates share one random draw per HTTP request, in
the order listed below, so they should sum to at most 1. Faults, latency and the key
apply to the queue endpoints only, never to ``/_fake/*`` or the JWKS.

Endpoints (queue endpoints need ``Authorization: Key <config.key>`` when a key is set)::

    POST /{endpoint id}[/{path}][?fal_webhook=URL]      submit
    GET  /{app}/requests/{id}/status[/][?logs=1]        202 queued/running, 200 completed
    GET  /{app}/requests/{id}/status/stream[?logs=1]    server-sent events until COMPLETED
    GET  /{app}/requests/{id}                           result; 400 unfinished, 404 gone
    PUT  /{app}/requests/{id}/cancel                    202 / 400 ALREADY_COMPLETED / 404
    GET  /.well-known/jwks.json                         the webhook signing key
    POST /storage/auth/token, /files/...                CDN token and uploads (fal_cdn.py)
    POST /_run/{endpoint id}/stream                     the direct host's SSE (fal_run.py)
    GET  /_fake/stats[?per_request=0]  POST /_fake/reset  GET|POST /_fake/config
    GET  /_fake/requests/{id}  (debug view)  GET /_fake/files/{id}/{n}.png  (output bytes)

``{app}`` drops the sub-path exactly as fal_client does (docs/protocol.md §2): ``fal-ai/flux/dev``
polls under ``fal-ai/flux``, ``workflows/alice/flow/x`` under ``workflows/alice/flow``,
``12345-myapp`` under ``12345/myapp``. A poll under the wrong app answers 404.

Per-input overrides: a submitted input may carry ``"_fake": {...}`` with
``duration`` and ``queue_time`` (seconds), ``fail`` (an HTTP status such as 422, 500, 503,
504, or ``true`` for ``config.fail_status``: the request runs, then COMPLETES with that
error; 422 uses the validation-error body) and ``logs`` (number of log lines spread over
the running time; ``?logs=1`` returns every line emitted so far, each poll).

Faults (rates in ``FakeFalConfig``, one random draw per HTTP request to a queue endpoint;
reproducible with ``seed``):

- ``ingress_error``: 502 HTML from "nginx", no ``x-fal-request-id``; nothing happens.
- ``rate_limit``: 429 with ``Retry-After``; nothing happens.
- ``drop``: the connection closes with no response (client: ``RemoteProtocolError``).
  On submit the request was already enqueued: an ambiguous submit.
- ``error_500``: 500 with ``x-fal-request-id``. On submit the request was already
  enqueued (ambiguous; the header names it); on status/result/cancel nothing happens.
- ``processed_drop_rate`` (submit only, its own draw after the one above): the request is
  queued, then the connection drops, as for ``drop``; counted as ``processed_drop``.
- ``slow``: the reply (normal otherwise) is delayed by ``slow_seconds``; a submit is
  enqueued before the wait.
- ``unknown_status`` (status only): a 202 whose ``status`` is ``UNKNOWN_FAKE_STATE``.
- ``invalid_json`` (submit, status, result): 200 with a body that is not JSON; a submit
  is enqueued.

Cancel: a queued request ends at once, a running one after ``cancel_delay`` seconds
(default 0), as COMPLETED with ``error_type`` ``client_cancelled``; its result answers
499 (docs/protocol.md §8). An ``X-Fal-Request-Timeout`` shorter than the queue time ends
the request with 504 and ``X-Fal-Request-Timeout-Type: user`` on the result. Queue
positions are 0-based among requests still queued, normal priority before low.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jobs.providers.signatures import public_jwk
from jobs.testing import _asgi
from jobs.testing._asgi import Receive, Scope, Send, send_bytes, send_json
from jobs.testing.fal_cdn import FakeCdn
from jobs.testing.fal_control import handle_control
from jobs.testing.fal_model import (
    COMPLETED,
    IN_QUEUE,
    FakeFalConfig,
    FakeFalStats,
    FakeRequest,
    error_body,
    error_kind,
    parse_request_path,
    parse_submit_path,
)
from jobs.testing.fal_queue import FakeQueue, Submission, parse_overrides
from jobs.testing.fal_run import PREFIX as RUN_PREFIX
from jobs.testing.fal_run import handle_run
from jobs.testing.fal_webhooks import WebhookSender

log = logging.getLogger(__name__)

FAULTS = (
    "ingress_error",
    "rate_limit",
    "drop",
    "error_500",
    "slow",
    "unknown_status",
    "invalid_json",
)
_ALL_BUT = set(FAULTS) - {"unknown_status", "invalid_json"}
FAULTS_FOR: dict[str, frozenset[str]] = {
    "submit": frozenset(_ALL_BUT | {"invalid_json"}),
    "status": frozenset(FAULTS),
    "stream": frozenset(_ALL_BUT),
    "result": frozenset(_ALL_BUT | {"invalid_json"}),
    "cancel": frozenset(_ALL_BUT),
}
_COUNTER = {
    "status": "status_polls",
    "stream": "stream_requests",
    "result": "result_fetches",
    "cancel": "cancels",
}
NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
NOT_JSON = b"<!doctype html><p>upstream sent something that is not JSON"
UNKNOWN_STATE = "UNKNOWN_FAKE_STATE"
STREAM_INTERVAL = 0.1
STREAM_PING = 10.0


class FakeFal:
    """The emulator as an ASGI app; ``stats`` and ``config`` are live objects.

    A server's lifespan events start and stop the completion loop and the webhook
    client. Mounted without lifespan (e.g. ``httpx.ASGITransport``), states still follow
    the clock; call ``await fake.start()`` / ``stop()`` for webhooks, or ``tick()``.
    """

    def __init__(
        self,
        config: FakeFalConfig | None = None,
        *,
        private_key: Ed25519PrivateKey | None = None,
        key_id: str = "fake-fal-signer",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config if config is not None else FakeFalConfig()
        self.stats = FakeFalStats()
        self.private_key = private_key if private_key is not None else Ed25519PrivateKey.generate()
        self.key_id = key_id
        self._clock = clock
        self._rng = random.Random(self.config.seed)
        self.queue = FakeQueue(lambda: self.config, self.stats, self._rng, clock, wall_clock)
        self._webhooks = WebhookSender(
            lambda: self.config, self.stats, self.private_key, wall_clock
        )
        self.cdn = FakeCdn(lambda: self.config, self.stats, wall_clock)
        self._loop_task: asyncio.Task[None] | None = None

    # --- in-process API -------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.private_key, self.key_id)]}

    def get_request(self, request_id: str) -> FakeRequest | None:
        return self.queue.get(request_id)

    def describe(self, request: FakeRequest) -> dict[str, Any]:
        return self.queue.describe(request)

    @property
    def pending_webhooks(self) -> int:
        return self._webhooks.pending

    def update_config(self, changes: Mapping[str, Any]) -> None:
        self.config.update(changes)
        if "seed" in changes:
            self._rng.seed(self.config.seed)

    async def start(self) -> None:
        """Start webhook delivery and the completion loop (the ASGI lifespan calls this)."""
        if self._loop_task is not None:
            return
        await self._webhooks.start()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._webhooks.stop()

    def tick(self, now: float | None = None) -> None:
        """Apply what time did: finished requests get their webhooks, expired ones go."""
        self.queue.tick(self._clock() if now is None else now, self._finished)

    def _finished(self, request: FakeRequest) -> None:
        config = self.config
        if request.webhook_url and (not request.cancelled or config.webhook_on_cancel):
            rate = config.webhook_duplicate_rate
            self._webhooks.schedule(request, rate > 0 and self._rng.random() < rate)

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # keep the loop alive; a bug shows in the log
                log.exception("fake-fal tick failed")
            await asyncio.sleep(self.config.tick)

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _asgi.run_lifespan(receive, send, self.start, self.stop)
        elif kind == "http":
            path: str = scope["path"]
            try:
                if path.startswith("/_fake/") or path.startswith("/.well-known/"):
                    await handle_control(self, scope, receive, send)
                elif FakeCdn.handles(path):
                    base = self.config.base_url or _base_url(scope, _asgi.header_map(scope))
                    await self.cdn.handle(scope, receive, send, base)
                elif path.startswith(RUN_PREFIX):
                    await handle_run(scope, receive, send, self.config, self.stats)
                else:
                    await self._queue_api(scope, receive, send)
            except _asgi.Disconnected:
                return  # nothing was queued or changed: the body never arrived whole
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    def _draw_fault(self, kind: str) -> str | None:
        c = self.config
        rates = (
            c.ingress_error_rate,
            c.rate_limit_rate,
            c.drop_rate,
            c.error_500_rate,
            c.slow_rate,
            c.unknown_status_rate,
            c.invalid_json_rate,
        )
        if not any(rates):
            return None
        draw, total = self._rng.random(), 0.0
        for name, rate in zip(FAULTS, rates, strict=True):
            total += rate
            if draw < total:
                return name if name in FAULTS_FOR[kind] else None
        return None

    async def _queue_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        stripped = scope["path"].strip("/")
        segments = stripped.split("/") if stripped else []
        route = parse_request_path(segments)
        rid = ""
        if route is None:
            if method != "POST" or "requests" in segments[1:4]:
                # A poll with a wrong app path (e.g. sub-path kept) must fail loudly: 404.
                found = bool(segments) and "requests" not in segments
                code, detail = (405, "Method Not Allowed") if found else (404, "Not Found")
                await send_json(send, code, {"detail": detail})
                return
            kind = "submit"
            self.stats.submit_attempts += 1
        else:
            _, rid, kind = route
            if method != ("PUT" if kind == "cancel" else "GET"):
                await send_json(send, 405, {"detail": "Method Not Allowed"})
                return
            attr = _COUNTER[kind]
            setattr(self.stats, attr, getattr(self.stats, attr) + 1)
            counters = self.stats.requests.get(rid)
            if counters is not None:
                setattr(counters, attr, getattr(counters, attr) + 1)
        config = self.config
        if config.latency > 0:
            await asyncio.sleep(config.latency)
        fault = self._draw_fault(kind)
        if fault is not None:
            self.stats.fault(fault)
        if fault == "ingress_error":
            await send_bytes(send, 502, NGINX_502, b"text/html")
            return
        if fault == "rate_limit":
            after = config.retry_after
            value = str(int(after)) if after == int(after) else str(after)
            await send_json(send, 429, {"detail": "Rate limit exceeded"}, [("retry-after", value)])
            return
        if kind != "submit" and fault in ("drop", "error_500"):
            await self._fault_reply(fault, rid, receive, send)
            return
        headers = _asgi.header_map(scope)
        if config.key is not None and headers.get("authorization") != f"Key {config.key}":
            await send_json(send, 401, {"detail": "Invalid or missing credentials"})
            return
        if kind == "submit":
            await self._submit(scope, receive, send, headers, segments, fault)
            return
        if fault == "slow":
            await asyncio.sleep(config.slow_seconds)
        assert route is not None
        app = route[0]
        if kind == "status":
            await self._status(scope, send, app, rid, fault)
        elif kind == "result":
            await self._result(send, app, rid, fault)
        elif kind == "cancel":
            await self._cancel(send, app, rid)
        else:
            await self._stream(scope, receive, send, app, rid)

    async def _fault_reply(self, fault: str, rid: str, receive: Receive, send: Send) -> None:
        if fault == "drop":
            await _asgi.drop_connection(receive, send)
            return
        body = {"detail": "Internal server error", "error_type": "internal_error"}
        headers = [("x-fal-request-id", rid), ("x-fal-error-type", "internal_error")]
        await send_json(send, 500, body, headers)

    async def _submit(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        segments: list[str],
        fault: str | None,
    ) -> None:
        raw = await _asgi.read_body(receive)
        route = parse_submit_path(segments)
        if route is None:
            detail = f"Application '{'/'.join(segments)}' not found"
            await send_json(send, 404, {"detail": detail})
            return
        try:
            value = json.loads(raw) if raw.strip() else {}
            overrides = parse_overrides(value, self.config.fail_status)
            priority = headers.get("x-fal-queue-priority", "normal")
            if priority not in ("normal", "low"):
                raise ValueError(
                    f"X-Fal-Queue-Priority must be 'normal' or 'low', not {priority!r}"
                )
            timeout_header = headers.get("x-fal-request-timeout")
            start_timeout = float(timeout_header) if timeout_header is not None else None
        except ValueError as exc:
            await send_json(send, 422, {"detail": str(exc)})
            return
        query = parse_qs(scope["query_string"].decode("latin-1")) if scope["query_string"] else {}
        submission = Submission(
            route=route,
            base_url=self.config.base_url or _base_url(scope, headers),
            input=value,
            priority=priority,
            hint=headers.get("x-fal-runner-hint"),
            fal_headers={k: v for k, v in headers.items() if k.startswith("x-fal-")},
            webhook_url=query.get("fal_webhook", [None])[0],
            start_timeout=start_timeout,
        )
        request = self.queue.enqueue(submission, overrides)
        rid = request.request_id
        rate = self.config.processed_drop_rate
        if fault is None and rate > 0 and self._rng.random() < rate:
            fault = "drop"
            self.stats.fault("processed_drop")
        reply = {
            "request_id": rid,
            **request.urls(),
            "status": IN_QUEUE,
            "queue_position": self.queue.position(request, self._clock()),
            "gateway_request_id": rid,
        }
        id_header = [("x-fal-request-id", rid)]
        if fault in ("drop", "error_500"):
            await self._fault_reply(fault, rid, receive, send)
        elif fault == "invalid_json":
            await send_bytes(send, 200, NOT_JSON, _asgi.JSON, id_header)
        else:
            if fault == "slow":
                await asyncio.sleep(self.config.slow_seconds)
            await send_json(send, 200, reply, id_header)

    async def _status(
        self, scope: Scope, send: Send, app: str, rid: str, fault: str | None
    ) -> None:
        now = self._clock()
        request = self.queue.find(app, rid, now)
        headers = [("x-fal-request-id", rid)]
        if request is None:
            await send_json(send, 404, {"detail": "Request not found"}, headers)
            return
        if fault == "invalid_json":
            await send_bytes(send, 200, NOT_JSON, _asgi.JSON, headers)
            return
        position = self.queue.position(request, now) if request.state(now) == IN_QUEUE else 0
        body = request.status_body(now, _logs_flag(scope), position)
        if fault == "unknown_status":
            body["status"] = UNKNOWN_STATE
        await send_json(send, 200 if body["status"] == COMPLETED else 202, body, headers)

    async def _result(self, send: Send, app: str, rid: str, fault: str | None) -> None:
        now = self._clock()
        request = self.queue.find(app, rid, now)
        headers = [("x-fal-request-id", rid)]
        if request is None:
            await send_json(send, 404, {"detail": "Request not found"}, headers)
        elif request.state(now) != COMPLETED:
            await send_json(send, 400, {"detail": "Request is still in progress"}, headers)
        elif fault == "invalid_json":
            await send_bytes(send, 200, NOT_JSON, _asgi.JSON, headers)
        elif request.fail_status is None:
            headers.append(("x-fal-billable-units", "1"))
            await send_json(send, 200, request.output(self.config.result_padding), headers)
        else:
            status = request.fail_status
            headers.append(("x-fal-error-type", error_kind(status)[0]))
            headers.append(("x-fal-billable-units", "0"))
            if status == 422:
                headers.append(("x-fal-retryable", "false"))
            if request.timeout_user:
                headers.append(("x-fal-request-timeout-type", "user"))
            await send_json(send, status, error_body(status), headers)

    async def _cancel(self, send: Send, app: str, rid: str) -> None:
        now = self._clock()
        request = self.queue.find(app, rid, now)
        if request is None:
            await send_json(send, 404, {"status": "NOT_FOUND"})
            return
        if not self.queue.cancel(request, now):
            await send_json(send, 400, {"status": "ALREADY_COMPLETED"})
            return
        await send_json(send, 202, {"status": "CANCELLATION_REQUESTED"})

    async def _stream(self, scope: Scope, receive: Receive, send: Send, app: str, rid: str) -> None:
        """Server-sent status events (docs/protocol.md §6): one ``data:`` line per change, then
        close."""
        request = self.queue.find(app, rid, self._clock())
        if request is None:
            await send_json(send, 404, {"detail": "Request not found"}, [("x-fal-request-id", rid)])
            return
        await _asgi.read_body(receive)
        with_logs = _logs_flag(scope)
        raw = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        raw.append((b"x-fal-request-id", rid.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        gone: asyncio.Future[Any] = asyncio.ensure_future(receive())
        last, last_write = b"", self._clock()
        try:
            while True:
                now = self._clock()
                state = request.state(now)
                position = self.queue.position(request, now) if state == IN_QUEUE else 0
                encoded = _asgi.dumps(request.status_body(now, with_logs, position))
                if encoded != last:
                    chunk, last, last_write = b"data: " + encoded + b"\n\n", encoded, now
                elif now - last_write >= STREAM_PING:
                    chunk, last_write = b": ping\n\n", now
                else:
                    chunk = b""
                if state == COMPLETED:
                    await send({"type": "http.response.body", "body": chunk})
                    return
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                wait = request.start_at if now < request.start_at else request.finish_at
                delay = max(0.005, min(STREAM_INTERVAL, wait - now))
                done, _ = await asyncio.wait({gone}, timeout=delay)
                if done:
                    return
        finally:
            gone.cancel()


def _logs_flag(scope: Scope) -> bool:
    if not scope["query_string"]:
        return False
    values = parse_qs(scope["query_string"].decode("latin-1")).get("logs", ["0"])
    return values[-1].lower() in ("1", "true", "yes")


def _base_url(scope: Scope, headers: dict[str, str]) -> str:
    host = headers.get("host")
    if not host:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}"
