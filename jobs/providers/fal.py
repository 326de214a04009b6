"""The fal.ai queue API (docs/protocol.md).

Building requests and reading replies are pure functions; :class:`FalProvider` only adds the
lines that send, the retries and the per-provider rate gate.

Submit is retried only when the request provably never reached the queue (no connection,
429, an ingress error without ``x-fal-request-id``): fal has no idempotency key, so a blind
second POST can start a second paid job. Any other failure after the bytes left raises
``ProviderUnavailable(reached=True)`` and the manager records the job as ambiguous.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..config import Secret
from ..errors import (
    ConfigError,
    ProviderError,
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
)
from ..states import FailureReason, State
from .base import (
    Held,
    Lookup,
    Observation,
    RemoteRef,
    SubmitRequest,
    Submitted,
    WebhookDelivery,
    WebhookUnavailable,
)
from .http import (
    RateGate,
    RetryPolicy,
    never_sent,
    parse_retry_after,
    send_repeatable,
)
from .jwks import JwksCache
from .signatures import FAL_USER_ID, SignatureError, verify_fal

NAMESPACES = ("workflows", "comfy")
PRIORITIES = ("normal", "low")
MIN_START_TIMEOUT = 1.0
_LEGACY_ID = re.compile(r"^(\d+)-([A-Za-z0-9_.-]+)$")
_STATUS_CODE_IN_ERROR = re.compile(r"status code:?\s*(\d{3})", re.IGNORECASE)


@dataclass(frozen=True)
class AppId:
    """An endpoint id split the way fal_client splits it (docs/protocol.md §2)."""

    owner: str
    alias: str
    path: str = ""
    namespace: str = ""

    @classmethod
    def parse(cls, endpoint: str) -> AppId:
        endpoint = endpoint.strip("/")
        if "/" not in endpoint:
            legacy = _LEGACY_ID.match(endpoint)
            if not legacy:
                raise ConfigError(
                    f"fal application {endpoint!r} is not an endpoint id like 'fal-ai/flux/dev'"
                )
            return cls(owner=legacy.group(1), alias=legacy.group(2))
        parts = endpoint.split("/")
        namespace = ""
        if parts[0] in NAMESPACES:
            namespace, parts = parts[0], parts[1:]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(
                f"fal application {endpoint!r} is not an endpoint id like 'fal-ai/flux/dev'"
            )
        return cls(owner=parts[0], alias=parts[1], path="/".join(parts[2:]), namespace=namespace)

    @property
    def base(self) -> str:
        """The part of the URL that status, result and cancel use (no sub-path)."""
        prefix = f"{self.namespace}/" if self.namespace else ""
        return f"{prefix}{self.owner}/{self.alias}"


def submit_url(queue_url: str, application: str, path: str | None, webhook: str | None) -> str:
    url = f"{queue_url}/{application.strip('/')}"
    if path:
        url += "/" + path.strip("/")
    if webhook:
        # The whole webhook URL is one parameter value, so its own query survives.
        url += "?fal_webhook=" + quote(webhook, safe="")
    return url


def request_ref(queue_url: str, application: str, request_id: str) -> RemoteRef:
    base = f"{queue_url}/{AppId.parse(application).base}/requests/{request_id}"
    return RemoteRef(
        application=application,
        request_id=request_id,
        status_url=f"{base}/status",
        response_url=base,
        cancel_url=f"{base}/cancel",
    )


def submit_headers(request: SubmitRequest) -> dict[str, str]:
    headers = {}
    if request.priority:
        if request.priority not in PRIORITIES:
            raise ConfigError(f"priority must be 'normal' or 'low', not {request.priority!r}")
        headers["X-Fal-Queue-Priority"] = request.priority
    if request.hint:
        headers["X-Fal-Runner-Hint"] = request.hint
    if request.start_timeout is not None:
        # fal_client refuses 1 s or less too; fal reads the value as decimal seconds
        if not request.start_timeout > MIN_START_TIMEOUT or request.start_timeout == math.inf:
            raise ConfigError(
                f"start_timeout must be more than {MIN_START_TIMEOUT:g} second, "
                f"not {request.start_timeout!r}"
            )
        headers["X-Fal-Request-Timeout"] = str(float(request.start_timeout))
    return headers


MAX_REQUEST_ID = 128  # the jobs.request_id column


def _sendable(name: str, value: str) -> None:
    """URL parts and header values must be plain visible ASCII: no spaces, no line breaks
    (a newline in a header is an injection), nothing a proxy might rewrite."""
    if not (value.isascii() and value.isprintable() and " " not in value):
        raise ConfigError(f"{name} {value!r} must be printable ASCII without spaces")


def _plain_segments(name: str, value: str) -> None:
    """Each ``/``-separated part of a URL path we build must be a plain name: no ``.`` or
    ``..`` (which climb out of the application), no empty part, no ``%`` escape (decoded
    by a server into any of those), no ``?`` or ``#`` (which end the path)."""
    for part in value.strip("/").split("/"):
        if part in ("", ".", "..") or any(c in part for c in "%?#\\"):
            raise ConfigError(
                f"{name} {value!r} must be plain path segments (no '..', '.', empty parts, "
                "'%', '?', '#' or backslash)"
            )


# Besides a string "url", a fal File (or Image) object has one of these.
FILE_KEYS = ("content_type", "file_name", "file_size")


def file_of(value: Any) -> tuple[str, str | None, str | None] | None:
    """``(url, file name, content type)`` when ``value`` is a fal File object."""
    if not isinstance(value, Mapping):
        return None
    url = value.get("url")
    if not isinstance(url, str) or not any(key in value for key in FILE_KEYS):
        return None
    return url, value.get("file_name"), value.get("content_type")


def check_request(request: SubmitRequest) -> None:
    """Refuse, before anything is recorded, a request fal could not receive as sent."""
    _sendable("application", request.application)
    _plain_segments("application", request.application)
    AppId.parse(request.application)
    if request.path:
        _sendable("path", request.path)
        _plain_segments("path", request.path)
    if request.hint:
        _sendable("hint", request.hint)
    if request.cancel_after is not None:
        raise ConfigError("fal has no cancel-after deadline; use a start timeout instead")
    submit_headers(request)
    try:
        json.dumps(request.arguments, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        reason = "too deeply nested" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError(f"the arguments cannot be sent as JSON: {reason}") from None


def loads(data: bytes | str) -> Any:
    """Parse JSON from fal. Python's parser accepts ``NaN``, ``Infinity`` and ``1e400``, which
    JSON does not have and PostgreSQL's JSON columns refuse: they are read as null, so one odd
    number cannot keep a whole result from being stored."""
    return json.loads(data, parse_constant=lambda _: None, parse_float=_finite_or_none)


def _finite_or_none(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _json(response: httpx.Response) -> Any:
    try:
        return loads(response.content)
    except ValueError:
        raise ProviderProtocolError(
            f"fal answered {response.status_code} with a body that is not JSON",
            status_code=response.status_code,
            body=response.text[:500],
        ) from None


def _logs(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    logs = body.get("logs")
    if not isinstance(logs, list):
        return ()
    return tuple(entry for entry in logs if isinstance(entry, Mapping))


def observation_from_status(body: Any) -> Observation:
    """Map a status reply. COMPLETED says nothing about success: the result decides (P3)."""
    if not isinstance(body, Mapping):
        raise ProviderProtocolError("fal status reply is not a JSON object", body=body)
    status = body.get("status")
    metrics = body.get("metrics") if isinstance(body.get("metrics"), Mapping) else None
    if status == "IN_QUEUE":
        position = body.get("queue_position")
        return Observation(
            state=State.QUEUED, queue_position=position if isinstance(position, int) else None
        )
    if status == "IN_PROGRESS":
        return Observation(state=State.IN_PROGRESS, logs=_logs(body))
    if status == "COMPLETED":
        # A failed request reports ``error``/``error_type`` here; the result holds the detail.
        error = None
        if body.get("error") or body.get("error_type"):
            error = {"type": body.get("error_type"), "message": body.get("error")}
        return Observation(
            state=State.IN_PROGRESS,
            logs=_logs(body),
            metrics=metrics,
            error=error,
            needs_result=True,
        )
    raise ProviderProtocolError(f"fal reported an unknown status {status!r}", body=body)


def error_from_response(response: httpx.Response) -> dict[str, Any]:
    """The error as fal reported it: type, message, detail, status code, request id."""
    try:
        body: Any = loads(response.content)
    except ValueError:
        body = response.text[:2000]
    detail = body.get("detail") if isinstance(body, Mapping) else body
    error_type = (body.get("error_type") if isinstance(body, Mapping) else None) or (
        response.headers.get("x-fal-error-type")
    )
    message = detail if isinstance(detail, str) else None
    if message is None and isinstance(detail, list) and detail:
        first = detail[0]
        if isinstance(first, Mapping):
            where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    retryable = response.headers.get("x-fal-retryable")
    return {
        "type": error_type or f"http_{response.status_code}",
        "message": message or f"fal answered HTTP {response.status_code}",
        "detail": body,
        "status_code": response.status_code,
        "request_id": response.headers.get("x-fal-request-id"),
        "retryable": None if retryable is None else retryable.lower() == "true",
    }


def _is_replayed_error(response: httpx.Response) -> bool:
    """A result endpoint error that is the request's own outcome, not a passing hiccup."""
    if response.headers.get("x-fal-error-type"):
        return True
    if response.status_code == 429:
        return False  # the platform's rate limit, not the app's answer: try again
    try:
        body = loads(response.content)
    except ValueError:
        return False
    return isinstance(body, Mapping) and ("detail" in body or "error_type" in body)


def _is_ingress_error(response: httpx.Response) -> bool:
    """502/503/504 from the load balancer in front of fal: the queue never saw the request."""
    return (
        response.status_code in (502, 503, 504)
        and "x-fal-request-id" not in response.headers
        and "nginx" in response.text.lower()
    )


def observation_from_result(response: httpx.Response) -> Observation:
    """Map a reply of the result endpoint (called once the request completed)."""
    code = response.status_code
    if 200 <= code < 300:
        return Observation(state=State.SUCCEEDED, result=_json(response), source="result")
    error = error_from_response(response)
    if code == 404:
        error["message"] = "fal no longer keeps this result (retention expired) or never knew it"
        return Observation(
            state=State.FAILED,
            error=error,
            failure_reason=FailureReason.RESULT_UNAVAILABLE,
            source="result",
        )
    if code == 400 and not _is_replayed_error(response):
        return Observation(state=State.IN_PROGRESS, source="result")  # not finished yet
    if code == 499 or error["type"] == "client_cancelled":
        return Observation(state=State.CANCELLED, error=error, source="result")
    return Observation(
        state=State.FAILED, error=error, failure_reason=FailureReason.REMOTE_ERROR, source="result"
    )


def parse_webhook(
    headers: Mapping[str, str],
    body: bytes,
    keys: Sequence[Ed25519PublicKey],
    now: float,
    *,
    job_id: str | None = None,
    attempt: int | None = None,
) -> WebhookDelivery:
    """Verify and read a fal callback. Raises ``SignatureError`` or ``ValueError`` (malformed)."""
    signed_request_id = verify_fal(headers, body, keys, now)
    user_id = {k.lower(): v for k, v in headers.items()}[FAL_USER_ID]
    payload = loads(body)
    if not isinstance(payload, Mapping):
        raise ValueError("webhook body is not a JSON object")
    request_id = payload.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("webhook body has no request_id")
    if request_id != signed_request_id and payload.get("gateway_request_id") != signed_request_id:
        raise ValueError("webhook body names another request than its signed header")
    return WebhookDelivery(
        request_id=request_id,
        observation=observation_from_webhook(payload),
        user_id=user_id,
        job_id=job_id,
        attempt=attempt,
    )


def observation_from_webhook(payload: Mapping[str, Any]) -> Observation:
    status = payload.get("status")
    inner = payload.get("payload")
    if inner is None and "payload_error" in payload:
        # fal could not include the payload: the queue still has it (docs/protocol.md §10).
        return Observation(state=State.IN_PROGRESS, needs_result=True, source="webhook")
    if status == "OK":
        return Observation(state=State.SUCCEEDED, result=inner, source="webhook")
    if status == "ERROR":
        message = payload.get("error") or "fal reported an error"
        found = _STATUS_CODE_IN_ERROR.search(str(message))
        code = int(found.group(1)) if found else None
        detail = inner.get("detail") if isinstance(inner, Mapping) else inner
        error_type = inner.get("error_type") if isinstance(inner, Mapping) else None
        error = {
            "type": error_type or (f"http_{code}" if code else "remote_error"),
            "message": detail if isinstance(detail, str) else str(message),
            "detail": inner,
            "status_code": code,
            "request_id": payload.get("request_id"),
            "retryable": None,
        }
        if code == 499 or error_type == "client_cancelled":
            return Observation(state=State.CANCELLED, error=error, source="webhook")
        return Observation(
            state=State.FAILED,
            error=error,
            failure_reason=FailureReason.REMOTE_ERROR,
            source="webhook",
        )
    raise ValueError(f"webhook status {status!r} is neither OK nor ERROR")


Sleep = Callable[[float], Awaitable[None]]


class FalProvider:
    """fal's queue, over an injected ``httpx.AsyncClient`` (tests pass the emulator's)."""

    name = "fal"

    def __init__(
        self,
        *,
        queue_url: str,
        key: Secret | None,
        client: httpx.AsyncClient,
        keys: JwksCache | None = None,
        account: str | None = None,
        retry: RetryPolicy | None = None,
        gate: RateGate | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.queue_url = queue_url.rstrip("/")
        self._key = key
        self._client = client
        self.keys = keys
        self.account = account
        self._retry = retry or RetryPolicy()
        self.gate = gate or RateGate(sleep=sleep, max_pause=self._retry.max_retry_after)
        self.gate.max_pause = min(self.gate.max_pause, self._retry.max_retry_after)
        self._sleep = sleep

    def _auth(self) -> dict[str, str]:
        if self._key is None:
            raise ConfigError("FAL_KEY is not set: export FAL_KEY=<your fal API key> and retry")
        return {"Authorization": f"Key {self._key.reveal()}"}

    def ref_for(self, application: str, request_id: str) -> RemoteRef:
        return request_ref(self.queue_url, application, request_id)

    def track_ref(self, application: str, request_id: str) -> RemoteRef:
        """The ref of a request made elsewhere, refusing (``ConfigError``) an application or
        request id that could not name one."""
        _sendable("request id", request_id)
        if len(request_id) > MAX_REQUEST_ID or set(request_id) & set("/?#%"):
            raise ConfigError(
                f"request id {request_id!r} is not a fal request id (at most "
                f"{MAX_REQUEST_ID} characters, no '/', '?', '#' or '%')"
            )
        ref = self.ref_for(application, request_id)
        self._auth()  # a job that could never be polled is not worth recording
        return ref

    def check(self, request: SubmitRequest) -> None:
        check_request(request)
        self._auth()

    def send_delay(self) -> float:
        return self.gate.remaining()

    def retry_delay(self, attempt: int) -> float:
        return self._retry.delay(attempt)

    async def submit(self, request: SubmitRequest) -> Submitted:
        url = submit_url(self.queue_url, request.application, request.path, request.webhook_url)
        headers = {**self._auth(), **submit_headers(request)}
        for attempt in range(1, self._retry.attempts + 1):
            last = attempt == self._retry.attempts
            await self.gate.wait()
            try:
                response = await self._client.post(url, json=request.arguments, headers=headers)
            except httpx.TransportError as exc:
                if never_sent(exc) and not last:
                    await self._sleep(self._retry.delay(attempt))
                    continue
                raise ProviderUnavailable(
                    f"submit to fal failed: {type(exc).__name__}: {exc}",
                    reached=not never_sent(exc),
                ) from None
            code = response.status_code
            if code == 429 or _is_ingress_error(response):
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                if code == 429:
                    self.gate.pause(self._retry.delay(attempt, retry_after))
                if not last:
                    await self._sleep(0 if code == 429 else self._retry.delay(attempt, retry_after))
                    continue
                raise ProviderUnavailable(
                    f"fal did not accept the submit (HTTP {code}) after {attempt} attempts",
                    status_code=code,
                    retry_after=retry_after,
                    reached=False,
                )
            if 200 <= code < 300:
                return self._submitted(request, response)
            error = error_from_response(response)
            if 400 <= code < 500 and code not in (408, 409):
                raise ProviderRejected(
                    f"fal rejected the submit (HTTP {code}): {error['message']}",
                    status_code=code,
                    body=error,
                )
            raise ProviderUnavailable(
                f"fal answered the submit with HTTP {code}; it may or may not have been queued",
                status_code=code,
                body=error,
                request_id=response.headers.get("x-fal-request-id"),
                reached=True,
            )
        raise AssertionError("unreachable: the loop returns or raises")

    def _submitted(self, request: SubmitRequest, response: httpx.Response) -> Submitted:
        try:
            body = loads(response.content)
            request_id = body["request_id"]
            if not isinstance(request_id, str) or not request_id:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            # The queue answered 2xx, so the request is probably queued, but we cannot
            # tell which: an ambiguous submit.
            raise ProviderUnavailable(
                "fal accepted the submit but its reply has no request_id",
                status_code=response.status_code,
                body=response.text[:500],
                reached=True,
            ) from None
        built = self.ref_for(request.application, request_id)
        ref = RemoteRef(
            application=request.application,
            request_id=request_id,
            status_url=body.get("status_url") or built.status_url,
            response_url=body.get("response_url") or built.response_url,
            cancel_url=body.get("cancel_url") or built.cancel_url,
        )
        position = body.get("queue_position")
        observation = Observation(
            state=State.QUEUED,
            queue_position=position if isinstance(position, int) else None,
            source="submit",
        )
        return Submitted(
            ref=ref, observation=observation, gateway_request_id=body.get("gateway_request_id")
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        final: Callable[[httpx.Response], bool] = lambda r: False,
    ) -> httpx.Response:
        """An idempotent request (:func:`jobs.providers.http.send_repeatable`)."""
        return await send_repeatable(
            self._client,
            method,
            url,
            provider="fal",
            headers=self._auth(),
            retry=self._retry,
            gate=self.gate,
            sleep=self._sleep,
            final=final,
        )

    async def find_submitted(
        self, request: SubmitRequest, *, job_id: str, since: float, held: Held | None = None
    ) -> Lookup:
        # fal's queue API cannot list requests (docs/protocol.md): only a webhook naming
        # the job, or the ambiguous policy, can settle a lost submit.
        return Lookup(None, certain=False, detail="fal cannot list the requests it received")

    async def status(self, ref: RemoteRef, *, logs: bool = True) -> Observation:
        url = ref.status_url or self.ref_for(ref.application, ref.request_id).status_url
        assert url is not None
        # A ready URL: a params= merge makes httpx parse and copy the URL again on every poll.
        url += ("&" if "?" in url else "?") + ("logs=1" if logs else "logs=0")
        response = await self._send("GET", url)
        if response.status_code == 404:
            return observation_from_result(response)
        if response.status_code in (401, 403):
            raise ProviderRejected(
                f"fal refused the status request (HTTP {response.status_code}); check FAL_KEY",
                status_code=response.status_code,
            )
        if response.status_code not in (200, 202):
            raise ProviderError(
                f"fal answered the status request with HTTP {response.status_code}",
                status_code=response.status_code,
            )
        return observation_from_status(_json(response))

    async def result(self, ref: RemoteRef, *, failed: bool | None = None) -> Observation:
        """Fetch the outcome. ``failed``: what the status said (None when unknown). When the
        status reported success, an error reply is a passing fault and is retried; when it
        reported a failure, the replayed error is the outcome."""
        url = ref.response_url or self.ref_for(ref.application, ref.request_id).response_url
        assert url is not None
        final = (lambda r: False) if failed is False else _is_replayed_error
        response = await self._send("GET", url, final=final)
        if failed is False and response.status_code >= 500:
            raise ProviderUnavailable(
                f"fal answered the result request with HTTP {response.status_code}",
                status_code=response.status_code,
            )
        if response.status_code in (401, 403) and not _is_replayed_error(response):
            raise ProviderRejected(
                f"fal refused the result request (HTTP {response.status_code}); check FAL_KEY",
                status_code=response.status_code,
            )
        return observation_from_result(response)

    async def cancel(self, ref: RemoteRef) -> bool:
        url = ref.cancel_url or self.ref_for(ref.application, ref.request_id).cancel_url
        assert url is not None
        response = await self._send("PUT", url)
        if 200 <= response.status_code < 300:
            return True
        if response.status_code in (400, 404):
            return False
        raise ProviderRejected(
            f"fal refused the cancel (HTTP {response.status_code})",
            status_code=response.status_code,
        )

    async def parse_webhook(
        self,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float,
        job_id: str | None = None,
        attempt: int | None = None,
    ) -> WebhookDelivery:
        """Verify a callback against fal's published keys (docs/protocol.md §11) and read it.

        A signature that matches no cached key triggers one (rate-limited) refetch and a
        second verification, so a key rotation costs at most one rejected delivery per key."""
        if self.keys is None:
            raise WebhookUnavailable("no JWKS URL is configured for fal's signing keys")
        keys = await self.keys.keys()
        try:
            return parse_webhook(headers, body, keys, now, job_id=job_id, attempt=attempt)
        except SignatureError:
            if not await self.keys.refresh_after_miss(keys):
                raise
        keys = await self.keys.keys()
        return parse_webhook(headers, body, keys, now, job_id=job_id, attempt=attempt)

    async def close(self) -> None:
        if self.keys is not None:
            await self.keys.aclose()
        await self._client.aclose()
