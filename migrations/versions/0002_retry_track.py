"""retries and tracked jobs

Revision ID: 0002_retry_track
Revises: 0001_initial

``retry_of`` links a retry to the job it retries (``jobsctl retry``); ``tracked`` marks a job
adopted with ``jobsctl track``, whose input is unknown, so nothing may ever send it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_retry_track"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy): SQLite does it in place, and `alembic upgrade --sql`
    # can render it offline.
    op.add_column("jobs", sa.Column("retry_of", sa.String(length=32), nullable=True))
    op.add_column(
        "jobs", sa.Column("tracked", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.create_index(op.f("ix_jobs_retry_of"), "jobs", ["retry_of"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_retry_of"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("tracked")
        batch.drop_column("retry_of")
