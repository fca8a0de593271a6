"""cloud deletions: a generation, so that a key queued again outlives the claim before it

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("cloud_deletions", sa.Column("generation", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("cloud_deletions", "generation")
