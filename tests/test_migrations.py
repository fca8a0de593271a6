"""Alembic owns the schema: it goes up, down and up again, and matches the Core tables."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import fresh_database
from sqlalchemy.ext.asyncio import create_async_engine

from mediad import migrate
from mediad.db import async_url, metadata


async def _tables_and_diff(url: str) -> tuple[set[str], list]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            def inspect(sync_conn: sa.Connection) -> tuple[set[str], list]:
                context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                return set(sa.inspect(sync_conn).get_table_names()), compare_metadata(context, metadata)
            return await conn.run_sync(inspect)
    finally:
        await engine.dispose()


def test_upgrade_downgrade_upgrade_and_no_drift(pg_server_url: str) -> None:
    with fresh_database(pg_server_url) as url:
        migrate.upgrade(url)
        tables, diff = asyncio.run(_tables_and_diff(url))
        assert {"users", "tokens", "files", "alembic_version"} <= tables
        assert diff == [], f"Core tables and migrations disagree: {diff}"

        migrate.downgrade(url, "base")
        tables, _ = asyncio.run(_tables_and_diff(url))
        assert tables == {"alembic_version"}

        migrate.upgrade(url)
        tables, diff = asyncio.run(_tables_and_diff(url))
        assert {"users", "tokens", "files"} <= tables
        assert diff == []


def test_migrations_started_together_take_turns(pg_server_url: str) -> None:
    """A server and a cleanup worker (or two nodes) may migrate a new database at the same moment."""
    with fresh_database(pg_server_url) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
        env["MEDIAD_DATABASE_URL"] = url
        runs = [subprocess.Popen([sys.executable, "-m", "mediad.cli", "migrate"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
        results = [(run.wait(60), run.stderr.read().decode()[-2000:] if run.stderr else "") for run in runs]
        assert [code for code, _ in results] == [0, 0, 0], results
        tables, diff = asyncio.run(_tables_and_diff(url))
        assert "files" in tables and diff == []
