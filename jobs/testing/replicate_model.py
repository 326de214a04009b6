"""The Replicate emulator's model: configuration, counters, and one prediction as a function
of time.

Nothing here does I/O. As in :mod:`jobs.testing.fal_model`, a prediction is a record of
instants (``start_at``, ``finish_at`` and, implicitly, ``finish_at + retention``): its
status, logs, output and whether its data was removed are all computed from the clock, so
polls cost the same however many predictions are in flight, and a test that moves the
clock (``FakeReplicate.advance``) sees the hour of retention pass at once.

:class:`PredictionTable` keeps every prediction (Replicate keeps them after the data is
removed, unlike fal's queue, which forgets a request), a creation-ordered list for the
paginated list endpoint, and one heap of the instants something happens (a prediction
starts, emits log lines or output, ends): the background loop pops it to send webhooks.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import hashlib
import heapq
import math
import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# One home for the JSON-ish coercion rules (names, types, rates <= 1) of both emulators.
from jobs.testing.fal_model import _coerce, input_hash

STARTING = "starting"
PROCESSING = "processing"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
ABORTED = "aborted"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED, ABORTED})

# The kinds of API request the emulator tells apart (``FakeReplicateConfig.fault_kinds``).
REQUEST_KINDS = ("create", "get", "list", "cancel", "secret", "deployment", "version")
EVENTS = ("start", "output", "logs", "completed")
DEFAULT_EVENTS = frozenset({"output", "completed"})

_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
_MODEL_REF = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_UNSET: Any = object()


def new_webhook_secret() -> str:
    """A fresh signing secret in Replicate's format: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class FakeReplicateConfig:
    """Every knob of the Replicate emulator; all may be changed at runtime
    (``POST /_fake/config``).

    The fault rates share one random draw per API request (in the order of
    :data:`jobs.testing.replicate_emulator.FAULTS`), so they are exclusive and exact as long
    as they sum to at most 1. Webhook loss and duplication draw separately, per message.
    """

    token: str | None = None
    latency: float = 0.0
    queue_time: float = 0.2
    duration: float = 1.0
    fail_rate: float = 0.0
    fail_message: str = "Prediction failed (fake-replicate)"
    retention: float = 3600.0
    # Prefer: wait holds a create at most this long (Replicate's own ceiling is 60 s).
    max_wait: float = 60.0
    page_size: int = 100
    error_500_rate: float = 0.0
    drop_rate: float = 0.0
    rate_limit_rate: float = 0.0
    # A 429 whose retry_after is only in the JSON body (no Retry-After header).
    rate_limit_no_header_rate: float = 0.0
    slow_rate: float = 0.0
    invalid_json_rate: float = 0.0
    slow_seconds: float = 30.0
    # The request kinds the faults above apply to (create, get, list, cancel, secret,
    # deployment, version); empty: every API request. ["create"] makes every create
    # ambiguous while the listing that settles it is answered.
    fault_kinds: list[str] = field(default_factory=list)
    retry_after: int = 1
    # An exact limit on creates (a token bucket; 0 turns it off), like Replicate's 600/min.
    create_limit_per_minute: float = 0.0
    create_limit_burst: int = 1
    webhook_secret: str = field(default_factory=new_webhook_secret)
    # Secrets that also sign every delivery (one more v1 entry each), as during a rotation.
    extra_signing_secrets: list[str] = field(default_factory=list)
    # The terminal webhook is retried this many times, after base, 2*base, 4*base... seconds
    # (6 and 1.0: the last retry about a minute after completion, as Replicate documents).
    webhook_retries: int = 6
    webhook_retry_base: float = 1.0
    webhook_timeout: float = 10.0
    # output and logs deliveries: at most one per this many seconds per prediction.
    webhook_throttle: float = 0.5
    webhook_loss_rate: float = 0.0
    webhook_duplicate_rate: float = 0.0
    default_model: str = "fake/echo"
    file_size: int = 2048
    seed: int | None = None
    base_url: str | None = None
    tick: float = 0.05

    def __post_init__(self) -> None:
        for secret in self.signing_secrets():
            _check_secret(secret)
        _check_kinds(self.fault_kinds)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set fields from JSON-ish values, checking names and types; all or nothing."""
        kinds = {f.name: str(f.type) for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(kinds))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            if kinds[name] == "list[str]":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of strings")
                coerced[name] = list(value)
            else:
                coerced[name] = _coerce(name, kinds[name], value)
        if "webhook_secret" in coerced:
            _check_secret(coerced["webhook_secret"])
        for secret in coerced.get("extra_signing_secrets", []):
            _check_secret(secret)
        _check_kinds(coerced.get("fault_kinds", []))
        for name, value in coerced.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """The config as JSON, credentials masked (the secret is served by the API itself)."""
        data = dataclasses.asdict(self)
        if data["token"] is not None:
            data["token"] = "***"
        data["webhook_secret"] = "***"
        data["extra_signing_secrets"] = ["***" for _ in self.extra_signing_secrets]
        return data

    def signing_secrets(self) -> list[str]:
        return [self.webhook_secret, *self.extra_signing_secrets]


def _check_kinds(kinds: list[str]) -> None:
    unknown = sorted(set(kinds) - set(REQUEST_KINDS))
    if unknown:
        raise ValueError(
            f"unknown request kind(s) {', '.join(unknown)}: use {', '.join(REQUEST_KINDS)}"
        )


def _check_secret(secret: str) -> None:
    prefix, sep, encoded = secret.partition("_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        key = b""
    if prefix != "whsec" or not sep or not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret is whsec_ + base64 of 24 to 64 bytes")


@dataclass
class PredictionCounters:
    """What clients did with one prediction, and what was sent about it."""

    gets: int = 0
    cancels: int = 0
    webhook_attempts: int = 0
    webhook_deliveries: int = 0


@dataclass
class FakeReplicateStats:
    """Counters a test or benchmark reads to prove what reached the "remote" side.

    ``create_attempts`` counts every create POST that arrived; ``creates`` only those that
    made a prediction (an injected 429 is an attempt, an injected 500 or dropped connection
    on create is both: the prediction exists). ``gets``, ``lists`` and ``cancels`` count
    every request received, faulted or not. ``creates_by_input`` maps
    :func:`jobs.testing.input_hash` of each created prediction's input to how many
    predictions carried it; ``predictions`` holds per-prediction counters.

    Webhooks: ``webhook_attempts`` HTTP POSTs made, ``webhook_deliveries`` answered 2xx,
    ``webhook_retries`` attempts that were retries of a terminal message, ``webhook_failures``
    messages given up on (or failed, for intermediate ones, which are never retried),
    ``webhooks_lost`` messages silently never sent, ``webhooks_duplicated`` messages sent
    twice, ``webhook_events`` messages per event kind.
    """

    create_attempts: int = 0
    creates: int = 0
    gets: int = 0
    lists: int = 0
    cancels: int = 0
    secret_gets: int = 0
    deployment_gets: int = 0
    version_gets: int = 0
    file_downloads: int = 0
    completed: int = 0
    responses_429: int = 0
    create_limited: int = 0
    webhook_attempts: int = 0
    webhook_deliveries: int = 0
    webhook_retries: int = 0
    webhook_failures: int = 0
    webhooks_lost: int = 0
    webhooks_duplicated: int = 0
    webhook_events: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    creates_by_input: dict[str, int] = field(default_factory=dict)
    predictions: dict[str, PredictionCounters] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero everything in place, so references held by tests stay valid."""
        fresh = FakeReplicateStats()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def duplicate_inputs(self) -> dict[str, int]:
        """Input hashes created more than once (empty when every input went in once)."""
        return {h: n for h, n in dict(self.creates_by_input).items() if n > 1}

    def counters(self, prediction_id: str) -> PredictionCounters | None:
        return self.predictions.get(prediction_id)

    def to_json(self, per_prediction: bool = True) -> dict[str, Any]:
        nested = ("webhook_events", "faults", "creates_by_input", "predictions")
        data: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in nested
        }
        data["webhook_events"] = dict(self.webhook_events)
        data["faults"] = dict(self.faults)
        data["creates_by_input"] = dict(self.creates_by_input)
        if per_prediction:
            data["predictions"] = {
                pid: dataclasses.asdict(c) for pid, c in dict(self.predictions).items()
            }
        return data


# --- parsing what a create carries -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overrides:
    """The checked ``_fake`` block of an input (see :mod:`jobs.testing.replicate_emulator`)."""

    duration: float | None = None
    queue_time: float | None = None
    fail: str | None = None  # the error message; None: succeeds
    logs: int = 0
    files: int = 0
    output: Any = _UNSET

    @property
    def has_output(self) -> bool:
        return self.output is not _UNSET


def parse_overrides(value: Any, fail_message: str) -> Overrides:
    block = value.get("_fake") if isinstance(value, dict) else None
    if block is None:
        return Overrides()
    if not isinstance(block, dict):
        raise ValueError("_fake must be an object")
    found: dict[str, Any] = {}
    for name, item in block.items():
        if name == "output":
            found[name] = item
        elif name == "fail":
            if item is True:
                found[name] = fail_message
            elif isinstance(item, str) and item:
                found[name] = item
            elif item is not False:
                raise ValueError("_fake.fail must be true or an error message")
        elif name in ("duration", "queue_time"):
            found[name] = _non_negative(name, item)
        elif name in ("logs", "files"):
            number = _non_negative(name, item)
            if number != int(number) or number > 10_000:
                raise ValueError(f"_fake.{name} must be a whole number up to 10000")
            found[name] = int(number)
        else:
            raise ValueError(f"_fake.{name} is not a known override")
    return Overrides(**found)


def _non_negative(name: str, item: Any) -> float:
    if isinstance(item, bool) or not isinstance(item, int | float):
        raise ValueError(f"_fake.{name} must be a non-negative number")
    if not math.isfinite(item) or item < 0:
        raise ValueError(f"_fake.{name} must be a finite, non-negative number")
    return float(item)


def parse_duration(text: str) -> float:
    """Seconds in a ``Cancel-After`` value: ``90`` or ``90s``, ``1m``, ``1h30m``, ``500ms``.

    Replicate documents only the example ``1m``; units and their sums follow the Go-style
    durations that example suggests (our choice, named in the module docstring).
    """
    value = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    else:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"Cancel-After must be a duration such as 90s, 1m or 1h30m: {text!r}")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("Cancel-After must be a positive duration")
    return seconds


def parse_prefer_wait(header: str | None, cap: float) -> float | None:
    """Seconds a ``Prefer: wait[=N]`` header asks to hold the create (None: no wait)."""
    if header is None:
        return None
    for token in re.split(r"[,;]", header):
        name, _, raw = token.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not raw.strip():
            return min(60.0, cap)
        try:
            seconds = int(raw.strip())
        except ValueError:
            raise ValueError(f"Prefer: wait=N needs whole seconds (1-60), not {raw!r}") from None
        if seconds < 1:
            raise ValueError("Prefer: wait=N needs at least 1 second")
        return float(min(seconds, cap))
    return None


def parse_version(value: Any) -> tuple[str | None, str]:
    """``(model or None, version id)`` from a create's ``version`` (id or ``owner/name:id``)."""
    if not isinstance(value, str):
        raise ValueError("version is required: a 64-character version id or owner/name:id")
    ref, sep, version = value.rpartition(":")
    if sep and _MODEL_REF.match(ref) and _VERSION_ID.match(version):
        return ref, version
    if not sep and _VERSION_ID.match(value):
        return None, value
    raise ValueError(f"invalid version {value!r}: expected a 64-character id or owner/name:id")


def check_model_ref(owner: str, name: str) -> str:
    ref = f"{owner}/{name}"
    if not _MODEL_REF.match(ref):
        raise ValueError(f"invalid model or deployment name {ref!r}")
    return ref


def version_for(model: str) -> str:
    """The version id the emulator gives a model or deployment: stable, 64 hex digits."""
    return hashlib.sha256(f"fake-replicate:{model}".encode()).hexdigest()


def parse_events(value: Any) -> frozenset[str]:
    if value is None:
        return DEFAULT_EVENTS
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("webhook_events_filter must be a list of event names")
    unknown = sorted(set(value) - set(EVENTS))
    if unknown:
        raise ValueError(
            f"unknown webhook event(s) {', '.join(unknown)}: use start, output, logs, completed"
        )
    return frozenset(value)


def iso(wall: float) -> str:
    """Replicate's timestamp format: UTC, microseconds, a ``Z``."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> float:
    """A wall-clock time from an ISO-8601 query value (``Z`` or an offset; naive is UTC)."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO-8601 time: {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def problem(status: int, title: str, detail: str) -> dict[str, Any]:
    """An RFC 7807 problem-details body, as Replicate answers errors."""
    return {"title": title, "detail": detail, "status": status}


def progress_line(index: int, total: int) -> str:
    """Log line ``index`` (0-based) of ``total``, in the tqdm shape replicate-python parses
    into ``Prediction.progress``."""
    done = index + 1
    filled = done * 10 // total
    return f"{done * 100 // total:3d}%|{'#' * filled}{' ' * (10 - filled)}| {done}/{total}"


# --- one prediction ------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class FakePrediction:
    """One prediction. ``*_at`` times are on the emulator's monotonic clock."""

    id: str
    seq: int
    model: str
    version: str
    input: Any
    input_hash: str
    base_url: str
    webhook: str | None
    events: frozenset[str]
    created_at: float
    created_wall: float
    start_at: float  # math.inf when it never starts (canceled or aborted while starting)
    finish_at: float
    end_status: str  # the terminal status it reaches at finish_at
    error: str | None
    log_lines: int
    files: int
    output_override: Any = _UNSET
    deployment: str | None = None
    source: str = "api"
    # The running time as first planned; a cancel ends the run early without respacing it.
    planned_finish: float = math.inf
    # What the background loop last announced by webhook (for output/logs events).
    sent_logs: int = 0
    sent_files: int = 0
    last_progress_at: float = -math.inf
    finalized: bool = False
    expired: bool = False

    def status(self, now: float) -> str:
        if now >= self.finish_at:
            return self.end_status
        return PROCESSING if now >= self.start_at else STARTING

    @property
    def started(self) -> bool:
        return not math.isinf(self.start_at)

    def removed(self, now: float, retention: float) -> bool:
        """Whether the hour (``retention``) after completion has passed: data is gone."""
        return self.source == "api" and now >= self.finish_at + retention

    def _span(self, count: int) -> float:
        return (self.finish_at - self.start_at) / count if count else 0.0

    def emitted(self, count: int, now: float) -> int:
        """How many of ``count`` evenly spaced items (log lines, files) exist at ``now``:
        item i appears at ``start_at + i * span`` over the (original) running time."""
        if count <= 0 or not self.started or now < self.start_at:
            return 0
        end = min(now, self.finish_at)
        if end >= self.planned_finish:
            return count
        span = (self.planned_finish - self.start_at) / count
        return min(count, int((end - self.start_at) / span) + 1)

    def next_emission(self, count: int, now: float) -> float | None:
        """The instant after ``now`` when the next of ``count`` items appears, if before the end."""
        done = self.emitted(count, now)
        if done >= count or not self.started:
            return None
        span = (self.planned_finish - self.start_at) / count
        at = self.start_at + done * span
        return at if at < self.finish_at else None

    def logs(self, now: float) -> str:
        lines = self.emitted(self.log_lines, now)
        return "".join(progress_line(i, self.log_lines) + "\n" for i in range(lines))

    def file_url(self, index: int) -> str:
        return f"{self.base_url}/_fake/files/{self.id}/{index}.png"

    def output(self, now: float) -> Any:
        status = self.status(now)
        if status == SUCCEEDED:
            if self.output_override is not _UNSET:
                return self.output_override
            if self.files:
                return [self.file_url(i) for i in range(self.files)]
            return {"echo": self.input}
        if status in (FAILED, ABORTED) or not self.files:
            return None
        done = self.emitted(self.files, now)  # processing or canceled: what exists so far
        return [self.file_url(i) for i in range(done)] if done else None

    def metrics(self, now: float) -> dict[str, Any]:
        if self.status(now) not in TERMINAL:
            return {}
        if not self.started:
            return {"predict_time": 0.0}
        return {"predict_time": round(self.finish_at - self.start_at, 6)}

    def wall(self, at: float) -> float:
        return self.created_wall + (at - self.created_at)

    def urls(self) -> dict[str, str]:
        get = f"{self.base_url}/v1/predictions/{self.id}"
        return {"get": get, "cancel": get + "/cancel", "web": f"{self.base_url}/p/{self.id}"}

    def to_json(self, now: float, retention: float) -> dict[str, Any]:
        """The prediction object as ``GET /v1/predictions/{id}`` returns it at ``now``."""
        status = self.status(now)
        removed = self.removed(now, retention)
        terminal = status in TERMINAL
        started = self.started and now >= self.start_at
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": {} if removed else self.input,
            "logs": "" if removed else self.logs(now),
            "output": None if removed else self.output(now),
            "data_removed": removed,
            "error": self.error if status == FAILED else None,
            "source": self.source,
            "status": status,
            "created_at": iso(self.created_wall),
            "started_at": iso(self.wall(self.start_at)) if started else None,
            "completed_at": iso(self.wall(self.finish_at)) if terminal else None,
            "metrics": self.metrics(now),
            "urls": self.urls(),
        }

    def cancel(self, now: float) -> bool:
        """End the prediction now as ``canceled``; False when it had already ended."""
        if self.status(now) in TERMINAL:
            return False
        if now < self.start_at:
            self.start_at = math.inf
        self.finish_at = now
        self.end_status = CANCELED
        self.error = None
        return True


@dataclass(frozen=True, slots=True)
class NewPrediction:
    """Everything a create carries that shapes the prediction, already validated."""

    model: str
    version: str
    input: dict[str, Any]
    base_url: str
    overrides: Overrides
    webhook: str | None = None
    events: frozenset[str] = DEFAULT_EVENTS
    cancel_after: float | None = None
    deployment: str | None = None


# Heap entry kinds: a prediction starts, may emit (logs/output), ends.
START, EMIT, END = 0, 1, 2


class PredictionTable:
    """Every prediction, the creation order for listing, and the heap of instants."""

    def __init__(
        self,
        config: Callable[[], FakeReplicateConfig],
        stats: FakeReplicateStats,
        ids: Callable[[], str],
        fail_draw: Callable[[], float],
    ) -> None:
        self._config = config
        self._stats = stats
        self._ids = ids
        self._fail_draw = fail_draw
        self._by_id: dict[str, FakePrediction] = {}
        self._ordered: list[FakePrediction] = []  # by seq == creation order
        self._walls: list[float] = []  # created_wall per seq, non-decreasing
        self._heap: list[tuple[float, int, int, str]] = []
        self._finished: deque[FakePrediction] = deque()

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, prediction_id: str) -> FakePrediction | None:
        return self._by_id.get(prediction_id)

    def create(self, new: NewPrediction, now: float, wall: float) -> FakePrediction:
        config = self._config()
        o = new.overrides
        queue_time = config.queue_time if o.queue_time is None else o.queue_time
        duration = config.duration if o.duration is None else o.duration
        start_at = now + queue_time
        finish_at = start_at + duration
        error = o.fail
        if error is None and config.fail_rate > 0 and self._fail_draw() < config.fail_rate:
            error = config.fail_message
        end_status = FAILED if error is not None else SUCCEEDED
        planned = finish_at
        if new.cancel_after is not None:
            deadline = now + new.cancel_after
            if deadline < start_at:
                start_at, finish_at, end_status, error = math.inf, deadline, ABORTED, None
            elif deadline < finish_at:
                finish_at, end_status, error = deadline, CANCELED, None
        if self._walls:
            wall = max(wall, self._walls[-1])  # keep the list order and the times in step
        seq = len(self._ordered)
        prediction = FakePrediction(
            id=self._ids(),
            seq=seq,
            model=new.model,
            version=new.version,
            input=new.input,
            input_hash=input_hash(new.input),
            base_url=new.base_url,
            webhook=new.webhook,
            events=new.events,
            created_at=now,
            created_wall=wall,
            start_at=start_at,
            finish_at=finish_at,
            end_status=end_status,
            error=error,
            log_lines=o.logs,
            files=o.files,
            output_override=o.output,
            deployment=new.deployment,
            planned_finish=planned,
        )
        self._by_id[prediction.id] = prediction
        self._ordered.append(prediction)
        self._walls.append(wall)
        if prediction.webhook is not None and prediction.started:
            self._push(start_at, START, prediction)
        self._push(finish_at, END, prediction)
        stats = self._stats
        stats.creates += 1
        stats.creates_by_input[prediction.input_hash] = (
            stats.creates_by_input.get(prediction.input_hash, 0) + 1
        )
        stats.predictions[prediction.id] = PredictionCounters()
        return prediction

    def cancel(self, prediction: FakePrediction, now: float) -> bool:
        if not prediction.cancel(now):
            return False
        self._push(now, END, prediction)
        return True

    def _push(self, at: float, kind: int, prediction: FakePrediction) -> None:
        heapq.heappush(self._heap, (at, kind, prediction.seq, prediction.id))

    def page(
        self,
        before: int | None,
        after: int | None,
        created_after: float | None,
        created_before: float | None,
        size: int,
    ) -> tuple[list[FakePrediction], bool, bool]:
        """Newest first: ``size`` predictions older than seq ``before`` (or newer than seq
        ``after``, the page just above it) inside the time filters; with whether older and
        newer ones remain."""
        low = 0 if created_after is None else bisect.bisect_right(self._walls, created_after)
        high = (
            len(self._walls)
            if created_before is None
            else bisect.bisect_left(self._walls, created_before)
        )
        if after is not None:
            start = max(low, after + 1)
            stop = min(high, start + size)
        else:
            stop = high if before is None else min(high, before)
            start = max(low, stop - size)
        if stop <= start:
            return [], False, False
        items = self._ordered[start:stop][::-1]
        return items, start > low, stop < high

    def due(self, now: float) -> list[tuple[float, int, FakePrediction]]:
        """Pop every heap entry due at ``now``: ``(instant, kind, prediction)``, stale ones
        skipped. The instant is when it happened, however late the loop looks.

        An END is announced once per prediction (``finalized``); a START whose time moved
        (canceled before it started) and an END superseded by a cancel are stale.
        """
        out: list[tuple[float, int, FakePrediction]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, kind, _, pid = heapq.heappop(heap)
            prediction = self._by_id.get(pid)
            if prediction is None or prediction.finalized:
                continue
            if kind == START and at != prediction.start_at:
                continue
            if kind == END:
                if at != prediction.finish_at:
                    continue
                prediction.finalized = True
                self._stats.completed += 1
                self._finished.append(prediction)
            out.append((at, kind, prediction))
        return out

    def schedule_emit(self, prediction: FakePrediction, at: float) -> None:
        self._push(at, EMIT, prediction)

    def expire(self, now: float) -> int:
        """Drop the data of predictions past retention (their JSON already hides it; this
        frees the memory). Returns how many were expired."""
        retention = self._config().retention
        count = 0
        while self._finished and self._finished[0].finish_at + retention <= now:
            prediction = self._finished.popleft()
            if prediction.removed(now, retention) and not prediction.expired:
                prediction.expired = True
                prediction.input = {}
                prediction.output_override = _UNSET
                count += 1
        return count
