"""change notifications: triggers that pg_notify 'mediad_changes' when a token, a user or a file changes

Processes that cache authorization and file lookups (mediad/cache.py) LISTEN on the channel and
drop what a notification names. The triggers are in the database, not in mediad's code, so every
writer invalidates: another node, the CLI, psql, a future migration. NOTIFY is delivered when the
writing transaction commits, and not at all when it rolls back.

Payloads (one line of text, well under NOTIFY's 8000-byte limit):
  t <token_hash hex>   a token row was updated or deleted
  u <user id>          a user row was updated or deleted (drops everything of that user)
  f <file id>          a file row was inserted, deleted, or updated in a column a download uses
  *                    one of the tables was truncated (drops everything)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Columns whose change no cached answer depends on: bookkeeping written on every access, push
# attempt or token use would otherwise flood the channel and empty the caches. Every other
# column, including those added later, invalidates by default. Naming a column that does not
# exist (yet) is harmless: jsonb `-` ignores missing keys.
_FILES_VOLATILE = ("accessed_at", "cloud_attempts", "cloud_next_attempt_at", "cloud_last_error",
                   "cloud_lease_until", "cloud_stored_at")
_TOKENS_VOLATILE = ("last_used_at",)
_USERS_VOLATILE = ("last_login_at",)


def _array(columns: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join(f"'{c}'" for c in columns) + "]::text[]"


def upgrade() -> None:
    op.execute(f"""
        CREATE FUNCTION mediad_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            subject record := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
            volatile text[] := CASE TG_TABLE_NAME WHEN 'files' THEN {_array(_FILES_VOLATILE)}
                                                  WHEN 'tokens' THEN {_array(_TOKENS_VOLATILE)}
                                                  ELSE {_array(_USERS_VOLATILE)} END;
        BEGIN
            IF TG_LEVEL = 'STATEMENT' THEN  -- TRUNCATE fires no row triggers
                PERFORM pg_notify('mediad_changes', '*');
                RETURN NULL;
            END IF;
            IF TG_OP = 'UPDATE' AND (to_jsonb(OLD) - volatile) IS NOT DISTINCT FROM (to_jsonb(NEW) - volatile) THEN
                RETURN NULL;  -- nothing a cached answer depends on has changed
            END IF;
            IF TG_TABLE_NAME = 'tokens' THEN
                -- An UPDATE that changes the hash itself must drop the old one.
                PERFORM pg_notify('mediad_changes', 't ' || encode(OLD.token_hash, 'hex'));
            ELSIF TG_TABLE_NAME = 'users' THEN
                PERFORM pg_notify('mediad_changes', 'u ' || OLD.id::text);
            ELSE
                PERFORM pg_notify('mediad_changes', 'f ' || subject.id::text);
                IF TG_OP = 'UPDATE' AND OLD.id <> NEW.id THEN
                    PERFORM pg_notify('mediad_changes', 'f ' || OLD.id::text);
                END IF;
            END IF;
            RETURN NULL;
        END
        $$
    """)
    op.execute("CREATE TRIGGER tokens_notify_change AFTER UPDATE OR DELETE ON tokens "
               "FOR EACH ROW EXECUTE FUNCTION mediad_notify_change()")
    op.execute("CREATE TRIGGER users_notify_change AFTER UPDATE OR DELETE ON users "
               "FOR EACH ROW EXECUTE FUNCTION mediad_notify_change()")
    op.execute("CREATE TRIGGER files_notify_change AFTER INSERT OR UPDATE OR DELETE ON files "
               "FOR EACH ROW EXECUTE FUNCTION mediad_notify_change()")
    for table in ("tokens", "users", "files"):
        op.execute(f"CREATE TRIGGER {table}_notify_truncate AFTER TRUNCATE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION mediad_notify_change()")


def downgrade() -> None:
    for table in ("files", "users", "tokens"):
        op.execute(f"DROP TRIGGER {table}_notify_truncate ON {table}")
        op.execute(f"DROP TRIGGER {table}_notify_change ON {table}")
    op.execute("DROP FUNCTION mediad_notify_change()")
