"""Group commit: many coroutines' observations applied in one transaction.

A webhook receiver taking thousands of callbacks a second, or a tick applying thousands of
polls, would otherwise pay one transaction (and on SQLite, one turn of the single write
lock) per observation. Here each caller queues its change and awaits it; one drain task
applies whatever has queued up in one ``Store.apply_many`` call, off the event loop. While
that commit runs, the next batch gathers, so batches grow exactly when load does and a lone
caller waits for nobody.
"""

from __future__ import annotations

import asyncio

from .store import Applied, Change, Store

MAX_BATCH = 500


class ApplyWriter:
    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[Change, asyncio.Future[Applied | None]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def apply(self, change: Change) -> Applied | None:
        """Apply ``change`` (batched with concurrent callers); None if its job is unknown."""
        future: asyncio.Future[Applied | None] = asyncio.get_running_loop().create_future()
        self._pending.append((change, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                outcomes = await asyncio.to_thread(
                    self._store.apply_many, [change for change, _ in batch]
                )
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], error=exc)
                    continue
                # One bad change must not sink the others: apply them one by one.
                for change, future in batch:
                    try:
                        [outcome] = await asyncio.to_thread(self._store.apply_many, [change])
                    except Exception as one:
                        _settle(future, error=one)
                    else:
                        _settle(future, outcome)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                _settle(future, outcome)


def _settle(
    future: asyncio.Future[Applied | None],
    outcome: Applied | None = None,
    *,
    error: Exception | None = None,
) -> None:
    if future.done():  # the caller was cancelled; its change was applied all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)
