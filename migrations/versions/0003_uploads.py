"""uploads: files sent to fal's CDN, content-addressed and resumable; jobs.start_timeout

Revision ID: 0003_uploads
Revises: 0002_retry_track

The uploads and upload_parts tables of jobs/db.py (see jobs/uploads.py), and the start
timeout a job asks of fal (sent again with every attempt, so it is kept with the job). The
CHECK list of upload states is spelled out here, as in 0001, so this revision stays what it
was.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003_uploads"
down_revision: str | Sequence[str] | None = "0002_retry_track"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy), as 0002: SQLite does it in place.
    op.add_column("jobs", sa.Column("start_timeout", sa.Double(), nullable=True))
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("multipart_id", sa.Text(), nullable=True),
        sa.Column("access_url", sa.Text(), nullable=True),
        sa.Column("part_size", sa.Integer(), nullable=True),
        sa.Column("lifecycle_seconds", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("uploaded_at", sa.Double(), nullable=True),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.CheckConstraint(
            "state IN ('uploading', 'uploaded', 'abandoned')", name=op.f("ck_uploads_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
    )
    op.create_index(
        op.f("ix_uploads_sha256_content_type"), "uploads", ["sha256", "content_type"], unique=False
    )
    op.create_table(
        "upload_parts",
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("part_number", sa.Integer(), nullable=False),
        sa.Column("etag", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["upload_id"],
            ["uploads.id"],
            name=op.f("fk_upload_parts_upload_id_uploads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("upload_id", "part_number", name=op.f("pk_upload_parts")),
    )


def downgrade() -> None:
    op.drop_table("upload_parts")
    op.drop_index(op.f("ix_uploads_sha256_content_type"), table_name="uploads")
    op.drop_table("uploads")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("start_timeout")
