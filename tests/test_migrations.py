"""Alembic migrations against jobs/db.py, on SQLite and PostgreSQL.

The guard rails: a model change without a migration fails ``test_models_match_migrations``; a
new State/FailureReason without a migration of the CHECK constraint fails the ``enum synced``
tests (Alembic does not compare CHECK bodies).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from jobs import migrate
from jobs.db import create_db_engine, job_events, metadata
from jobs.db import jobs as jobs_table
from jobs.states import FailureReason, State

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest) -> str:
    """An empty database, never migrated."""
    url: str = request.getfixturevalue(
        "sqlite_url" if request.param == "sqlite" else "postgres_empty_url"
    )
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_db_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


def _tables(url: str) -> set[str]:
    eng = create_db_engine(url)
    try:
        with eng.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        eng.dispose()


def _version_rows(url: str) -> list[str]:
    eng = create_db_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars())
    finally:
        eng.dispose()


MODEL_TABLES = set(metadata.tables)


# Upgrade / downgrade


def test_upgrade_empty_database_to_head(empty_url: str) -> None:
    assert migrate.current(empty_url) is None
    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == migrate.head()
    assert _tables(empty_url) == MODEL_TABLES | {"alembic_version"}
    assert migrate.check(empty_url) == []


def test_downgrade_to_base_then_upgrade_again(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    migrate.downgrade(empty_url, "base")
    assert _tables(empty_url) - {"alembic_version"} == set()
    assert migrate.current(empty_url) is None
    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == migrate.head()
    assert migrate.check(empty_url) == []


def test_upgrade_accepts_an_engine(empty_url: str) -> None:
    eng = create_db_engine(empty_url)
    try:
        migrate.upgrade(eng)
        assert migrate.current(eng) == migrate.head()
        assert migrate.check(eng) == []
    finally:
        eng.dispose()


def test_current_is_head(db_url: str) -> None:
    assert migrate.current(db_url) == migrate.head()


def test_upgrade_twice_is_a_noop(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    before = (_tables(empty_url), _version_rows(empty_url))
    migrate.upgrade(empty_url)
    migrate.upgrade(empty_url, "head")
    assert (_tables(empty_url), _version_rows(empty_url)) == before
    assert before[1] == [migrate.head()]


def test_upgrade_at_head_takes_no_lock(db_url: str) -> None:
    """The fast path: with another process holding the migration lock, upgrade() still
    returns at once when the database is at head (it only reads alembic_version)."""
    holder = create_db_engine(db_url)
    try:
        with holder.connect() as conn, migrate.migration_transaction(conn):
            started = time.perf_counter()
            migrate.upgrade(db_url)
            assert time.perf_counter() - started < 5  # the lock would block for 30 s
    finally:
        holder.dispose()


# Models and migrations agree


def test_models_match_migrations(db_url: str) -> None:
    """Fails when jobs/db.py changes without a migration: write one with
    ``alembic revision --autogenerate --rev-id 000N_what -m "what"`` and review it."""
    assert migrate.check(db_url) == []


def _copy_metadata() -> sa.MetaData:
    copy = sa.MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(copy)
    return copy


def _add_column(md: sa.MetaData) -> None:
    md.tables["jobs"].append_column(sa.Column("extra", sa.Integer))


def _widen_type(md: sa.MetaData) -> None:
    md.tables["jobs"].c.provider.type = sa.String(64)


def _make_nullable(md: sa.MetaData) -> None:
    md.tables["jobs"].c.application.nullable = True


def _add_index(md: sa.MetaData) -> None:
    sa.Index(None, md.tables["jobs"].c.lease_owner)


def _drop_unique(md: sa.MetaData) -> None:
    table = md.tables["job_logs"]
    table.constraints -= {c for c in table.constraints if isinstance(c, sa.UniqueConstraint)}


def _drop_cascade(md: sa.MetaData) -> None:
    (fk,) = md.tables["results"].foreign_keys
    fk.ondelete = None
    assert fk.constraint is not None
    fk.constraint.ondelete = None


def _add_table(md: sa.MetaData) -> None:
    sa.Table("job_tags", md, sa.Column("tag", sa.String(32), primary_key=True))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_add_column, "add_column"),
        (_widen_type, "modify_type"),
        (_make_nullable, "modify_nullable"),
        (_add_index, "add_index"),
        (_drop_unique, "remove_constraint"),
        (_drop_cascade, "add_fk"),
        (_add_table, "add_table"),
    ],
)
def test_check_detects_model_changes(db_url: str, change: Any, expected: str) -> None:
    """The check above can fail: a changed copy of the models differs from the database."""
    changed = _copy_metadata()
    assert migrate.check(db_url, target=changed) == []  # an unchanged copy is clean
    change(changed)
    diffs = migrate.check(db_url, target=changed)
    kinds = {_diff_kind(d) for d in diffs}
    assert expected in kinds, diffs


def _diff_kind(diff: Any) -> str:
    # Column modifications come as a list of tuples; everything else as one tuple.
    first = diff[0] if isinstance(diff, list) else diff
    return str(first[0])


# The CHECK constraints list exactly the enums ("enum synced")


def _check_values(engine: Engine, name: str) -> set[str]:
    with engine.connect() as conn:
        checks = sa.inspect(conn).get_check_constraints("jobs")
    (sqltext,) = [c["sqltext"] for c in checks if c["name"] == name]
    # SQLite keeps the text as written; PostgreSQL renders
    # ((state)::text = ANY ((ARRAY['submitting'::character varying, ...])::text[])).
    return set(re.findall(r"'([^']*)'", sqltext))


def _job(job_id: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": job_id,
        "provider": "fal",
        "application": "fal-ai/fast-sdxl",
        "arguments": {"prompt": "x"},
        "state": State.QUEUED.value,
        "created_at": 1.0,
        "updated_at": 1.0,
    }
    row.update(values)
    return row


def test_state_check_lists_exactly_the_states(engine: Engine) -> None:
    assert _check_values(engine, "ck_jobs_state") == {s.value for s in State}


def test_failure_reason_check_lists_exactly_the_reasons(engine: Engine) -> None:
    assert _check_values(engine, "ck_jobs_failure_reason") == {r.value for r in FailureReason}


def test_check_constraints_match_models(engine: Engine) -> None:
    """Every CHECK of the models exists under its name; on SQLite, which keeps the text as
    written, with exactly the models' text."""
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in metadata.sorted_tables:
            model = {
                str(c.name): str(c.sqltext)
                for c in table.constraints
                if isinstance(c, sa.CheckConstraint)
            }
            reflected = {
                str(c["name"]): c["sqltext"] for c in inspector.get_check_constraints(table.name)
            }
            assert set(reflected) == set(model), table.name
            if engine.dialect.name == "sqlite":
                assert reflected == model, table.name


def test_every_state_is_accepted_and_others_rejected(engine: Engine) -> None:
    with engine.connect() as conn:
        for i, state in enumerate(State):
            conn.execute(jobs_table.insert(), _job(f"ok{i}", state=state.value))
        for i, reason in enumerate(FailureReason):
            conn.execute(
                jobs_table.insert(),
                _job(f"fail{i}", state=State.FAILED.value, failure_reason=reason.value),
            )
        conn.commit()
    for bad in [{"state": "bogus"}, {"state": "QUEUED"}, {"failure_reason": "bogus"}]:
        with engine.connect() as conn, pytest.raises(IntegrityError):
            conn.execute(jobs_table.insert(), _job("bad", **bad))


# Concurrency

_WORKER = textwrap.dedent(
    """
    import sys
    from jobs.migrate import upgrade
    print("ready", flush=True)
    sys.stdin.readline()  # "go": all workers start upgrade() together
    upgrade(sys.argv[1])
    print("done", flush=True)
    """
)


def test_concurrent_upgrades_from_several_processes(empty_url: str, tmp_path: Path) -> None:
    """Replicas starting together on a fresh database: all succeed, the schema is right.

    The workers run from another directory: migrations are found without alembic.ini."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, empty_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        for _ in range(4)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready"
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        results = [w.communicate(timeout=90) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (out, err) in zip(workers, results, strict=True):
        assert w.returncode == 0, err
        assert out.strip() == "done", (out, err)
    assert _version_rows(empty_url) == [migrate.head()]
    assert _tables(empty_url) == MODEL_TABLES | {"alembic_version"}
    assert migrate.check(empty_url) == []


# SQLite specifics


def test_sqlite_batch_migration_keeps_child_rows(sqlite_migrated_url: str) -> None:
    """A later revision that rebuilds ``jobs`` in batch mode (copy, DROP, rename) must not
    cascade-delete the children: migration_transaction switches foreign keys off, checks them
    before COMMIT, and switches them back on."""
    eng = create_db_engine(sqlite_migrated_url)
    try:
        with eng.begin() as conn:
            conn.execute(jobs_table.insert(), _job("j1"))
            conn.execute(job_events.insert(), {"job_id": "j1", "at": 1.0, "kind": "created"})
        with eng.connect() as conn:
            with migrate.migration_transaction(conn):
                ops = Operations(MigrationContext.configure(conn))
                with ops.batch_alter_table("jobs", recreate="always") as batch:
                    batch.add_column(sa.Column("extra", sa.Integer))
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            conn.rollback()
        with eng.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(job_events)).scalar() == 1
            assert "extra" in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    finally:
        eng.dispose()


def test_sqlite_failed_migration_rolls_back_everything(sqlite_url: str) -> None:
    """SQLite DDL runs in the migration's transaction: a failure leaves no half schema."""
    eng = create_db_engine(sqlite_url)
    try:
        with (
            eng.connect() as conn,
            pytest.raises(RuntimeError, match="boom"),
            migrate.migration_transaction(conn),
        ):
            ops = Operations(MigrationContext.configure(conn))
            ops.create_table("half", sa.Column("id", sa.Integer, primary_key=True))
            raise RuntimeError("boom")
    finally:
        eng.dispose()
    assert "half" not in _tables(sqlite_url)


# The command line and the revision files


def test_alembic_command_line(sqlite_url: str) -> None:
    """``alembic`` with alembic.ini: the URL comes from JOBS_DATABASE_URL."""
    env = {**os.environ, "JOBS_DATABASE_URL": sqlite_url}
    ini = str(ROOT / "alembic.ini")

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alembic", "-c", ini, *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    offline = alembic("upgrade", "head", "--sql").stdout
    assert "CREATE TABLE jobs" in offline
    assert migrate.current(sqlite_url) is None  # --sql only prints
    alembic("upgrade", "head")
    assert migrate.current(sqlite_url) == migrate.head()
    alembic("check")  # exits non-zero when models and database differ


def test_head_agrees_with_alembic() -> None:
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    assert migrate.head() == scripts.get_current_head()
    assert migrate._parse_script_heads(migrate.migrations_dir() / "versions") == set(
        scripts.get_heads()
    )


def _write_revision(versions: Path, rev: str, down: str) -> None:
    (versions / f"{rev}.py").write_text(
        f'"""{rev}"""\n\nrevision: str = "{rev}"\ndown_revision = {down}\n'
        "branch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n"
    )


def test_head_parser_on_branches_and_merges(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    graph = {
        "a": "None",
        "b": "'a'",
        "c": '"a"  # a comment',
        "d": "('b', 'c')",
        "e": "'a'",
    }
    for rev, down in graph.items():
        _write_revision(versions, rev, down)
    (versions / "__init__.py").write_text("")
    parsed = migrate._parse_script_heads(versions)
    assert parsed == {"d", "e"}
    assert parsed == set(ScriptDirectory(str(tmp_path)).get_heads())

    _write_revision(versions, "f", "compute()")  # not a literal: left to Alembic
    with pytest.raises(ValueError, match="not a literal"):
        migrate._parse_script_heads(versions)
