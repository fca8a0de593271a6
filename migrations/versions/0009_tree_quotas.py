"""file tree and quotas: a per-user quota, the folder of each path, indexes for prefixes and folders

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in mediad/db.py (a migration keeps its own copy: it must not change when the code does).
FOLDER_OF_PATH = "left(path, length(path) - strpos(reverse(path), '/') + 1)"


def upgrade() -> None:
    op.add_column("users", sa.Column("quota", sa.BigInteger(), nullable=True))
    # A stored generated column: adding it rewrites the files table once.
    op.add_column("files", sa.Column("folder", sa.Text(), sa.Computed(FOLDER_OF_PATH, persisted=True),
                                     nullable=True))
    op.create_index("ix_files_owner_path", "files", ["owner_id", "path"],
                    postgresql_ops={"path": "text_pattern_ops"})
    op.create_index("ix_files_owner_folder", "files", ["owner_id", "folder", "created_at", "id"],
                    postgresql_ops={"folder": "text_pattern_ops"}, postgresql_include=["size"])


def downgrade() -> None:
    op.drop_index("ix_files_owner_folder", table_name="files")
    op.drop_index("ix_files_owner_path", table_name="files")
    op.drop_column("files", "folder")
    op.drop_column("users", "quota")
