"""Group commit: many coroutines' writes applied in one transaction.

A webhook receiver taking thousands of callbacks a second, a tick applying thousands of
polls, or a batch submitting thousands of jobs would otherwise pay one transaction (and on
SQLite, one turn of the single write lock) per write. Here each caller queues its write
(a :class:`jobs.store.Write`: the SQL stays in the store) and awaits it; one drain task runs
whatever has queued up in one ``Store.write_many`` call, off the event loop. While that
commit runs the next batch gathers, so batches grow exactly when load does and a lone caller
waits for nobody.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from .store import Store, Write

T = TypeVar("T")

MAX_BATCH = 500


class GroupWriter:
    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[Write[Any], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def write(self, write: Write[T]) -> T:
        """Run ``write``, batched with concurrent callers' writes; return its result."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((write, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                outcomes = await self._store.aio.run(
                    self._store.write_many, [write for write, _ in batch]
                )
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], error=exc)
                    continue
                # One bad write must not sink the others: run them one by one.
                for write, future in batch:
                    try:
                        [outcome] = await self._store.aio.run(self._store.write_many, [write])
                    except Exception as one:
                        _settle(future, error=one)
                    else:
                        _settle(future, outcome)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                _settle(future, outcome)


def _settle(
    future: asyncio.Future[Any], outcome: Any = None, *, error: Exception | None = None
) -> None:
    if future.done():  # the caller was cancelled; its write was made all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)
