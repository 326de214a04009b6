"""Shared fixtures: databases to test against.

SQLite (always available):

* ``sqlite_url``: ``sqlite:///<tmp_path>/jobs.db``, an empty file database (not migrated).
* ``sqlite_migrated_url``: the same path, already migrated to head (a copy of a database
  migrated once per session).

PostgreSQL (needs ``JOBS_TEST_POSTGRES_URL``, e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``; the tests using it skip without it):

* ``postgres_url``: a fresh database migrated to head, ``CREATE DATABASE ... TEMPLATE`` of a
  template migrated once per session; dropped after the test.
* ``postgres_empty_url``: a fresh empty database (not migrated), for migration tests.

Both:

* ``db_url``: parametrized ``[sqlite, postgres]``, a migrated database: what store contract
  tests should use. The postgres case carries the ``postgres`` marker and skips as above.

Tests marked ``slow`` are skipped unless ``JOBS_TEST_SLOW=1``; tests using a PostgreSQL fixture
get the ``postgres`` marker (``-m "not postgres"`` deselects them).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from jobs.migrate import upgrade

POSTGRES_URL_ENV = "JOBS_TEST_POSTGRES_URL"
_POSTGRES_FIXTURES = {"postgres_server_url", "postgres_url", "postgres_empty_url"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = os.environ.get("JOBS_TEST_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow test: set JOBS_TEST_SLOW=1 to run it")
    for item in items:
        if _POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)
        if item.get_closest_marker("slow"):
            # One worker runs the heavy tests (crash storms, replicas, the wheel) one after
            # another, so two of them never compete for the machine's two cores.
            item.add_marker(pytest.mark.xdist_group("slow"))
            if not run_slow:
                item.add_marker(skip_slow)


# SQLite


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An empty SQLite database file (not migrated)."""
    return f"sqlite:///{tmp_path}/jobs.db"


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite_template") / "jobs.db"
    upgrade(f"sqlite:///{path}")  # disposes its engine: the WAL is checkpointed and removed
    return path


@pytest.fixture
def sqlite_migrated_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """A SQLite database file migrated to head, at the same path as ``sqlite_url``."""
    target = tmp_path / "jobs.db"
    shutil.copyfile(_sqlite_template, target)
    wal = _sqlite_template.with_name(_sqlite_template.name + "-wal")
    if wal.exists():  # normally gone once the last connection closed
        shutil.copyfile(wal, target.with_name(target.name + "-wal"))
    return f"sqlite:///{target}"


# PostgreSQL


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """``JOBS_TEST_POSTGRES_URL``: the server's maintenance database; tests do not write to it."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip("JOBS_TEST_POSTGRES_URL is not set; PostgreSQL tests need a server")
    return url


@pytest.fixture(scope="session")
def _postgres_admin(postgres_server_url: str) -> Iterator[Engine]:
    # CREATE/DROP DATABASE cannot run in a transaction; NullPool keeps no connection around.
    engine = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def _database_url(server_url: str, database: str) -> str:
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


def _create_database(admin: Engine, prefix: str, template: str = "template0") -> str:
    name = f"{prefix}{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def _drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        # FORCE (PostgreSQL 13+): a test that leaked a connection must not leak the database.
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _postgres_template(postgres_server_url: str, _postgres_admin: Engine) -> Iterator[str]:
    name = _create_database(_postgres_admin, "jobs_template_")
    try:
        # upgrade() disposes its engine: no session stays on the template, which
        # CREATE DATABASE ... TEMPLATE requires.
        upgrade(_database_url(postgres_server_url, name))
        yield name
    finally:
        _drop_database(_postgres_admin, name)


@pytest.fixture
def postgres_url(
    postgres_server_url: str, _postgres_admin: Engine, _postgres_template: str
) -> Iterator[str]:
    """A fresh PostgreSQL database migrated to head, dropped after the test."""
    name = _create_database(_postgres_admin, "jobs_test_", template=_postgres_template)
    try:
        yield _database_url(postgres_server_url, name)
    finally:
        _drop_database(_postgres_admin, name)


@pytest.fixture
def postgres_empty_url(postgres_server_url: str, _postgres_admin: Engine) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (not migrated), dropped after the test."""
    name = _create_database(_postgres_admin, "jobs_test_")
    try:
        yield _database_url(postgres_server_url, name)
    finally:
        _drop_database(_postgres_admin, name)


# Both


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A database migrated to head, on SQLite and on PostgreSQL."""
    fixture = "sqlite_migrated_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url
