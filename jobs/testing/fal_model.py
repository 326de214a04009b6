"""The fal emulator's model: configuration, counters, and one request's life as a function of time.

Nothing here does I/O. A request is a record of three instants (``start_at``, ``finish_at``
and, implicitly, ``finish_at + retention``); its state at any moment is computed from the
clock, so the emulator needs no task or timer per request and a status poll costs the same
whether 10 or 100,000 requests are in flight. The only ordered structures are a Fenwick
tree that answers "how many requests are still queued ahead of this one" in O(log n), and
the heaps kept by :mod:`jobs.testing.fal_emulator`.

URL shapes, status bodies and error bodies follow ``docs/protocol.md`` §2, §5, §7 and §9;
where fal documents nothing, the choice made here is named inline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
NAMESPACES = ("workflows", "comfy")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_SIDE = 64

_LEGACY_ID = re.compile(r"^([0-9]+)-([a-zA-Z0-9-]+)$")

# status -> (error_type, human message) for platform errors; 422 has its own body shape.
# error_type values come from the spec's table 1.10; "validation_error" for 422 is our choice.
ERROR_TYPES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "Bad request"),
    422: ("validation_error", "Input validation failed"),
    499: ("client_cancelled", "Request cancelled by the client"),
    500: ("runner_server_error", "Runner internal error"),
    502: ("runner_incomplete_response", "Incomplete response from runner"),
    503: ("runner_disconnected", "Runner disconnected"),
    504: ("request_timeout", "Request timed out"),
}


@dataclass
class FakeFalConfig:
    """Every knob of the emulator; all may be changed at runtime (``POST /_fake/config``).

    Rates are probabilities in [0, 1]. The fault rates share one random draw per HTTP
    request, so they are exclusive and exact as long as they sum to at most 1.
    """

    latency: float = 0.0
    duration: float = 1.0
    queue_time: float = 0.2
    fail_rate: float = 0.0
    fail_status: int = 500
    error_500_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after: float = 1.0
    drop_rate: float = 0.0
    ingress_error_rate: float = 0.0
    # Share of submits (beyond the shared draw) queued, then answered by a dropped
    # connection: an ambiguous submit whose request exists, without any other fault.
    processed_drop_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 30.0
    unknown_status_rate: float = 0.0
    invalid_json_rate: float = 0.0
    retention: float = 3600.0
    key: str | None = None
    user_id: str = "fake-fal-user"
    webhook_retries: int = 3
    webhook_retry_delay: float = 0.5
    webhook_duplicate_rate: float = 0.0
    webhook_timeout: float = 10.0
    webhook_on_cancel: bool = True
    # Seconds a running request keeps running after a cancel before it ends (fal stops a
    # runner some time after accepting the cancel); a queued one ends at once.
    cancel_delay: float = 0.0
    seed: int | None = None
    result_padding: int = 0
    file_size: int = 2048
    base_url: str | None = None
    tick: float = 0.05
    # CDN (fal_cdn.py): token lifetime, a status every upload is refused with (0: accept),
    # and a delay per multipart part (so a test can kill an upload half-way).
    cdn_token_ttl: float = 3600.0
    cdn_refuse_status: int = 0
    cdn_part_delay: float = 0.0

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set fields from JSON-ish values, checking names and types; all or nothing."""
        kinds = {f.name: str(f.type) for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(kinds))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        coerced = {name: _coerce(name, kinds[name], value) for name, value in changes.items()}
        for name, value in coerced.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["key"] is not None:
            data["key"] = "***"
        return data


def _coerce(name: str, kind: str, value: Any) -> Any:
    optional = kind.endswith("| None")
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} may not be null")
    base = kind.split("|")[0].strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if base == "int":
        if value != int(value):
            raise ValueError(f"{name} must be an integer")
        return int(value)
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite, non-negative number")
    if name.endswith("_rate") and number > 1:
        raise ValueError(f"{name} must be at most 1")
    return number


@dataclass
class RequestCounters:
    """What clients did with one request id."""

    status_polls: int = 0
    stream_requests: int = 0
    result_fetches: int = 0
    cancels: int = 0
    webhook_attempts: int = 0
    webhook_successes: int = 0


@dataclass
class FakeFalStats:
    """Counters a test or benchmark reads to prove what reached the "remote" side.

    ``submit_attempts`` counts every submit POST that arrived; ``submits`` only those that
    created a request (so an injected 429 or ingress 502 is an attempt but not a submit,
    while an injected 500 on submit is both). Poll/fetch/cancel counters count every HTTP
    request received, faulted or not. ``submits_by_input`` maps :func:`input_hash` of each
    created request's input to how many requests carried it.
    """

    submit_attempts: int = 0
    submits: int = 0
    status_polls: int = 0
    stream_requests: int = 0
    result_fetches: int = 0
    cancels: int = 0
    file_downloads: int = 0
    completed: int = 0
    webhook_attempts: int = 0
    webhook_successes: int = 0
    webhook_failures: int = 0
    stream_runs: int = 0
    cdn_tokens: int = 0
    cdn_uploads: int = 0
    cdn_multipart_initiated: int = 0
    cdn_part_puts: int = 0
    cdn_completes: int = 0
    cdn_downloads: int = 0
    cdn_bytes_received: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    submits_by_input: dict[str, int] = field(default_factory=dict)
    requests: dict[str, RequestCounters] = field(default_factory=dict)
    # multipart upload id -> part number -> how many PUTs of that part arrived
    cdn_parts: dict[str, dict[int, int]] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero everything in place, so references held by tests stay valid."""
        fresh = FakeFalStats()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def duplicate_inputs(self) -> dict[str, int]:
        """Input hashes submitted more than once (empty when every input went in once)."""
        return {h: n for h, n in dict(self.submits_by_input).items() if n > 1}

    def to_json(self, per_request: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("faults", "submits_by_input", "requests", "cdn_parts")
        }
        data["cdn_parts"] = {
            upload: {str(n): count for n, count in dict(parts).items()}
            for upload, parts in dict(self.cdn_parts).items()
        }
        data["faults"] = dict(self.faults)
        data["submits_by_input"] = dict(self.submits_by_input)
        if per_request:
            data["requests"] = {
                rid: dataclasses.asdict(c) for rid, c in dict(self.requests).items()
            }
        return data


def input_hash(value: Any) -> str:
    """A stable hash of a JSON input: key order and whitespace do not matter."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AppPath:
    """A submit path split per fal_client's ``AppId.from_endpoint_id`` (docs/protocol.md §2)."""

    endpoint_id: str  # as the client sent it, e.g. "fal-ai/flux/dev" or "12345-myapp"
    app: str  # the base of status/result/cancel URLs, e.g. "fal-ai/flux" or "12345/myapp"
    path: str  # the sub-path used only on submit, e.g. "dev"; may be ""


def parse_submit_path(segments: list[str]) -> AppPath | None:
    if not segments or any(not s for s in segments):
        return None
    endpoint_id = "/".join(segments)
    parts = segments
    if len(parts) == 1:
        match = _LEGACY_ID.match(parts[0])
        if match is None:
            return None
        parts = [match.group(1), match.group(2)]
    size = 3 if parts[0] in NAMESPACES else 2
    if len(parts) < size:
        return None
    return AppPath(endpoint_id, "/".join(parts[:size]), "/".join(parts[size:]))


def parse_request_path(segments: list[str]) -> tuple[str, str, str] | None:
    """``(app, request_id, action)`` for ``{app}/requests/{id}[/status[/stream]|/cancel]``.

    action is one of ``result``, ``status``, ``stream``, ``cancel``; None for other paths.
    """
    size = 3 if segments and segments[0] in NAMESPACES else 2
    if len(segments) < size + 2 or segments[size] != "requests" or not segments[size + 1]:
        return None
    if any(not s for s in segments[:size]):
        return None
    rest = segments[size + 2 :]
    actions = {(): "result", ("status",): "status", ("cancel",): "cancel"}
    action = actions.get(tuple(rest))
    if action is None and rest == ["status", "stream"]:
        action = "stream"
    if action is None:
        return None
    return "/".join(segments[:size]), segments[size + 1], action


class QueueIndex:
    """Which requests are still queued, by submit order: a growable Fenwick tree.

    ``ahead(seq)`` counts queued entries with a smaller sequence number in O(log n).
    """

    def __init__(self) -> None:
        self._tree = [0] * 1025  # 1-based, capacity 1024, grows by doubling
        self.total = 0

    def _grow(self, seq: int) -> None:
        while seq + 1 >= len(self._tree):
            size = len(self._tree) - 1
            self._tree.extend([0] * size)
            # New node 2*size covers (0, 2*size]: the whole old tree; the rest cover zeros.
            self._tree[2 * size] = self.total

    def add(self, seq: int, delta: int) -> None:
        self._grow(seq)
        self.total += delta
        i, n = seq + 1, len(self._tree)
        while i < n:
            self._tree[i] += delta
            i += i & -i

    def ahead(self, seq: int) -> int:
        i = min(seq, len(self._tree) - 1)
        count = 0
        while i > 0:
            count += self._tree[i]
            i -= i & -i
        return count


@dataclass(slots=True, eq=False)
class FakeRequest:
    """One remote request. Times are on the emulator's monotonic clock."""

    request_id: str
    seq: int
    route: AppPath
    base_url: str
    input: Any
    input_hash: str
    priority: str
    hint: str | None
    fal_headers: dict[str, str]
    webhook_url: str | None
    submitted_at: float
    submitted_wall: float
    start_at: float  # math.inf when it never starts (cancelled while queued, start timeout)
    finish_at: float
    fail_status: int | None  # None: succeeds
    log_lines: int
    file_size: int
    cancelled: bool = False
    timeout_user: bool = False  # ended by the caller's X-Fal-Request-Timeout
    queued: bool = True  # still counted in the QueueIndex
    finalized: bool = False  # seen finished by the background loop

    def state(self, now: float) -> str:
        if now >= self.finish_at:
            return COMPLETED
        return IN_PROGRESS if now >= self.start_at else IN_QUEUE

    @property
    def response_url(self) -> str:
        return f"{self.base_url}/{self.route.app}/requests/{self.request_id}"

    def urls(self) -> dict[str, str]:
        base = self.response_url
        return {
            "response_url": base,
            "status_url": base + "/status",
            "cancel_url": base + "/cancel",
        }

    def logs(self, now: float) -> list[dict[str, Any]]:
        """Log lines emitted so far: ``log_lines`` spread evenly over the running time."""
        if self.log_lines <= 0 or now < self.start_at:
            return []
        span = (self.finish_at - self.start_at) / self.log_lines
        lines = []
        for i in range(self.log_lines):
            at = self.start_at + i * span
            if at > now:
                break
            wall = self.submitted_wall + (at - self.submitted_at)
            stamp = datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")
            message = f"step {i + 1}/{self.log_lines}"
            lines.append(
                {"message": message, "level": "INFO", "source": "USER", "timestamp": stamp}
            )
        return lines

    def metrics(self) -> dict[str, Any]:
        if math.isinf(self.start_at):
            return {"inference_time": None}
        return {"inference_time": round(self.finish_at - self.start_at, 6)}

    def status_body(self, now: float, with_logs: bool, position: int) -> dict[str, Any]:
        """The body of ``GET …/status`` (docs/protocol.md §5); ``logs`` is always a key."""
        state = self.state(now)
        body: dict[str, Any] = {"status": state, "request_id": self.request_id, **self.urls()}
        body["logs"] = self.logs(now) if with_logs else None
        if state == IN_QUEUE:
            body["queue_position"] = position
        elif state == COMPLETED:
            body["metrics"] = self.metrics()
            if self.fail_status is not None:
                error_type, message = error_kind(self.fail_status)
                body["error"] = message
                body["error_type"] = error_type
        return body

    def image_count(self) -> int:
        """``num_images`` from the input, 1 to 16; 1 when absent or not an integer."""
        data = self.input if isinstance(self.input, dict) else {}
        count = data.get("num_images", 1)
        if not isinstance(count, int) or isinstance(count, bool):
            return 1
        return max(1, min(count, 16))

    def output(self, padding: int = 0) -> dict[str, Any]:
        """The successful result: deterministic from the input, shaped like fal image output."""
        data = self.input if isinstance(self.input, dict) else {}
        count = self.image_count()
        seed = data.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            seed = int(self.input_hash[:8], 16)
        rid = self.request_id
        images = [
            {
                "url": f"{self.base_url}/_fake/files/{rid}/{n}.png",
                "content_type": "image/png",
                "file_name": f"{rid}-{n}.png",
                "file_size": self.file_size,
                "width": IMAGE_SIDE,
                "height": IMAGE_SIDE,
            }
            for n in range(count)
        ]
        prompt = data.get("prompt")
        result: dict[str, Any] = {"images": images, "seed": seed, "prompt": prompt}
        result["input"] = self.input
        audio = data.get("audio_url")
        if isinstance(audio, str):  # speech-to-text endpoints answer a transcript
            result["text"] = f"transcript of {audio[:64]}"
        if padding > 0:
            result["padding"] = "x" * padding
        return result


def error_kind(status: int) -> tuple[str, str]:
    """``(error_type, message)`` for a failed request's status code."""
    return ERROR_TYPES.get(status, ("internal_error", f"Invalid status code: {status}"))


def error_body(status: int) -> dict[str, Any]:
    """The result body replayed for a failed request (docs/protocol.md §7): 422 is a validation
    error."""
    if status == 422:
        return {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]}
    error_type, message = error_kind(status)
    return {"detail": message, "error_type": error_type}


def expected_file_bytes(request_id: str, index: int, size: int = 2048) -> bytes:
    """The bytes the emulator serves at ``/_fake/files/{request_id}/{index}.png``."""
    if size <= len(PNG_MAGIC):
        return PNG_MAGIC[: max(size, 0)]
    tail = hashlib.shake_256(f"{request_id}/{index}".encode()).digest(size - len(PNG_MAGIC))
    return PNG_MAGIC + tail
