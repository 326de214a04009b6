"""A Replicate-compatible predictions API emulator: the remote side for tests and benchmarks.

``FakeReplicate`` is an ASGI app speaking Replicate's HTTP API for predictions closely
enough that the real ``replicate`` package (1.0.x) works against it, plus knobs to make
it misbehave in the ways a job manager must survive. Serve it with
:class:`jobs.testing.FakeReplicateServer` (background thread) or
:func:`jobs.testing.run_fake_replicate` (blocking, for ``jobsctl fake-replicate``).

It is built like the fal emulator (:mod:`jobs.testing.fal_emulator`): a prediction is a
record of times whose state is computed from the clock (:mod:`jobs.testing.replicate_model`),
one background loop (every ``config.tick`` seconds) pops a heap of instants to send
webhooks (:mod:`jobs.testing.replicate_webhooks`) and forget expired data, each fault
rate is exact (one random draw per API request, reproducible with ``seed``), and every
request is counted (``stats``). Faults, latency and the token apply to the API endpoints
only, never to ``/_fake/*``; the fault is drawn before the token is checked, as a gateway
throttles before it authenticates.

Endpoints (API ones need ``Authorization: Bearer <config.token>`` when a token is set;
otherwise 401 with a problem-details body)::

    POST /v1/predictions                              create; body version + input
    POST /v1/models/{owner}/{name}/predictions        create for a model; body input
    POST /v1/deployments/{owner}/{name}/predictions   create for a deployment (any name)
    GET  /v1/predictions/{id}                         the prediction
    GET  /v1/predictions[?cursor=&created_after=&created_before=]   newest first, paged
    POST /v1/predictions/{id}/cancel                  the prediction after the cancel
    GET  /v1/webhooks/default/secret                  {"key": config.webhook_secret}
    GET  /v1/deployments/{owner}/{name}               a deployment (for deployments.get)
    GET  /v1/models/{owner}/{name}/versions/{id}      a version (for run("o/n:id"))
    GET  /_fake/stats[?per_prediction=0]  POST /_fake/reset  GET|POST /_fake/config
    POST /_fake/advance  {"seconds": N}: :meth:`FakeReplicate.advance` on the server's loop
    GET  /_fake/predictions/{id}  (debug view)  GET /_fake/files/{id}/{n}.png  (output bytes)

Create: ``version`` is a 64-hex id or ``owner/name:id`` (a bare id takes the model it was
last seen with, else ``config.default_model``); model and deployment predictions get the
stable version :func:`jobs.testing.replicate_model.version_for` of their name. ``input``
must be an object (422 otherwise). ``webhook`` (http or https, the emulator accepts both
for local receivers), ``webhook_events_filter`` (``start``, ``output``, ``logs``,
``completed``; default output + completed); replicate-python's ``webhook_completed``
means a webhook with the filter ``["completed"]``. Headers: ``Prefer: wait[=N]`` holds
the reply up to N s (60 by default, at most ``config.max_wait``) and returns the
prediction as it is then; ``Cancel-After`` (``90``, ``90s``, ``1m``, ``1h30m``, ``500ms``)
ends a prediction at that deadline: ``aborted`` if it had not started, else ``canceled``.
The reply is 201 with the prediction object::

    {"id", "model", "version", "input", "logs" (one string), "output", "data_removed",
     "error", "source": "api", "status", "created_at", "started_at", "completed_at"
     (ISO-8601, "Z"), "metrics": {"predict_time"} once terminal, "urls": {get, cancel, web}}

(``urls`` are built on the emulator's own base URL; ``web`` is not served.)

Statuses: ``starting`` for ``queue_time`` s, ``processing`` for ``duration`` s, then
``succeeded`` (output ``{"echo": input}``), ``failed`` (``error`` set), or ``canceled`` /
``aborted``. Cancel on a finished prediction changes nothing and answers 200. After
``retention`` s (3600) from completion a prediction keeps its status but has
``data_removed: true``, ``input: {}``, ``output: null``, ``logs: ""``, and its files 404.

Per-input overrides: an input may carry ``"_fake": {...}`` with ``duration`` and
``queue_time`` (seconds), ``fail`` (``true`` or an error message: it runs, then fails),
``logs`` (that many tqdm-style progress lines over the running time, appended to
``logs``), ``files`` (that many output files, served at ``/_fake/files/{id}/{n}.png``,
appearing one by one while it runs; the output is the list of their URLs) and ``output``
(the output value on success, replacing the default).

Faults (rates in ``FakeReplicateConfig``, one random draw per API request, in this order):

- ``error_500``: 500 with a problem body. On create the prediction WAS created (an
  ambiguous create; find it with the list endpoint); elsewhere nothing happens.
- ``drop``: the connection closes without a response (client: ``RemoteProtocolError``);
  on create the prediction was created first; elsewhere nothing happens.
- ``rate_limit``: 429, ``Retry-After: N`` and ``{"detail": "Request was throttled.
  Expected available in N seconds.", "status": 429, "retry_after": N}``; nothing happens.
- ``rate_limit_no_header``: the same 429 without the ``Retry-After`` header.
- ``slow``: the reply (otherwise normal, the action done) is delayed by ``slow_seconds``.
- ``invalid_json``: 200/201 with a body that is not JSON; the action was done.

``fault_kinds`` limits the faults to some request kinds (``["create"]``: only creates).
Also exact: ``create_limit_per_minute`` (a token bucket of ``create_limit_burst``) answers
creates beyond it with the same 429 (header and body) and creates nothing. Webhooks have
``webhook_loss_rate`` (a message is never sent, nor retried) and
``webhook_duplicate_rate`` (sent twice, the same ``webhook-id``); see the webhook module
for the signature and the retry schedule of the terminal message.

Webhook events: ``start`` when processing begins, ``logs`` / ``output`` when new log lines
or files appeared (at most one of either per ``webhook_throttle`` s, 0.5 by default, the
rest folded into the next), ``completed`` at the end (aborted included). Without
``completed`` in the filter but with ``output``, the end is sent as an ``output`` event.
The message at the end is the only one retried. Each body is the prediction as it was at
the instant of its event.

Time: ``clock`` (monotonic) and ``wall_clock`` are injectable, and :meth:`FakeReplicate.advance`
moves the emulator's time forward (e.g. past the hour of retention) without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode

from jobs.testing import _asgi
from jobs.testing._asgi import Receive, Scope, Send, send_bytes, send_json
from jobs.testing.fal_model import expected_file_bytes
from jobs.testing.replicate_model import (
    EMIT,
    START,
    TERMINAL,
    FakePrediction,
    FakeReplicateConfig,
    FakeReplicateStats,
    NewPrediction,
    PredictionTable,
    check_model_ref,
    iso,
    parse_duration,
    parse_events,
    parse_iso,
    parse_overrides,
    parse_prefer_wait,
    parse_version,
    problem,
    version_for,
)
from jobs.testing.replicate_webhooks import WebhookSender

log = logging.getLogger(__name__)

FAULTS = (
    "error_500",
    "drop",
    "rate_limit",
    "rate_limit_no_header",
    "slow",
    "invalid_json",
)
NOT_JSON = b"<!doctype html><p>upstream sent something that is not JSON"
WAIT_STEP = 0.05
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_MIN_STEP = 0.001


class FakeReplicate:
    """The emulator as an ASGI app; ``stats`` and ``config`` are live objects.

    A server's lifespan events start and stop the background loop and the webhook client.
    Mounted without lifespan (e.g. ``httpx.ASGITransport``), states still follow the clock;
    call ``await fake.start()`` / ``stop()`` for webhooks, or ``tick()`` by hand.
    """

    def __init__(
        self,
        config: FakeReplicateConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config if config is not None else FakeReplicateConfig()
        self.stats = FakeReplicateStats()
        self._clock = clock
        self._wall_clock = wall_clock
        self._offset = 0.0
        self._rng = random.Random(self.config.seed)
        # Webhook decisions draw from their own generator: they happen in the background
        # loop, so sharing the request generator would make fault sequences depend on timing.
        self._hook_rng = random.Random(self.config.seed)
        self.table = PredictionTable(
            lambda: self.config, self.stats, self._new_id, self._rng.random
        )
        self._webhooks = WebhookSender(lambda: self.config, self.stats, self._hook_rng, wall_clock)
        self._models_by_version: dict[str, str] = {}
        self._tokens = float(self.config.create_limit_burst)
        self._tokens_at: float | None = None
        self._loop_task: asyncio.Task[None] | None = None

    # --- time -----------------------------------------------------------------------------

    def now(self) -> float:
        """The emulator's monotonic time (the injected clock plus :meth:`advance`)."""
        return self._clock() + self._offset

    def wall(self) -> float:
        return self._wall_clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the emulator's time forward by ``seconds`` and apply what that did."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._offset += seconds
        self.tick()

    # --- in-process API -------------------------------------------------------------------

    def get_prediction(self, prediction_id: str) -> FakePrediction | None:
        return self.table.get(prediction_id)

    def prediction_json(self, prediction: FakePrediction) -> dict[str, Any]:
        """The prediction object as the API would return it now."""
        return prediction.to_json(self.now(), self.config.retention)

    @property
    def webhook_secret(self) -> str:
        return self.config.webhook_secret

    @property
    def pending_webhooks(self) -> int:
        return self._webhooks.pending

    def update_config(self, changes: Mapping[str, Any]) -> None:
        self.config.update(changes)
        if "seed" in changes:
            self._rng.seed(self.config.seed)
            self._hook_rng.seed(self.config.seed)
        if "create_limit_burst" in changes or "create_limit_per_minute" in changes:
            self._tokens, self._tokens_at = float(self.config.create_limit_burst), None

    def describe(self, prediction: FakePrediction) -> dict[str, Any]:
        """The debug view of one prediction (``GET /_fake/predictions/{id}``)."""
        counters = self.stats.predictions.get(prediction.id)
        return {
            "id": prediction.id,
            "model": prediction.model,
            "version": prediction.version,
            "deployment": prediction.deployment,
            "status": prediction.status(self.now()),
            "webhook": prediction.webhook,
            "webhook_events_filter": sorted(prediction.events),
            "input_hash": prediction.input_hash,
            "created_at": iso(prediction.created_wall),
            "queue_time": prediction.start_at - prediction.created_at
            if prediction.started
            else None,
            "run_time": prediction.finish_at - prediction.start_at if prediction.started else None,
            "counters": None if counters is None else vars(counters).copy(),
        }

    async def start(self) -> None:
        """Start webhook delivery and the background loop (the ASGI lifespan calls this)."""
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
        """Apply what time did: webhooks for starts, progress and ends; expired data goes.

        Each message shows the prediction as it was at the instant of its event, however
        late the loop runs, so bodies do not depend on the loop's timing.
        """
        for at, kind, prediction in self.table.due(self.now() if now is None else now):
            if kind == START:
                if "start" in prediction.events:
                    self._send(prediction, "start", at, terminal=False)
                self._progress(prediction, at)
            elif kind == EMIT:
                self._progress(prediction, at)
            else:
                self._ended(prediction, at)
        self.table.expire(self.now() if now is None else now)

    def _send(self, prediction: FakePrediction, event: str, at: float, terminal: bool) -> None:
        if prediction.webhook is None:
            return
        body = _asgi.dumps(prediction.to_json(at, self.config.retention))
        self._webhooks.send(prediction.id, event, prediction.webhook, body, terminal)

    def _progress(self, prediction: FakePrediction, at: float) -> None:
        """Send a logs/output event if something new appeared by ``at`` and the throttle
        allows; schedule the next look."""
        events = prediction.events
        want_logs = "logs" in events and prediction.log_lines > 0
        want_output = "output" in events and prediction.files > 0
        if prediction.webhook is None or not (want_logs or want_output):
            return
        if prediction.status(at) in TERMINAL:
            return  # the end sends its own message
        lines = prediction.emitted(prediction.log_lines, at) if want_logs else 0
        files = prediction.emitted(prediction.files, at) if want_output else 0
        ready = prediction.last_progress_at + self.config.webhook_throttle
        if lines > prediction.sent_logs or files > prediction.sent_files:
            if at < ready:
                self.table.schedule_emit(prediction, ready)
                return
            event = "output" if files > prediction.sent_files else "logs"
            self._send(prediction, event, at, terminal=False)
            prediction.sent_logs, prediction.sent_files = lines, files
            prediction.last_progress_at = at
            ready = at + self.config.webhook_throttle
        upcoming = [
            when
            for when in (
                prediction.next_emission(prediction.log_lines, at) if want_logs else None,
                prediction.next_emission(prediction.files, at) if want_output else None,
            )
            if when is not None
        ]
        if upcoming:
            self.table.schedule_emit(prediction, max(min(upcoming), ready, at + _MIN_STEP))

    def _ended(self, prediction: FakePrediction, at: float) -> None:
        events = prediction.events
        if "completed" in events:
            self._send(prediction, "completed", at, terminal=True)
        elif "output" in events and prediction.status(at) != "aborted":
            # No completed event asked for: the final output still arrives as an output event.
            self._send(prediction, "output", at, terminal=True)

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # keep the loop alive; a bug shows in the log
                log.exception("fake-replicate tick failed")
            await asyncio.sleep(self.config.tick)

    def _new_id(self) -> str:
        return "".join(_ID_ALPHABET[self._rng.randrange(36)] for _ in range(26))

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _asgi.run_lifespan(receive, send, self.start, self.stop)
        elif kind == "http":
            try:
                if scope["path"].startswith("/_fake/"):
                    await self._control(scope, receive, send)
                else:
                    await self._api(scope, receive, send)
            except _asgi.Disconnected:
                return  # nothing was created or changed: the body never arrived whole
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    def _draw_fault(self) -> str | None:
        c = self.config
        rates = (
            c.error_500_rate,
            c.drop_rate,
            c.rate_limit_rate,
            c.rate_limit_no_header_rate,
            c.slow_rate,
            c.invalid_json_rate,
        )
        if not any(rates):
            return None
        draw, total = self._rng.random(), 0.0
        for name, rate in zip(FAULTS, rates, strict=True):
            total += rate
            if draw < total:
                return name
        return None

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        route = _route(scope["path"], method)
        if route is None:
            await send_json(send, 404, problem(404, "Not found", "Not found"))
            return
        kind, expected, args = route
        if method != expected:
            await send_json(send, 405, problem(405, "Method not allowed", f"Use {expected}"))
            return
        self._count(kind, args)
        config = self.config
        if config.latency > 0:
            await asyncio.sleep(config.latency)
        fault = None
        if not config.fault_kinds or kind in config.fault_kinds:
            fault = self._draw_fault()
        if fault is not None:
            self.stats.fault(fault)
        if fault in ("rate_limit", "rate_limit_no_header"):
            await self._throttled(send, config.retry_after, fault == "rate_limit")
            return
        headers = _asgi.header_map(scope)
        if config.token is not None and headers.get("authorization") != f"Bearer {config.token}":
            detail = "You did not pass a valid authentication token"
            await send_json(send, 401, problem(401, "Unauthenticated", detail))
            return
        base = config.base_url or _base_url(scope, headers)
        if kind == "create":
            await self._create(scope, receive, send, headers, args, base, fault)
            return
        if fault in ("drop", "error_500"):
            await _fault_reply(fault, receive, send)
            return
        if kind == "cancel":
            body, status = self._cancel(args[0])
        elif kind == "get":
            body, status = self._get(args[0])
        elif kind == "list":
            body, status = self._list(scope, base)
        elif kind == "secret":
            body, status = {"key": config.webhook_secret}, 200
        elif kind == "deployment":
            body, status = self._deployment(args[0], args[1])
        else:
            body, status = self._version(args[0], args[1], args[2])
        if fault == "slow":
            await asyncio.sleep(config.slow_seconds)
        if fault == "invalid_json" and status < 400:
            await send_bytes(send, status, NOT_JSON)
            return
        await send_json(send, status, body)

    def _count(self, kind: str, args: tuple[str, ...]) -> None:
        stats = self.stats
        if kind == "create":
            stats.create_attempts += 1
            return
        attr = {
            "get": "gets",
            "list": "lists",
            "cancel": "cancels",
            "secret": "secret_gets",
            "deployment": "deployment_gets",
            "version": "version_gets",
        }[kind]
        setattr(stats, attr, getattr(stats, attr) + 1)
        if kind in ("get", "cancel"):
            counters = stats.predictions.get(args[0])
            if counters is not None:
                setattr(counters, attr, getattr(counters, attr) + 1)

    async def _throttled(self, send: Send, seconds: int, with_header: bool) -> None:
        self.stats.responses_429 += 1
        body = {
            "detail": f"Request was throttled. Expected available in {seconds} seconds.",
            "status": 429,
            "retry_after": seconds,
        }
        headers = [("retry-after", str(seconds))] if with_header else []
        await send_json(send, 429, body, headers)

    def _take_create_token(self) -> int | None:
        """None when a create may proceed, else the whole seconds until one may."""
        per_minute = self.config.create_limit_per_minute
        if per_minute <= 0:
            return None
        now, burst, rate = (
            self.now(),
            float(max(1, self.config.create_limit_burst)),
            per_minute / 60,
        )
        if self._tokens_at is not None:
            self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return max(1, math.ceil((1 - self._tokens) / rate))

    async def _create(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        args: tuple[str, ...],
        base: str,
        fault: str | None,
    ) -> None:
        raw = await _asgi.read_body(receive)
        try:
            new, wait = self._parse_create(raw, headers, args, base)
        except ValueError as exc:
            await send_json(send, 422, problem(422, "Input validation failed", str(exc)))
            return
        limited = self._take_create_token()
        if limited is not None:
            self.stats.create_limited += 1
            await self._throttled(send, limited, True)
            return
        prediction = self.table.create(new, self.now(), self.wall())
        self._models_by_version[prediction.version] = prediction.model
        if fault in ("drop", "error_500"):
            await _fault_reply(fault, receive, send)
            return
        if wait is not None and not await self._hold(prediction, wait, receive):
            return  # the client left while we held its request
        if fault == "slow":
            await asyncio.sleep(self.config.slow_seconds)
        if fault == "invalid_json":
            await send_bytes(send, 201, NOT_JSON)
            return
        await send_json(send, 201, self.prediction_json(prediction))

    def _parse_create(
        self, raw: bytes, headers: dict[str, str], args: tuple[str, ...], base: str
    ) -> tuple[NewPrediction, float | None]:
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise ValueError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        target, owner, name = args
        deployment = None
        if target == "version":
            model, version = parse_version(body.get("version"))
            if model is None:
                model = self._models_by_version.get(version, self.config.default_model)
        else:
            model = check_model_ref(owner, name)
            version = version_for(model)
            if target == "deployment":
                deployment = model
        value = body.get("input")
        if value is None:
            raise ValueError("- input: input is required")
        if not isinstance(value, dict):
            raise ValueError("- input: input must be an object")
        webhook = body.get("webhook")
        events = parse_events(body.get("webhook_events_filter"))
        completed_only = body.get("webhook_completed")
        if webhook is None and completed_only is not None:
            webhook, events = completed_only, frozenset({"completed"})
        if webhook is not None and (
            not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))
        ):
            raise ValueError("webhook must be an http(s) URL")
        cancel_header = headers.get("cancel-after")
        cancel_after = parse_duration(cancel_header) if cancel_header is not None else None
        wait = parse_prefer_wait(headers.get("prefer"), self.config.max_wait)
        new = NewPrediction(
            model=model,
            version=version,
            input=value,
            base_url=base,
            overrides=parse_overrides(value, self.config.fail_message),
            webhook=webhook,
            events=events,
            cancel_after=cancel_after,
            deployment=deployment,
        )
        return new, wait

    async def _hold(self, prediction: FakePrediction, seconds: float, receive: Receive) -> bool:
        """Wait (real time) until the prediction ends or ``seconds`` pass; False if the
        client disconnected meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        gone: asyncio.Future[Any] = asyncio.ensure_future(receive())
        try:
            while True:
                now = self.now()
                remaining = deadline - loop.time()
                if prediction.status(now) in TERMINAL or remaining <= 0:
                    return True
                step = max(_MIN_STEP, min(WAIT_STEP, remaining, prediction.finish_at - now))
                done, _ = await asyncio.wait({gone}, timeout=step)
                if done:
                    return False
        finally:
            gone.cancel()

    def _get(self, prediction_id: str) -> tuple[dict[str, Any], int]:
        prediction = self.table.get(prediction_id)
        if prediction is None:
            return problem(404, "Not found", "The requested resource could not be found."), 404
        return self.prediction_json(prediction), 200

    def _cancel(self, prediction_id: str) -> tuple[dict[str, Any], int]:
        prediction = self.table.get(prediction_id)
        if prediction is None:
            return problem(404, "Not found", "The requested resource could not be found."), 404
        self.table.cancel(prediction, self.now())
        return self.prediction_json(prediction), 200

    def _list(self, scope: Scope, base: str) -> tuple[dict[str, Any], int]:
        query = parse_qs(scope["query_string"].decode("latin-1"))
        try:
            after = query.get("created_after", [None])[-1]
            before = query.get("created_before", [None])[-1]
            created_after = parse_iso(after) if after else None
            created_before = parse_iso(before) if before else None
            cursor = query.get("cursor", [None])[-1]
            older, newer = _parse_cursor(cursor) if cursor else (None, None)
        except ValueError as exc:
            return problem(400, "Bad request", str(exc)), 400
        size = max(1, self.config.page_size)
        items, more_older, more_newer = self.table.page(
            older, newer, created_after, created_before, size
        )
        now, retention = self.now(), self.config.retention
        filters = {k: v for k, v in (("created_after", after), ("created_before", before)) if v}

        def link(token: str) -> str:
            return f"{base}/v1/predictions?" + urlencode({"cursor": token, **filters})

        return {
            "next": link(_cursor("b", items[-1].seq)) if items and more_older else None,
            "previous": link(_cursor("a", items[0].seq)) if items and more_newer else None,
            "results": [p.to_json(now, retention) for p in items],
        }, 200

    def _deployment(self, owner: str, name: str) -> tuple[dict[str, Any], int]:
        ref = f"{owner}/{name}"
        release = {
            "number": 1,
            "model": ref,
            "version": version_for(ref),
            "created_at": iso(self.wall()),
            "created_by": {
                "type": "organization",
                "username": owner,
                "name": owner,
                "github_url": None,
            },
            "configuration": {"hardware": "cpu", "min_instances": 0, "max_instances": 1},
        }
        return {"owner": owner, "name": name, "current_release": release}, 200

    def _version(self, owner: str, name: str, version: str) -> tuple[dict[str, Any], int]:
        output = {"title": "Output", "type": "object"}
        schema = {"openapi": "3.0.2", "components": {"schemas": {"Output": output}}}
        body = {
            "id": version,
            "created_at": iso(self.wall()),
            "cog_version": "0.9.0",
            "openapi_schema": schema,
        }
        return body, 200

    # --- control endpoints (no token, no faults, no latency) ---------------------------------

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/_fake/stats" and method == "GET":
            query = parse_qs(scope["query_string"].decode("latin-1"))
            flag = query.get("per_prediction", ["1"])[-1].lower()
            await send_json(send, 200, self.stats.to_json(flag not in ("0", "false", "no")))
        elif path == "/_fake/reset" and method == "POST":
            await _asgi.read_body(receive)
            self.stats.reset()
            await send_json(send, 200, {"ok": True})
        elif path == "/_fake/config" and method == "GET":
            await send_json(send, 200, self.config.to_json())
        elif path == "/_fake/config" and method == "POST":
            raw = await _asgi.read_body(receive)
            try:
                changes = json.loads(raw or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object of config fields")
                self.update_config(changes)
            except ValueError as exc:
                await send_json(send, 400, {"detail": str(exc)})
                return
            await send_json(send, 200, self.config.to_json())
        elif path == "/_fake/advance" and method == "POST":
            # advance() from another thread would send webhooks outside the server's loop.
            raw = await _asgi.read_body(receive)
            try:
                seconds = json.loads(raw or b"{}").get("seconds")
                if (
                    isinstance(seconds, bool)
                    or not isinstance(seconds, int | float)
                    or not math.isfinite(seconds)
                ):
                    raise ValueError('the body must be {"seconds": <number>}')
                self.advance(float(seconds))
            except (ValueError, AttributeError) as exc:
                await send_json(send, 400, {"detail": str(exc)})
                return
            await send_json(send, 200, {"now": self.now()})
        elif path.startswith("/_fake/predictions/") and method == "GET":
            prediction = self.table.get(path.removeprefix("/_fake/predictions/"))
            if prediction is None:
                await send_json(send, 404, {"detail": "Prediction not found"})
            else:
                await send_json(send, 200, self.describe(prediction))
        elif path.startswith("/_fake/files/") and method == "GET":
            await self._file(path, send)
        else:
            await send_json(send, 404, {"detail": "Not Found"})

    async def _file(self, path: str, send: Send) -> None:
        """An output file: only for a prediction that has it and whose data is not removed."""
        parts = path.removeprefix("/_fake/files/").split("/")
        index_text = parts[1].removesuffix(".png") if len(parts) == 2 else ""
        prediction = self.table.get(parts[0])
        now = self.now()
        if (
            prediction is None
            or not index_text.isdigit()
            or not parts[1].endswith(".png")
            or int(index_text) >= prediction.emitted(prediction.files, now)
            or prediction.removed(now, self.config.retention)
        ):
            await send_json(send, 404, {"detail": "Not Found"})
            return
        self.stats.file_downloads += 1
        body = expected_file_bytes(prediction.id, int(index_text), self.config.file_size)
        await send_bytes(send, 200, body, b"image/png")


def _route(path: str, method: str) -> tuple[str, str, tuple[str, ...]] | None:
    """``(kind, expected method, args)`` for an API path, None when it is not one."""
    parts = path.strip("/").split("/")
    if not parts or parts[0] != "v1" or any(not p for p in parts):
        return None
    rest = parts[1:]
    n = len(rest)
    if rest == ["predictions"]:
        if method == "GET":
            return "list", "GET", ()
        return "create", "POST", ("version", "", "")
    if n == 2 and rest[0] == "predictions":
        return "get", "GET", (rest[1],)
    if n == 3 and rest[0] == "predictions" and rest[2] == "cancel":
        return "cancel", "POST", (rest[1],)
    if n == 4 and rest[0] in ("models", "deployments") and rest[3] == "predictions":
        return "create", "POST", (rest[0].removesuffix("s"), rest[1], rest[2])
    if n == 3 and rest[0] == "deployments":
        return "deployment", "GET", (rest[1], rest[2])
    if n == 5 and rest[0] == "models" and rest[3] == "versions":
        return "version", "GET", (rest[1], rest[2], rest[4])
    if rest == ["webhooks", "default", "secret"]:
        return "secret", "GET", ()
    return None


def _cursor(direction: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{direction}{seq}".encode()).decode().rstrip("=")


def _parse_cursor(token: str) -> tuple[int | None, int | None]:
    """``(older than seq, newer than seq)`` from a cursor made by :func:`_cursor`."""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        direction, seq = text[0], int(text[1:])
    except (ValueError, IndexError):
        raise ValueError("invalid cursor") from None
    if direction == "b" and seq >= 0:
        return seq, None
    if direction == "a" and seq >= 0:
        return None, seq
    raise ValueError("invalid cursor")


async def _fault_reply(fault: str, receive: Receive, send: Send) -> None:
    if fault == "drop":
        await _asgi.drop_connection(receive, send)
        return
    await send_json(send, 500, problem(500, "Internal Server Error", "Internal server error"))


def _base_url(scope: Scope, headers: dict[str, str]) -> str:
    host = headers.get("host")
    if not host:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}"
