"""Tables, engine creation and connection set-up. No queries: those live in :mod:`jobs.store`.

Timestamps are stored as UNIX seconds (double precision): the same on SQLite and
PostgreSQL, cheap to index and compare, and free of time-zone handling. The API layers
render them as ISO-8601.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
)
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry

from .states import FailureReason, State

# Stable constraint names so Alembic can compare and alter them on every backend.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _in_list(column: str, values: list[str]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


STATE_VALUES = [s.value for s in State]
FAILURE_VALUES = [r.value for r in FailureReason]

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("provider", String(16), nullable=False),
    Column("application", String(255), nullable=False),
    Column("path", String(255)),
    Column("arguments", JSON, nullable=False),
    Column("request_id", String(128)),
    Column("gateway_request_id", String(128)),
    Column("status_url", Text),
    Column("response_url", Text),
    Column("cancel_url", Text),
    Column("state", String(16), nullable=False),
    Column("failure_reason", String(32)),
    Column("error", JSON),
    Column("priority", String(8)),
    Column("hint", String(255)),
    Column("labels", JSON),
    Column("batch", String(255)),
    Column("batch_index", Integer),
    Column("idempotency_key", String(255)),
    Column("webhook", Boolean, nullable=False, default=False),
    Column("download_files", Boolean, nullable=False, default=False),
    Column("queue_position", Integer),
    Column("metrics", JSON),
    Column("attempts", Integer, nullable=False, default=0),
    Column("polls", Integer, nullable=False, default=0),
    Column("poll_interval", Double),
    Column("next_poll_at", Double),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Double),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("submitted_at", Double),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("last_change_at", Double),
    Column("cancel_requested_at", Double),
    Column("retry_of", String(32)),
    Column("tracked", Boolean, nullable=False, default=False, server_default=false()),
    # seconds fal may take to start the request (X-Fal-Request-Timeout), sent on every attempt
    Column("start_timeout", Double),
    # seconds Replicate may take before the prediction is cancelled (Cancel-After)
    Column("cancel_after", Double),
    CheckConstraint(_in_list("state", STATE_VALUES), name="state"),
    CheckConstraint(
        "failure_reason IS NULL OR " + _in_list("failure_reason", FAILURE_VALUES),
        name="failure_reason",
    ),
    UniqueConstraint("request_id", "provider"),
    UniqueConstraint("idempotency_key"),
    # The poll tick's claim reads due rows through this index; terminal jobs have
    # next_poll_at NULL and so never enter it.
    Index(None, "next_poll_at"),
    Index(None, "state", "created_at"),
    Index(None, "batch", "batch_index"),
    # Batches skip a job that a retry supersedes (a NOT EXISTS on this column).
    Index(None, "retry_of"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("at", Double, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("reason", String(64)),
    Column("detail", JSON),
    Index(None, "job_id", "id"),
)

results = Table(
    "results",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("stored_at", Double, nullable=False),
    Column("data", JSON),
    Column("size", Integer, nullable=False),
)

job_logs = Table(
    "job_logs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("at", Double, nullable=False),
    Column("entry", JSON, nullable=False),
    UniqueConstraint("job_id", "seq"),
)

job_files = Table(
    "job_files",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("n", Integer, primary_key=True),
    Column("url", Text, nullable=False),
    Column("json_path", Text),
    Column("file_name", String(255)),
    Column("content_type", String(255)),
    Column("size", Integer),
    Column("sha256", String(64)),
    Column("state", String(16), nullable=False),
    Column("error", Text),
    Column("stored_at", Double, nullable=False),
)

# The provider account our webhooks must come from (fal signs every customer's callbacks
# with the same keys): learned once from a callback for a request we submitted, shared by
# every replica and kept across restarts.
provider_accounts = Table(
    "provider_accounts",
    metadata,
    Column("provider", String(16), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("learned_at", Double, nullable=False),
)

# Callbacks already applied, by the provider's message id (Replicate's ``webhook-id``, the
# same across retries of one message): a repeat is answered without touching the job.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("provider", String(16), primary_key=True),
    Column("delivery_id", String(128), primary_key=True),
    Column("received_at", Double, nullable=False, index=True),
)

UPLOAD_STATES = ["uploading", "uploaded", "abandoned"]

# Files sent to fal's CDN, content-addressed: the same bytes (and content type) while the URL
# lives are not sent again. A multipart upload is a row in "uploading" with its finished
# parts in upload_parts, so a killed process can finish it with the missing parts only.
uploads = Table(
    "uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("file_name", String(255)),
    Column("state", String(16), nullable=False),
    Column("url", Text),
    Column("multipart_id", Text),
    Column("access_url", Text),
    Column("part_size", Integer),
    Column("lifecycle_seconds", BigInteger),
    Column("created_at", Double, nullable=False),
    Column("uploaded_at", Double),
    Column("expires_at", Double),
    CheckConstraint(_in_list("state", UPLOAD_STATES), name="state"),
    Index(None, "sha256", "content_type"),
)

upload_parts = Table(
    "upload_parts",
    metadata,
    Column("upload_id", String(32), ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True),
    Column("part_number", Integer, primary_key=True),
    Column("etag", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("at", Double, nullable=False),
)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


_URL_PASSWORD = re.compile(r"(://[^/:@]*:)[^/@]*@")


def hide_password(url: str) -> str:
    """``url`` with its password shown as ``***`` (also for a URL SQLAlchemy cannot parse)."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def create_db_engine(url: str, *, synchronous: str = "NORMAL", echo: bool = False) -> Engine:
    """An engine with the connection set-up each backend needs.

    SQLite: WAL (readers never block the writer), a busy timeout so concurrent processes
    wait instead of failing with 'database is locked', foreign keys on, and transactions we
    begin ourselves so a write can take the lock up front (``BEGIN IMMEDIATE``) rather than
    failing to upgrade a read lock. ``synchronous=NORMAL`` survives a killed process but may
    lose the last commits on power loss; ``FULL`` does not.
    """
    # hide_parameters: an error's text (logged, shown) never quotes the values of a
    # statement, which include the user's arguments and results.
    kwargs: dict[str, Any] = {"echo": echo, "future": True, "hide_parameters": True}
    if is_sqlite(url):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, **kwargs)
    if is_sqlite(url):
        _configure_sqlite(engine, synchronous)
    return engine


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # e.g. VACUUM, which cannot run inside a transaction
        mode = options.get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
