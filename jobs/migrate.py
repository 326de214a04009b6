"""Schema migrations: Alembic, run from the application.

The revisions live in ``migrations/versions`` at the repository root (one level above this
package), and a wheel carries them as ``jobs/migrations``; :func:`alembic_config` builds the
Alembic ``Config`` programmatically, so ``alembic.ini`` is only needed for the ``alembic``
command line. ``JOBS_MIGRATIONS_DIR`` overrides the location.

Concurrency: several processes may call :func:`upgrade` on the same database at once (two
``jobs serve`` replicas, a CLI and a server). Every migration runs in one transaction that
first takes a lock, and Alembic reads the version table only once the lock is held, so the
losers of the race find the schema already at the target and do nothing:

* PostgreSQL: ``pg_advisory_xact_lock`` (released by the COMMIT/ROLLBACK, even on error);
  DDL is transactional, so a failed migration leaves nothing behind.
* SQLite: ``BEGIN IMMEDIATE`` (the write lock, waited for through the busy timeout). DDL is
  transactional on SQLite too once the driver's implicit transaction handling is off, which
  :func:`jobs.db.create_db_engine` does. Foreign keys are switched off for the migration (a
  batch "move and copy" of ``jobs`` would otherwise cascade-delete every child row when it
  drops the old table) and ``PRAGMA foreign_key_check`` must be clean before the COMMIT.

Fast path: when the database is already at head, :func:`upgrade` costs one connection and one
``SELECT`` from ``alembic_version``, and does not import Alembic at all (the heads are read
from the revision files' ``revision``/``down_revision`` lines; anything unusual falls back to
Alembic's own ``ScriptDirectory``).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import MetaData, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import OperationalError, ProgrammingError

from .db import create_db_engine, metadata

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "COMPARE_OPTIONS",
    "VERSION_TABLE",
    "alembic_config",
    "check",
    "current",
    "downgrade",
    "head",
    "migration_transaction",
    "migrations_dir",
    "upgrade",
]

VERSION_TABLE: Final = "alembic_version"

# Shared by migrations/env.py (autogenerate, `alembic check`) and :func:`check`, so the test
# that models and migrations agree compares exactly what autogenerate would.
COMPARE_OPTIONS: Final[dict[str, Any]] = {"compare_type": True, "compare_server_default": True}

# Key of the PostgreSQL advisory lock serialising migrations: the bytes "jobsmigr" as a
# (positive) bigint. Advisory locks are per database, so other databases are not affected.
_PG_LOCK_KEY: Final = int.from_bytes(b"jobsmigr", "big")

_REVISION_FILE = re.compile(r"(?!\.#|__init__)(.*\.py)$")  # as Alembic's _only_source_rev_file
_ASSIGNMENT = re.compile(
    r"^(revision|down_revision|depends_on)\s*(?::[^=\n]*)?=\s*(.+?)\s*(?:#.*)?$", re.MULTILINE
)


def migrations_dir() -> Path:
    """The Alembic script directory (``env.py``, ``versions/``): ``JOBS_MIGRATIONS_DIR`` when
    set, else the copy an installed wheel carries (``jobs/migrations``), else the repository's
    ``migrations/`` beside the package (a checkout or an editable install)."""
    override = os.environ.get("JOBS_MIGRATIONS_DIR")
    package = Path(__file__).resolve().parent
    candidates = [package / "migrations", package.parent / "migrations"]
    if override:
        candidates = [Path(override)]
    for path in candidates:
        if (path / "env.py").is_file():
            return path
    raise RuntimeError(
        f"Alembic migrations not found at {candidates[0]}: the installation is incomplete "
        "(reinstall jobs) or JOBS_MIGRATIONS_DIR points at the wrong folder"
    )


def alembic_config(connection: Connection | Engine | None = None) -> Config:
    """An Alembic ``Config`` built without ``alembic.ini``.

    ``connection``, when given, is what ``env.py`` migrates (``config.attributes``); without it
    env.py falls back to ``sqlalchemy.url`` / ``JOBS_DATABASE_URL``.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def migration_transaction(conn: Connection) -> Iterator[Connection]:
    """Begin a transaction on ``conn`` holding the migration lock; commit it on success.

    ``conn`` must not be in a transaction yet (the lock must be taken before Alembic reads the
    version table, and SQLite can only switch foreign keys off outside a transaction).
    """
    if conn.in_transaction():
        raise RuntimeError("migration_transaction() needs a connection outside a transaction")
    if conn.dialect.name == "sqlite":
        with _sqlite_migration_transaction(conn):
            yield conn
        return
    with conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        yield conn


@contextlib.contextmanager
def _sqlite_migration_transaction(conn: Connection) -> Iterator[None]:
    raw: Any = conn.connection.driver_connection  # sqlite3.Connection; not in a transaction
    foreign_keys = bool(raw.execute("PRAGMA foreign_keys").fetchone()[0])
    if foreign_keys:
        raw.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set it first
    try:
        # create_db_engine's "begin" hook reads this option and issues BEGIN IMMEDIATE.
        conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            if not raw.in_transaction:
                # A plain engine: pysqlite would only BEGIN before the first DML statement,
                # leaving the DDL in autocommit. Take the transaction and the lock ourselves.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield
            violations = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                raise RuntimeError(
                    f"migration left foreign key violations (rolled back): {violations[:10]}"
                )
    finally:
        conn.execution_options(sqlite_begin="DEFERRED")
        if foreign_keys:
            raw.execute("PRAGMA foreign_keys=ON")


@contextlib.contextmanager
def _engine(url_or_engine: str | URL | Engine) -> Iterator[Engine]:
    if isinstance(url_or_engine, Engine):
        yield url_or_engine
        return
    url = (
        url_or_engine.render_as_string(hide_password=False)
        if isinstance(url_or_engine, URL)
        else url_or_engine
    )
    engine = create_db_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _db_heads(conn: Connection) -> frozenset[str] | None:
    """The revisions recorded in the database; None when there is no version table."""
    try:
        rows = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalars().all()
    except (OperationalError, ProgrammingError):  # no such table (SQLite / PostgreSQL)
        conn.rollback()
        return None
    return frozenset(rows)


def _read_db_heads(engine: Engine) -> frozenset[str] | None:
    with engine.connect() as conn:
        heads = _db_heads(conn)
        conn.rollback()
        return heads


def _script_heads() -> frozenset[str]:
    path = migrations_dir() / "versions"
    return _script_heads_cached(str(path), path.stat().st_mtime_ns)


@functools.cache
def _script_heads_cached(versions: str, _mtime_ns: int) -> frozenset[str]:
    # Keyed on the directory's mtime: adding or removing a revision file invalidates it.
    try:
        return _parse_script_heads(Path(versions))
    except ValueError:
        from alembic.script import ScriptDirectory

        return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def _parse_script_heads(versions: Path) -> frozenset[str]:
    """Heads from the revision files' literal ``revision``/``down_revision`` assignments.

    Raises ValueError for anything this cheap reader does not fully understand (the caller
    then asks Alembic); the result is checked against Alembic's in tests/test_migrations.py.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for file in versions.iterdir():
        if not (_REVISION_FILE.fullmatch(file.name) and file.is_file()):
            continue
        values: dict[str, Any] = {}
        for name, expression in _ASSIGNMENT.findall(file.read_text(encoding="utf-8")):
            if name in values:
                raise ValueError(f"{file}: {name} assigned twice")
            try:
                values[name] = ast.literal_eval(expression)
            except (ValueError, SyntaxError) as exc:
                raise ValueError(f"{file}: {name} is not a literal") from exc
        revision, down = values.get("revision"), values.get("down_revision", ...)
        if not isinstance(revision, str) or down is ...:
            raise ValueError(f"{file}: no literal revision/down_revision")
        if values.get("depends_on") is not None:
            raise ValueError(f"{file}: depends_on is left to Alembic")
        if revision in revisions:
            raise ValueError(f"duplicate revision {revision}")
        revisions.add(revision)
        if isinstance(down, str):
            parents.add(down)
        elif isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
            parents.update(down)
        elif down is not None:
            raise ValueError(f"{file}: unexpected down_revision {down!r}")
    if not revisions or not parents <= revisions:
        raise ValueError("empty or broken revision graph")
    return frozenset(revisions - parents)


def head() -> str:
    """The head revision of the migration scripts."""
    heads = _script_heads()
    if len(heads) != 1:
        raise RuntimeError(f"expected one head revision, found {sorted(heads)}: merge them")
    return next(iter(heads))


def current(url_or_engine: str | URL | Engine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    with _engine(url_or_engine) as engine:
        heads = _read_db_heads(engine)
    if not heads:
        return None
    if len(heads) > 1:
        raise RuntimeError(f"database is at several heads: {sorted(heads)}")
    return next(iter(heads))


def upgrade(url_or_engine: str | URL | Engine, revision: str = "head") -> None:
    """Migrate the database up to ``revision``; safe to call concurrently from processes.

    A no-op costing one ``SELECT`` when the database is already at head.
    """
    with _engine(url_or_engine) as engine:
        if revision in {"head", "heads"} and _read_db_heads(engine) == _script_heads():
            return
        from alembic import command

        with engine.connect() as conn, migration_transaction(conn):
            command.upgrade(alembic_config(conn), revision)


def downgrade(url_or_engine: str | URL | Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (``"base"``: drop everything)."""
    from alembic import command

    with _engine(url_or_engine) as engine, engine.connect() as conn, migration_transaction(conn):
        command.downgrade(alembic_config(conn), revision)


def check(engine: str | URL | Engine, *, target: MetaData | None = None) -> list[Any]:
    """Differences between the models (``target``, default :data:`jobs.db.metadata`) and the
    database schema, as Alembic's autogenerate sees them.

    Empty when the database matches the models, as ``alembic check`` would say. CHECK
    constraint bodies are not compared by Alembic (tests/test_migrations.py covers them).
    """
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with _engine(engine) as eng, eng.connect() as conn:
        context = MigrationContext.configure(conn, opts=dict(COMPARE_OPTIONS))
        diffs = list(compare_metadata(context, metadata if target is None else target))
        conn.rollback()
        return diffs
