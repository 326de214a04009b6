"""Status values yielded by ``iter_events``, named as fal_client names them, so code written
for ``fal_client`` reads the same against ``jobs``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Status:
    """Base of the three statuses."""


@dataclass(frozen=True)
class Queued(Status):
    position: int | None


@dataclass(frozen=True)
class InProgress(Status):
    logs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Completed(Status):
    logs: list[dict[str, Any]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Beyond fal_client: how it ended, so no further call is needed to know.
    state: str = "succeeded"
    error: dict[str, Any] | None = None
