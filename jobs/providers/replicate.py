"""Replicate's predictions API behind the provider protocol.

Naming an application
---------------------
``owner/name``
    an official model: ``POST /v1/models/{owner}/{name}/predictions``.
``owner/name:<version id>`` or a bare version id (64 lowercase hex digits)
    one model version: ``POST /v1/predictions`` with ``"version": "<version id>"``.
``deployments/owner/name``
    a deployment: ``POST /v1/deployments/{owner}/{name}/predictions``.

Anything else is refused by :meth:`ReplicateProvider.check` before a job is recorded, as are
the fal-only options (``path``, ``priority``, ``hint``, ``start_timeout``): Replicate has no
equivalent, and silently dropping one would run something other than what was asked.
``cancel_after`` becomes the ``Cancel-After`` header (a deadline: ``aborted`` if the run has
not started by then, ``canceled`` if it has). ``Prefer: wait`` is never sent: every job is
tracked durably, and a sync-mode reply can look finished while it is not.

Submit safety
-------------
Replicate documents no idempotency key, so a second POST may start a second paid
prediction. A create is sent again only when it provably never arrived (no connection was
made) or was answered 429 (nothing was created). Any other failure after the bytes left (a
5xx, a dropped connection, an unreadable 2xx) raises ``ProviderUnavailable(reached=True)``:
the manager records the submit as ambiguous, and :meth:`ReplicateProvider.find_submitted`
can settle it by listing recent predictions.

Replies
-------
Only ``succeeded``, ``failed``, ``canceled`` and ``aborted`` are terminal; a prediction is
never taken as finished because its ``output`` is filled. A succeeded prediction whose
``data_removed`` is true (Replicate deletes API predictions' outputs after an hour) is
reported failed as ``result_unavailable``. ``logs`` is one string that grows: each complete
line becomes one entry ``{"message", "level", "source", "timestamp", "line"}``, like fal's
entries, where ``timestamp`` is ``"line N"`` (Replicate gives lines no time) so the store's
de-duplication on (timestamp, message) keeps repeated identical lines apart and sees the
same line as the same on every poll. The last, unterminated line is held back until the
prediction is terminal, because it may still be growing (a progress bar redrawn with
``\\r`` shows as its last redraw).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import httpx

from ..config import Secret
from ..errors import (
    ConfigError,
    ProviderError,
    ProviderProtocolError,
    ProviderRejected,
    ProviderUnavailable,
)
from ..states import FailureReason, State
from . import standard_webhooks
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
from .fal import loads
from .http import (
    RateGate,
    RetryPolicy,
    never_sent,
    parse_retry_after,
    send_repeatable,
)

WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
DEFAULT_WEBHOOK_EVENTS = ("completed",)
TERMINAL_STATUSES = ("succeeded", "failed", "canceled", "aborted")
# Listing recent predictions to settle an ambiguous submit: how far before the send to look
# (clocks differ), and the most pages (100 predictions each) to read. At Replicate's create
# limit (600 a minute) the skew margin alone holds 6 pages, and a lookup by the resolver
# some 130 s after the send (its grace and period) about 19: 20 covers both.
LIST_SKEW_SECONDS = 60.0
MAX_LIST_PAGES = 20
MIN_CANCEL_AFTER = 1.0
MAX_PREDICTION_ID = 64
MESSAGE_LIMIT = 300

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSION = re.compile(r"[0-9a-f]{64}")
_PREDICTION_ID = re.compile(rf"[a-z0-9]{{1,{MAX_PREDICTION_ID}}}")
_FORMS = (
    "owner/name, owner/name:<64-hex version id>, a 64-hex version id, or deployments/owner/name"
)

TOKEN_MISSING = (
    "REPLICATE_API_TOKEN is not set: export REPLICATE_API_TOKEN=<your Replicate API token> "
    "and retry"
)


@dataclass(frozen=True)
class Target:
    """What an application names at Replicate (see the module docstring)."""

    kind: Literal["model", "version", "deployment"]
    owner: str = ""
    name: str = ""
    version: str = ""

    @classmethod
    def parse(cls, application: str) -> Target:
        def refuse() -> ConfigError:
            return ConfigError(f"Replicate application {application!r} is not {_FORMS}")

        if _VERSION.fullmatch(application):
            return cls(kind="version", version=application)
        model, colon, version = application.partition(":")
        parts = model.split("/")
        if not all(_SEGMENT.fullmatch(p) for p in parts):
            raise refuse()
        if parts[0] == "deployments":  # never a model owner: the prefix of deployments
            if len(parts) != 3 or colon:
                raise refuse()
            return cls(kind="deployment", owner=parts[1], name=parts[2])
        if colon:
            if len(parts) != 2:
                raise refuse()
            if not _VERSION.fullmatch(version):
                raise ConfigError(
                    f"Replicate version id {version!r} in {application!r} is not 64 "
                    "lowercase hex digits"
                )
            return cls(kind="version", owner=parts[0], name=parts[1], version=version)
        if len(parts) == 2:
            return cls(kind="model", owner=parts[0], name=parts[1])
        raise refuse()

    @property
    def create_path(self) -> str:
        if self.kind == "model":
            return f"/v1/models/{self.owner}/{self.name}/predictions"
        if self.kind == "deployment":
            return f"/v1/deployments/{self.owner}/{self.name}/predictions"
        return "/v1/predictions"

    def matches(self, prediction: Mapping[str, Any]) -> bool | None:
        """Whether a listed prediction was made for this target; None when the prediction
        does not say (a deployment's predictions name the model behind it, not the
        deployment, unless a ``deployment`` field is present)."""
        if self.kind == "version":
            return prediction.get("version") == self.version
        wanted = f"{self.owner}/{self.name}".lower()
        if self.kind == "model":
            model = prediction.get("model")
            return isinstance(model, str) and model.lower() == wanted
        deployment = prediction.get("deployment")
        if deployment is None:
            return None
        return isinstance(deployment, str) and deployment.lower() == wanted


def format_duration(seconds: float) -> str:
    """Seconds as a Replicate duration (``90`` → ``1m30s``, ``3723`` → ``1h2m3s``), rounded
    up to whole seconds so a deadline never comes early."""
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{secs}s" if secs or not text else "")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def file_of(value: Any) -> tuple[str, str | None, str | None] | None:
    """``(url, None, None)`` when ``value`` is an output file: Replicate gives files as
    plain http(s) URLs (served from replicate.delivery, deleted with the prediction after
    its one-hour retention, so they are cached when the job succeeds)."""
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return value, None, None
    return None


def check_request(request: SubmitRequest) -> Target:
    """Refuse, before anything is recorded, a request Replicate could not receive as sent."""
    target = Target.parse(request.application)
    refusals = (
        (request.path, "sub-paths (path); name the model, version or deployment alone"),
        (request.priority, "queue priority (priority)"),
        (request.hint, "runner hint (hint)"),
        (
            request.start_timeout,
            "start timeout (start_timeout); use cancel_after, the Cancel-After deadline",
        ),
    )
    for value, what in refusals:
        if value is not None and value != "":
            raise ConfigError(f"Replicate has no {what}")
    if request.cancel_after is not None:
        after = request.cancel_after
        if not (MIN_CANCEL_AFTER <= after < math.inf):
            raise ConfigError(
                f"cancel_after must be at least {MIN_CANCEL_AFTER:g} second, not {after!r}"
            )
    try:
        json.dumps(request.arguments, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        reason = "too deeply nested" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError(f"the arguments cannot be sent as JSON: {reason}") from None
    return target


def check_prediction_id(prediction_id: str) -> None:
    if not _PREDICTION_ID.fullmatch(prediction_id):
        raise ConfigError(
            f"request id {prediction_id[:80]!r} is not a Replicate prediction id (lowercase "
            f"letters and digits, at most {MAX_PREDICTION_ID})"
        )


def prediction_ref(api_url: str, application: str, prediction_id: str) -> RemoteRef:
    """URLs built from the id, never taken from a reply: the token is only ever sent to the
    configured API."""
    get = f"{api_url}/v1/predictions/{prediction_id}"
    return RemoteRef(
        application=application,
        request_id=prediction_id,
        status_url=get,
        response_url=get,  # the prediction itself holds the output
        cancel_url=f"{get}/cancel",
    )


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MESSAGE_LIMIT else line[: MESSAGE_LIMIT - 3] + "..."


def error_from_response(response: httpx.Response) -> dict[str, Any]:
    """An error reply (RFC 7807 problem details) as our error mapping."""
    try:
        body: Any = loads(response.content)
    except ValueError:
        body = response.text[:2000]
    message = None
    problem_type = None
    if isinstance(body, Mapping):
        for key in ("detail", "title"):
            if isinstance(body.get(key), str) and body[key].strip():
                message = _one_line(body[key])
                break
        problem_type = body.get("type") if isinstance(body.get("type"), str) else None
    return {
        "type": problem_type or f"http_{response.status_code}",
        "message": message or f"Replicate answered HTTP {response.status_code}",
        "detail": body,
        "status_code": response.status_code,
        "request_id": None,
        "retryable": None,
    }


def retry_after_of(response: httpx.Response) -> float | None:
    """How long a 429 asks to wait: the larger of the ``Retry-After`` header and the body's
    ``retry_after`` (seconds), when either is given."""
    header = parse_retry_after(response.headers.get("retry-after"))
    body_value = None
    try:
        body = loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        raw = body.get("retry_after")
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            body_value = max(0.0, float(raw))
        elif isinstance(raw, str):
            body_value = parse_retry_after(raw)
    given = [v for v in (header, body_value) if v is not None]
    return max(given) if given else None


def log_entries(logs: Any, *, finished: bool) -> tuple[Mapping[str, Any], ...]:
    """Replicate's log string as entries, stable across polls (see the module docstring)."""
    if not isinstance(logs, str) or not logs:
        return ()
    lines = logs.split("\n")
    tail = lines.pop()  # "" when the text ends with a newline, else a line still growing
    if finished and tail:
        lines.append(tail)
    entries = []
    for number, raw in enumerate(lines, 1):
        text = raw.rstrip("\r").rsplit("\r", 1)[-1]
        if not text.strip():
            continue  # blank lines carry nothing; numbering still counts them
        entries.append(
            {
                "message": text,
                "level": "INFO",
                "source": "replicate",
                "timestamp": f"line {number}",
                "line": number,
            }
        )
    return tuple(entries)


def _metrics(prediction: Mapping[str, Any]) -> Mapping[str, Any] | None:
    metrics = prediction.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        return None
    out = dict(metrics)
    predict_time = out.get("predict_time")
    if isinstance(predict_time, int | float) and "inference_time" not in out:
        # the name fal uses for the run time, which the manager's detection lag reads
        out["inference_time"] = predict_time
    return out


def observation_from_prediction(
    prediction: Any, *, source: str = "poll", logs: bool = True
) -> Observation:
    """Map a prediction object (a poll, a webhook body, a listing entry) to an observation."""
    if not isinstance(prediction, Mapping):
        raise ProviderProtocolError("Replicate's prediction is not a JSON object", body=prediction)
    status = prediction.get("status")
    prediction_id = prediction.get("id")
    finished = status in TERMINAL_STATUSES
    entries = log_entries(prediction.get("logs"), finished=finished) if logs else ()
    metrics = _metrics(prediction)
    if status == "starting":
        return Observation(state=State.QUEUED, logs=entries, metrics=metrics, source=source)
    if status == "processing":
        return Observation(state=State.IN_PROGRESS, logs=entries, metrics=metrics, source=source)

    def error(kind: str, message: str, detail: Any = None) -> dict[str, Any]:
        return {
            "type": kind,
            "message": message,
            "detail": detail,
            "status_code": None,
            "request_id": prediction_id,
            "retryable": None,
        }

    def end(state: State, **fields: Any) -> Observation:
        return Observation(state=state, logs=entries, metrics=metrics, source=source, **fields)

    if status == "succeeded":
        if prediction.get("data_removed") is True:
            return end(
                State.FAILED,
                failure_reason=FailureReason.RESULT_UNAVAILABLE,
                error=error(
                    "data_removed",
                    "the prediction succeeded, but Replicate removed its output after its "
                    "one-hour retention for API predictions before it was fetched",
                ),
            )
        return end(State.SUCCEEDED, result=prediction.get("output"))
    if status == "failed":
        raw = prediction.get("error")
        message = _one_line(str(raw)) if raw else None
        if message is None and prediction.get("data_removed") is True:
            return end(
                State.FAILED,
                failure_reason=FailureReason.RESULT_UNAVAILABLE,
                error=error(
                    "data_removed",
                    "the prediction failed; Replicate removed its details after its "
                    "one-hour retention",
                ),
            )
        return end(
            State.FAILED,
            failure_reason=FailureReason.REMOTE_ERROR,
            error=error("remote_error", message or "Replicate reported a failure", raw),
        )
    if status == "canceled":
        return end(
            State.CANCELLED,
            error=error(
                "canceled",
                "Replicate canceled the prediction (a cancel request, or its Cancel-After "
                "deadline passed while it ran)",
            ),
        )
    if status == "aborted":
        return end(
            State.CANCELLED,
            failure_reason=FailureReason.TIMEOUT,
            error=error(
                "aborted",
                "Replicate aborted the prediction: its Cancel-After deadline passed before "
                "it started (not billed)",
            ),
        )
    raise ProviderProtocolError(
        f"Replicate reported an unknown prediction status {str(status)[:40]!r}", body=prediction
    )


def _job_of(webhook: str | None) -> str | None:
    """The job id in a webhook URL's query (``...?job=<id>&attempt=N``), if any."""
    if not webhook:
        return None
    jobs = parse_qs(urlsplit(webhook).query).get("job")
    return jobs[0] if jobs else None


def _created_at(prediction: Mapping[str, Any]) -> float | None:
    raw = prediction.get("created_at")
    if not isinstance(raw, str):
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


Sleep = Callable[[float], Awaitable[None]]


class ReplicateProvider:
    """Replicate's predictions API, over an injected ``httpx.AsyncClient``.

    ``webhook_events`` is sent as ``webhook_events_filter`` (any of start, output, logs,
    completed); ``webhook_secrets`` verify callbacks (several during a rotation)."""

    name = "replicate"
    # A delivery verified with our own secret is ours: there is no account to compare.
    account: str | None = None

    def __init__(
        self,
        *,
        api_url: str,
        token: Secret | None,
        client: httpx.AsyncClient,
        webhook_secrets: Sequence[Secret] = (),
        webhook_events: Sequence[str] = DEFAULT_WEBHOOK_EVENTS,
        retry: RetryPolicy | None = None,
        gate: RateGate | None = None,
        sleep: Sleep = asyncio.sleep,
        list_pages: int = MAX_LIST_PAGES,
        list_skew: float = LIST_SKEW_SECONDS,
    ) -> None:
        unknown = [e for e in webhook_events if e not in WEBHOOK_EVENTS]
        if unknown or not webhook_events:
            raise ConfigError(
                f"Replicate webhook events must be some of {', '.join(WEBHOOK_EVENTS)}, "
                f"not {list(webhook_events)!r}"
            )
        for secret in webhook_secrets:
            try:
                standard_webhooks.secret_key(secret.reveal())
            except ValueError as exc:
                raise ConfigError(f"a Replicate webhook secret {exc} (not shown)") from None
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._client = client
        self.webhook_secrets = tuple(webhook_secrets)
        self.webhook_events = tuple(dict.fromkeys(webhook_events))
        self._retry = retry or RetryPolicy()
        self.gate = gate or RateGate(sleep=sleep, max_pause=self._retry.max_retry_after)
        self.gate.max_pause = min(self.gate.max_pause, self._retry.max_retry_after)
        self._sleep = sleep
        self.list_pages = list_pages
        self.list_skew = list_skew

    def _auth(self) -> dict[str, str]:
        if self._token is None:
            raise ConfigError(TOKEN_MISSING)
        return {"Authorization": f"Bearer {self._token.reveal()}"}

    def ref_for(self, application: str, request_id: str) -> RemoteRef:
        return prediction_ref(self.api_url, application, request_id)

    def track_ref(self, application: str, request_id: str) -> RemoteRef:
        Target.parse(application)
        check_prediction_id(request_id)
        self._auth()  # a job that could never be polled is not worth recording
        return self.ref_for(application, request_id)

    def check(self, request: SubmitRequest) -> None:
        check_request(request)
        self._auth()

    def send_delay(self) -> float:
        return self.gate.remaining()

    def retry_delay(self, attempt: int) -> float:
        return self._retry.delay(attempt)

    def submit_body(self, request: SubmitRequest, target: Target) -> dict[str, Any]:
        body: dict[str, Any] = {"input": dict(request.arguments)}
        if target.kind == "version":
            body["version"] = target.version
        if request.webhook_url:
            body["webhook"] = request.webhook_url
            body["webhook_events_filter"] = list(self.webhook_events)
        return body

    async def submit(self, request: SubmitRequest) -> Submitted:
        target = check_request(request)
        headers = self._auth()
        if request.cancel_after is not None:
            headers["Cancel-After"] = format_duration(request.cancel_after)
        url = self.api_url + target.create_path
        body = self.submit_body(request, target)
        for attempt in range(1, self._retry.attempts + 1):
            last = attempt == self._retry.attempts
            await self.gate.wait()
            try:
                response = await self._client.post(url, json=body, headers=headers)
            except httpx.TransportError as exc:
                if never_sent(exc) and not last:
                    await self._sleep(self._retry.delay(attempt))
                    continue
                raise ProviderUnavailable(
                    f"submit to Replicate failed: {type(exc).__name__}: {exc}",
                    reached=not never_sent(exc),
                ) from None
            code = response.status_code
            if code == 429:
                # Nothing was created; every request to Replicate waits at the gate.
                retry_after = retry_after_of(response)
                self.gate.pause(self._retry.delay(attempt, retry_after))
                if not last:
                    await self._sleep(0)
                    continue
                raise ProviderUnavailable(
                    f"Replicate rate-limited the submit (HTTP 429) {attempt} times",
                    status_code=code,
                    retry_after=retry_after,
                    reached=False,
                )
            if 200 <= code < 300:
                return self._submitted(request, response)
            error = error_from_response(response)
            if 400 <= code < 500 and code not in (408, 409):
                hint = "; check REPLICATE_API_TOKEN" if code in (401, 403) else ""
                raise ProviderRejected(
                    f"Replicate rejected the prediction (HTTP {code}): {error['message']}{hint}",
                    status_code=code,
                    body=error,
                )
            raise ProviderUnavailable(
                f"Replicate answered the submit with HTTP {code}; the prediction may or may "
                "not have been created",
                status_code=code,
                body=error,
                reached=True,
            )
        raise AssertionError("unreachable: the loop returns or raises")

    def _submitted(self, request: SubmitRequest, response: httpx.Response) -> Submitted:
        try:
            body = loads(response.content)
            prediction_id = body["id"]
            check_prediction_id(prediction_id)
        except (ValueError, KeyError, TypeError, ConfigError):
            # Replicate answered 2xx, so a prediction probably exists, but we cannot tell
            # which: an ambiguous submit (find_submitted may still find it).
            raise ProviderUnavailable(
                "Replicate accepted the submit but its reply names no prediction id",
                status_code=response.status_code,
                body=response.text[:500],
                reached=True,
            ) from None
        return Submitted(
            ref=self.ref_for(request.application, prediction_id),
            observation=Observation(state=State.QUEUED, source="submit"),
        )

    async def _send(
        self, method: str, url: str, *, params: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """A request safe to repeat (GET, cancel): :func:`jobs.providers.http.send_repeatable`,
        honouring the body's ``retry_after`` too."""
        return await send_repeatable(
            self._client,
            method,
            url,
            provider="Replicate",
            headers=self._auth(),
            retry=self._retry,
            gate=self.gate,
            sleep=self._sleep,
            params=params,
            retry_after=retry_after_of,
        )

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return loads(response.content)
        except ValueError:
            raise ProviderProtocolError(
                f"Replicate answered the {what} with a body that is not JSON",
                status_code=response.status_code,
                body=response.text[:500],
            ) from None

    def _refused(self, response: httpx.Response, what: str) -> ProviderError:
        code = response.status_code
        if code in (401, 403):
            return ProviderRejected(
                f"Replicate refused the {what} (HTTP {code}); check REPLICATE_API_TOKEN",
                status_code=code,
            )
        return ProviderError(
            f"Replicate answered the {what} with HTTP {code}: "
            f"{error_from_response(response)['message']}",
            status_code=code,
        )

    async def status(self, ref: RemoteRef, *, logs: bool = True) -> Observation:
        url = ref.status_url or self.ref_for(ref.application, ref.request_id).status_url
        assert url is not None
        response = await self._send("GET", url)
        if response.status_code == 404:
            return Observation(
                state=State.FAILED,
                failure_reason=FailureReason.RESULT_UNAVAILABLE,
                error={
                    **error_from_response(response),
                    "message": f"Replicate does not know prediction {ref.request_id}",
                    "request_id": ref.request_id,
                },
            )
        if response.status_code != 200:
            raise self._refused(response, "status request")
        prediction = self._json(response, "status request")
        if isinstance(prediction, Mapping) and prediction.get("id") not in (None, ref.request_id):
            raise ProviderProtocolError(
                f"Replicate answered for prediction {str(prediction.get('id'))[:80]!r} when "
                f"asked for {ref.request_id!r}"
            )
        return observation_from_prediction(prediction, logs=logs)

    async def result(self, ref: RemoteRef, *, failed: bool | None = None) -> Observation:
        """The outcome, read from the prediction: Replicate has no separate result endpoint,
        the prediction object carries ``output`` and ``error`` (``failed`` is not needed)."""
        return dataclasses.replace(await self.status(ref), source="result")

    async def cancel(self, ref: RemoteRef) -> bool:
        url = ref.cancel_url or self.ref_for(ref.application, ref.request_id).cancel_url
        assert url is not None
        # Cancelling twice changes nothing, so this POST may be retried like a GET.
        response = await self._send("POST", url)
        code = response.status_code
        if 200 <= code < 300:
            try:
                prediction = loads(response.content)
            except ValueError:
                return True
            status = prediction.get("status") if isinstance(prediction, Mapping) else None
            # The reply is the prediction after the cancel: one that ended otherwise had
            # finished before the cancel reached it.
            return status not in ("succeeded", "failed", "aborted")
        if code in (400, 404, 422):
            return False
        raise self._refused(response, "cancel")

    async def find_submitted(
        self, request: SubmitRequest, *, job_id: str, since: float, held: Held | None = None
    ) -> Lookup:
        """List predictions created since ``since`` (less a clock-skew margin) and find the
        one a lost submit made: by our job id in its webhook URL (certain), else by the same
        target and identical input (certain only if exactly one, the listing was complete,
        and no prediction that might be ours could not be told apart). A prediction another
        job holds (``held``: the same input asked twice) is never ours."""
        try:
            target = Target.parse(request.application)
        except ConfigError as exc:
            return Lookup(None, certain=False, detail=str(exc))
        window = since - self.list_skew
        wanted_input = _canonical(dict(request.arguments))
        by_input: list[str] = []
        unsure: list[str] = []
        url: str | None = f"{self.api_url}/v1/predictions"
        params: dict[str, str] | None = {"created_after": _iso(window)}
        complete = False
        for page in range(self.list_pages):
            assert url is not None
            try:
                response = await self._send("GET", url, params=params)
                if response.status_code != 200:
                    raise self._refused(response, "listing of predictions")
                body = self._json(response, "listing of predictions")
            except ProviderError as exc:
                return self._lookup_failed(job_id, f"listing page {page + 1} failed: {exc}")
            results = body.get("results") if isinstance(body, Mapping) else None
            if not isinstance(results, list):
                return self._lookup_failed(job_id, "the listing of predictions has no results")
            theirs: set[str] = set()
            if held is not None:
                ids = [p.get("id") for p in results if isinstance(p, Mapping)]
                theirs = await held([i for i in ids if isinstance(i, str)])
            older_seen = False
            for prediction in results:
                if not isinstance(prediction, Mapping):
                    continue
                created = _created_at(prediction)
                if created is not None and created < window:
                    older_seen = True  # newest first: the rest is older still
                    continue
                prediction_id = prediction.get("id")
                if not isinstance(prediction_id, str) or not _PREDICTION_ID.fullmatch(
                    prediction_id
                ):
                    continue
                if "webhook" in prediction:  # the listing says which webhook it was made with
                    webhook = prediction.get("webhook")
                    webhook = webhook if isinstance(webhook, str) and webhook else None
                    if _job_of(webhook) == job_id:
                        return Lookup(
                            self._found(request, prediction_id),
                            certain=True,
                            detail=f"prediction {prediction_id} carries job={job_id} in its "
                            "webhook",
                        )
                    if webhook != (request.webhook_url or None):
                        continue  # made with another webhook than ours sent: not ours
                if prediction_id in theirs:
                    continue  # another job's (the same input asked twice)
                if prediction.get("source") not in (None, "api"):
                    continue  # made on the website, not by an API call
                same = target.matches(prediction)
                if same is False:
                    continue
                if prediction.get("data_removed") is True or prediction.get("input") is None:
                    # Its input is gone (Replicate's one-hour retention): it may be ours.
                    unsure.append(prediction_id)
                    continue
                if _canonical(prediction.get("input")) != wanted_input:
                    continue
                if same is None:
                    unsure.append(prediction_id)  # a deployment's, but which one?
                else:
                    by_input.append(prediction_id)
            following = body.get("next")
            if older_seen or not following:
                complete = True
                break
            if not self._own_url(following):
                return self._lookup_failed(
                    job_id, "the listing's next page points outside the configured API"
                )
            url, params = following, None
        if not complete:
            detail = f"more than {self.list_pages} pages of predictions since the submit"
        elif unsure:
            detail = (
                f"{len(unsure)} prediction(s) may be this job's but cannot be compared (their "
                "input was removed, or they do not name their deployment): "
                f"{', '.join(unsure[:5])}"
            )
        elif len(by_input) > 1:
            detail = f"{len(by_input)} predictions match by input: {', '.join(by_input[:5])}"
        elif by_input:
            return Lookup(
                self._found(request, by_input[0]),
                certain=True,
                detail=f"prediction {by_input[0]} is the only one with this input",
            )
        else:
            return Lookup(None, certain=True, detail="no prediction was made since the submit")
        return Lookup(None, certain=False, detail=detail)

    def _lookup_failed(self, job_id: str, detail: str) -> Lookup:
        return Lookup(None, certain=False, detail=f"cannot tell for job {job_id}: {detail}")

    def _found(self, request: SubmitRequest, prediction_id: str) -> Submitted:
        return Submitted(
            ref=self.ref_for(request.application, prediction_id),
            observation=Observation(state=State.QUEUED, source="submit"),
        )

    def _own_url(self, url: Any) -> bool:
        """Only the configured API gets our token (a listing's ``next`` is absolute)."""
        if not isinstance(url, str):
            return False
        try:
            other, own = httpx.URL(url), httpx.URL(self.api_url)
        except httpx.InvalidURL:
            return False
        return (other.scheme, other.host, other.port) == (own.scheme, own.host, own.port)

    async def parse_webhook(
        self,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float,
        job_id: str | None = None,
        attempt: int | None = None,
    ) -> WebhookDelivery:
        """Verify a callback with the configured secret(s) (Standard Webhooks) and read the
        prediction it carries, the same object a status request returns."""
        if not self.webhook_secrets:
            raise WebhookUnavailable(
                "JOBS_REPLICATE_WEBHOOK_SECRET is not set: Replicate's callbacks cannot be "
                "verified (get the secret with GET /v1/webhooks/default/secret)"
            )
        delivery_id = standard_webhooks.verify(headers, body, self.webhook_secrets, now)
        prediction = loads(body)
        if not isinstance(prediction, Mapping):
            raise ValueError("webhook body is not a JSON object")
        prediction_id = prediction.get("id")
        if not isinstance(prediction_id, str) or not _PREDICTION_ID.fullmatch(prediction_id):
            raise ValueError("webhook body has no prediction id")
        try:
            observation = observation_from_prediction(prediction, source="webhook")
        except ProviderProtocolError as exc:
            raise ValueError(str(exc)) from None
        return WebhookDelivery(
            request_id=prediction_id,
            observation=observation,
            user_id=None,
            job_id=job_id,
            attempt=attempt,
            delivery_id=delivery_id,
        )

    async def close(self) -> None:
        await self._client.aclose()
