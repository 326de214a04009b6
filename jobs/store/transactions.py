"""Transactions: one engine, one writer lock per process on SQLite, bounded retries.

SQLite: one writer at a time per process (a lock) and ``BEGIN IMMEDIATE`` so concurrent
processes queue on the busy timeout instead of failing to upgrade a read lock. Transient
database errors (a PostgreSQL restart, a lock held past the busy timeout) are retried a
bounded number of times.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Self, TypeVar

from sqlalchemy import (
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, PendingRollbackError
from sqlalchemy.sql.dml import Insert

from ..db import (
    create_db_engine,
    hide_password,
)
from ..errors import ConfigError
from .aio import AsyncStore

T = TypeVar("T")

DB_RETRIES = 5


def _transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower()
    return any(
        needle in text
        for needle in ("database is locked", "connection", "server closed", "terminating")
    )


class Transactions:
    """An engine and the transactions run on it (the base of :class:`Store`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        # Why the last write failed, while no write has succeeded since (see _tx).
        self.write_failure: str | None = None
        self._write_lock = threading.Lock() if self.sqlite else None

    @classmethod
    def open(cls, url: str, *, synchronous: str = "NORMAL") -> Self:
        try:
            engine = create_db_engine(url, synchronous=synchronous)
        except Exception as exc:  # bad URL, missing driver
            shown = hide_password(url)
            reason = str(exc).replace(url, shown)
            raise ConfigError(f"cannot open database {shown!r}: {reason}") from None
        return cls(engine)

    @functools.cached_property
    def aio(self) -> AsyncStore:
        """This store for async callers: every method through :meth:`AsyncStore.run`."""
        return AsyncStore()

    def close(self) -> None:
        # Like the engine, usable again after close (a new pool is made on next use).
        aio: AsyncStore | None = self.__dict__.pop("aio", None)
        if aio is not None:
            aio.close()
        self.engine.dispose()

    # --- transactions --------------------------------------------------------------------

    @contextmanager
    def _connect(self, *, write: bool) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if write and self.sqlite:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def _tx(self, fn: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run ``fn`` in one transaction; retry transient failures a bounded number of times.
        A write that fails for a reason other than a constraint is remembered
        (:attr:`write_failure`, shown by ``/healthz``) until a write succeeds."""
        lock = self._write_lock if write and self._write_lock is not None else nullcontext()
        for attempt in range(1, DB_RETRIES + 1):
            try:
                with lock, self._connect(write=write) as conn:
                    try:
                        outcome = fn(conn)
                        _flush_inserts(conn)
                    finally:
                        conn.info.pop(_PENDING, None)
                if write:
                    self.write_failure = None
                return outcome
            except PendingRollbackError as exc:
                # A connection dropped mid-transaction (a PostgreSQL restart): a new one works.
                if attempt == DB_RETRIES:
                    self._note_write_failure(write, exc)
                    raise
            except (OperationalError, DBAPIError) as exc:
                if isinstance(exc, IntegrityError) or not _transient(exc) or attempt == DB_RETRIES:
                    if not isinstance(exc, IntegrityError):
                        self._note_write_failure(write, exc)
                    raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")

    def _note_write_failure(self, write: bool, exc: Exception) -> None:
        if write:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            self.write_failure = f"{type(exc).__name__}: {reason[0] if reason else ''}"[:300]

    def ping(self) -> None:
        self._tx(lambda c: c.execute(select(1)).scalar_one(), write=False)


def _chunks(items: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    """Slices small enough for an ``IN (…)`` list on every backend."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Rows of events and results written in a transaction wait here (on the connection) for
# one executemany per table.
_PENDING = "jobs_pending_inserts"


def _defer_insert(conn: Connection, statement: Insert, row: dict[str, Any]) -> None:
    """Queue a row for ``statement``; :meth:`Store._tx` inserts each table's rows with one
    executemany just before the commit (nothing reads them back inside the transaction)."""
    pending: dict[Insert, list[dict[str, Any]]] = conn.info.setdefault(_PENDING, {})
    pending.setdefault(statement, []).append(row)


def _flush_inserts(conn: Connection) -> None:
    pending: dict[Insert, list[dict[str, Any]]] = conn.info.pop(_PENDING, {})
    for statement, rows in pending.items():
        conn.execute(statement, rows)
