"""token ids, names and last use; users can be disabled

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Existing tokens get a random id and the name "login" (what POST /auth/login names its tokens).
    op.add_column("tokens", sa.Column("id", postgresql.UUID(as_uuid=True),
                                      server_default=sa.text("gen_random_uuid()"), nullable=False))
    op.add_column("tokens", sa.Column("name", sa.Text(), server_default="login", nullable=False))
    op.add_column("tokens", sa.Column("last_used_at", TZ, nullable=True))
    op.create_unique_constraint(op.f("uq_tokens_id"), "tokens", ["id"])
    op.add_column("users", sa.Column("disabled_at", TZ, nullable=True))


def downgrade() -> None:
    op.drop_column("users", "disabled_at")
    op.drop_constraint(op.f("uq_tokens_id"), "tokens", type_="unique")
    op.drop_column("tokens", "last_used_at")
    op.drop_column("tokens", "name")
    op.drop_column("tokens", "id")
