"""Building managers against the emulator: the settings every in-process test uses, and a
manager that is closed (with its store) when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from jobs import AsyncJobManager, Settings
from jobs.config import Secret


def local_settings(
    tmp_path: Path, queue_url: str, *, fal_key: str = "test-key", **extra: Any
) -> Settings:
    """Settings for a SQLite file in ``tmp_path`` and the fal queue at ``queue_url`` (whose
    result files, on 127.0.0.1, the file cache is allowed to download)."""
    values: dict[str, Any] = {"cache_allow_hosts": ("127.0.0.1",), **extra}
    return Settings.from_env(
        {},
        database_url=f"sqlite:///{tmp_path}/jobs.db",
        fal_queue_url=queue_url,
        fal_key=Secret(fal_key),
        **values,
    )


@asynccontextmanager
async def open_manager(settings: Settings, **options: Any) -> AsyncIterator[AsyncJobManager]:
    manager = AsyncJobManager(settings, **options)
    try:
        yield manager
    finally:
        await manager.aclose()
        manager.store.close()
