"""The emulator's queue: every request it knows, and what the passing of time does to them.

Kept apart from the HTTP layer (:mod:`jobs.testing.fal_emulator`) so its bookkeeping can
be read, and tested, on its own. Three ordered structures keep every operation O(log n)
at most, however many requests are in flight:

- a heap of the instants requests leave the queue, drained lazily before a queue
  position is computed (and by every tick), feeding one :class:`QueueIndex` per priority;
- a heap of finish instants, popped by :meth:`FakeQueue.tick` to announce completions
  (which is what sends webhooks: nobody has to poll);
- a FIFO of finished requests, forgotten once ``retention`` has passed.

A cancel changes a request's ``finish_at`` and pushes a second heap entry; the stale one
is recognised (its time no longer matches) and skipped.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from jobs.testing.fal_model import (
    COMPLETED,
    AppPath,
    FakeFalConfig,
    FakeFalStats,
    FakeRequest,
    QueueIndex,
    RequestCounters,
    input_hash,
)

PRIORITIES = ("normal", "low")


def parse_overrides(value: Any, fail_status: int) -> dict[str, float]:
    """The checked ``_fake`` block of an input (see :mod:`jobs.testing.fal_emulator`)."""
    block = value.get("_fake") if isinstance(value, dict) else None
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError("_fake must be an object")
    out: dict[str, float] = {}
    for name, item in block.items():
        if name == "fail" and item is True:
            out[name] = fail_status
            continue
        if isinstance(item, bool) or not isinstance(item, int | float) or item < 0:
            raise ValueError(f"_fake.{name} must be a non-negative number")
        if not math.isfinite(item):
            raise ValueError(f"_fake.{name} must be finite")
        if name in ("duration", "queue_time"):
            out[name] = float(item)
        elif name in ("fail", "logs") and item == int(item):
            if name == "fail" and not 400 <= item <= 599:
                raise ValueError("_fake.fail must be an HTTP error status (400-599)")
            out[name] = int(item)
        else:
            raise ValueError(f"_fake.{name} is not a known override")
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Submission:
    """Everything a submit carries that shapes the request, already validated."""

    route: AppPath
    base_url: str
    input: Any
    priority: str = "normal"
    hint: str | None = None
    fal_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    webhook_url: str | None = None
    start_timeout: float | None = None


class FakeQueue:
    """The request table plus the heaps that turn time into state changes."""

    def __init__(
        self,
        config: Callable[[], FakeFalConfig],
        stats: FakeFalStats,
        rng: random.Random,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._stats = stats
        self._rng = rng
        self._clock = clock
        self._wall = wall_clock
        self._requests: dict[str, FakeRequest] = {}
        self._seq = 0
        self._queues = {p: QueueIndex() for p in PRIORITIES}
        self._leave_heap: list[tuple[float, int, str]] = []
        self._finish_heap: list[tuple[float, int, str]] = []
        self._finished: deque[FakeRequest] = deque()

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> FakeRequest | None:
        return self._requests.get(request_id)

    def find(self, app: str, request_id: str, now: float) -> FakeRequest | None:
        """The request if it exists under ``app`` and has not expired, else None (a 404)."""
        request = self._requests.get(request_id)
        if request is None or request.route.app != app:
            return None
        if now >= request.finish_at + self._config().retention:
            return None
        return request

    def enqueue(self, sub: Submission, overrides: dict[str, float]) -> FakeRequest:
        config = self._config()
        now, wall = self._clock(), self._wall()
        queue_time = overrides.get("queue_time", config.queue_time)
        start_at = now + queue_time
        finish_at = start_at + overrides.get("duration", config.duration)
        fail = overrides.get("fail")
        if fail is None and config.fail_rate > 0 and self._rng.random() < config.fail_rate:
            fail = config.fail_status
        timed_out = sub.start_timeout is not None and queue_time > sub.start_timeout
        if sub.start_timeout is not None and timed_out:
            start_at, finish_at, fail = math.inf, now + sub.start_timeout, 504
        rid = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        seq, self._seq = self._seq, self._seq + 1
        request = FakeRequest(
            request_id=rid,
            seq=seq,
            route=sub.route,
            base_url=sub.base_url,
            input=sub.input,
            input_hash=input_hash(sub.input),
            priority=sub.priority,
            hint=sub.hint,
            fal_headers=sub.fal_headers,
            webhook_url=sub.webhook_url,
            submitted_at=now,
            submitted_wall=wall,
            start_at=start_at,
            finish_at=finish_at,
            fail_status=int(fail) if fail is not None else None,
            log_lines=int(overrides.get("logs", 0)),
            file_size=config.file_size,
            timeout_user=timed_out,
        )
        self._requests[rid] = request
        leave_at = min(start_at, finish_at)
        if leave_at > now:
            self._queues[request.priority].add(seq, 1)
            heapq.heappush(self._leave_heap, (leave_at, seq, rid))
        else:
            request.queued = False
        heapq.heappush(self._finish_heap, (finish_at, seq, rid))
        stats = self._stats
        stats.submits += 1
        stats.submits_by_input[request.input_hash] = (
            stats.submits_by_input.get(request.input_hash, 0) + 1
        )
        stats.requests[rid] = RequestCounters()
        return request

    def position(self, request: FakeRequest, now: float) -> int:
        """0-based place among requests still queued: normal priority first, then low."""
        self._drain(now)
        if not request.queued:
            return 0
        ahead = self._queues[request.priority].ahead(request.seq)
        if request.priority == "low":
            ahead += self._queues["normal"].total
        return ahead

    def cancel(self, request: FakeRequest, now: float) -> bool:
        """End a queued request now, a running one after ``config.cancel_delay``, with 499;
        False if it had already finished."""
        if request.state(now) == COMPLETED:
            return False
        end = now
        if request.queued:
            self._leave(request)
        if now < request.start_at:
            request.start_at = math.inf
        else:
            end = now + self._config().cancel_delay
        request.finish_at = end
        request.fail_status = 499
        request.cancelled = True
        request.timeout_user = False
        heapq.heappush(self._finish_heap, (end, request.seq, request.request_id))
        return True

    def tick(self, now: float, on_finished: Callable[[FakeRequest], None]) -> None:
        """Leave queues, announce finished requests once each, forget expired ones."""
        self._drain(now)
        heap = self._finish_heap
        while heap and heap[0][0] <= now:
            at, _, rid = heapq.heappop(heap)
            request = self._requests.get(rid)
            if request is None or request.finalized or request.finish_at != at:
                continue
            request.finalized = True
            self._stats.completed += 1
            self._finished.append(request)
            on_finished(request)
        retention = self._config().retention
        while self._finished and self._finished[0].finish_at + retention <= now:
            request = self._finished.popleft()
            if self._requests.get(request.request_id) is request:
                del self._requests[request.request_id]

    def describe(self, request: FakeRequest) -> dict[str, Any]:
        """The debug view of one request (``GET /_fake/requests/{id}``)."""
        started = not math.isinf(request.start_at)
        counters = self._stats.requests.get(request.request_id, RequestCounters())
        return {
            "request_id": request.request_id,
            "endpoint_id": request.route.endpoint_id,
            "app": request.route.app,
            "path": request.route.path,
            "state": request.state(self._clock()),
            "priority": request.priority,
            "hint": request.hint,
            "headers": request.fal_headers,
            "webhook_url": request.webhook_url,
            "input": request.input,
            "input_hash": request.input_hash,
            "submitted_at": request.submitted_wall,
            "queue_time": request.start_at - request.submitted_at if started else None,
            "run_time": request.finish_at - request.start_at if started else None,
            "fail_status": request.fail_status,
            "cancelled": request.cancelled,
            "counters": dataclasses.asdict(counters),
        }

    def _drain(self, now: float) -> None:
        heap = self._leave_heap
        while heap and heap[0][0] <= now:
            _, _, rid = heapq.heappop(heap)
            request = self._requests.get(rid)
            if request is not None and request.queued:
                self._leave(request)

    def _leave(self, request: FakeRequest) -> None:
        request.queued = False
        self._queues[request.priority].add(request.seq, -1)
