"""sign-in throttling: failure counts and blocks per name and client address

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "signin_throttle",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("window_started_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("blocked_until", TZ, nullable=True),
        sa.Column("level", sa.Integer(), server_default="0", nullable=False),
        sa.Column("updated_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_signin_throttle")),
    )
    op.create_index(op.f("ix_signin_throttle_updated_at"), "signin_throttle", ["updated_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_signin_throttle_updated_at"), table_name="signin_throttle")
    op.drop_table("signin_throttle")
