"""Alembic migration scripts, installed as mediad.migrations."""
