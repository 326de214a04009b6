"""replicate: jobs.cancel_after; webhook_deliveries

Revision ID: 0005_replicate
Revises: 0004_provider_accounts

``jobs.cancel_after``: the deadline a Replicate prediction is created with (``Cancel-After``).
``webhook_deliveries``: the message ids of callbacks already applied (Replicate's
``webhook-id``, the same across its retries), kept longer than the retry window so a repeat
is answered without touching the job (jobs/db.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005_replicate"
down_revision: str | Sequence[str] | None = "0004_provider_accounts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cancel_after", sa.Double(), nullable=True))
    op.create_table(
        "webhook_deliveries",
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("delivery_id", sa.String(length=128), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "delivery_id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(
        op.f("ix_webhook_deliveries_received_at"), "webhook_deliveries", ["received_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_deliveries_received_at"), table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_after")
