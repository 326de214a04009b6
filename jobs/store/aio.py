"""The store from async code: one interface that owns every thread hop.

The store blocks (SQLAlchemy Core on a blocking driver), so async callers run its methods
on worker threads. They all go through :meth:`AsyncStore.run`, on a pool of the store's own:
database calls never queue behind file hashing or copying on the default executor, and the
number of threads talking to the database is bounded in one place.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# More threads than SQLite's one writer can use, fewer than PostgreSQL's pool (10 + 20):
# readers and the group writer proceed side by side without exhausting connections.
THREADS = 8


class AsyncStore:
    """Runs blocking store calls on the store's threads; :meth:`close` stops them."""

    def __init__(self, threads: int = THREADS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jobs-db")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on a store thread, with the caller's context (the job
        named in log lines) carried along, as :func:`asyncio.to_thread` does."""
        context = contextvars.copy_context()
        call = functools.partial(context.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
