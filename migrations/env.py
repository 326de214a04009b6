"""Alembic environment for the jobs schema (:data:`jobs.db.metadata`).

What is migrated, in this order:

1. ``config.attributes["connection"]``: a Connection (or Engine) passed in programmatically,
   as :mod:`jobs.migrate` does. A Connection already in a transaction is used as it is (the
   caller holds the lock and commits); otherwise the migration runs in
   :func:`jobs.migrate.migration_transaction` (lock, then commit).
2. ``sqlalchemy.url`` set on the Config,
3. the ``JOBS_DATABASE_URL`` environment variable,
4. ``sqlite:///jobs.db``.

URLs get an engine from :func:`jobs.db.create_db_engine` (SQLite pragmas, explicit BEGIN).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, Engine

from jobs.db import create_db_engine, metadata
from jobs.migrate import COMPARE_OPTIONS, migration_transaction

config = context.config

# Logging set-up only for the `alembic` command line: when the application migrates (no
# alembic.ini, config_file_name is None) its own logging configuration is left alone.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def _url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("JOBS_DATABASE_URL")
        or "sqlite:///jobs.db"
    )


def _configure(*, connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else url or ""
    sqlite = dialect.startswith("sqlite")
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later revisions use batch ("move and copy") mode.
        render_as_batch=sqlite,
        # With the driver's implicit transactions off (create_db_engine, or our own BEGIN in
        # migration_transaction) SQLite DDL is transactional: one revision, one transaction.
        transactional_ddl=True if sqlite else None,
        literal_binds=connection is None,
        dialect_opts={"paramstyle": "named"} if connection is None else None,
        **COMPARE_OPTIONS,
    )


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: emit the SQL instead of running it."""
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        if given.in_transaction():
            _run(given)
        else:
            with migration_transaction(given):
                _run(given)
        return
    if given is not None and not isinstance(given, Engine):
        raise TypeError(f'config.attributes["connection"] must be a Connection, not {given!r}')
    engine = given if given is not None else create_db_engine(_url())
    try:
        with engine.connect() as connection, migration_transaction(connection):
            _run(connection)
    finally:
        if given is None:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
