"""media probing: state, result, lease and the derived kind of every File

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None



def upgrade() -> None:
    op.add_column("files", sa.Column("media_state", sa.Text(), server_default="pending", nullable=False))
    op.add_column("files", sa.Column("media", postgresql.JSONB(), nullable=True))
    op.add_column("files", sa.Column("media_lease_until", sa.DateTime(timezone=True), nullable=True))
    op.add_column("files", sa.Column("media_kind", sa.Text(), server_default="other", nullable=False))
    # Existing images, videos and audio are probed on the first start after the upgrade; the rest
    # are known at once (as mediad.db.initial_media decides for new content).
    op.execute("UPDATE files SET media_kind = split_part(format, '/', 1) "
               "WHERE split_part(format, '/', 1) IN ('image', 'video', 'audio')")
    op.execute("""UPDATE files SET media_state = 'ready', media = '{"kind": "other", "status": "ready", """
               """"error": null}'::jsonb WHERE media_kind = 'other'""")
    op.create_check_constraint(op.f("ck_files_media_state"), "files",
                               "media_state IN ('pending', 'ready', 'failed')")
    op.create_index(op.f("ix_files_media_state"), "files", ["media_state"])


def downgrade() -> None:
    op.drop_index(op.f("ix_files_media_state"), table_name="files")
    op.drop_constraint(op.f("ck_files_media_state"), "files", type_="check")
    for column in ("media_kind", "media_lease_until", "media", "media_state"):
        op.drop_column("files", column)
