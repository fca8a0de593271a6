"""cloud replication: due-row index and the queue of cloud deletions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_index("ix_files_cloud_due", "files", ["cloud_state", "cloud_next_attempt_at"])
    op.create_table(
        "cloud_deletions",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_until", TZ, nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_cloud_deletions")),
    )


def downgrade() -> None:
    op.drop_table("cloud_deletions")
    op.drop_index("ix_files_cloud_due", table_name="files")
