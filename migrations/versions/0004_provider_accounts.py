"""provider accounts

Revision ID: 0004_provider_accounts
Revises: 0003_uploads

The fal account webhooks must come from (jobs/db.py ``provider_accounts``): one row per
provider, learned from the first callback for a request this store submitted.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_provider_accounts"
down_revision: str | Sequence[str] | None = "0003_uploads"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_accounts",
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("learned_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("provider", name=op.f("pk_provider_accounts")),
    )


def downgrade() -> None:
    op.drop_table("provider_accounts")
